"""Explain files and folders into an output folder (the CLI's `explain`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dicom_io.errors import DicomInputError
from dicom_io.output import is_medxplain_output
from dicom_io.reader import read_radiograph
from dicom_io.source import SourceImage
from dicom_io.uids import hash_text
from pipeline.engine import Engine, ImageResult


@dataclass
class FileOutcome:
    path: Path
    result: ImageResult | None = None
    error: str | None = None  # "reason: message" when the file failed or was skipped
    skipped: str | None = None  # "reason: message" when the engine declined it (e.g. out_of_domain)
    written: list[Path] = field(default_factory=list)
    folder: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given; folders recursively (sorted, hidden files and DICOMDIR skipped)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")
        else:
            files.append(path)
    return files


def output_folder(out: Path, source: SourceImage) -> Path:
    """One folder per source image, named by a hash of its UID (no patient data in paths)."""
    return out / hash_text(source.sop_instance_uid)


def write_result(result: ImageResult, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for ds in result.datasets():  # the SR comes last
        name = f"{ds.Modality}-{ds.SeriesNumber}-{ds.InstanceNumber}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def explain_paths(engine: Engine, paths: list[Path], out: Path,
                  on_file: Callable[[FileOutcome], None] | None = None) -> list[FileOutcome]:
    """Read every file (recording each failure with its reason), explain the good
    ones in batches, write their objects, and return one outcome per file."""
    outcomes: list[FileOutcome] = []
    pending: list[tuple[FileOutcome, SourceImage]] = []

    def run(batch: list[tuple[FileOutcome, SourceImage]]) -> list:
        """Results of a batch; a failing batch is run image by image, so that one bad
        image fails alone (with its reason) and the others are still explained."""
        try:
            return engine.run([source for _, source in batch])
        except Exception as exc:  # one bad image must not lose the rest of the run
            if len(batch) > 1:
                return [result for item in batch for result in run([item])]
            reason = exc.reason if isinstance(exc, DicomInputError) else "explain_failed"
            batch[0][0].error = f"{reason}: {type(exc).__name__}: {exc}"
            return [None]

    def flush() -> None:
        for (outcome, _), result in zip(pending, run(pending)):
            if result is None:
                if on_file:
                    on_file(outcome)
                continue
            outcome.result = result
            if result.skipped:  # not explained (e.g. out_of_domain): the reason, no outputs
                outcome.skipped = result.skipped
            else:
                outcome.folder = output_folder(out, result.source)
                outcome.written = write_result(result, outcome.folder)
            if on_file:
                on_file(outcome)
        pending.clear()

    for path in expand_inputs(paths):
        outcome = FileOutcome(path)
        outcomes.append(outcome)
        try:
            source = read_radiograph(path)
        except DicomInputError as exc:
            outcome.error = f"{exc.reason}: {exc}"
        else:
            if is_medxplain_output(source.dataset):
                outcome.error = "medxplain_output: our own output is never explained again"
            elif source.rows * source.columns > engine.config.max_pixels:
                outcome.error = (f"too_large: {source.rows}x{source.columns} exceeds max_pixels "
                                 f"{engine.config.max_pixels}")
            else:
                pending.append((outcome, source))
        if outcome.error and on_file:
            on_file(outcome)
        if len(pending) >= engine.config.batch_size:
            flush()
    if pending:
        flush()
    return outcomes
