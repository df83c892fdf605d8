"""Per-epoch checkpoints for the explainers' training loops: resumable, refused
when they were written for a different setup.

``last.ckpt`` holds everything needed to go on (networks, optimisers, epoch, log,
best-so-far); ``best.ckpt`` holds the weights of the best validation epoch only.
Both are our own files, read with ``weights_only=True`` (no arbitrary objects).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainingState:
    """Where a run stands: the next epoch, the best so far and the log rows."""

    start_epoch: int = 0
    best_epoch: int = -1
    best_key: tuple[float, ...] | None = None
    log: list[dict[str, float]] = field(default_factory=list)

    @property
    def elapsed_s(self) -> float:
        return self.log[-1]["seconds"] if self.log else 0.0


class EpochCheckpoints:
    """last.ckpt and best.ckpt of one training folder, refused for another setup (``fingerprint``)."""

    def __init__(self, directory: Path, fingerprint: str, parts: dict[str, Any], best_parts: tuple[str, ...]):
        """``parts``: name -> module or optimiser (anything with state_dict / load_state_dict);
        ``best_parts``: the names whose weights best.ckpt keeps."""
        self.directory, self.fingerprint, self.parts, self.best_parts = directory, fingerprint, parts, best_parts
        self.last, self.best = directory / "last.ckpt", directory / "best.ckpt"

    def resume(self) -> TrainingState:
        """Load last.ckpt into the parts (ValueError if written for another setup);
        a fresh state when there is none."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.last.exists():
            if self.best.exists():
                self.best.unlink()  # left by an interrupted first epoch of another run
            return TrainingState()
        state = torch.load(self.last, weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.last} was written for a different setup ({state['fingerprint']}), not "
                             f"{self.fingerprint}; delete {self.directory} to start afresh")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        best_epoch = int(state["best_epoch"])
        return TrainingState(
            start_epoch=int(state["epoch"]) + 1, best_epoch=best_epoch,
            best_key=tuple(state["best_key"].tolist()) if best_epoch >= 0 else None,
            log=[dict(zip(state["log_keys"], row.tolist())) for row in state["log"]])

    def end_epoch(self, epoch: int, key: tuple[float, ...], state: TrainingState) -> bool:
        """Record an epoch (its log row already appended); True when it is the new best."""
        improved = state.best_key is None or key > state.best_key
        if improved:
            state.best_key, state.best_epoch = key, epoch
            torch.save({name: self.parts[name].state_dict() for name in self.best_parts}, self.best)
        keys = list(state.log[0].keys())
        torch.save({
            **{name: part.state_dict() for name, part in self.parts.items()},
            "epoch": epoch, "best_epoch": state.best_epoch,
            "best_key": torch.tensor(state.best_key, dtype=torch.float64),
            "fingerprint": self.fingerprint, "log_keys": keys,
            "log": torch.tensor([[row[k] for k in keys] for row in state.log], dtype=torch.float64),
        }, self.last)
        return improved

    def load_best(self) -> None:
        """Load best.ckpt's parts (a no-op when no epoch finished)."""
        if self.best.exists():
            saved = torch.load(self.best, weights_only=True)
            for name in self.best_parts:
                self.parts[name].load_state_dict(saved[name])
