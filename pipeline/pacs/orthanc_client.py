"""A small client for Orthanc's REST API, on the standard library only.

The worker talks to Orthanc with its own user (HTTP basic auth); the password
comes from the environment variable named in ``config.orthanc.password_env``,
never from a file in the repository.

Errors are typed by what the caller should do about them:

- ``OrthancUnavailable``: connection refused or reset, timeout, HTTP 5xx.
  Transient: the job is retried with back-off.
- ``OrthancRequestError``: HTTP 4xx (unknown resource, bad credentials, a file
  Orthanc refuses). Not transient; ``.status`` tells which (404: the study was
  deleted).
- ``OrthancConfigError``: the client cannot be set up (password variable unset).

Messages name the method and URL path (Orthanc ids, never patient data) and
Orthanc's own short error message; request bodies (which hold UIDs or DICOM
files) never appear in them.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

__all__ = [
    "OrthancClient",
    "OrthancConfigError",
    "OrthancError",
    "OrthancRequestError",
    "OrthancUnavailable",
]


class OrthancError(Exception):
    """Base class of every error of this client."""

    def __init__(self, message: str, *, method: str = "", path: str = "", status: int | None = None):
        self.method = method
        self.path = path
        self.status = status
        super().__init__(message)


class OrthancUnavailable(OrthancError):
    """Orthanc cannot be reached or failed on its side (5xx): retry later."""


class OrthancRequestError(OrthancError):
    """Orthanc refused the request (4xx): retrying the same request will not help."""


class OrthancConfigError(OrthancError):
    """The client is not configured (e.g. the password variable is not set)."""


# What a dropped or half-answered connection raises below urllib.
_NETWORK_ERRORS = (ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException, OSError)


class OrthancClient:
    """``OrthancClient("http://127.0.0.1:8042", "medxplain", "secret")``.

    Proxies from the environment are ignored on purpose: the worker sends patient
    images, and they go to the configured Orthanc only, never through an
    ``http_proxy`` that happens to be set for something else.
    """

    def __init__(self, url: str, username: str | None = None, password: str | None = None, *,
                 timeout_s: float = 60.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise OrthancConfigError(f"Orthanc URL must be http(s)://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers: dict[str, str] = {}
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_config(cls, orthanc: Any) -> "OrthancClient":
        """From a ``config.schema.OrthancConfig``; the password is read from the environment."""
        password = os.environ.get(orthanc.password_env)
        if not password:
            raise OrthancConfigError(
                f"environment variable {orthanc.password_env} is not set: it must hold the password of "
                f"Orthanc user {orthanc.username!r} (config orthanc.password_env)")
        return cls(orthanc.url, orthanc.username, password, timeout_s=orthanc.timeout_s)

    # -- transport ------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> bytes:
        """One HTTP request; the answer's body, or a typed error."""
        if not path.startswith("/"):
            path = "/" + path
        headers = dict(self._headers)
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        where = f"{method} {path}"
        try:
            with self._opener.open(req, timeout=self.timeout_s) as answer:
                return answer.read()
        except urllib.error.HTTPError as exc:
            detail = _orthanc_message(exc)
            message = f"{where}: HTTP {exc.code}{' ' + detail if detail else ''}"
            kind = OrthancUnavailable if exc.code >= 500 else OrthancRequestError
            raise kind(message, method=method, path=path, status=exc.code) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
            raise OrthancUnavailable(f"{where}: Orthanc at {self.url} unreachable ({text})",
                                     method=method, path=path) from None
        except _NETWORK_ERRORS as exc:
            raise OrthancUnavailable(f"{where}: connection to {self.url} failed ({type(exc).__name__})",
                                     method=method, path=path) from None

    def get_json(self, path: str) -> Any:
        return self._json("GET", path, self.request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self.request("GET", path)

    def post_json(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._json("POST", path, self.request("POST", path, data, "application/json"))

    def _json(self, method: str, path: str, data: bytes) -> Any:
        try:
            return json.loads(data) if data else None
        except ValueError:
            raise OrthancUnavailable(f"{method} {path}: answer is not JSON", method=method, path=path) from None

    # -- the calls the worker needs ---------------------------------------------
    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """Every series of the study (``ID``, ``Instances``, ``MainDicomTags``...)."""
        return self.get_json(f"/studies/{_id(study_id)}/series")

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM Part 10 file of an instance."""
        return self.get_bytes(f"/instances/{_id(instance_id)}/file")

    def post_instance(self, data: bytes) -> dict[str, Any]:
        """Store a DICOM Part 10 file; returns Orthanc's answer (``ID``, ``Status``...)."""
        path = "/instances"
        answer = self._json("POST", path, self.request("POST", path, data, "application/dicom"))
        status = answer.get("Status") if isinstance(answer, dict) else None
        if status not in ("Success", "AlreadyStored"):
            raise OrthancRequestError(f"POST {path}: Orthanc did not store the instance (Status {status!r})",
                                      method="POST", path=path)
        return answer

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Orthanc resources with this DICOM UID (``[{"ID", "Type", "Path"}]``; empty if none)."""
        answer = self.post_json("/tools/lookup", uid.encode("ascii"))
        return list(answer or [])

    def has_instance(self, sop_instance_uid: str) -> bool:
        return any(item.get("Type") == "Instance" for item in self.lookup(sop_instance_uid))


def _id(resource_id: str) -> str:
    """Orthanc ids are hex groups joined by dashes; refuse anything that could change the path."""
    text = str(resource_id)
    if not text or any(c not in "0123456789abcdefABCDEF-" for c in text):
        raise OrthancRequestError(f"not an Orthanc resource id: {text[:80]!r}")
    return text


def _orthanc_message(exc: urllib.error.HTTPError) -> str:
    """Orthanc's short error text ("Unknown resource"), never the request or its details."""
    try:
        body = json.loads(exc.read() or b"{}")
    except (ValueError, OSError, http.client.HTTPException):
        return ""
    if isinstance(body, dict):
        message = body.get("Message") or body.get("OrthancError")
        if isinstance(message, str):
            return f"({message[:200]})"
    return ""
