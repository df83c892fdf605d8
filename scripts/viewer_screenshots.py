"""Screenshots of every medxplain series of some studies, as OHIF (served by the same
Orthanc under /ohif/) shows them in Debian's Chromium, driven by Playwright.

Used by scripts/demo.sh. Playwright comes from PyPI (the test extra); the browser is
/usr/bin/chromium (Debian), never one that Playwright downloads.

    python scripts/viewer_screenshots.py URL PASSWORD OUT STUDY_UID...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.pacs import orthanc_launcher as launcher  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOWN = "() => { const e = window.cornerstone && window.cornerstone.getRenderingEngines()[0];" \
        " const v = e && e.getViewports()[0]; return !!(v && v.getCurrentImageId && v.getCurrentImageId()); }"


def descriptions(url: str, password: str, study_uid: str) -> list[str]:
    status, body = launcher.request(f"{url}/tools/find", user=launcher.ADMIN_USER, password=password,
                                    method="POST", body=json.dumps({
                                        "Level": "Series", "Expand": True,
                                        "Query": {"StudyInstanceUID": study_uid}}).encode())
    if status != 200:
        raise SystemExit(f"/tools/find: HTTP {status}")
    found = [str(s["MainDicomTags"].get("SeriesDescription", "")) for s in json.loads(body)]
    return sorted(d for d in found if d.upper().startswith("MEDXPLAIN"))


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    url, password, out, studies = argv[0], argv[1], Path(argv[2]), argv[3:]
    from playwright.sync_api import Error, sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(http_credentials={"username": launcher.ADMIN_USER, "password": password},
                                      viewport={"width": 1400, "height": 900})
        context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        page = context.new_page()
        for n, study in enumerate(studies, 1):
            page.goto(f"{url}/ohif/viewer?StudyInstanceUIDs={study}")
            try:
                page.wait_for_function(SHOWN, timeout=60_000)
            except Error:
                print(f"  study {n}: OHIF showed no image within 60 s; skipped")
                continue
            for description in descriptions(url, password, study):
                page.get_by_text(description, exact=True).first.dblclick()
                page.wait_for_timeout(4000)
                name = out / f"study{n}-{description.lower().replace(' ', '_')}.png"
                page.screenshot(path=str(name))
                print(f"  {name}")
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
