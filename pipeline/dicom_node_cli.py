"""CLI commands for the PACS side (filled in by the Orthanc-plugin issue)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `medxplain` app."""
