#!/usr/bin/env bash
# One install for every path (README, make demo, make test, CI, docker):
# Debian packages (Orthanc + its Python, DICOMweb and Web Viewer plugins, dcmtk,
# dicom3tools, Chromium for the viewer test, Redis for queue.backend celery), a Python 3.11 venv in .venv, the project
# with its pinned dependencies, and the OHIF Viewer (npm @ohif/app, prebuilt) in .viewer/.
# Idempotent: re-running skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(orthanc orthanc-python orthanc-dicomweb orthanc-webviewer dcmtk dicom3tools python3-venv python3-dev redis-server
              chromium)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
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
# OHIF, served by Orthanc under /ohif/ (pipeline/pacs/viewer.py): the prebuilt app of the pinned
# release, fetched with `npm pack` (the package only, no dependencies, no build).
if ! .venv/bin/python -c "import sys; from pipeline.pacs.viewer import installed; sys.exit(0 if installed() else 1)"; then
  OHIF_VERSION=$(.venv/bin/python -c "from pipeline.pacs.viewer import OHIF_VERSION; print(OHIF_VERSION)")
  echo "== npm: OHIF @ohif/app@$OHIF_VERSION"
  rm -rf .viewer/npm && mkdir -p .viewer/npm
  (cd .viewer/npm && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  tar -xzf ".viewer/npm/ohif-app-$OHIF_VERSION.tgz" -C .viewer/npm
  .venv/bin/python -m pipeline.pacs.viewer .viewer/npm/package/dist
  rm -rf .viewer/npm
fi
echo "== install: ready (.venv/bin/medxplain)"
