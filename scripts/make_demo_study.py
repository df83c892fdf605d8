"""Build the demo input from ../shared/data (read in place, written under out/):
the two real CR files as they are, plus one study of Kermany test radiographs
(NORMAL and PNEUMONIA) wrapped as CR DICOM."""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dicom_io.convert import cr_from_pixels  # noqa: E402

# Fixed, reviewed picks from the 624-image test split (one of each class, and two more).
DEMO_IMAGES = [
    "test/NORMAL/IM-0001-0001.jpeg",
    "test/PNEUMONIA/person100_bacteria_475.jpeg",
    "test/NORMAL/IM-0003-0001.jpeg",
    "test/PNEUMONIA/person1_virus_6.jpeg",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not (args.shared / "dicom").is_dir():
        print(f"error: shared data not found at {args.shared} (pass --shared)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted((args.shared / "dicom").glob("*.dcm")):
        shutil.copyfile(path, args.out / path.name)
    kermany = args.shared / "kermany-cxr224"
    labels = {row["path"]: row["class_name"] for row in csv.DictReader(open(kermany / "manifest.csv"))}
    for number, rel in enumerate(DEMO_IMAGES, start=1):
        if rel not in labels:
            print(f"error: {rel} is not in the Kermany manifest", file=sys.stderr)
            return 2
        pixels = np.asarray(Image.open(kermany / rel).convert("L"), dtype=np.uint8)
        ds = cr_from_pixels(pixels, patient_id="MXDEMO", patient_name="Demo^Kermany", study_key="kermany-demo",
                            instance_key=rel, instance_number=number,
                            study_description="CHEST (Kermany CC BY 4.0 demo)")
        ds.save_as(args.out / f"kermany-{number}-{labels[rel].lower()}.dcm", enforce_file_format=True)
    print(f"demo study written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
