"""Serve a prebuilt single-page web app (OHIF) from Orthanc itself: standard library only.

Orthanc's REST callbacks go through Orthanc's own HTTP server, so the app has
Orthanc's origin and authentication, and reaches the DICOMweb plugin without
CORS. What Orthanc's ServeFolders plugin lacks and a single-page app needs: an
unknown route (``/ohif/viewer``, no file extension) is answered with
``index.html``, so the app's router takes over. A missing file *with* an
extension is a 404 (a wrong asset must not come back as HTML). Paths are
resolved inside the folder only (no ``..``, no symlinks out of it).
"""
import mimetypes
import os
import re

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".map": "application/json",
}
# Bundler output names carry a content hash: cache them; index.html and app-config.js never.
_HASHED = re.compile(r"\.[0-9a-f]{8,}\.")


class StaticApp:
    """The files of ``folder`` under the URL path ``prefix`` (e.g. ``/ohif``)."""

    def __init__(self, folder, prefix="/ohif"):
        self.folder = os.path.realpath(folder)
        self.prefix = "/" + prefix.strip("/")
        if not os.path.isfile(os.path.join(self.folder, "index.html")):
            raise ValueError("%s has no index.html (run scripts/install.sh)" % self.folder)

    @property
    def route(self):
        """The regular expression Orthanc's RegisterRestCallback matches."""
        return re.escape(self.prefix) + "(/.*)?"

    def resolve(self, rest):
        """File path for the part of the URL after the prefix, or None (404)."""
        rest = (rest or "/").split("?", 1)[0].lstrip("/")
        path = os.path.realpath(os.path.join(self.folder, rest or "index.html"))
        if path != self.folder and not path.startswith(self.folder + os.sep):
            return None
        if os.path.isfile(path):
            return path
        if "." not in os.path.basename(rest):
            return os.path.join(self.folder, "index.html")  # a route of the app
        return None

    @staticmethod
    def content_type(path):
        ext = os.path.splitext(path)[1].lower()
        return _TYPES.get(ext) or mimetypes.guess_type(path)[0] or "application/octet-stream"

    def answer(self, output, uri, **request):
        if request.get("method") != "GET":
            return output.SendMethodNotAllowed("GET")
        groups = request.get("groups") or ()
        rest = groups[0] if groups else None
        if rest is None:  # "/ohif" itself: relative asset URLs need the slash
            return output.Redirect(self.prefix + "/")
        path = self.resolve(rest)
        if path is None:
            return output.SendHttpStatusCode(404)
        with open(path, "rb") as f:
            body = f.read()
        name = os.path.basename(path)
        output.SetHttpHeader("Cache-Control", "public, max-age=86400" if _HASHED.search(name) else "no-cache")
        output.AnswerBuffer(body, self.content_type(path))
