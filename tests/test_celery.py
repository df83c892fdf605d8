"""queue.backend celery with real servers: Redis (Debian), two `medxplain worker`
processes (Celery prefork pools), two Orthancs whose plugins make each job durable
in their own outbox and whose supervised dispatchers publish into the one cluster.

Studies (12 by default; ``MEDXPLAIN_CELERY_STUDIES=50`` for the issue's full run)
alternate between the two Orthancs, one CR image each, gradcam. Faults, in one run:
a worker's pool process SIGKILLed mid-task, the broker restarted with tasks queued
(append-only file on), an Orthanc stopped while its results are due and started
again. Then: every study has exactly one SR per source, in the Orthanc it came
from, and nothing of it in the other (0 lost, 0 duplicated). Waits are on events
(outbox states, log lines, Orthanc answers), never on wall-clock bounds.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.pacs import orthanc_launcher as launcher
from tests.orthanc_server import MEDXPLAIN, PROJECT_ROOT, OrthancServer, require_orthanc, wait_for
from tests.redis_server import RedisServer, require_redis
from tests.test_orthanc import cr_study, kermany_test, require_bundle, study_id, to_bytes  # noqa: F401

N_STUDIES = int(os.environ.get("MEDXPLAIN_CELERY_STUDIES", "12"))


def celery_queue(redis: RedisServer, origin: str) -> dict:
    # visibility 30 s: longer than a task here (seconds; a task that took longer would run
    # twice, harmlessly), short enough for the killed worker's task to come back within the
    # test; re-publication by the dispatcher only after 300 s (the last resort, unused here).
    return {"backend": "celery", "lease_s": 60,
            "celery": {"broker_url": redis.url, "origin": origin, "visibility_timeout_s": 30,
                       "redeliver_after_s": 300, "poll_interval_s": 0.2}}


class Cluster:
    def __init__(self, root: Path, origins: tuple[str, ...] = ("a", "b")):
        self.root = root
        self.origins = origins
        self.redis = RedisServer(root / "redis")
        self.orthancs: dict[str, OrthancServer] = {}
        self.workers: list[subprocess.Popen] = []

    def start(self, n_workers: int = 2) -> "Cluster":
        self.redis.start()
        for origin in self.origins:
            self.orthancs[origin] = OrthancServer(self.root / f"orthanc-{origin}", start_worker=True,
                                                  queue=celery_queue(self.redis, origin)).start()
        for i in range(n_workers):
            self.start_worker(i)
        return self

    def worker_config(self) -> Path:
        base = yaml.safe_load(self.orthancs[self.origins[0]].paths["worker_config"].read_text())
        base["queue"]["path"] = str(self.root / "unused-worker-queue.db")  # never opened by a Celery worker
        base["queue"]["celery"]["origins"] = {
            origin: {"url": o.url, "username": launcher.WORKER_USER, "password_env": f"MX_TEST_PW_{origin.upper()}"}
            for origin, o in self.orthancs.items()}
        base["worker"]["audit_log"] = str(self.root / "worker-audit.jsonl")
        path = self.root / "celery-worker.yaml"
        path.write_text(yaml.safe_dump(base, sort_keys=False))
        return path

    def start_worker(self, i: int) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for origin, o in self.orthancs.items():
            env[f"MX_TEST_PW_{origin.upper()}"] = o.password(launcher.WORKER_USER)
        log = open(self.worker_log(i), "ab")
        try:
            proc = subprocess.Popen([str(MEDXPLAIN), "worker", "--config", str(self.worker_config()),
                                     "--owner", f"w{i}@localhost"], cwd=PROJECT_ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        if i < len(self.workers):
            self.workers[i] = proc
        else:
            self.workers.append(proc)
        return proc

    def worker_log(self, i: int) -> Path:
        return self.root / f"worker-{i}.log"

    def log_text(self, i: int) -> str:
        try:
            return self.worker_log(i).read_text(errors="replace")
        except OSError:
            return ""

    def stop_workers(self) -> None:
        """Warm shutdown (SIGTERM): each worker finishes and acknowledges its current task first."""
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def stop(self) -> None:
        self.stop_workers()
        for o in self.orthancs.values():
            o.stop()
        self.redis.stop()

    def diagnostics(self) -> str:
        parts = [f"--- worker {i}\n" + "\n".join(self.log_text(i).splitlines()[-30:]) for i in range(len(self.workers))]
        parts += [f"--- orthanc {k}\n{o.log_tail(30)}" for k, o in self.orthancs.items()]
        parts.append("--- redis\n" + self.redis.log_tail())
        return "\n".join(parts)


def pool_children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def outbox_states(o: OrthancServer) -> dict[str, list[str]]:
    by_key: dict[str, list[str]] = {}
    for job in o.queue().list(limit=-1):
        by_key.setdefault(job.key, []).append(job.state)
    return by_key


def all_done(o: OrthancServer, studies: list[str]) -> bool:
    by_key = outbox_states(o)
    dead = [k for k, s in by_key.items() if "dead" in s]
    assert not dead, f"dead jobs: {[j.last_error for j in o.queue().list('dead')]}"
    return all("done" in by_key.get(f"orthanc:{s}", []) and not {"pending", "leased"} & set(by_key[f"orthanc:{s}"])
               for s in studies)


def n_done(o: OrthancServer) -> int:
    return o.queue().counts()["done"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_orthanc()
    require_redis()
    require_bundle()
    c = Cluster(tmp_path_factory.mktemp("celery"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.mark.slow
def test_two_orthancs_one_cluster_faults_lose_and_duplicate_nothing(cluster, tmp_path, kermany_test):
    import redis

    a, b = cluster.orthancs["a"], cluster.orthancs["b"]
    studies: dict[str, list[tuple[str, object]]] = {"a": [], "b": []}

    def send(numbers: range) -> None:
        for n in numbers:
            origin = "ab"[n % 2]
            (ds,) = cr_study(kermany_test[n % len(kermany_test):][:1], f"celery-{n}", patient_id=f"MXCEL{n}")
            cluster.orthancs[origin].upload(to_bytes(ds))
            studies[origin].append((study_id(cluster.orthancs[origin], ds), ds))

    def started() -> list[int]:
        return [cluster.log_text(i).count(": started") for i in range(len(cluster.workers))]

    third = max(2, N_STUDIES // 3)
    try:
        # 1. A pool process SIGKILLed mid-task: task_reject_on_worker_lost requeues its task at once.
        send(range(0, third))

        def mid_task() -> int | None:
            for i, proc in enumerate(cluster.workers):
                # A task takes seconds (gradcam, writers, delivery): the one that just started is running.
                if ": started" in cluster.log_text(i):
                    children = pool_children(proc.pid)
                    if children:
                        return children[0]
            return None

        os.kill(wait_for(mid_task, 300, interval=0.05, what="a task running in a worker"), signal.SIGKILL)
        wait_for(lambda: any("WorkerLostError" in cluster.log_text(i) for i in range(len(cluster.workers))), 60,
                 what="the pool noticing the killed process")

        # 2. A whole worker (main process and pool) SIGKILLed mid-task, then started again: its
        #    unacknowledged task is redelivered by Redis after visibility_timeout_s.
        before = started()
        send(range(third, 2 * third))
        busy = wait_for(lambda: [i for i, (x, y) in enumerate(zip(before, started())) if y > x], 300, interval=0.05,
                        what="a worker starting a task of the second wave")[0]
        os.killpg(cluster.workers[busy].pid, signal.SIGKILL)
        killed = time.monotonic()
        cluster.workers[busy].wait(timeout=30)
        cluster.start_worker(busy)
        broker = redis.Redis(port=cluster.redis.port)
        wait_for(lambda: broker.hlen("unacked") == 0, 300, what="the killed worker's task redelivered")
        print(f"\nFIGURE whole worker SIGKILLed: its task back in the queue after {time.monotonic() - killed:.1f} s "
              f"(visibility timeout 30 s)")

        # 3. The broker restarted with tasks queued (append-only file on): they survive.
        #    Idle workers take each task the moment it is published, so they are stopped first
        #    (after the earlier waves are done) and the third wave waits in the broker.
        earlier = {k: [s for s, _ in v] for k, v in studies.items()}
        wait_for(lambda: all_done(a, earlier["a"]) and all_done(b, earlier["b"]), 600, interval=0.5,
                 what="the first two waves done")
        cluster.stop_workers()
        assert broker.llen("medxplain") == 0
        send(range(2 * third, N_STUDIES))
        queued = N_STUDIES - 2 * third
        wait_for(lambda: broker.llen("medxplain") == queued, 300, interval=0.2,
                 what=f"the third wave's {queued} tasks queued in the broker")
        broker.close()
        cluster.redis.stop()
        cluster.redis.start()
        broker = redis.Redis(port=cluster.redis.port)
        assert broker.llen("medxplain") == queued, "tasks lost in the broker restart"
        broker.close()
        restarted, done = time.monotonic(), n_done(a) + n_done(b)
        for i in range(len(cluster.workers)):
            cluster.start_worker(i)
        wait_for(lambda: n_done(a) + n_done(b) > done, 300, what="progress after the broker restart")
        print(f"\nFIGURE broker restart with {queued} task(s) queued: next job done "
              f"{time.monotonic() - restarted:.1f} s after the restart")

        # 4. Orthanc B stopped while its results are due, then started again.
        ids = {k: [s for s, _ in v] for k, v in studies.items()}
        if not all_done(b, ids["b"]):
            b.stop()  # B's dispatcher stops with it; tasks already out fail their delivery (deferred)
            wait_for(lambda: all_done(a, ids["a"]), 600, interval=0.5, what="Orthanc A's studies done")
            b.start()
        wait_for(lambda: all_done(a, ids["a"]) and all_done(b, ids["b"]), 600, interval=0.5,
                 what="every study done in both outboxes")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.diagnostics()}") from None

    # Exactly one SR per source, in the Orthanc the study came from; nothing in the other.
    assert len(studies["a"]) + len(studies["b"]) == N_STUDIES
    for origin, other in (("a", "b"), ("b", "a")):
        here, there = cluster.orthancs[origin], cluster.orthancs[other]
        for sid, ds in studies[origin]:
            instances = here.study_instances(sid)
            modalities = sorted(i["Modality"] for i in instances)
            assert modalities.count("SR") == 1 and modalities.count("SEG") == 1 and len(instances) == 4, modalities
            assert len({i["SOPInstanceUID"] for i in instances}) == 4
            status, _ = there.http("GET", f"/studies/{sid}")
            assert status == 404, f"study of {origin} found in {other}"


# ----------------------------------------------------------------- configuration (fast)


def test_broker_pitfalls_are_handled_by_configuration():
    from celery import Celery

    from config import load_config
    from pipeline.pacs.celery_queue import configure

    cfg = load_config(None, {"queue": {"backend": "celery", "celery": {"visibility_timeout_s": 5400}}})
    conf = configure(cfg, Celery("t", set_as_current=False)).conf
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.accept_content == conf.result_accept_content == ["json"]  # never pickle from the broker
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 5400
    assert conf.broker_transport_options["unacked_restore_interval"] == 60  # sweep for timed-out tasks


def test_broker_password_comes_from_the_environment_only():
    from config import load_config
    from pipeline.pacs.celery_queue import broker_urls

    cfg = load_config(None, {"queue": {"backend": "celery", "celery": {"broker_url": "redis://broker:6379/0"}}})
    assert broker_urls(cfg, {}) == ("redis://broker:6379/0", "redis://broker:6379/0")
    broker, backend = broker_urls(cfg, {"MEDXPLAIN_BROKER_PASSWORD": "p@ss/word"})
    assert broker == backend == "redis://:p%40ss%2Fword@broker:6379/0"


def test_queue_backend_is_validated():
    from config import ConfigError, load_config

    assert load_config(None).queue.backend == "sqlite"  # the default stays the embedded queue
    with pytest.raises(ConfigError, match="queue.backend"):
        load_config(None, {"queue": {"backend": "rabbit"}})
    with pytest.raises(ConfigError, match="origin"):
        load_config(None, {"queue": {"backend": "celery", "celery": {"origin": "a b"}}})


def test_outcome_records_what_the_worker_decided():
    from pipeline.pacs.celery_queue import Outcome
    from pipeline.pacs.jobqueue import Job

    job = Job(id="j", key="orthanc:s", payload={}, state="leased", attempts=5, max_attempts=5, not_before=0,
              lease_owner=None, lease_expires=None, last_error=None, result=None, created=0, updated=0)
    out = Outcome(job)
    assert out.fail("j", "w", "boom", retry=True) == "dead"  # attempts exhausted, as JobQueue.fail decides
    assert out.report == {"verb": "fail", "wake": False, "error": "boom", "retry": True}
    out.defer("j", "w", "down", delay_s=4.0)
    out.wake_deferred()
    assert out.report["verb"] == "defer" and out.report["delay_s"] == 4.0 and out.report["wake"] is True


def test_the_compose_configs_are_valid():
    from config import load_config
    from tests.orthanc_server import PROJECT_ROOT as root

    orthanc = load_config(root / "docker" / "scaleout-orthanc.yaml")
    worker = load_config(root / "docker" / "scaleout-worker.yaml")
    assert orthanc.queue.backend == worker.queue.backend == "celery"
    assert orthanc.queue.celery.origin in worker.queue.celery.origins


# ----------------------------------------------------------------- the dispatcher (real Redis, no worker)


def test_dispatcher_publishes_records_outcomes_and_survives_a_lost_message_and_a_broker_outage(tmp_path):
    """The outbox is the truth: a message the broker lost is published again after
    redeliver_after_s (fake clock), an outcome is recorded in the outbox, and a broker that
    cannot be reached leaves the job pending with no attempt spent."""
    import redis
    from celery import Celery

    from config import load_config
    from pipeline.pacs.celery_queue import TASK_NAME, configure
    from pipeline.pacs.dispatcher import Dispatcher
    from pipeline.pacs.jobqueue import JobQueue

    require_redis()
    server = RedisServer(tmp_path / "redis").start()
    try:
        now = [1000.0]
        cfg = load_config(None, {"queue": {"backend": "celery", "backoff_s": 1, "celery": {
            "broker_url": server.url, "origin": "a", "redeliver_after_s": 600, "visibility_timeout_s": 300}}})
        app = configure(cfg, Celery("t", set_as_current=False))
        outbox = JobQueue(tmp_path / "queue.db", clock=lambda: now[0])
        job_id, _ = outbox.enqueue("orthanc:s1", {"kind": "orthanc", "study": "s1"})
        dispatcher = Dispatcher(cfg, outbox, owner="dispatcher-test", celery_app=app, clock=lambda: now[0])
        broker = redis.Redis(port=server.port)

        assert dispatcher.step() and broker.llen("medxplain") == 1
        message = json.loads(broker.lindex("medxplain", 0))
        assert message["headers"]["task"] == TASK_NAME and message["content-type"] == "application/json"
        assert message["headers"]["id"] == f"{job_id}.1" and outbox.get(job_id).state == "leased"

        broker.delete("medxplain")  # the broker loses the message (no persistence)
        now[0] += 599
        dispatcher.step()
        assert broker.llen("medxplain") == 0  # not yet: the task may still be running somewhere
        now[0] += 2
        dispatcher.step()
        assert broker.llen("medxplain") == 1  # published again, same task id
        assert json.loads(broker.lindex("medxplain", 0))["headers"]["id"] == f"{job_id}.1"

        # A worker's outcome (what the task returns) is recorded in the outbox.
        app.backend.store_result(f"{job_id}.1", {"verb": "complete", "wake": False, "result": {"ok": 1}}, "SUCCESS")
        dispatcher.step()
        assert outbox.get(job_id).state == "done" and outbox.get(job_id).result == {"ok": 1}
        assert dispatcher.in_flight == {}

        # The broker down at publishing time: the job stays pending, no attempt spent.
        second, _ = outbox.enqueue("orthanc:s2", {"kind": "orthanc", "study": "s2"})
        broker.close()
        server.stop()
        dispatcher.step()
        job = outbox.get(second)
        assert job.state == "pending" and job.attempts == 0 and dispatcher.pause_s > 0
        server.start()
        dispatcher.step()
        assert outbox.get(second).state == "leased" and dispatcher.pause_s == 0
    finally:
        server.stop()
