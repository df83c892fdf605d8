"""Deterministic DICOM UIDs for medxplain output.

Re-running the same explainer with the same bundle and settings on the same
source instance must give byte-identical identifiers, so that a PACS sees the
same SOP Instance again (and overwrites or ignores it) instead of collecting
duplicates. We therefore never use random UIDs for output objects.

Route: ISO/IEC 9834-8 / ITU-T X.667 "2.25." UIDs built from a name-based
(version 5, SHA-1) UUID of the joined parts. ``pydicom.uid.generate_uid`` is
*not* used: with ``prefix=None`` it ignores ``entropy_srcs`` and returns a
random UUID, and with entropy it would use pydicom's own organisation root and
concatenate the parts without a separator (so ``("ab", "c")`` and
``("a", "bc")`` would collide).
"""
from __future__ import annotations

import hashlib
import uuid

from pydicom.uid import UID

__all__ = ["MEDXPLAIN_UUID_NAMESPACE", "derived_uid", "instance_uid", "series_uid"]

#: Fixed namespace for all medxplain name-based UUIDs (uuid5 of our project URL).
MEDXPLAIN_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medxplain:dicom-output:v1")

# Unit separator: cannot occur in UIDs, hex digests or sane settings keys, and
# makes the joined string an unambiguous encoding of the tuple of parts.
_SEP = "\x1f"


def derived_uid(*parts: str) -> UID:
    """Return a deterministic ``2.25.<decimal UUID>`` UID for ``parts``.

    The same parts, in the same order, always give the same UID; any change of
    any part gives a different one. At most 44 characters (well under the 64
    allowed for the UI VR).
    """
    if len(parts) == 0:
        raise ValueError('Argument "parts" must contain at least one string.')
    for i, part in enumerate(parts):
        if not isinstance(part, str):
            raise TypeError(
                f'Argument "parts" item {i} must be a str, got {type(part).__name__}.'
            )
        if _SEP in part:
            raise ValueError(f'Argument "parts" item {i} must not contain the \\x1f separator.')
    name = _SEP.join(parts)
    return UID(f"2.25.{uuid.uuid5(MEDXPLAIN_UUID_NAMESPACE, name).int}")


def instance_uid(
    *,
    source_sop_instance_uid: str,
    bundle_sha256: str,
    settings_key: str,
    kind: str,
    index: int = 0,
) -> UID:
    """SOP Instance UID of one output object derived from one source instance."""
    return derived_uid(
        "instance", str(source_sop_instance_uid), bundle_sha256, settings_key, kind, str(int(index))
    )


def series_uid(
    *,
    source_study_instance_uid: str,
    settings_key: str,
    kind: str,
    extra: str = "",
) -> UID:
    """Series Instance UID of an output series within the source study.

    One series per (study, explainer settings, object kind); ``extra`` splits it
    further where one series per source instance is wanted (counterfactual
    paths, so that each path scrolls as its own stack).
    """
    return derived_uid("series", str(source_study_instance_uid), settings_key, kind, extra)


def hash_text(value: str) -> str:
    """A pseudonymous token for an identifier (a UID, a file name) in logs and folder names.

    ``sha256(value)`` as hex, first 16 characters: stable, so lines about the same study
    can be joined, and no patient or study identifier appears in clear.
    """
    return hashlib.sha256(str(value).encode()).hexdigest()[:16]
