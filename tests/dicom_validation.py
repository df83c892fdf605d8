"""Run dicom3tools' ``dciodvfy`` (and dcmtk's ``dsrdump``) from the tests.

``dciodvfy`` prints one line per finding on stderr: ``Error - ...``,
``Warning - ...`` (and ``Abort - ...`` when it cannot read the file). We split
them; the tests require zero errors and report the warnings.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

__all__ = ["dciodvfy", "dcentvfy", "assert_valid", "dsrdump", "require_tool"]


def require_tool(name: str) -> str:
    """Path of a command-line tool, or skip the test with a clear message."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian packages dicom3tools / dcmtk)")
    return path


def dciodvfy(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """Run ``dciodvfy`` on a file; return (errors, warnings) as lists of lines."""
    exe = require_tool("dciodvfy")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return _split(proc.stderr + "\n" + proc.stdout)


def _split(output: str) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    warnings: list[str] = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith(("Error", "Abort")):
            errors.append(line)
        elif line.startswith("Warning"):
            warnings.append(line)
    return errors, warnings


def dcentvfy(paths: list[str | os.PathLike[str]]) -> tuple[list[str], list[str]]:
    """Run ``dcentvfy`` (entity consistency across files of one study); (errors, warnings)."""
    exe = require_tool("dcentvfy")
    proc = subprocess.run([exe, *map(str, paths)], capture_output=True, text=True, timeout=120)
    return _split(proc.stderr + "\n" + proc.stdout)


def _write_temp(ds: Dataset) -> Path:
    handle, name = tempfile.mkstemp(suffix=".dcm", prefix="medxplain-")
    os.close(handle)
    ds.save_as(name, enforce_file_format=True)
    return Path(name)


def assert_valid(ds_or_path: Dataset | str | os.PathLike[str]) -> list[str]:
    """Require zero dciodvfy errors for a dataset (written to a temp file) or a file.

    Returns the warnings, so the caller can print or check them.
    """
    if isinstance(ds_or_path, Dataset):
        path = _write_temp(ds_or_path)
        try:
            errors, warnings = dciodvfy(path)
        finally:
            path.unlink(missing_ok=True)
    else:
        errors, warnings = dciodvfy(ds_or_path)
    if errors:
        raise AssertionError("dciodvfy reported errors:\n" + "\n".join(errors))
    return warnings


def dsrdump(path: str | os.PathLike[str], *options: str) -> subprocess.CompletedProcess[str]:
    """Run dcmtk's ``dsrdump`` (``+Pl`` prints long values in full, ``+Pu`` referenced UIDs)."""
    exe = require_tool("dsrdump")
    return subprocess.run([exe, *options, str(path)], capture_output=True, text=True, timeout=120)
