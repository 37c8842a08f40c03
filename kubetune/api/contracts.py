"""What crosses a component boundary, typed: the files one component writes and another reads,
the exit codes a component ends with, and the environment variables that carry Secret keys.

The writer and the reader use the same model: the writer builds it and stores
`model_dump_json(by_alias=True)`, the reader calls `model_validate_json` (or `model_validate`
on JSON already parsed). Keys are camelCase on the wire, like the API. Readers ignore keys they
do not know (a newer writer may add some) but reject a known key of the wrong type with a
pydantic ValidationError that names it; `problem(error)` turns one into a line for a status.

Where each file lives is in `kubetune.api.layout`.
"""

from __future__ import annotations

from datetime import datetime
from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel


class ExitCode(IntEnum):
    """Exit codes of `kubetune collect` and `kubetune train`, read by the operator from the
    pod's terminated state (and by the Job's podFailurePolicy)."""

    OK = 0
    FAILED = 1  # something went wrong that a retry may fix
    INVALID = 2  # bad input (flags, spec, data, missing model): retrying cannot help
    DIVERGED = 3  # the loss, gradients or weights became NaN/inf: the same settings would again
    STORAGE_OWNED = 4  # storage.uri belongs to another FineTuneJob (its owner marker): nothing written
    EMPTY_DATASET = 65  # EX_DATAERR: the collection finished and kept no image
    PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving a checkpoint; resume later


# Environment variable of each Secret key a dataset source reads: source -> {field of the
# source's model (a SecretKeyRef) -> variable}. The operator maps the refs to these variables
# in the collector's pod; the collector reads them back.
SOURCE_SECRET_ENV: dict[str, dict[str, str]] = {
    "unsplash": {"access_key_secret_ref": "UNSPLASH_ACCESS_KEY"},
    "google": {"api_key_secret_ref": "GOOGLE_API_KEY", "search_engine_id_secret_ref": "GOOGLE_CSE_ID"},
    "openverse": {"client_id_secret_ref": "OPENVERSE_CLIENT_ID", "client_secret_secret_ref": "OPENVERSE_CLIENT_SECRET"},
    "huggingface": {"token_secret_ref": "HF_TOKEN"},
}


class Contract(BaseModel):
    """camelCase on the wire, no coercion of wrong types, unknown keys ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, alias_generator=to_camel, populate_by_name=True)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, indent=2).encode() + b"\n"


def _timestamp() -> Any:
    """An optional datetime; ISO 8601 strings, which strict validation of parsed JSON refuses."""
    return Field(default=None, strict=False)


# -- dataset/manifest.json: collector -> operator, trainer ---------------------------------------


class DatasetCounts(Contract):
    requested: int = 0
    kept: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)  # reason -> images


class SourceCount(Contract):
    source: str
    images: int
    licenses: dict[str, int] = Field(default_factory=dict)


class CollectionTiming(Contract):
    started_at: datetime | None = _timestamp()
    finished_at: datetime | None = _timestamp()
    shard_seconds: list[float] = Field(default_factory=list)


class DatasetManifest(Contract):
    """Written last by the collector's merge once every shard is done, also when nothing was
    kept (`counts.kept == 0`): the collection is over, and the operator reads the count."""

    fingerprint: str  # kubetune.api.layout.dataset_fingerprint of the settings collected
    counts: DatasetCounts
    kubetune: str = ""  # the version that wrote it
    run: str = ""  # fingerprint and shard count: the collector's own notion of "same collection"
    complete: bool = True
    sources: list[SourceCount] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    timing: CollectionTiming = Field(default_factory=CollectionTiming)
    content_hash: str = ""
    metadata: str | None = None  # the imagefolder's metadata file; None when nothing was kept

    @property
    def empty(self) -> bool:
        return self.counts.kept == 0


# -- owner.json: the first pod of a FineTuneJob to write to storage.uri -> the others, operator ------


class StorageOwner(Contract):
    """Which FineTuneJob a storage prefix belongs to. Written once, only when absent, by the
    first of the job's pods to write there; a pod (or the operator) of a job with another `uid`
    refuses the prefix. Deleting the file releases the prefix."""

    namespace: str
    name: str
    uid: str
    created_at: datetime | None = _timestamp()

    @property
    def job(self) -> str:
        return f"{self.namespace}/{self.name}"


# -- progress.json: trainer -> operator ------------------------------------------------------------

ProgressState = Literal[
    "loading", "caching", "training", "checkpointing", "publishing", "preempted", "succeeded", "failed"
]


class TrainingProgress(Contract):
    """Live training progress, rewritten often by the trainer's main process."""

    # a NaN loss stays NaN on the wire (JSON's default would turn it into null)
    model_config = ConfigDict(ser_json_inf_nan="constants")

    state: ProgressState = "loading"
    step: int = 0
    max_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    images_per_second: float | None = None
    eta_seconds: float | None = None
    latest_checkpoint: str | None = None  # a name (step-N) or a URI
    updated_at: datetime | None = _timestamp()
    message: str | None = None  # why, when state is "failed"


# -- checkpoint-N/manifest.json: trainer -> trainer (resume), operator (it exists) ---------------------


class CheckpointFile(Contract):
    size: int
    sha256: str


class EmaState(Contract):
    optimization_step: int


class DataloaderPosition(Contract):
    position: int
    epoch: int
    index_in_epoch: int
    samples: int


class RngState(Contract):
    seed: int
    scheme: str


class CheckpointState(Contract):
    """What the trainer needs to continue exactly where a checkpoint left off. The settings that
    make resuming meaningful (`RESUME_SETTINGS`) are compared with the resuming run's; a checkpoint
    written before they were recorded has them empty (0, ""): not compared."""

    step: int
    samples_seen: int
    epoch: int
    seed: int
    method: str
    global_batch_size: int
    world_size: int
    cache_key: str
    dataloader: DataloaderPosition
    rng: RngState
    ema: EmaState | None = None
    model: str = ""  # --pretrained_model_name_or_path
    revision: str = ""
    resolution: int = 0
    lora_rank: int = 0  # 0 for a full fine-tune
    optimizer: str = ""  # --optimizer
    text_encoders: str = ""  # "trained" (--train_text_encoder) or "frozen"


# what a resume compares (field of CheckpointState -> how an error names it); cacheKey last: it is
# known only once the data is loaded and cached
RESUME_SETTINGS: dict[str, str] = {
    "method": "method",
    "model": "model",
    "revision": "model revision",
    "global_batch_size": "global batch size",
    "resolution": "resolution",
    "lora_rank": "LoRA rank",
    "optimizer": "optimizer",
    "text_encoders": "text encoders",
    "cache_key": "data/cache key",
}


def resume_mismatches(recorded: CheckpointState, current: dict[str, Any]) -> list[str]:
    """`name old -> new` for each of RESUME_SETTINGS in `current` (field -> value) that differs
    from what the checkpoint recorded; a setting the checkpoint did not record (empty) is skipped."""
    out = []
    for key, label in RESUME_SETTINGS.items():
        if key not in current:
            continue
        old = getattr(recorded, key)
        if old in ("", 0, None) or old == current[key]:
            continue
        out.append(f"{label} {old} -> {current[key]}")
    return out


class CheckpointManifest(CheckpointState):
    """Written last into a checkpoint folder: the checkpoint is complete."""

    files: dict[str, CheckpointFile]  # file name -> size and hash, verified before resuming
    created_at: datetime | None = _timestamp()


def problem(error: ValidationError) -> str:
    """A ValidationError on one line: `counts.kept: Input should be a valid integer`."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


# -- <dataset>/.kubetune/{captions,clip-scores}/<key>/manifest.json: trainer -> trainer, later jobs --------


class AnnotationManifest(Contract):
    """Written last beside a column computed for every image of a dataset (generated captions,
    CLIP scores): the column is complete, and reused by runs with the same `settings`."""

    column: str
    settings: dict[str, Any] = Field(default_factory=dict)  # what the key hashes (model fingerprint, ...)
    described: dict[str, Any] = Field(default_factory=dict)  # for people: the model as named, mode, prompt
    count: int  # images (rows) of the dataset
    chunks: int  # part-NNNNN.json files, in order
    unreadable: int = 0  # images that could not be read (value null)
