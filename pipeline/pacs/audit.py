"""The worker's audit trail: one JSON line per job, without patient data.

A line says what a job did (instances seen, explained, skipped with their
reasons, already done; objects stored per destination; time; outcome; error),
never who it was about: no names, patient IDs, accession numbers, and no UIDs in
clear (UIDs and the job key appear as ``sha256(value)[:16]``).

Error texts come from deep inside libraries and may quote a UID or, in the worst
case, a header value; ``Redactor.scrub`` replaces every UID-shaped token by its
hash and every identifying value seen during the job by ``[redacted]`` before a
text reaches the audit log, the queue's last error or the log.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_io.uids import hash_text

__all__ = ["AuditLog", "JobAudit", "Redactor", "ScrubUIDsFilter"]

# A DICOM UID: at least five components (IPv4 addresses and versions have fewer), or
# a UUID-derived UID, "2.25." and the UUID as one decimal number (PS3.5 B.2), which has
# only three; its long last component tells it from a version number.
_UID = re.compile(r"(?<![\w.])(?:[0-9]+(?:\.[0-9]+){4,}|2\.25\.[0-9]{6,}(?:\.[0-9]+)*)(?![\w.])")
# Attributes whose values identify the patient (or lead to them).
_IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
                "AccessionNumber", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
                "ReferringPhysicianName", "InstitutionName", "StudyID")


class Redactor:
    """Collects identifying values of the datasets a job reads; scrubs texts of them."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add_dataset(self, ds: Any) -> None:
        for keyword in _IDENTIFYING:
            try:
                value = ds.get(keyword) if hasattr(ds, "get") else None
            except Exception:  # a corrupt element: nothing to collect from it
                continue
            if value is None:
                continue
            values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            for item in values:
                text = str(item).strip()
                self._add(text)
                # Person names: also each component ("Doe^John" -> "Doe", "John").
                for part in re.split(r"[\^=\s]+", text):
                    self._add(part)

    def _add(self, text: str) -> None:
        if len(text) >= 3:  # shorter values ("M", "12") would redact half of every message
            self._values.add(text)

    def scrub(self, text: str | None) -> str | None:
        if text is None:
            return None
        for value in sorted(self._values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, "[redacted]")
        return _UID.sub(lambda m: "uid:" + hash_text(m.group(0)), text)


class ScrubUIDsFilter(logging.Filter):
    """A logging filter (put it on the handler) that hashes every UID in every record,
    ours and third-party ones (highdicom logs source UIDs at INFO)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = _UID.sub(lambda m: "uid:" + hash_text(m.group(0)), message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, ()
        return True


_MAX_LISTED = 100  # failed images listed by name in one audit line; the count is always complete


@dataclass
class JobAudit:
    """What one job did; ``record()`` is the audit line."""

    job_id: str
    key: str
    kind: str
    attempt: int = 0
    seen: int = 0
    explained: int = 0
    already_done: int = 0
    skipped: Counter = field(default_factory=Counter)
    failed: int = 0  # eligible images whose explanation raised
    #: per image that failed for good: {"instance": hashed label, "reason": stable code}
    failures: list = field(default_factory=list)
    #: reader notes on doubtful headers, by code (e.g. presentation_lut_inverse)
    warnings: Counter = field(default_factory=Counter)
    stored: Counter = field(default_factory=Counter)
    profiles: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n
        self.seen += n

    def fail(self, instance: str, reason: str) -> None:
        """An eligible image that cannot be explained (deterministic: not retried)."""
        self.failed += 1
        if len(self.failures) < _MAX_LISTED:
            self.failures.append({"instance": instance, "reason": reason})

    def summary(self) -> dict[str, Any]:
        """Counts, and the failed images by hashed label: also the queue's result of a done job."""
        return {
            "instances": {"seen": self.seen, "explained": self.explained, "skipped": sum(self.skipped.values()),
                          "already_done": self.already_done, "failed": self.failed},
            "skipped": dict(sorted(self.skipped.items())),
            "failures": list(self.failures),
            "warnings": dict(sorted(self.warnings.items())),
            "outputs_stored": dict(sorted(self.stored.items())),
            "profiles": dict(sorted(self.profiles.items())),
            "ms": round((time.perf_counter() - self.started) * 1000.0, 1),
        }

    def record(self, outcome: str, error: str | None = None) -> dict[str, Any]:
        return {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "job": self.job_id,
            "key": hash_text(self.key),
            "kind": self.kind,
            "attempt": self.attempt,
            **self.summary(),
            "outcome": outcome,
            "error": error,
        }


class AuditLog:
    """Append-only JSON-lines file; each line is written with a single ``write`` in
    append mode, so lines of several workers never interleave."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=False, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
