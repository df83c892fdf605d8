"""The decoded source radiograph that flows from the reader to preprocessing and writers."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class SourceImage:
    """A single-frame 2-D grayscale radiograph, decoded and ready for display.

    ``display`` is float32 (rows, cols) in [0, 1] after the Modality LUT and the
    VOI LUT / window, in MONOCHROME2 sense (higher = brighter; MONOCHROME1 is
    inverted). ``dataset`` is the full source header, kept so that writers can
    reference the source and copy patient/study attributes.
    """

    dataset: Dataset
    display: np.ndarray
    path: Path | None = None
    #: what the reader decided about doubtful headers, ``"code: text"`` (no patient data).
    warnings: tuple[str, ...] = ()
    #: per-source memo of derived headers (``dicom_io.patient_study.writer_reference``).
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rows(self) -> int:
        return int(self.display.shape[0])

    @property
    def columns(self) -> int:
        return int(self.display.shape[1])

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)
