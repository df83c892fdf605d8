"""medxplain inside Orthanc: the script Orthanc's Python plugin loads.

Runs in Orthanc's embedded interpreter (Debian's /usr/bin/python3.11, not the
venv): standard library plus the project's stdlib-only modules
(pipeline.pacs.jobqueue, dicom_io.output.is_medxplain_output, orthanc_plugin.core).
No torch, no blocking: each callback is a short SQLite write, timed, and any
exception is logged, never raised into Orthanc. The work is done by the worker
(`medxplain worker`), which this script can start and supervise.

Loop guard: Orthanc re-fires STABLE_STUDY whenever an instance joins a study,
our own SC/SEG/SR included. A study is marked only when a non-medxplain
instance arrives; STABLE_STUDY enqueues a job only for a marked study and
clears the mark. Studies whose only new instances are ours never trigger work.

No acknowledged study is lost:

- C-STORE: the study is marked in the incoming-instance filter, *before* Orthanc
  stores the instance and answers. If the queue cannot record it (disk full,
  file unusable, plugin disabled) the C-STORE is refused with 0xA700 (Out of
  resources): the sender keeps the instance and sends it again later.
- REST/DICOMweb uploads (no such filter in Orthanc 1.10): marked in the
  stored-instance callback. While the queue is known unusable, uploads are
  refused by the HTTP filter (403); one that fails in between is remembered in
  memory and written by the reconciliation below (lost only if Orthanc also
  stops before the queue is usable again; the README says so).
- Every instance's study id is Orthanc's own (asked from Orthanc after storage;
  the C-STORE filter computes it by Orthanc's rule from Orthanc's tags).
- Reconciliation (a thread, every ``ReconcileSeconds``): writes remembered
  marks, enqueues marked studies that are stable (a STABLE_STUDY whose enqueue
  failed is not lost), clears marks of deleted studies, and probes the queue.
- Start-up: an emptied or damaged queue file is moved aside, a new one made,
  and every study Orthanc holds is queued again (the worker skips images it
  already explained); the incident is logged, listed in ``/medxplain/jobs`` and
  makes `medxplain orthanc` exit non-zero.

Least privilege: requests by the worker's account (``WorkerUser``) are limited
by an HTTP filter to what the worker needs (core.WORKER_ALLOWED): read a study's
series and instances, download instance files, store results, look up UIDs.

Configuration: the "Medxplain" section (written by pipeline/pacs/orthanc_launcher.py):
ProjectRoot, QueuePath, MaxAttempts, BackoffSeconds, BackoffMaxSeconds,
UnavailableDeadAfterSeconds, ReconcileSeconds, WorkerUser, StartWorker,
WorkerCommand, WorkerEnv, WorkerLog, WorkerPidFile; ViewerFolder and ViewerPrefix
(optional: a prepared OHIF app served under that prefix, see orthanc_plugin/viewer.py).
"""
import json
import os
import sys
import threading
import time
import traceback

import orthanc

CFG, QUEUE, MARKS, TIMES, SUPERVISOR, DISABLED = {}, None, None, None, None, None
# The queue's health as the callbacks last saw it: a failed write makes it "not ok"
# (C-STOREs and uploads refused) until a write succeeds again.
HEALTH = {"ok": True, "reason": None, "since": None}
UNRECORDED = set()          # studies whose mark could not be written (REST uploads): the reconciliation retries
FILTER_MARKED = {}          # SOPInstanceUID -> study id marked by the C-STORE filter, checked after storage
LOCK = threading.Lock()
STOP = threading.Event()
RECONCILER = None
STATUS_OUT_OF_RESOURCES = 0xA700
HTTP_METHODS = {1: "GET", 2: "POST", 3: "PUT", 4: "DELETE"}


def _guarded(kind):
    """Time a callback; log any exception instead of raising it into Orthanc."""
    def wrap(fn):
        def inner(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            except Exception:
                TIMES.counters["errors"] += 1
                orthanc.LogError("medxplain: %s failed: %s" % (fn.__name__, traceback.format_exc(limit=4)))
            finally:
                TIMES.add(kind, (time.perf_counter() - start) * 1000.0)
        return inner
    return wrap


def _queue_failed(what, exc):
    with LOCK:
        TIMES.counters["queue_errors"] += 1
        first = HEALTH["ok"]
        HEALTH.update(ok=False, reason="%s: %s: %s" % (what, type(exc).__name__, exc),
                      since=HEALTH["since"] or time.time())
    if first:
        orthanc.LogError("medxplain: THE JOB QUEUE CANNOT RECORD STUDIES (%s: %s: %s); C-STOREs are refused "
                         "(0xA700) and uploads answered 403 until it can" % (what, type(exc).__name__, exc))


def _queue_ok():
    if not HEALTH["ok"]:
        with LOCK:
            was = HEALTH["reason"]
            HEALTH.update(ok=True, reason=None, since=None)
        orthanc.LogWarning("medxplain: the job queue records studies again (was: %s)" % was)


def _tags(dicom):
    # Main tags only (no pixel data, long values dropped): well under a millisecond. The
    # values are Orthanc's own (DCMTK's): the study id computed from them is Orthanc's.
    return json.loads(dicom.GetInstanceAdvancedJson(
        orthanc.DicomToJsonFormat.HUMAN, orthanc.DicomToJsonFlags.NONE, 256))


def _rule_study(tags):
    return orthanc_study_id(str(tags.get("PatientID") or ""), str(tags.get("StudyInstanceUID") or ""))


def on_incoming_cstore(dicom):
    """Before Orthanc stores a C-STORE'd instance: mark its study, or refuse the
    instance (0xA700) if the queue cannot record it. Returns the DIMSE status."""
    start = time.perf_counter()
    try:
        if MARKS is None:
            if TIMES is not None:
                TIMES.counters["cstore_refused"] += 1
            return STATUS_OUT_OF_RESOURCES  # disabled: nothing could remember this study
        try:
            tags = _tags(dicom)
            if is_medxplain_output(tags):
                return 0
            study = _rule_study(tags)
        except Exception:  # not the queue's fault: accept, the stored callback marks it
            orthanc.LogError("medxplain: C-STORE filter: %s" % traceback.format_exc(limit=3))
            return 0
        try:
            MARKS.mark(study)
        except Exception as exc:
            _queue_failed("marking a study", exc)
            TIMES.counters["cstore_refused"] += 1
            return STATUS_OUT_OF_RESOURCES
        _queue_ok()
        with LOCK:
            if len(FILTER_MARKED) > 10000:  # instances Orthanc then refused: forget the oldest
                FILTER_MARKED.pop(next(iter(FILTER_MARKED)))
            FILTER_MARKED[str(tags.get("SOPInstanceUID") or "")] = study
        return 0
    finally:
        if TIMES is not None:
            TIMES.add("cstore_filter", (time.perf_counter() - start) * 1000.0)


def on_stored_instance(dicom, instance_id):
    tags = _tags(dicom)
    if is_medxplain_output(tags):
        TIMES.counters["stored_ours"] += 1
        return
    TIMES.counters["stored_new"] += 1
    # Orthanc's own id of the study (never an approximation of its rule).
    study = json.loads(orthanc.RestApiGet("/instances/%s/study" % instance_id))["ID"]
    with LOCK:
        marked = FILTER_MARKED.pop(str(tags.get("SOPInstanceUID") or ""), None)
    if marked == study:
        return  # marked before the C-STORE was acknowledged
    if marked is not None:
        TIMES.counters["study_id_mismatch"] += 1
        orthanc.LogError("medxplain: the C-STORE filter computed study %s, Orthanc stored %s; marking Orthanc's"
                         % (marked, study))
    try:
        MARKS.mark(study)
        _queue_ok()
    except Exception as exc:
        _queue_failed("marking an uploaded study", exc)
        with LOCK:
            UNRECORDED.add(study)


def on_http_request(uri, **request):
    """Least privilege for the worker's account; no uploads while the queue cannot record them."""
    method = HTTP_METHODS.get(request.get("method"), str(request.get("method")))
    user = basic_auth_user(request.get("headers") or {})
    if user == CFG.get("WorkerUser"):
        if not worker_may(method, uri):
            TIMES.counters["worker_requests_refused"] += 1
            orthanc.LogWarning("medxplain: refused %s %s for the worker's account (least privilege)"
                               % (method, uri.split("?")[0][:100]))
            return False
        return True
    if method == "POST" and (uri == "/instances" or uri.startswith("/dicom-web/studies")) and not HEALTH["ok"]:
        TIMES.counters["uploads_refused"] += 1
        return False
    return True


def _enqueue(study, recovered=False):
    payload = {"kind": "orthanc", "study": study}
    if recovered:
        payload["recovered"] = True
    job_id, created = QUEUE.enqueue("orthanc:" + study, payload)
    TIMES.counters["enqueued" if created else "merged"] += 1
    orthanc.LogWarning("medxplain: study %s -> job %s (%s)" % (study, job_id, "new" if created else "merged"))
    return job_id


def _take(study):
    try:
        result = MARKS.take(study, _enqueue)
    except Exception as exc:  # the mark stays: the reconciliation enqueues it later
        _queue_failed("enqueuing a stable study", exc)
        return None
    _queue_ok()
    return result


def on_change(change_type, level, resource_id):
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        start = time.perf_counter()
        if _take(resource_id) is None:
            TIMES.counters["stable_skipped"] += 1  # nothing new, or only our own output
        TIMES.add("stable", (time.perf_counter() - start) * 1000.0)
    elif change_type == orthanc.ChangeType.DELETED and level == orthanc.ResourceType.STUDY:
        MARKS.clear(resource_id)
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        # Orthanc does not persist pending STABLE_STUDY events: marks left by a stop or
        # a crash before a study became stable are enqueued now.
        for study in MARKS.studies():
            _take(study)
        if QUEUE.incident is not None:
            _recover_from_orthanc(QUEUE.incident)
        _start_reconciler()
        if SUPERVISOR:
            SUPERVISOR.start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        STOP.set()
        if SUPERVISOR:
            SUPERVISOR.stop()


def _recover_from_orthanc(incident):
    """The queue was emptied or damaged: queue every study Orthanc holds again (the
    worker skips what it already explained: its outputs have deterministic UIDs)."""
    studies = json.loads(orthanc.RestApiGet("/studies"))
    for study in studies:
        _enqueue(study, recovered=True)
    detail = ("%d studies re-queued from Orthanc's own state after the queue was %s"
              % (len(studies), incident["kind"]))
    QUEUE.record_incident("recovered", detail)
    orthanc.LogError("medxplain: QUEUE %s (%s); %s" % (incident["kind"].upper(), incident["detail"], detail))


def reconcile_once():
    """One reconciliation pass (see the module docstring); returns what it did."""
    done = {"written": 0, "enqueued": 0, "cleared": 0}
    try:
        MARKS.probe()
        _queue_ok()
    except Exception as exc:
        _queue_failed("probing the queue", exc)
        return done
    with LOCK:
        pending = list(UNRECORDED)
    for study in pending:
        MARKS.mark(study)
        with LOCK:
            UNRECORDED.discard(study)
        done["written"] += 1
    quiet = float(CFG.get("StableAgeSeconds", 60))
    for study, updated in MARKS.studies_with_time():
        if time.time() - updated < quiet:
            continue  # Orthanc's STABLE_STUDY will come
        try:
            info = json.loads(orthanc.RestApiGet("/studies/%s" % study))
        except Exception:  # unknown resource: the study was deleted
            MARKS.clear(study)
            done["cleared"] += 1
            continue
        if info.get("IsStable") and _take(study) is not None:
            done["enqueued"] += 1
    if any(done.values()):
        orthanc.LogWarning("medxplain: reconciliation: %s" % done)
    return done


def _reconcile_loop():
    interval = float(CFG.get("ReconcileSeconds", 30))
    while not STOP.wait(interval):
        try:
            reconcile_once()
        except Exception:
            orthanc.LogError("medxplain: reconciliation failed: %s" % traceback.format_exc(limit=3))


def _start_reconciler():
    global RECONCILER
    RECONCILER = threading.Thread(target=_reconcile_loop, name="medxplain-reconcile", daemon=True)
    RECONCILER.start()


def _answer(output, status, body):
    text = json.dumps(body, indent=1, default=str)
    if status == 200:
        return output.AnswerBuffer(text, "application/json")
    output.SetHttpHeader("Content-Type", "application/json")
    try:  # orthanc-python 4.0: (status, body, size); later releases: (status, body)
        output.SendHttpStatus(status, text, len(text.encode("utf-8")))
    except TypeError:
        output.SendHttpStatus(status, text.encode("utf-8"))


def rest_jobs(output, uri, **request):
    if request.get("method") != "GET":
        return output.SendMethodNotAllowed("GET")
    if DISABLED:
        return _answer(output, 503, {"error": "medxplain plugin disabled: C-STOREs are refused", "reason": DISABLED})
    query = request.get("get") or {}
    worker = SUPERVISOR.status() if SUPERVISOR else {"supervised": False}
    health = dict(HEALTH, unrecorded_studies=len(UNRECORDED))
    _answer(output, 200, jobs_answer(QUEUE, MARKS, TIMES, worker, state=query.get("state") or None,
                                     limit=max(1, min(1000, int(query.get("limit", 50)))), health=health))


def rest_retry(output, uri, **request):
    if request.get("method") != "POST":
        return output.SendMethodNotAllowed("POST")
    if DISABLED:
        return _answer(output, 503, {"error": "medxplain plugin disabled", "reason": DISABLED})
    job_id = request["groups"][0]
    job = QUEUE.get(job_id)
    if job is None:
        return _answer(output, 404, {"error": "no such job", "id": job_id})
    if not QUEUE.retry(job_id):
        return _answer(output, 409, {"error": "job is %s: only dead or done jobs are retried, and not while the "
                                              "study has an open job" % job.state, "id": job_id})
    _answer(output, 200, {"id": job_id, "state": "pending"})


def _rest(fn):
    def inner(output, uri, **request):
        try:
            fn(output, uri, **request)
        except Exception:
            orthanc.LogError("medxplain: %s %s failed: %s" % (request.get("method"), uri, traceback.format_exc(4)))
            _answer(output, 500, {"error": "internal error, see the Orthanc log"})
    return inner


def _setup():
    global CFG, QUEUE, MARKS, TIMES, SUPERVISOR, DISABLED, is_medxplain_output, orthanc_study_id, jobs_answer, \
        worker_may, basic_auth_user
    try:
        config = json.loads(orthanc.GetConfiguration())
        CFG = config.get("Medxplain") or {}
        CFG.setdefault("StableAgeSeconds", float(config.get("StableAge", 60)) * 2)
        root = CFG.get("ProjectRoot") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root not in sys.path:
            sys.path.insert(0, root)
        from dicom_io.output import is_medxplain_output  # noqa: F811 (stdlib-only at import)
        from orthanc_plugin.core import (
            StudyMarks,
            Timings,
            WorkerSupervisor,
            basic_auth_user,
            jobs_answer,
            orthanc_study_id,
            worker_may,
        )
        from pipeline.pacs.jobqueue import JobQueue

        TIMES = Timings()
        if not CFG.get("QueuePath"):
            raise ValueError('the "Medxplain" configuration section has no "QueuePath"')
        QUEUE = JobQueue(CFG["QueuePath"], max_attempts=int(CFG.get("MaxAttempts", 5)),
                         backoff_s=float(CFG.get("BackoffSeconds", 5)),
                         backoff_max_s=float(CFG.get("BackoffMaxSeconds", 600)),
                         unavailable_dead_after_s=float(CFG.get("UnavailableDeadAfterSeconds", 7 * 86400)),
                         recover=True)
        if QUEUE.incident is not None:
            orthanc.LogError("medxplain: THE JOB QUEUE WAS %s: %s. A new queue was made; every study in Orthanc "
                             "is queued again once Orthanc has started" % (QUEUE.incident["kind"].upper(),
                                                                            QUEUE.incident["detail"]))
        MARKS = StudyMarks(CFG["QueuePath"])
        if CFG.get("StartWorker"):
            if not CFG.get("WorkerCommand"):
                raise ValueError('"StartWorker" is true but "WorkerCommand" is empty')
            SUPERVISOR = WorkerSupervisor(CFG["WorkerCommand"], cwd=root, env=CFG.get("WorkerEnv"),
                                          log_path=CFG.get("WorkerLog"), pid_path=CFG.get("WorkerPidFile"),
                                          log_warning=orthanc.LogWarning, log_error=orthanc.LogError,
                                          on_exit=lambda pid: QUEUE.reclaim_orphans())
        orthanc.RegisterOnStoredInstanceCallback(_guarded("stored")(on_stored_instance))
        orthanc.RegisterOnChangeCallback(_guarded("change")(on_change))
        orthanc.RegisterIncomingHttpRequestFilter(on_http_request)
        orthanc.LogWarning("medxplain: plugin ready (queue %s, worker %s)" % (
            CFG["QueuePath"], "supervised" if SUPERVISOR else "not started by Orthanc"))
    except Exception as exc:
        DISABLED = "%s: %s" % (type(exc).__name__, exc)
        MARKS = None
        orthanc.LogError("medxplain: plugin DISABLED, Orthanc keeps running but REFUSES C-STOREs (0xA700) "
                         "until the plugin works, so that no study is acknowledged and never explained: %s\n%s"
                         % (DISABLED, traceback.format_exc(limit=4)))
    try:
        # Registered even when disabled: then it refuses every C-STORE (MARKS is None).
        orthanc.RegisterIncomingCStoreInstanceFilter(on_incoming_cstore)
    except Exception:
        orthanc.LogError("medxplain: cannot register the C-STORE filter: %s" % traceback.format_exc(limit=4))
    try:
        orthanc.RegisterRestCallback("/medxplain/jobs", _rest(rest_jobs))
        orthanc.RegisterRestCallback("/medxplain/jobs/([0-9a-f]+)/retry", _rest(rest_retry))
    except Exception:
        orthanc.LogError("medxplain: cannot register the REST routes: %s" % traceback.format_exc(limit=4))
    if CFG.get("ViewerFolder"):
        _serve_viewer(CFG["ViewerFolder"], CFG.get("ViewerPrefix") or "/ohif")


def _serve_viewer(folder, prefix):
    """OHIF (or any single-page app) under ``prefix`` on Orthanc's own origin and authentication."""
    try:
        from orthanc_plugin.viewer import StaticApp

        app = StaticApp(folder, prefix)

        def serve(output, uri, **request):
            try:
                app.answer(output, uri, **request)
            except Exception:
                orthanc.LogError("medxplain: viewer %s failed: %s" % (uri, traceback.format_exc(4)))
                output.SendHttpStatusCode(500)

        orthanc.RegisterRestCallback(app.route, serve)
        orthanc.LogWarning("medxplain: serving %s under %s/" % (app.folder, app.prefix))
    except Exception:
        orthanc.LogError("medxplain: viewer not served: %s" % traceback.format_exc(limit=4))


_setup()
