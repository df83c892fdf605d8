#!/usr/bin/env bash
# One install for every path (README, make demo, make test, CI, docker):
# Debian packages (Orthanc + its Python plugin, dcmtk, dicom3tools), a Python 3.11
# venv in .venv, and the project with its pinned dependencies.
# Idempotent: re-running skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(orthanc orthanc-python dcmtk dicom3tools python3-venv python3-dev)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== apt: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv must be Debian's Python 3.11: the Orthanc plugin embeds the same interpreter.
PYTHON=/usr/bin/python3.11
[ -x "$PYTHON" ] || { echo "error: $PYTHON not found (Debian 12's python3.11 is required)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "== venv: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.medxplain-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== pip: installing the project and its pinned dependencies"
  # torch first, pinned, so that no other requirement pulls a multi-GB CUDA build.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
echo "== install: ready (.venv/bin/medxplain)"
