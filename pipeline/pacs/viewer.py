"""OHIF served by the same Orthanc: where the app lives and how it is prepared.

The app is the prebuilt static OHIF Viewer from the npm package ``@ohif/app``
(``dist/``), fetched at install time by ``scripts/install.sh`` (``npm pack``, no
dependencies, no build) into ``.viewer/`` and prepared here for one origin:

- It is served under ``/ohif/`` by medxplain's Orthanc plugin
  (:mod:`orthanc_plugin.viewer`), so it shares Orthanc's origin and HTTP
  authentication and its DICOMweb plugin (``/dicom-web``) needs no CORS.
  Orthanc's ServeFolders plugin cannot do this alone: OHIF's client-side routes
  (``/ohif/viewer?StudyInstanceUIDs=…``) must fall back to ``index.html``.
- The published build assumes the server root (``window.PUBLIC_URL="/"``,
  ``/app-config.js``, the bundler's public path ``"/"``; OHIF documents a rebuild
  with ``PUBLIC_URL`` to move it). :func:`prepare_ohif` rewrites those few
  absolute references to ``/ohif/`` instead, and writes an ``app-config.js``
  whose only data source is this Orthanc's DICOMweb (relative URLs: the origin
  the page came from).

Nothing is downloaded at run time; the prepared folder is read-only input.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import quote

from config.schema import PROJECT_ROOT

__all__ = ["OHIF_VERSION", "OHIF_PREFIX", "ohif_folder", "prepare_ohif", "study_url", "ViewerError"]

#: The pinned OHIF release (npm ``@ohif/app``); scripts/install.sh fetches this one.
OHIF_VERSION = "3.13.2"
#: URL path under which Orthanc serves OHIF.
OHIF_PREFIX = "/ohif/"
_STAMP = ".medxplain-ohif"


class ViewerError(RuntimeError):
    """The OHIF app is missing or not prepared; the message says what to run."""


def ohif_folder() -> Path:
    """Where scripts/install.sh puts the prepared app."""
    return PROJECT_ROOT / ".viewer" / "ohif"


def installed(folder: Path | None = None) -> bool:
    folder = folder or ohif_folder()
    stamp = folder / _STAMP
    return stamp.is_file() and json.loads(stamp.read_text()).get("version") == OHIF_VERSION


def _app_config(prefix: str) -> str:
    base = prefix.rstrip("/")
    return f"""/* Written by medxplain (pipeline/pacs/viewer.py): OHIF {OHIF_VERSION} served by Orthanc under {prefix},
   its only data source this Orthanc's DICOMweb plugin on the same origin. */
window.config = {{
  routerBasename: '{base}',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: {{ option: 'never' }},
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {{
        friendlyName: 'medxplain Orthanc',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/wado',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {{ enabled: true, relativeResolution: 'studies' }},
      }},
    }},
  ],
}};
"""


def prepare_ohif(dist: Path, target: Path, *, prefix: str = OHIF_PREFIX) -> Path:
    """Copy OHIF's ``dist/`` to ``target`` and rebase it from ``/`` to ``prefix``.

    Raises :class:`ViewerError` when ``dist`` is not an OHIF build this function
    knows how to rebase (an index.html without ``window.PUBLIC_URL="/"``, or no
    bundle with the bundler's public path ``"/"``): a silently half-rebased app
    would load a blank page.
    """
    dist, target = Path(dist), Path(target)
    index = dist / "index.html"
    if not index.is_file():
        raise ViewerError(f"{dist} is not OHIF's dist folder (no index.html)")
    if not (prefix.startswith("/") and prefix.endswith("/")):
        raise ViewerError(f'prefix must start and end with "/", got {prefix!r}')
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(dist, target)
    html = (target / "index.html").read_text()
    if 'window.PUBLIC_URL="/"' not in html:
        raise ViewerError("index.html does not set window.PUBLIC_URL=\"/\": unknown OHIF build")
    html = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{prefix}"')
    html = re.sub(r'(href|src)="/(?!/)', rf'\1="{prefix}', html)
    (target / "index.html").write_text(html)
    public_path = re.compile(r'(__webpack_require__\.p\s*=\s*)"/"')
    rebased = 0
    for bundle in target.glob("*.js"):
        text = bundle.read_text(errors="surrogateescape")
        new, n = public_path.subn(rf'\1"{prefix}"', text)
        if n:
            bundle.write_text(new, errors="surrogateescape")
            rebased += n
    if not rebased:
        raise ViewerError('no bundle sets the public path "/": unknown OHIF build')
    for sheet in target.glob("*.css"):  # fonts referenced from the root
        text = sheet.read_text(errors="surrogateescape")
        sheet.write_text(re.sub(r"url\(/(?!/)", f"url({prefix}", text), errors="surrogateescape")
    (target / "app-config.js").write_text(_app_config(prefix))
    (target / _STAMP).write_text(json.dumps({"version": OHIF_VERSION, "prefix": prefix}) + "\n")
    return target


def study_url(orthanc_url: str, study_instance_uid: str) -> str:
    """Link that opens a study in OHIF served by the Orthanc at ``orthanc_url``."""
    return f"{orthanc_url.rstrip('/')}{OHIF_PREFIX}viewer?StudyInstanceUIDs={quote(study_instance_uid)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare OHIF's prebuilt app to be served by Orthanc.")
    parser.add_argument("dist", type=Path, help="the dist/ folder of the npm package @ohif/app")
    parser.add_argument("--target", type=Path, default=None, help="default: .viewer/ohif")
    args = parser.parse_args(argv)
    try:
        out = prepare_ohif(args.dist, args.target or ohif_folder())
    except ViewerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"OHIF {OHIF_VERSION} prepared in {out} (served under {OHIF_PREFIX})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
