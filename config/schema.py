"""The configuration schema: every option, its default and what it does.

Loaded from YAML (config/medxplain.yaml by default) and validated here, so a typo
or a wrong type fails at start-up with the option's name, not deep in a job.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputsConfig(_Strict):
    overlay: bool = Field(True, description="RGB Secondary Capture: source + colour saliency + burned-in text")
    counterfactual: bool = Field(True, description="grayscale Secondary Capture per counterfactual path step "
                                                   "(only for methods that produce counterfactuals)")
    segmentation: bool = Field(True, description="BINARY Segmentation of the most salient region")
    report: bool = Field(True, description="Comprehensive SR (TID 1500): the audit trail; written last")
    segmentation_top_fraction: float = Field(
        0.05, gt=0, lt=1, description="fraction of lung-field pixels (highest saliency) in the BINARY SEG")
    first_series_number: int = Field(9000, ge=1, description="series numbers of our output start here")


class WorkerConfig(_Strict):
    poll_interval_s: float = Field(0.2, gt=0, description="how often an idle worker looks for jobs")
    audit_log: Path = Field(Path("data/audit.jsonl"), description="JSON-lines audit log (no patient data)")


class OrthancConfig(_Strict):
    url: str = Field("http://127.0.0.1:8042", description="Orthanc REST base URL the worker uses")
    username: str = Field("medxplain", description="the worker's own Orthanc user")
    password_env: str = Field("MEDXPLAIN_ORTHANC_PASSWORD",
                              description="environment variable holding that user's password")
    timeout_s: float = Field(60.0, gt=0, description="HTTP timeout per request")


class CeleryConfig(_Strict):
    """``queue.backend: celery``: the Orthanc plugin still makes each job durable in its
    local SQLite file (the outbox); ``medxplain dispatcher`` publishes it to Celery and
    records the outcome back in that file; ``medxplain worker`` processes on any
    machine run the tasks. Messages are JSON only (never pickle)."""

    broker_url: str = Field("redis://127.0.0.1:6379/0",
                            description="Celery broker (Redis, with appendonly persistence); a password goes in "
                                        "the environment variable broker_password_env, not here")
    result_backend: str | None = Field(None, description="where task outcomes wait for the dispatcher "
                                                         "(default: the broker URL)")
    broker_password_env: str = Field("MEDXPLAIN_BROKER_PASSWORD",
                                     description="environment variable with the broker's password (optional)")
    task_queue: str = Field("medxplain", description="Celery queue name the dispatchers publish to")
    visibility_timeout_s: float = Field(
        3600.0, gt=0, description="Redis redelivers a task not acknowledged within this time (acks are late: "
        "after the task). Must exceed the longest task, or a slow study runs twice (harmless: deterministic "
        "UIDs, but wasted work); a worker killed mid-task is redelivered after it")
    redeliver_after_s: float = Field(
        7200.0, gt=0, description="the dispatcher publishes a task again when no outcome came this long "
        "after publishing (a message lost with a broker that had no persistence); > visibility_timeout_s")
    origin: str = Field("default", description="name of this Orthanc for the workers (dispatcher side): "
                                               "results go back to origins[origin]")
    origins: dict[str, OrthancConfig] = Field(
        default_factory=dict, description="worker side: the Orthancs whose jobs this worker accepts, by name; "
        "'default' falls back to the top-level orthanc section. A task naming another origin is refused")
    max_in_flight: int = Field(64, ge=1, description="jobs one dispatcher has published and not yet seen "
                                                     "finished")
    poll_interval_s: float = Field(0.5, gt=0, description="how often the dispatcher looks for new jobs "
                                                          "and outcomes")
    concurrency: int = Field(1, ge=1, le=64, description="task processes per `medxplain worker` (each holds "
                                                         "its own models)")

    @field_validator("origin")
    @classmethod
    def _origin_name(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError(f"origin must be a name of letters, digits, '-', '_' or '.', got {value!r}")
        return value


class DicomwebConfig(_Strict):
    """A DICOMweb server (QIDO-RS, WADO-RS, STOW-RS; DICOM PS3.18) for ``dicomweb:`` jobs and
    ``delivery.dicomweb``. Secrets come from environment variables, never from this file."""

    url: str = Field(..., description="DICOMweb base URL, e.g. http://pacs:8042/dicom-web")
    auth: Literal["none", "basic", "bearer"] = Field("none", description="HTTP authentication")
    username: str | None = Field(None, description="user for basic authentication")
    password_env: str = Field("MEDXPLAIN_DICOMWEB_PASSWORD", description="variable with the basic-auth password")
    token_env: str = Field("MEDXPLAIN_DICOMWEB_TOKEN", description="variable with the bearer token")
    timeout_s: float = Field(60.0, gt=0, description="HTTP timeout per request")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"DICOMweb url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")


class QueueConfig(_Strict):
    path: Path = Field(Path("~/.local/share/medxplain/queue.db"),
                       description="SQLite job queue file (WAL mode, 0600 in a 0700 folder); '~' is the home "
                                   "folder, a relative path is relative to the project root")
    max_attempts: int = Field(5, ge=1, description="attempts before a job goes to the dead-letter state")
    backoff_s: float = Field(5.0, gt=0, description="first retry delay; doubles per attempt")
    backoff_max_s: float = Field(600.0, gt=0, description="longest retry delay")
    lease_s: float = Field(300.0, gt=0, description="a job leased longer than this without renewal is retried")
    unavailable_dead_after_s: float = Field(
        7 * 86400.0, gt=0, description="a peer (Orthanc, the C-STORE destination) unreachable this long "
        "dead-letters the jobs waiting for it; until then an outage spends no attempts")
    outage_retry_max_s: float = Field(60.0, gt=0, description="while a peer is unreachable the worker pauses, "
                                      "starting at backoff_s and doubling up to this, then tries one job again")
    backend: Literal["sqlite", "celery"] = Field(
        "sqlite", description="sqlite: workers lease jobs from the SQLite file (one machine); celery: the file "
                              "is an outbox that `medxplain dispatcher` publishes to Celery (queue.celery)")
    celery: CeleryConfig = Field(default_factory=CeleryConfig,
                                 description="queue.backend celery: broker, visibility timeout, origins")


class MatchRule(_Strict):
    """Which instances a rule applies to; an empty list matches anything."""

    name: str
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    sop_class_uids: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list, description="BodyPartExamined values, e.g. [CHEST]")
    view_positions: list[str] = Field(default_factory=list, description="ViewPosition values, e.g. [PA, AP]")
    for_processing: bool = Field(False, description="also explain raw detector data (DX/MG/IO 'For Processing'); "
                                 "off: such images are skipped with reason for_processing")
    bundle: Path | None = Field(None, description="bundle for matching images (default: the top-level bundle)")
    explainers: list[str] | None = Field(None, description="methods for matching images (default: top level)")


class CStoreDestination(_Strict):
    ae_title: str = Field(..., max_length=16)
    host: str
    port: int = Field(..., ge=1, le=65535)
    calling_ae_title: str = Field("MEDXPLAIN", max_length=16)


class DeliveryConfig(_Strict):
    orthanc: bool = Field(True, description="store results into the same Orthanc (REST)")
    cstore: CStoreDestination | None = Field(None, description="also C-STORE results to this AE (e.g. the PACS)")
    dicomweb: bool = Field(False, description="also STOW-RS results to the DICOMweb server of the `dicomweb` "
                                             "section (dicomweb: jobs always store there)")


class DicomNodeConfig(_Strict):
    ae_title: str = Field("MEDXPLAIN", max_length=16, description="our AE title for `medxplain serve-dicom`")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_ae_titles: list[str] = Field(default_factory=list,
                                                 description="only these peers may send; empty = refuse all")
    quiet_s: float = Field(5.0, gt=0, description="a study is complete after this long without new instances")
    spool: Path = Field(Path("~/.local/share/medxplain/spool"),
                        description="received instances (full DICOM files, 0600 in 0700 folders), kept until "
                                    "their job is done; outside the project by default")


class TrustConfig(_Strict):
    out_of_domain: Literal["skip", "warn"] | None = Field(
        None, description="an image the bundle's domain guard scores out of domain: 'skip' it with the reason "
                          "out_of_domain, or 'warn': explain it with an 'out of domain' caution on the overlay and "
                          "in the SR. Unset: skip in the PACS (worker), warn in `medxplain explain` (a person "
                          "asked for that file; the summary table says so)")
    low_confidence_margin: float = Field(
        0.05, ge=0, lt=1, description="|P - threshold| below this is called 'low confidence (near threshold)' "
                                      "on the overlay and in the SR")
    explainer_classifier_override: bool = Field(
        False, description="RESEARCH ONLY: load explainer networks trained against another classifier than the "
                           "bundle's (normally refused); recorded in the SR and on the overlay")


class MedxplainConfig(_Strict):
    bundle: Path = Field(Path("bundles/demo-pneumonia-v2"),
                         description="model bundle folder (relative paths are from the project root)")
    explainers: list[str] = Field(["gradcam", "ig", "occlusion"], min_length=1,
                                  description="methods to run, by registry name, in this order")
    explainer_parameters: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method keyword parameters, e.g. {ig: {steps: 32}}")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu")
    precision: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="autocast dtype on CUDA for classifier/explainers (CPU always float32)")
    batch_size: int = Field(8, ge=1, le=512, description="images per explainer batch")
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    trusted_torchscript: list[str] = Field(
        default_factory=list, description="sha256 of TorchScript classifier files allowed to load")
    max_pixels: int = Field(60_000_000, ge=1, description="reject images with more pixels than this")
    rules: list[MatchRule] = Field(
        default_factory=lambda: [MatchRule(name="chest radiographs")],
        description="PACS eligibility: the first rule an instance matches decides bundle and explainers; "
                    "an instance no rule matches is skipped with a reason")
    queue: QueueConfig = Field(default_factory=QueueConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    orthanc: OrthancConfig = Field(default_factory=OrthancConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    dicom_node: DicomNodeConfig = Field(default_factory=DicomNodeConfig)
    dicomweb: DicomwebConfig | None = Field(None, description="a DICOMweb PACS: source of `dicomweb:<Study "
                                            "Instance UID>` jobs and target of delivery.dicomweb")

    @field_validator("explainers")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"explainers listed twice: {value}")
        return value

    def bundle_path(self) -> Path:
        return resolve(self.bundle)


def resolve(path: Path) -> Path:
    """'~' is the home folder; other relative paths in the config are relative to the project root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path
