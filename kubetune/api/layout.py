"""Where the operator, the collector and the trainer find each other's artifacts.

They meet only through the Kubernetes API and storage, so what they agree on is: where each artifact
lives under `spec.storage.uri` (here), what the files in it hold and what an exit code means
(`kubetune.api.contracts`), and how the spec reaches a pod (SPEC_ENV).

Storage layout (the trainer's `--output_dir` is the storage URI itself, as in diffusers' script):

    <storage>/
      owner.json                           the FineTuneJob the prefix belongs to (contracts.StorageOwner)
      model_index.json, unet/, vae/, ...   the published diffusers pipeline (LoRA: the adapter)
      progress.json                        live training progress (contracts.TrainingProgress)
      dataset/manifest.json                written last by the collector (contracts.DatasetManifest)
      dataset/train/metadata.jsonl         imagefolder: file_name, text, source, url, license, author
      dataset/train/*.jpg
      dataset/README.md                    dataset card
      cache/<key>/                         latent and text-embedding cache of the trainer
      checkpoint-N/                        a resumable checkpoint, named as diffusers' scripts name them:
        unet/, unet_ema/                     full fine-tune: the UNet (and EMA) in diffusers format
        pytorch_lora_weights.safetensors     LoRA: the adapter, for pipe.load_lora_weights(folder)
        optimizer.pt                         optimizer, LR schedule, loss scaler (tensors only)
        manifest.json                        written last (contracts.CheckpointManifest)
      checkpoints/step-NNNNNNNN/manifest.json   the layout before 0.x: still resumed, never written
      samples/step-NNNNNNNN/*.png, grid.png
      logs/                                TensorBoard
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from kubetune.api.contracts import ExitCode
from kubetune.api.models import Dataset

DATASET_DIR = "dataset"
DATASET_MANIFEST = "dataset/manifest.json"
CACHE_DIR = "cache"
CHECKPOINTS_DIR = ""  # checkpoints are folders at the output's root, as in diffusers' scripts
LEGACY_CHECKPOINTS_DIR = "checkpoints"  # kubetune's earlier `checkpoints/step-N/` (read, never written)
# one listing prefix covers `checkpoint-N/` and `checkpoints/` (Store.keys_starting_with)
CHECKPOINT_KEYS_PREFIX = "checkpoint"
# accelerate's save_state writes this (process 0's RNG states) last: a stock checkpoint is complete
STOCK_CHECKPOINT_MARKER = "random_states_0.pkl"
SAMPLES_DIR = "samples"
LOGS_DIR = "logs"
PROGRESS_FILE = "progress.json"
OWNER_FILE = "owner.json"
MANIFEST_FILE = "manifest.json"

# The spec reaches pods in this environment variable as JSON (no secret values: only refs).
SPEC_ENV = "KUBETUNE_SPEC"
# The FineTuneJob a pod belongs to (contracts.StorageOwner); set by the operator, by `kubetune run`
# (a stable id of the spec's storage.uri); unset: no owner marker is claimed or checked.
OWNER_UID_ENV = "KUBETUNE_FINETUNEJOB_UID"
OWNER_NAMESPACE_ENV = "KUBETUNE_FINETUNEJOB_NAMESPACE"
OWNER_NAME_ENV = "KUBETUNE_FINETUNEJOB"

# Exit codes of `kubetune collect` and `kubetune train` (see ExitCode for what each means).
EXIT_OK = ExitCode.OK
EXIT_FAILED = ExitCode.FAILED
EXIT_INVALID = ExitCode.INVALID
EXIT_DIVERGED = ExitCode.DIVERGED
EXIT_STORAGE_OWNED = ExitCode.STORAGE_OWNED
EXIT_EMPTY_DATASET = ExitCode.EMPTY_DATASET
EXIT_PREEMPTED = ExitCode.PREEMPTED


def is_safe_file_name(name: str) -> bool:
    """A metadata.jsonl `file_name` stays inside its folder: relative, no `..`, no backslash or
    NUL (a local store would follow `../../etc/passwd` or `/proc/self/environ` out of it)."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    return ".." not in name.split("/")


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint at `step`: `checkpoint-N`, as diffusers' scripts name it."""
    return f"checkpoint-{step}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name: `checkpoint-N`, or the earlier `step-N` (any padding)."""
    for prefix in ("checkpoint-", "step-"):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return int(name[len(prefix) :])
    return None


def step_of_checkpoint_uri(uri: str) -> int:
    """The step of a checkpoint name or URI (`.../checkpoint-N/`, `checkpoints/step-N`); 0 for none."""
    return checkpoint_step((uri or "").rstrip("/").rsplit("/", 1)[-1]) or 0


def complete_checkpoint_paths(keys: Iterable[str]) -> list[str]:
    """The complete checkpoint folders among `keys` (keys relative to the output): `checkpoint-N`
    whose manifest (written last) is listed, or, when diffusers' script wrote it, accelerate's last
    file (STOCK_CHECKPOINT_MARKER); and the earlier layout's `checkpoints/step-N` with its manifest.
    Paths relative to the output, oldest step first (at a tie, the earlier layout first)."""
    paths = set()
    for key in keys:
        parts = key.split("/")
        if len(parts) == 2 and parts[1] in (MANIFEST_FILE, STOCK_CHECKPOINT_MARKER):
            if parts[0].startswith("checkpoint-") and checkpoint_step(parts[0]) is not None:
                paths.add(parts[0])
        elif (
            len(parts) == 3
            and parts[0] == LEGACY_CHECKPOINTS_DIR
            and parts[2] == MANIFEST_FILE
            and checkpoint_step(parts[1]) is not None
        ):
            paths.add(f"{parts[0]}/{parts[1]}")
    return sorted(paths, key=lambda path: (step_of_checkpoint_uri(path), "/" not in path))


def complete_checkpoint_names(keys: Iterable[str]) -> list[str]:
    """The folder names (`checkpoint-N`, earlier: `step-N`) of `complete_checkpoint_paths(keys)`;
    `keys` are those listed under CHECKPOINTS_DIR (the output's root), relative to the output."""
    return [path.rsplit("/", 1)[-1] for path in complete_checkpoint_paths(keys)]


def dataset_fingerprint(dataset: Dataset) -> str:
    """A short hash of the settings that decide a collected dataset's content.

    The collector writes it into dataset/manifest.json as `fingerprint`; the operator skips
    collection when a complete dataset with the same fingerprint is already there.
    """
    settings: dict[str, Any] = dataset.model_dump(by_alias=True, mode="json", exclude_none=True)
    for prepared in ("captioning", "filter"):  # done by the trainer, beside the collected dataset
        settings.pop(prepared, None)
    source = settings[dataset.source_name]
    for key in list(source):
        if key.endswith("SecretRef"):  # which Secret holds a key does not change the images
            del source[key]
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
