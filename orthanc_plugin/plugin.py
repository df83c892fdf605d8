"""medxplain inside Orthanc: the script Orthanc's Python plugin loads.

Runs in Orthanc's embedded interpreter (Debian's /usr/bin/python3.11, not the
venv): standard library plus the project's stdlib-only modules
(pipeline.jobqueue, dicom_io.output.is_medxplain_output, orthanc_plugin.core).
No torch, no blocking: each callback is a short SQLite write, timed, and any
exception is logged, never raised into Orthanc. The work is done by the worker
(`medxplain worker`), which this script can start and supervise.

Loop guard: Orthanc re-fires STABLE_STUDY whenever an instance joins a study,
our own SC/SEG/SR included. A study is marked only when a non-medxplain
instance is stored; STABLE_STUDY enqueues a job only for a marked study and
clears the mark. Studies whose only new instances are ours never trigger work.

Configuration: the "Medxplain" section (written by pipeline/orthanc_launcher.py):
ProjectRoot, QueuePath, MaxAttempts, BackoffSeconds, BackoffMaxSeconds,
StartWorker, WorkerCommand, WorkerEnv, WorkerLog, WorkerPidFile; ViewerFolder and
ViewerPrefix (optional: a prepared OHIF app served under that prefix, see
orthanc_plugin/viewer.py).
"""
import json
import os
import sys
import time
import traceback

import orthanc

CFG, QUEUE, MARKS, TIMES, SUPERVISOR, DISABLED = {}, None, None, None, None, None


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


def on_stored_instance(dicom, instance_id):
    # Main tags only (no pixel data, long values dropped): well under a millisecond.
    tags = json.loads(dicom.GetInstanceAdvancedJson(
        orthanc.DicomToJsonFormat.HUMAN, orthanc.DicomToJsonFlags.NONE, 256))
    if is_medxplain_output(tags):
        TIMES.counters["stored_ours"] += 1
        return
    TIMES.counters["stored_new"] += 1
    MARKS.mark(orthanc_study_id(str(tags.get("PatientID") or ""), str(tags.get("StudyInstanceUID") or "")))


def _enqueue(study):
    job_id, created = QUEUE.enqueue("orthanc:" + study, {"kind": "orthanc", "study": study})
    TIMES.counters["enqueued" if created else "merged"] += 1
    orthanc.LogWarning("medxplain: study %s -> job %s (%s)" % (study, job_id, "new" if created else "merged"))
    return job_id


def on_change(change_type, level, resource_id):
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        start = time.perf_counter()
        if MARKS.take(resource_id, _enqueue) is None:
            TIMES.counters["stable_skipped"] += 1  # nothing new, or only our own output
        TIMES.add("stable", (time.perf_counter() - start) * 1000.0)
    elif change_type == orthanc.ChangeType.DELETED and level == orthanc.ResourceType.STUDY:
        MARKS.clear(resource_id)
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        # Orthanc does not persist pending STABLE_STUDY events: marks left by a stop or
        # a crash before a study became stable are enqueued now.
        for study in MARKS.studies():
            MARKS.take(study, _enqueue)
        if SUPERVISOR:
            SUPERVISOR.start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED and SUPERVISOR:
        SUPERVISOR.stop()


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
        return _answer(output, 503, {"error": "medxplain plugin disabled", "reason": DISABLED})
    query = request.get("get") or {}
    worker = SUPERVISOR.status() if SUPERVISOR else {"supervised": False}
    _answer(output, 200, jobs_answer(QUEUE, MARKS, TIMES, worker, state=query.get("state") or None,
                                     limit=max(1, min(1000, int(query.get("limit", 50))))))


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
    global CFG, QUEUE, MARKS, TIMES, SUPERVISOR, DISABLED, is_medxplain_output, orthanc_study_id, jobs_answer
    try:
        CFG = json.loads(orthanc.GetConfiguration()).get("Medxplain") or {}
        root = CFG.get("ProjectRoot") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root not in sys.path:
            sys.path.insert(0, root)
        from dicom_io.output import is_medxplain_output  # noqa: F811 (stdlib-only at import)
        from orthanc_plugin.core import StudyMarks, Timings, WorkerSupervisor, jobs_answer, orthanc_study_id
        from pipeline.jobqueue import JobQueue

        if not CFG.get("QueuePath"):
            raise ValueError('the "Medxplain" configuration section has no "QueuePath"')
        QUEUE = JobQueue(CFG["QueuePath"], max_attempts=int(CFG.get("MaxAttempts", 5)),
                         backoff_s=float(CFG.get("BackoffSeconds", 5)),
                         backoff_max_s=float(CFG.get("BackoffMaxSeconds", 600)))
        MARKS, TIMES = StudyMarks(CFG["QueuePath"]), Timings()
        if CFG.get("StartWorker"):
            if not CFG.get("WorkerCommand"):
                raise ValueError('"StartWorker" is true but "WorkerCommand" is empty')
            SUPERVISOR = WorkerSupervisor(CFG["WorkerCommand"], cwd=root, env=CFG.get("WorkerEnv"),
                                          log_path=CFG.get("WorkerLog"), pid_path=CFG.get("WorkerPidFile"),
                                          log_warning=orthanc.LogWarning, log_error=orthanc.LogError)
        orthanc.RegisterOnStoredInstanceCallback(_guarded("stored")(on_stored_instance))
        orthanc.RegisterOnChangeCallback(_guarded("change")(on_change))
        orthanc.LogWarning("medxplain: plugin ready (queue %s, worker %s)" % (
            CFG["QueuePath"], "supervised" if SUPERVISOR else "not started by Orthanc"))
    except Exception as exc:
        DISABLED = "%s: %s" % (type(exc).__name__, exc)
        orthanc.LogError("medxplain: plugin DISABLED, Orthanc keeps running without it: %s\n%s"
                         % (DISABLED, traceback.format_exc(limit=4)))
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
