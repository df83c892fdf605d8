"""A fake clock for the queue, the worker and the DICOM node: tests advance time
instead of sleeping (no wall-clock windows in assertions)."""
from __future__ import annotations


class FakeClock:
    """``clock()`` returns ``now``; ``advance(s)`` moves it forward."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
