#!/usr/bin/env bash
# The end-to-end PACS demo (run through `make demo`, which installs first):
#   1. build the demo studies from ../shared/data (scripts/make_demo_study.py) and
#      explain them on the command line (`medxplain explain`: summary table per file);
#   2. start Orthanc with the medxplain plugin and worker (`medxplain orthanc`,
#      data in out/demo/orthanc, loopback ports, authentication on);
#   3. send the studies with dcmtk's storescu, as a modality would;
#   4. wait until the worker has written the results into the same studies;
#   5. print what was made and where to see it; stop Orthanc unless
#      MEDXPLAIN_DEMO_KEEP=1 (then stop it with `medxplain orthanc --stop --data ...`).
# Each run starts with an empty out/demo/orthanc (storage, queue, credentials).
# Settings: MEDXPLAIN_DEMO_OUT (out/demo), MEDXPLAIN_DEMO_HTTP_PORT (8043),
# MEDXPLAIN_DEMO_DICOM_PORT (4243), MEDXPLAIN_DEMO_EXPLAINERS (gradcam,ig,occlusion),
# MEDXPLAIN_DEMO_PACS_EXPLAINERS (gradcam,sagen,gvr: a baseline, an amortised generative
# method and a per-image search), MEDXPLAIN_DEMO_TIMEOUT (seconds to wait for results, 900).
# The end: per study a link that opens it in OHIF served by the same Orthanc, and OHIF
# screenshots of every medxplain series in $OUT/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${MEDXPLAIN_DEMO_OUT:-out/demo}
DATA="$OUT/orthanc"
HTTP_PORT=${MEDXPLAIN_DEMO_HTTP_PORT:-8043}
DICOM_PORT=${MEDXPLAIN_DEMO_DICOM_PORT:-4243}
EXPLAINERS=${MEDXPLAIN_DEMO_EXPLAINERS:-gradcam,ig,occlusion}
PACS_EXPLAINERS=${MEDXPLAIN_DEMO_PACS_EXPLAINERS:-gradcam,sagen,gvr}
TIMEOUT=${MEDXPLAIN_DEMO_TIMEOUT:-900}
MEDXPLAIN=.venv/bin/medxplain

command -v storescu >/dev/null || { echo "error: storescu not found (Debian package dcmtk)" >&2; exit 2; }

rm -rf "$OUT/input" "$OUT/results"
.venv/bin/python scripts/make_demo_study.py --out "$OUT/input"

echo
echo "== 1. On the command line: medxplain explain (summary table per file) =="
$MEDXPLAIN explain "$OUT/input" --out "$OUT/results" --explainers "$EXPLAINERS"
echo "DICOM objects written under $OUT/results/<image hash>/ ; read an SR with: dsrdump $OUT/results/*/SR-*.dcm"

echo
echo "== 2. In the PACS: Orthanc + medxplain plugin + worker =="

# Each demo starts afresh: a demo Orthanc left running is stopped, its data folder emptied.
$MEDXPLAIN orthanc --stop --data "$DATA" >/dev/null
rm -rf "$DATA"
$MEDXPLAIN orthanc --data "$DATA" --http-port "$HTTP_PORT" --dicom-port "$DICOM_PORT" --stable-age 2 \
  --explainers "$PACS_EXPLAINERS"

stop_orthanc() {
  if [ "${MEDXPLAIN_DEMO_KEEP:-0}" != "1" ]; then
    echo
    echo "Stopping Orthanc (set MEDXPLAIN_DEMO_KEEP=1 to leave it running)."
    $MEDXPLAIN orthanc --stop --data "$DATA"
  fi
}
trap stop_orthanc EXIT

echo
echo "Sending the demo studies with storescu ..."
# -xy: propose JPEG baseline besides the uncompressed syntaxes (one demo file is JPEG),
# so that every file is sent as it is, without conversion.
storescu -aet STORESCU -aec ORTHANC -xy 127.0.0.1 "$DICOM_PORT" "$OUT"/input/*.dcm

echo "Waiting for the results (StableAge 2 s, then the worker runs $PACS_EXPLAINERS on the CPU/GPU) ..."
status=0
.venv/bin/python - "$DATA" "$HTTP_PORT" "$TIMEOUT" "$OUT/input" "$OUT/study_uids.txt" <<'PY' || status=$?
import hashlib
import json
import sys
import time
from pathlib import Path

import pydicom

from pipeline.pacs import orthanc_launcher as launcher
from pipeline.pacs.viewer import study_url

data, port, timeout, inputs = Path(sys.argv[1]).resolve(), int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
uid_list = Path(sys.argv[5])
url = f"http://127.0.0.1:{port}"
password = launcher.credentials(data)["users"][launcher.ADMIN_USER]


def get(path):
    status, body = launcher.request(url + path, user=launcher.ADMIN_USER, password=password, timeout=30)
    if status != 200:
        raise SystemExit(f"GET {path}: HTTP {status}")
    return json.loads(body)


sent = {(str(ds.PatientID), str(ds.StudyInstanceUID))
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(inputs.glob("*.dcm")))}
studies = ["-".join(h[i:i + 8] for i in range(0, 40, 8))
           for h in (hashlib.sha1(f"{pid}|{uid}".encode()).hexdigest() for pid, uid in sorted(sent))]
start, last = time.monotonic(), None
while True:
    listed = get("/medxplain/jobs?limit=200")["jobs"]
    jobs = {j["study"]: j for j in reversed(listed)}  # the newest job of each study
    states = [jobs.get(s, {}).get("state", "waiting") for s in studies]
    line = ", ".join(f"{states.count(s)} {s}" for s in ("waiting", "pending", "leased", "done", "dead")
                     if states.count(s))
    if line != last:
        print(f"  [{time.monotonic() - start:5.0f} s] {len(studies)} studies: {line}", flush=True)
        last = line
    if all(s in ("done", "dead") for s in states):
        break
    if time.monotonic() - start > timeout:
        raise SystemExit(f"timed out after {timeout:.0f} s; see {data}/worker.log and {url}/medxplain/jobs")
    time.sleep(1)

print()
print(f"Results (in {time.monotonic() - start:.0f} s):")
for sid in studies:
    study = get(f"/studies/{sid}")
    job = jobs[sid]
    print(f"  study {sid[:17]}…  {study['MainDicomTags'].get('StudyDescription', '')!r}: job {job['state']}"
          + (f" — {job['last_error']}" if job["state"] == "dead" else ""))
    print(f"    open in OHIF: {study_url(url, study['MainDicomTags']['StudyInstanceUID'])}")
    # A study may have had several jobs (a re-sent image re-fires it); add them up.
    done = [j["result"] for j in listed if j["study"] == sid and j.get("result")]
    explained = sum(r["instances"]["explained"] for r in done)
    reasons = {}
    for r in done:
        for reason, n in (r.get("skipped") or {}).items():
            if reason != "medxplain_output":  # our own results, listed below
                reasons[reason] = reasons.get(reason, 0) + n
    print(f"    images explained: {explained}" + (f"; skipped: {reasons}" if reasons else "")
          + f"; worker time {sum(r['ms'] for r in done) / 1000:.1f} s")
    for series in get(f"/studies/{sid}/series"):
        tags = series["MainDicomTags"]
        if str(tags.get("SeriesDescription", "")).upper().startswith("MEDXPLAIN"):
            print(f"    {tags.get('Modality', '?'):3s} {tags.get('SeriesDescription')}: "
                  f"{len(series['Instances'])} instance(s)")
uid_list.write_text("".join(get(f"/studies/{sid}")["MainDicomTags"]["StudyInstanceUID"] + "\n"
                           for sid in studies))
counts = get("/medxplain/jobs?limit=1")["counts"]
print()
print(f"Jobs: {counts}")
print(f"See them in OHIF:   {url}/ohif/  (the links above open each study)")
print(f"or in Orthanc's web interface: {url}/app/explorer.html")
print(f"  user '{launcher.ADMIN_USER}', password in {data}/credentials.json")
print(f"Job queue as JSON:  {url}/medxplain/jobs   (same credentials)")
print(f"Audit log:          {data}/audit.jsonl")
sys.exit(1 if counts["dead"] else 0)
PY

if [ -x /usr/bin/chromium ] && [ -s "$OUT/study_uids.txt" ]; then
  echo
  echo "OHIF screenshots of every medxplain series (Debian's Chromium via Playwright):"
  rm -rf "$OUT/screenshots"
  # shellcheck disable=SC2046
  .venv/bin/python scripts/viewer_screenshots.py "http://127.0.0.1:$HTTP_PORT" \
    "$(.venv/bin/python -c "from pipeline.pacs.orthanc_launcher import credentials; import sys; print(credentials(sys.argv[1])['users']['admin'])" "$DATA")" \
    "$OUT/screenshots" $(cat "$OUT/study_uids.txt")
fi
exit $status
