"""DICOM networking with pynetdicom: C-STORE out (SCU) and a small Storage SCP.

- :func:`cstore` sends datasets to a peer AE (e.g. the hospital PACS) over one
  association and checks every response status; any failure raises
  :class:`DeliveryError`, whose message names the peer AE and the failing SOP
  class but never patient data.
- :class:`StorageSCP` is a Storage SCP that accepts only configured calling AE
  titles and hands every received instance (with the bytes exactly as sent) to a
  callback that returns the C-STORE status. ``pipeline.pacs.dicom_node`` builds the
  standalone medxplain node on it; tests use it as a stand-in PACS.

No torch and no ``config`` import here: a destination is any object with
``ae_title``, ``host``, ``port`` and ``calling_ae_title`` attributes (such as
``config.schema.CStoreDestination``).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.status import STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS, Status, code_to_category

__all__ = [
    "COMMON_TRANSFER_SYNTAXES",
    "DeliveryError",
    "CStoreDestinationLike",
    "ReceivedInstance",
    "StorageSCP",
    "cstore",
    "STATUS_SUCCESS",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_NOT_AUTHORISED",
    "STATUS_CANNOT_UNDERSTAND",
]

LOGGER = logging.getLogger("medxplain.dicom_io.network")

STATUS_SUCCESS = int(Status.SUCCESS)
STATUS_NOT_AUTHORISED = 0x0124
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

#: Transfer syntaxes the SCP accepts: the uncompressed ones and the compressed
#: ones pydicom + pylibjpeg decode (radiographs arrive in any of these).
COMMON_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
_UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128  # per association request (PS3.8: odd context ids 1..255)


class CStoreDestinationLike(Protocol):
    ae_title: str
    host: str
    port: int
    calling_ae_title: str


class DeliveryError(Exception):
    """A C-STORE delivery failed. The message names the peer AE and, where one
    instance failed, its SOP class; never patient data.

    Attributes: ``ae_title``, ``host``, ``port``, ``sop_class_uid`` (or None when
    the association itself failed), ``status`` (the failing DIMSE status, or None),
    ``transient`` (False when retrying cannot help without a configuration change,
    e.g. the peer permanently rejects our calling AE title).
    """

    def __init__(self, message: str, *, ae_title: str, host: str, port: int,
                 sop_class_uid: str | None = None, status: int | None = None, transient: bool = True):
        super().__init__(message)
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.sop_class_uid = sop_class_uid
        self.status = status
        self.transient = transient


def _sop_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else str(uid)


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(ts)
    # A dataset built in memory without file meta: the encoding it was read with
    # decides, else pydicom's default for new datasets (Explicit VR Little Endian).
    implicit, little = ds.original_encoding
    if little is False:
        return UID(ExplicitVRBigEndian)
    return UID(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)


def _requested_contexts(plan: Sequence[tuple[str, UID]]) -> list[Any]:
    """Presentation contexts for (SOP class, transfer syntax) pairs.

    Per SOP class: one context with the uncompressed little-endian syntaxes
    (pynetdicom converts between them, and a compressed dataset is decompressed
    into it if the peer refuses the compressed syntax), plus one context per
    other syntax the datasets use, proposed as-is (compressed pixel data is never
    re-encoded when the peer accepts it).
    """
    from pynetdicom import build_context

    contexts = []
    seen: set[tuple[str, str]] = set()
    for sop_class in dict.fromkeys(sop for sop, _ in plan):
        syntaxes = [ts for sop, ts in plan if sop == sop_class]
        native_le = [ts for ts in syntaxes if ts in _UNCOMPRESSED_LE]
        contexts.append(build_context(sop_class, list(dict.fromkeys([*native_le, *_UNCOMPRESSED_LE]))))
        seen.update((sop_class, ts) for ts in _UNCOMPRESSED_LE)
        for ts in syntaxes:
            if (sop_class, ts) not in seen:
                seen.add((sop_class, ts))
                contexts.append(build_context(sop_class, [ts]))
    return contexts


def _association_failure(assoc: Any, connected: bool, where: str, ae_title: str, host: str,
                         port: int) -> DeliveryError:
    if assoc.is_rejected:
        primitive = getattr(assoc.acceptor, "primitive", None)
        result = getattr(primitive, "result_str", None) or "rejected"
        reason = getattr(primitive, "reason_str", None) or "no reason given"
        # rejected-permanent with 'calling AE title not recognised' (0x03) or
        # 'called AE title not recognised' (0x07): fixing needs configuration.
        permanent = getattr(primitive, "result", None) == 0x01
        return DeliveryError(f"{where}: association {result} by the peer: {reason}", ae_title=ae_title,
                             host=host, port=port, transient=not permanent)
    if not connected:
        return DeliveryError(f"{where}: could not connect (connection refused, unreachable, or timed out)",
                             ae_title=ae_title, host=host, port=port)
    if assoc.is_aborted:
        return DeliveryError(f"{where}: association aborted by the peer", ae_title=ae_title, host=host, port=port)
    return DeliveryError(f"{where}: association not established (no response within the timeout)",
                         ae_title=ae_title, host=host, port=port)


def cstore(datasets: Iterable[Dataset], destination: CStoreDestinationLike, timeout_s: float = 30) -> None:
    """Send ``datasets`` to ``destination`` by C-STORE over one association.

    Every response status is checked: success (0x0000) and the Storage warning
    statuses (0xB000, 0xB006, 0xB007: stored with coercion, logged) count as
    delivered; anything else, a refused connection, a rejected or aborted
    association, or a timeout raises :class:`DeliveryError` naming the AE and the
    failing SOP class. Instances before the failing one were stored; a retry
    resends all of them (deterministic UIDs make that idempotent at the peer).
    """
    from pynetdicom import AE, evt

    datasets = list(datasets)
    ae_title = str(destination.ae_title)
    host, port = str(destination.host), int(destination.port)
    where = f"C-STORE to {ae_title} at {host}:{port}"
    if not datasets:
        return
    plan: list[tuple[str, UID]] = []
    for i, ds in enumerate(datasets):
        if not isinstance(ds, Dataset):
            raise TypeError(f'Argument "datasets" item {i} must be a pydicom Dataset, got {type(ds).__name__}.')
        for keyword in ("SOPClassUID", "SOPInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f'Argument "datasets" item {i} has no {keyword}.')
        plan.append((str(ds.SOPClassUID), _transfer_syntax(ds)))
    contexts = _requested_contexts(plan)
    if len(contexts) > _MAX_CONTEXTS:
        raise DeliveryError(f"{where}: {len(contexts)} presentation contexts needed, at most {_MAX_CONTEXTS} "
                            "fit one association; send fewer SOP classes/transfer syntaxes at once",
                            ae_title=ae_title, host=host, port=port, transient=False)

    ae = AE(ae_title=str(destination.calling_ae_title))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    connected = threading.Event()
    try:
        assoc = ae.associate(host, port, contexts=contexts, ae_title=ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.set())])
    except (OSError, ValueError) as exc:  # e.g. an unresolvable host name
        raise DeliveryError(f"{where}: {type(exc).__name__}: {exc}", ae_title=ae_title, host=host, port=port) from exc
    if not assoc.is_established:
        raise _association_failure(assoc, connected.is_set(), where, ae_title, host, port)
    responsive = True  # False once the peer stopped answering: abort instead of release
    try:
        for index, (ds, (sop_class, ts)) in enumerate(zip(datasets, plan), start=1):
            what = f"{where}: {_sop_name(sop_class)}, instance {index} of {len(datasets)}"
            meta = getattr(ds, "file_meta", None)
            if meta is None or not meta.get("TransferSyntaxUID"):
                ds = _with_transfer_syntax(ds, ts)
            try:
                status = assoc.send_c_store(ds, msg_id=index % 65536)
            except ValueError as exc:
                if "presentation context" not in str(exc):  # pydicom could not encode it
                    raise DeliveryError(f"{what}: cannot encode the data set ({type(exc).__name__})",
                                        ae_title=ae_title, host=host, port=port, sop_class_uid=sop_class,
                                        transient=False) from exc
                # No accepted context for its transfer syntax: decompress if that helps.
                status = _send_decompressed(assoc, ds, ts, index, what, exc, ae_title, host, port, sop_class)
            code = status.get("Status") if status is not None else None
            if code is None:
                responsive = False
                if assoc.is_aborted:
                    raise DeliveryError(f"{what}: association aborted", ae_title=ae_title, host=host, port=port,
                                        sop_class_uid=sop_class)
                raise DeliveryError(f"{what}: no response (timed out after {timeout_s:g} s or invalid response)",
                                    ae_title=ae_title, host=host, port=port, sop_class_uid=sop_class)
            if code == STATUS_SUCCESS:
                continue
            # Storage warnings (PS3.4 B.2.3: coercion, elements discarded, data set does
            # not match the SOP class) mean the peer stored it: delivered, and logged.
            if code_to_category(code) == STATUS_WARNING:
                LOGGER.warning("%s: stored with warning status 0x%04X", what, code)
                continue
            # The peer's ErrorComment is free text: kept out of the message (no patient data in logs).
            raise DeliveryError(f"{what}: failed with status 0x{code:04X} ({_status_meaning(code)})",
                                ae_title=ae_title, host=host, port=port, sop_class_uid=sop_class, status=code,
                                transient=not (code in (0x0122, 0x0124) or 0xA900 <= code <= 0xA9FF))
    except BaseException:
        if assoc.is_established:
            assoc.release() if responsive else assoc.abort()
        raise
    assoc.release()


def _status_meaning(code: int) -> str:
    """The Storage service's name for a status (PS3.4 Annex B.2.3, pynetdicom's table)."""
    return STORAGE_SERVICE_CLASS_STATUS.get(code, ("Failure", "failure"))[1] or "failure"


def _with_transfer_syntax(ds: Dataset, ts: UID) -> Dataset:
    from pydicom.dataset import FileMetaDataset

    copy = Dataset(ds)  # shallow: shares the elements, not the file meta
    copy.file_meta = FileMetaDataset()
    copy.file_meta.TransferSyntaxUID = ts
    return copy


def _send_decompressed(assoc: Any, ds: Dataset, ts: UID, msg_id: int, what: str, error: Exception,
                       ae_title: str, host: str, port: int, sop_class: str) -> Dataset:
    if not ts.is_compressed:
        raise DeliveryError(f"{what}: the peer accepted no presentation context for it ({error})",
                            ae_title=ae_title, host=host, port=port, sop_class_uid=sop_class, transient=False)
    import copy as _copy

    plain = _copy.deepcopy(ds)
    try:
        # A change of transfer syntax keeps the instance's identity (and its
        # LossyImageCompression history): same SOP Instance UID.
        plain.decompress(generate_instance_uid=False)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a delivery failure with a reason
        raise DeliveryError(f"{what}: the peer refused {ts.name} and decompressing failed: "
                            f"{type(exc).__name__}", ae_title=ae_title, host=host, port=port,
                            sop_class_uid=sop_class, transient=False) from exc
    LOGGER.info("%s: peer refused %s, sent decompressed", what, ts.name)
    try:
        return assoc.send_c_store(plain, msg_id=msg_id)
    except ValueError as exc:
        raise DeliveryError(f"{what}: the peer accepted no presentation context for it ({exc})",
                            ae_title=ae_title, host=host, port=port, sop_class_uid=sop_class,
                            transient=False) from exc


# --------------------------------------------------------------------------- SCP


@dataclass
class ReceivedInstance:
    """One instance received by :class:`StorageSCP`."""

    calling_ae_title: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    _event: Any

    @property
    def dataset(self) -> Dataset:
        """The decoded dataset (pixel data as sent, not decompressed), with file meta."""
        ds = self._event.dataset
        ds.file_meta = self._event.file_meta
        return ds

    def encoded(self) -> bytes:
        """The instance in the DICOM file format: preamble, file meta, and the data
        set bytes exactly as the peer sent them (never decoded and re-encoded)."""
        return self._event.encoded_dataset(include_meta=True)


class StorageSCP:
    """A Storage SCP on (host, port) that accepts only ``allowed_calling_ae_titles``.

    - Every storage SOP class with :data:`COMMON_TRANSFER_SYNTAXES`, and
      Verification (C-ECHO).
    - An association from a calling AE title not in the list is rejected
      (rejected-permanent, "calling AE title not recognised"); an *empty* list
      rejects everyone. With ``require_called_ae_title`` the called AE title must
      be ours too.
    - ``on_store(instance) -> status`` runs in the association's thread for each
      C-STORE; an exception in it answers 0xA700 (out of resources) and is logged.
    - ``on_rejected(calling_ae_title, address, reason)`` is told of refused associations.
    """

    # An empty allowed list must refuse everyone, but pynetdicom treats an empty
    # require_calling_aet as "no check". This placeholder takes its place, and
    # every C-STORE is checked against the real list again (0x0124 Not authorised).
    _NOBODY = "-NOBODY ALLOWED-"

    def __init__(self, *, ae_title: str, host: str, port: int, allowed_calling_ae_titles: Iterable[str],
                 on_store: Callable[[ReceivedInstance], int],
                 on_rejected: Callable[[str, str, str], None] | None = None,
                 require_called_ae_title: bool = True,
                 transfer_syntaxes: Sequence[str] = COMMON_TRANSFER_SYNTAXES,
                 maximum_associations: int = 10, timeout_s: float = 60):
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.allowed = frozenset(t.strip() for t in allowed_calling_ae_titles if t.strip())
        self.on_store = on_store
        self.on_rejected = on_rejected
        self.require_called_ae_title = require_called_ae_title
        self.transfer_syntaxes = list(transfer_syntaxes)
        self.maximum_associations = maximum_associations
        self.timeout_s = timeout_s
        self._server: Any = None
        self._lock = threading.Lock()

    @property
    def refuses_everyone(self) -> bool:
        return not self.allowed

    def start(self) -> int:
        """Start listening in background threads; returns the bound port (useful with port 0)."""
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.require_calling_aet = sorted(self.allowed) or [self._NOBODY]
        ae.require_called_aet = self.require_called_ae_title
        ae.maximum_associations = self.maximum_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, self.transfer_syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_REJECTED, self._handle_rejected)]
        with self._lock:
            if self._server is not None:
                raise RuntimeError("StorageSCP already started")
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
            self.port = int(self._server.server_address[1])
        return self.port

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop listening; let running associations finish for up to ``drain_s``,
        then abort them (a peer whose store was cut short got no success and resends)."""
        import time

        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + drain_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()

    def __enter__(self) -> "StorageSCP":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handle_rejected(self, event: Any) -> None:
        if self.on_rejected is None:
            return
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title).strip()
        called = str(getattr(requestor.primitive, "called_ae_title", "") or "").strip()
        if calling not in self.allowed:
            reason = "calling AE title not allowed"
        elif self.require_called_ae_title and called != self.ae_title.strip():
            reason = f"called AE title {called!r} is not ours ({self.ae_title!r})"
        else:
            reason = "too many associations"
        try:
            self.on_rejected(calling, f"{requestor.address}:{requestor.port}", reason)
        except Exception:  # noqa: BLE001 - a notification must never break the server
            LOGGER.exception("on_rejected callback failed")

    def _handle_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        if calling not in self.allowed:  # second gate, see _NOBODY
            LOGGER.warning("refused C-STORE of %s from calling AE %r: not allowed", _sop_name(sop_class), calling)
            return STATUS_NOT_AUTHORISED
        instance = ReceivedInstance(calling_ae_title=calling, sop_class_uid=sop_class,
                                    sop_instance_uid=str(request.AffectedSOPInstanceUID),
                                    transfer_syntax_uid=str(event.context.transfer_syntax), _event=event)
        try:
            return int(self.on_store(instance))
        except Exception:  # noqa: BLE001 - answer a failure; never drop silently
            LOGGER.exception("storing %s from %s failed", _sop_name(sop_class), calling)
            return STATUS_OUT_OF_RESOURCES
