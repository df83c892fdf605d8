"""Typed errors for DICOM input that cannot be used as a 2-D grayscale radiograph.

Every error carries a short machine-readable ``reason`` code (stable: it goes to
the log, the audit trail and the job's dead-letter state) and a human message
that names the file or SOP Instance UID and the attribute at fault. Messages
never contain patient names or IDs; UIDs and file names are fine.

Each class has a fixed vocabulary of reason codes (``REASONS``); the first one
is the default. Catch ``DicomInputError`` to handle every kind of bad input.
"""
from __future__ import annotations

from typing import ClassVar


class DicomInputError(Exception):
    """Base class: this input cannot be read as a single-frame grayscale radiograph."""

    REASONS: ClassVar[tuple[str, ...]] = ("invalid_input",)

    def __init__(self, detail: str, *, source: str | None = None, reason: str | None = None):
        reason = reason if reason is not None else self.REASONS[0]
        if reason not in self.REASONS:
            # A programming error, not bad input: the vocabulary is part of the API.
            raise ValueError(f"{type(self).__name__} has no reason code {reason!r}; use one of {self.REASONS}")
        self.reason = reason
        self.detail = detail
        self.source = source
        super().__init__(f"{source}: {detail}" if source else detail)

    def __reduce__(self):
        # Errors travel between the worker and the queue (multiprocessing pickles
        # them); the default Exception pickling would lose reason and source.
        return (_rebuild, (type(self), self.detail, self.source, self.reason))


def _rebuild(cls: type[DicomInputError], detail: str, source: str | None, reason: str) -> DicomInputError:
    return cls(detail, source=source, reason=reason)


class UnreadableFileError(DicomInputError):
    """The file cannot be opened or parsed as DICOM Part 10."""

    REASONS = ("unparseable", "not_dicom", "empty_file", "file_not_found", "io_error")


class NotAnImageError(DicomInputError):
    """A non-image object: SR, SEG, presentation state, encapsulated document..."""

    REASONS = ("not_an_image",)


class ColourImageError(DicomInputError):
    """More than one sample per pixel, or a colour photometric interpretation."""

    REASONS = ("colour_image",)


class MultiFrameError(DicomInputError):
    """More than one frame, or a slice of a cross-sectional volume (CT, MR, PET)."""

    REASONS = ("multi_frame", "not_projection_radiograph")


class MissingPixelDataError(DicomInputError):
    """An image object without Pixel Data."""

    REASONS = ("missing_pixel_data",)


class CorruptPixelDataError(DicomInputError):
    """Pixel Data is present but cannot be decoded into the declared image."""

    REASONS = ("corrupt_pixel_data",)


class TruncatedPixelDataError(CorruptPixelDataError):
    """Pixel Data is shorter than Rows x Columns x BitsAllocated, or the file ends inside it."""

    REASONS = ("truncated_pixel_data",)


class BadDimensionsError(DicomInputError):
    """Zero or absurd matrix size, or a bit depth this reader does not handle."""

    REASONS = ("zero_dimensions", "too_large", "bad_bit_depth", "too_small")


class InvalidHeaderError(DicomInputError):
    """A required attribute is missing, or an attribute has a value that makes no sense."""

    REASONS = ("missing_attribute", "invalid_attribute", "missing_uid", "invalid_uid")


class BlankImageError(DicomInputError):
    """Every (non-padding) pixel displays as one value: there is nothing to explain."""

    REASONS = ("blank_image",)


class UnsupportedTransferSyntaxError(DicomInputError):
    """No decoder exists (or none is installed) for the file's transfer syntax."""

    REASONS = ("unsupported_transfer_syntax", "decoder_unavailable", "missing_transfer_syntax")


__all__ = [
    "BadDimensionsError",
    "BlankImageError",
    "ColourImageError",
    "CorruptPixelDataError",
    "DicomInputError",
    "InvalidHeaderError",
    "MissingPixelDataError",
    "MultiFrameError",
    "NotAnImageError",
    "TruncatedPixelDataError",
    "UnreadableFileError",
    "UnsupportedTransferSyntaxError",
]
