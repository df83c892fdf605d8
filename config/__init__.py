"""YAML configuration: defaults in medxplain.yaml, validated by the pydantic schema."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.schema import MedxplainConfig

DEFAULT_CONFIG = Path(__file__).with_name("medxplain.yaml")


class ConfigError(Exception):
    """The configuration file is unreadable or has invalid options."""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> MedxplainConfig:
    """Read YAML (default: config/medxplain.yaml), apply CLI overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of options")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return MedxplainConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"{path}: invalid configuration\n" + "\n".join(lines)) from exc


__all__ = ["ConfigError", "MedxplainConfig", "load_config", "DEFAULT_CONFIG"]
