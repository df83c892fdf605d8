#!/usr/bin/env bash
# The end-to-end demo on the shipped demo bundle: build a demo study from
# ../shared/data, explain it, and print the summary table and where the
# DICOM objects are. (Run through `make demo`, which installs first.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${MEDXPLAIN_DEMO_OUT:-out/demo}
rm -rf "$OUT/input"
.venv/bin/python scripts/make_demo_study.py --out "$OUT/input"
.venv/bin/medxplain explain "$OUT/input" --out "$OUT/results" --bundle bundles/demo-pneumonia \
  --explainers gradcam,ig,occlusion
echo
echo "DICOM results: $OUT/results/<image hash>/ (SC overlays, SEG, SR; open them in any DICOM viewer)"
echo "Read an SR:    dsrdump $OUT/results/*/SR-*.dcm | less"
