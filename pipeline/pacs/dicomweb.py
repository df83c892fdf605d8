"""DICOMweb: take studies from any DICOMweb PACS and store results into it.

- ``dicomweb:<StudyInstanceUID>`` jobs (payload ``{"kind": "dicomweb", "study_uid": ...}``,
  queued by ``medxplain jobs add-dicomweb``): the study's series are listed by
  QIDO-RS (DICOM PS3.18 §10.6, *Search Transaction*), each series of our own output
  or of a modality no rule admits is skipped without download, the other instances
  are listed by QIDO-RS and retrieved one by one by WADO-RS (§10.4, *Retrieve
  Transaction*, ``application/dicom`` in the stored transfer syntax).
- ``delivery.dicomweb``: results are stored by STOW-RS (§10.5, *Store Transaction*),
  each image's SR in a request after the objects it references; "already done" is a
  QIDO-RS search for the SR's SOP Instance UID (deterministic: a re-run finds it and
  writes nothing, and a re-sent object keeps its UID, so the PACS holds no duplicate).

The client is ``dicomweb-client`` (PyPI) on a ``requests`` session that ignores proxy
variables (patient images go to the configured server only). Authentication
(``config.dicomweb.auth``): ``basic`` (username + the password in the environment
variable ``password_env``) or ``bearer`` (the token in ``token_env``). Secrets never
appear in logs or errors: messages name the transaction, the HTTP status and a hash
of the study, never a UID, a password or a token.

Errors are typed for the worker's retry rules (``failure_kind``, see
``pipeline.pacs.worker._classify``): :class:`DicomwebUnavailable` (connection refused,
timeout, HTTP 401/403/408/429/5xx: defer, no attempt spent) and
:class:`DicomwebRequestError` (any other 4xx: permanent); :class:`DicomwebConfigError`
when the server or its secret is not configured.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any, Callable

from config.schema import DicomwebConfig

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "DicomwebConfigError",
    "DicomwebError",
    "DicomwebRequestError",
    "DicomwebServer",
    "DicomwebUnavailable",
]

# dicomweb-client logs Study Instance UIDs at INFO: patient data stays out of our logs.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

# Statuses that say "not now" (or "fix the credentials"): the job waits for the server.
_UNAVAILABLE = {401, 403, 408, 429, 500, 502, 503, 504, 507}


class DicomwebError(Exception):
    """Base class; ``status`` is the HTTP status (None: no answer), ``failure_kind`` what
    the worker should do: 'unavailable' (defer), 'permanent' (dead) or 'retry'."""

    failure_kind = "retry"

    def __init__(self, message: str, *, status: int | None = None):
        self.status = status
        super().__init__(message)


class DicomwebUnavailable(DicomwebError):
    failure_kind = "unavailable"


class DicomwebRequestError(DicomwebError):
    failure_kind = "permanent"


class DicomwebConfigError(DicomwebError):
    """No server configured, or the variable holding its secret is unset: nothing is
    wrong with the job, so it waits (like an unreachable server) until the deployment is fixed."""

    failure_kind = "unavailable"


def _short(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


class DicomwebServer:
    """``DicomwebServer(config.dicomweb)``: QIDO-RS, WADO-RS and STOW-RS against one server."""

    def __init__(self, config: DicomwebConfig | None, environ: dict[str, str] | None = None):
        if config is None:
            raise DicomwebConfigError("no DICOMweb server configured (set the `dicomweb` section: url, auth)")
        import requests
        from dicomweb_client.api import DICOMwebClient

        env = os.environ if environ is None else environ
        session = requests.Session()
        session.trust_env = False  # no proxy from the environment, no ~/.netrc credentials
        if config.auth == "basic":
            password = env.get(config.password_env)
            if not config.username or password is None:
                raise DicomwebConfigError(f"dicomweb.auth basic needs dicomweb.username and the password in "
                                          f"${config.password_env}")
            session.auth = (config.username, password)
        elif config.auth == "bearer":
            token = env.get(config.token_env)
            if not token:
                raise DicomwebConfigError(f"dicomweb.auth bearer needs the token in ${config.token_env}")
            session.headers["Authorization"] = f"Bearer {token}"
        self.config = config
        self.session = session
        self.client = DICOMwebClient(config.url, session=session, timeout=config.timeout_s)

    # -- error mapping ------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one transaction; requests' errors become typed errors naming ``what`` only."""
        import requests

        try:
            return fn(*args, **kwargs)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            kind = DicomwebUnavailable if status is None or status in _UNAVAILABLE or status >= 500 \
                else DicomwebRequestError
            raise kind(f"DICOMweb {what}: HTTP {status}", status=status) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise DicomwebUnavailable(f"DICOMweb {what}: server unreachable ({type(exc).__name__})") from None
        except requests.RequestException as exc:
            raise DicomwebUnavailable(f"DICOMweb {what}: {type(exc).__name__}") from None

    # -- QIDO-RS / WADO-RS ---------------------------------------------------------
    def study_series(self, study_uid: str) -> list["Dataset"]:
        """The study's series (QIDO-RS search for series, series-level attributes as a
        pydicom Dataset each: Modality, SeriesDescription, Manufacturer where the server
        returns them). Raises DicomwebRequestError(404) style errors for an unknown study:
        an empty answer is returned as an empty list."""
        from pydicom.dataset import Dataset

        found = self._call(f"QIDO-RS series of study {_short(study_uid)}", self.client.search_for_series,
                           study_instance_uid=study_uid, get_remaining=True,
                           fields=["Modality", "SeriesDescription", "Manufacturer"])
        return [Dataset.from_json(item) for item in found]

    def series_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOP Instance UIDs of one series (QIDO-RS search for instances), sorted."""
        found = self._call(f"QIDO-RS instances of study {_short(study_uid)}", self.client.search_for_instances,
                           study_instance_uid=study_uid, series_instance_uid=series_uid, get_remaining=True)
        uids = []
        for item in found:
            value = (item.get("00080018") or {}).get("Value") or []
            if value:
                uids.append(str(value[0]))
        return sorted(uids)

    def instance(self, study_uid: str, series_uid: str, sop_uid: str) -> "Dataset":
        """WADO-RS retrieve of one instance, in the transfer syntax the server stores."""
        return self._call(f"WADO-RS instance of study {_short(study_uid)}", self.client.retrieve_instance,
                          study_uid, series_uid, sop_uid, media_types=(("application/dicom", "*"),))

    def has_instance(self, sop_uid: str, study_uid: str | None = None) -> bool:
        """Does the server hold this SOP Instance UID (QIDO-RS search for instances)?"""
        found = self._call("QIDO-RS lookup of a result", self.client.search_for_instances,
                           study_instance_uid=study_uid, search_filters={"SOPInstanceUID": sop_uid}, limit=2)
        return any(((item.get("00080018") or {}).get("Value") or [None])[0] == sop_uid for item in found)

    # -- STOW-RS -------------------------------------------------------------------
    def store(self, datasets: list["Dataset"]) -> int:
        """STOW-RS of datasets of one study in one request; every one must be accepted
        (a FailedSOPSequence in the answer raises DicomwebRequestError). Returns the count."""
        if not datasets:
            return 0
        study_uid = str(datasets[0].StudyInstanceUID)
        answer = self._call(f"STOW-RS into study {_short(study_uid)}", self.client.store_instances,
                            datasets, study_instance_uid=study_uid)
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
            raise DicomwebRequestError(f"STOW-RS into study {_short(study_uid)}: {len(failed)} of "
                                       f"{len(datasets)} refused (FailureReason {', '.join(reasons)})")
        return len(datasets)


class StowDelivery:
    """A worker delivery (``pipeline.pacs.worker._Delivery`` protocol): STOW-RS of each image's
    objects, then its SR in a request of its own (so an SR on the server means everything
    it references is there too); ``is_done`` asks QIDO-RS for the SR."""

    name = "dicomweb"

    def __init__(self, server: DicomwebServer):
        self.server = server

    def is_done(self, report_uid: str, source_uid: str) -> bool | None:
        return self.server.has_instance(report_uid)

    def deliver(self, results: list[Any]) -> int:
        stored = 0
        for result in results:
            datasets = list(result.datasets())  # the SR last
            reports = [ds for ds in datasets if str(ds.get("Modality", "")) == "SR"]
            others = [ds for ds in datasets if str(ds.get("Modality", "")) != "SR"]
            stored += self.server.store(others)
            stored += self.server.store(reports)
        return stored
