"""Resumable checkpoints: complete and atomic, uploaded in the background.

A checkpoint is a folder `checkpoint-N/` at the output's root, named and filled as diffusers'
train_text_to_image(_lora).py fill theirs: `unet/` (and `unet_ema/`) in diffusers format for a full
fine-tune, `pytorch_lora_weights.safetensors` for LoRA, plus kubetune's `optimizer.pt`. Its
`manifest.json` (kubetune.api.contracts.CheckpointManifest: files with sizes and SHA-256, step,
samples seen, seed and the data position) is written last: a folder without it does not exist for
`--resume_from_checkpoint latest`. Writing the files is the only part on the training path;
hashing, the manifest, the upload to S3 and removing old checkpoints (only after a newer one is
complete) run in a background thread.

Also resumed: a `checkpoint-N/` that diffusers' script wrote (accelerate's save_state; no manifest,
complete once `random_states_0.pkl` exists), and kubetune's earlier `checkpoints/step-N/`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune.api.contracts import CheckpointFile, CheckpointManifest, CheckpointState, problem
from kubetune.api.layout import (
    CHECKPOINT_KEYS_PREFIX,
    MANIFEST_FILE,
    STOCK_CHECKPOINT_MARKER,
    checkpoint_name,
    checkpoint_step,
    complete_checkpoint_paths,
)
from kubetune.storage import StorageError, Store

log = logging.getLogger("kubetune.trainer")
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_MAX_DEPTH = 4  # `unet/diffusion_pytorch_model.safetensors` is 2
# A whole checkpoint is tried this many times, PUBLISH_RETRY_SECONDS * 2**n apart. boto3 already
# retries each request (8 attempts, adaptive); this outer loop rides out a longer outage of the
# store. A hand-written loop: three lines, and no retry library is a dependency of the trainer.
PUBLISH_ATTEMPTS = 3
PUBLISH_RETRY_SECONDS = 5.0


class CheckpointError(RuntimeError):
    pass


@dataclass
class CheckpointRef:
    name: str  # the folder's name: checkpoint-N (earlier: step-NNNNNNNN)
    step: int
    store: Store  # the checkpoint folder
    manifest: CheckpointManifest | None  # None: written by diffusers' script (accelerate's save_state)

    @property
    def stock(self) -> bool:
        return self.manifest is None


def checkpoint_keys(output: Store) -> list[str]:
    """The keys (relative to the output) under `checkpoint-*/` and `checkpoints/*/`: what
    complete_checkpoint_paths needs, without listing the dataset or cache (one prefix covers both)."""
    return output.keys_starting_with(CHECKPOINT_KEYS_PREFIX)


def complete_checkpoints(output: Store) -> list[CheckpointRef]:
    """Complete checkpoints in `output` (kubetune's, diffusers' script's, the earlier layout's),
    oldest first."""
    found = []
    for path in complete_checkpoint_paths(checkpoint_keys(output)):
        try:
            ref = open_checkpoint(output.child(path))
        except (CheckpointError, StorageError):
            continue
        if ref is not None:
            found.append(ref)
    return sorted(found, key=lambda ref: ref.step)


def open_checkpoint(folder: Store) -> CheckpointRef | None:
    """The checkpoint in `folder`: kubetune's (with its manifest) or one diffusers' script wrote
    (accelerate's files, the step in the folder name); None when it is neither (not a checkpoint,
    or one whose writing was cut off)."""
    name = folder.uri.rstrip("/").rsplit("/", 1)[-1]
    try:
        manifest = read_manifest(folder)
        return CheckpointRef(name, manifest.step, folder, manifest)
    except FileNotFoundError:
        pass
    if not folder.exists(STOCK_CHECKPOINT_MARKER):
        return None
    step = checkpoint_step(name)
    if step is None or not name.startswith("checkpoint-"):
        raise CheckpointError(
            f"{folder.uri}: a checkpoint of diffusers' script, but its step cannot be read from the folder "
            "name (it must be checkpoint-N)"
        )
    return CheckpointRef(name, step, folder, None)


def find_checkpoint(output: Store, value: str) -> CheckpointRef | None:
    """`latest` (None when there is none), `checkpoint-N` (or `step-N`) in the output, or a folder:
    an s3:// URI, an absolute path, or a relative path (to the working directory when it exists
    there, else to the output)."""
    if value == "latest":
        refs = complete_checkpoints(output)
        _warn_incomplete(output, refs)
        return refs[-1] if refs else None
    if "/" not in value and checkpoint_step(value) is not None:
        step = checkpoint_step(value)
        matches = [ref for ref in complete_checkpoints(output) if ref.step == step]
        if not matches:
            raise CheckpointError(
                f"--resume_from_checkpoint {value}: no complete checkpoint of step {step} in {output.uri}"
            )
        return matches[-1]
    if value.startswith("s3://") or Path(value).is_absolute():
        folder = Store(value)
    elif Path(value).is_dir():
        folder = Store(str(Path(value).resolve()))
    else:
        folder = output.child(value)
    ref = open_checkpoint(folder)
    if ref is None:
        raise CheckpointError(
            f"--resume_from_checkpoint {value}: no complete checkpoint at {folder.uri} (no {MANIFEST_FILE}, "
            f"nor the {STOCK_CHECKPOINT_MARKER} that accelerate's save_state writes last)"
        )
    return ref


def _warn_incomplete(output: Store, refs: list[CheckpointRef]) -> None:
    """Say which checkpoint folders `latest` passes over (an interrupted save), never silently."""
    complete = {ref.name for ref in refs}
    seen = {key.split("/")[0] for key in checkpoint_keys(output) if key.startswith("checkpoint-")}
    for name in sorted(seen - complete, key=lambda n: checkpoint_step(n) or -1):
        log.warning(
            "%s: passed over (no %s nor %s: its writing was cut off)",
            output.uri_of(name),
            MANIFEST_FILE,
            STOCK_CHECKPOINT_MARKER,
        )


def read_manifest(folder: Store) -> CheckpointManifest:
    """A checkpoint folder's manifest; FileNotFoundError when absent, CheckpointError when it is
    not one (not JSON, or a key of the wrong type)."""
    try:
        return CheckpointManifest.model_validate_json(folder.read_bytes(MANIFEST_FILE))
    except ValidationError as error:
        where = folder.uri_of(MANIFEST_FILE)
        raise CheckpointError(f"{where}: not a checkpoint manifest: {problem(error)}") from None


def is_safe_relative_name(name: str) -> bool:
    """A manifest's file name stays inside its folder: 1 to _MAX_DEPTH parts joined by '/', each
    letters, digits, '.', '_', '-' and neither '.' nor '..' (so no absolute path, no '..', no '//')."""
    parts = name.split("/")
    return len(parts) <= _MAX_DEPTH and all(
        _SAFE_FILE_NAME.fullmatch(part) and part not in (".", "..") for part in parts
    )


def fetch(ref: CheckpointRef, staging: Path) -> Path:
    """A local folder with the checkpoint's files, verified against its manifest (a checkpoint of
    diffusers' script, which has none, is taken as it is)."""
    local = Path(ref.store.uri) if not ref.store.is_s3 else staging / "resume" / ref.name
    if ref.manifest is None:
        if ref.store.is_s3:
            ref.store.download_tree("", local)
        return local
    inside = local.resolve()
    for name, entry in ref.manifest.files.items():
        if not is_safe_relative_name(name):
            # the manifest comes from the bucket: a name must not lead outside the folder
            raise CheckpointError(
                f"{ref.store.uri_of(MANIFEST_FILE)}: file name {name[:80]!r} is not "
                "a plain file name or relative path of them (letters, digits, '.', '_', '-'; "
                "no '..'); the checkpoint is damaged or was tampered with"
            )
        path = local / name
        if ref.store.is_s3 and not (path.exists() and path.stat().st_size == entry.size):
            ref.store.download_file(name, path)
        if not path.is_file() or not path.resolve().is_relative_to(inside):
            raise CheckpointError(f"{ref.store.uri_of(name)}: missing; the checkpoint is damaged")
        if path.stat().st_size != entry.size or _sha256(path) != entry.sha256:
            raise CheckpointError(
                f"{ref.store.uri_of(name)}: size or hash differs from the manifest; the checkpoint is damaged"
            )
    return local


def local_entries(folder: Path, paths: list[Path]) -> dict[str, CheckpointFile]:
    """Manifest entries (size, SHA-256) of files in `folder`, by their relative names."""
    return {
        p.relative_to(folder).as_posix(): CheckpointFile(size=p.stat().st_size, sha256=_sha256(p))
        for p in sorted(paths)
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# A checkpoint's tensors are copied to CPU memory and written in the background when the copy takes
# at most this share of the memory available (the process's cgroup limit or the machine's), or at
# most COPY_LIMIT_ENV gigabytes when set (0: always write before training goes on).
BACKGROUND_SHARE = 0.5
COPY_LIMIT_ENV = "KUBETUNE_CHECKPOINT_COPY_MAX_GB"


def background_copy_limit() -> float:
    """Bytes a checkpoint's copy in memory may take to be written in the background."""
    import os

    configured = os.environ.get(COPY_LIMIT_ENV)
    if configured:
        try:
            return max(0.0, float(configured)) * 1e9
        except ValueError:
            log.warning("%s=%r: not a number of gigabytes; using half the memory available", COPY_LIMIT_ENV, configured)
    return BACKGROUND_SHARE * available_memory()


def tensor_bytes(payload: Any) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples."""
    import torch

    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, dict):
        return sum(tensor_bytes(v) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(tensor_bytes(v) for v in payload)
    return 0


def cpu_copy(payload: Any) -> Any:
    """The same nest with every tensor copied into CPU memory (never a view of the live one, which
    training goes on changing) and every container new; other values are immutable or not changed
    in place (the optimizer's and scheduler's hyperparameters)."""
    import torch

    if isinstance(payload, torch.Tensor):
        return payload.detach().to("cpu", copy=True)
    if isinstance(payload, dict):
        return {k: cpu_copy(v) for k, v in payload.items()}
    if type(payload) in (list, tuple):
        return type(payload)(cpu_copy(v) for v in payload)
    return payload


def write_checkpoint_files(folder: Path, files: dict[str, Any]) -> None:
    """`relative path -> payload`: tensor dicts of `.safetensors` paths with safetensors, others with
    torch.save (read back with weights_only)."""
    import torch
    from safetensors.torch import save_file

    for name, payload in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            save_file(payload, target, metadata={"format": "pt"})
        else:
            torch.save(payload, target)


def available_memory() -> int:
    """Bytes this process may still take: the smaller of the machine's MemAvailable and what its
    cgroup (v2, else v1) leaves under its limit."""
    available = _meminfo_available()
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < 1 << 60:  # "max" or a huge v1 value: no limit
            available = min(available, max(0, int(limit_text) - usage))
        break
    return available


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0  # unknown: write before training goes on


class Checkpointer:
    """Writes checkpoints into `staging` and publishes them to `output` in the background.

    At most one checkpoint is being published while the next one is written: `folder` waits for
    the previous publish, so the staging disk holds at most two checkpoints and training waits
    rather than filling it. A publish that fails is retried, then logged; only the newest
    checkpoint failing to reach the store fails the run (`wait`)."""

    def __init__(self, output: Store, staging: Path, keep: int | None) -> None:
        self.output, self.keep = output, keep
        self.local_root = Path(output.uri) if not output.is_s3 else staging
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self._pending: list[tuple[str, Future[str]]] = []
        self.failed: list[str] = []  # checkpoints that never reached the store
        self.latest: str | None = None  # newest checkpoint known complete in the output
        # another run's checkpoints (--resume_mismatch restart): deleted once this run's first is complete
        self.superseded: list[CheckpointRef] = []
        # called in the upload thread with each checkpoint's local folder once it is stored; what it
        # raises is logged, never a failed checkpoint (the Hub copy of checkpoints: --hub_push_checkpoints)
        self.on_stored: Callable[[Path], None] | None = None

    def folder(self, step: int) -> Path:
        """A fresh, empty local folder for the checkpoint of `step` (files go in, then `commit`)."""
        self._settle()
        path = self.local_root / checkpoint_name(step)
        self._delete_superseded(path.name)  # an old run's checkpoint of the same step goes first
        if path.exists():
            shutil.rmtree(path)  # an incomplete leftover of an interrupted save
        path.mkdir(parents=True)
        return path

    def commit(
        self,
        path: Path,
        state: CheckpointState,
        uploaded: dict[str, CheckpointFile] | None = None,
        write: Callable[[], None] | None = None,
    ) -> None:
        """Hash, write the manifest, upload and prune, in the background; first `write` the
        checkpoint's files into `path`, when given (once: a failed write fails the checkpoint).
        `uploaded`: files of the checkpoint that other processes already stored (sharded
        checkpoints of several nodes), listed in the manifest as they are."""
        task = self._pool.submit(self._write_and_publish, path, state, dict(uploaded or {}), write)
        self._pending.append((path.name, task))

    def _write_and_publish(
        self, path: Path, state: CheckpointState, uploaded: dict[str, CheckpointFile], write: Callable[[], None] | None
    ) -> str:
        if write is not None:
            started = time.monotonic()
            write()
            log.info("%s written in %.1fs in the background", path.name, time.monotonic() - started)
        name = self._publish_with_retries(path, state, uploaded)
        if self.on_stored is not None:
            try:
                self.on_stored(path)
            except Exception as error:  # the checkpoint itself is stored; the extra copy is not worth a failure
                log.warning("checkpoint %s: %s", name, str(error) or type(error).__name__)
        return name

    def _settle(self) -> None:
        """Wait for the publishes in flight; remember (and log) the ones that failed."""
        for name, future in self._pending:
            error = future.exception()
            if error is not None:
                self.failed.append(name)
                log.error("checkpoint %s could not be stored in %s: %s", name, self.output.uri, error)
        self._pending = []

    def _publish_with_retries(self, path: Path, state: CheckpointState, uploaded: dict[str, CheckpointFile]) -> str:
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                return self._publish(path, state, uploaded)
            except (StorageError, OSError) as error:
                if attempt == PUBLISH_ATTEMPTS:
                    raise
                delay = PUBLISH_RETRY_SECONDS * 2 ** (attempt - 1)
                log.warning(
                    "checkpoint %s: storing failed (%s); retrying in %.0fs (attempt %d of %d)",
                    path.name,
                    error,
                    delay,
                    attempt + 1,
                    PUBLISH_ATTEMPTS,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _publish(self, path: Path, state: CheckpointState, uploaded: dict[str, CheckpointFile]) -> str:
        started = time.monotonic()
        here = [p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() != MANIFEST_FILE]
        files = local_entries(path, here)
        created = datetime.now(timezone.utc).replace(microsecond=0)
        manifest = CheckpointManifest(
            **dict(state), files=dict(sorted({**files, **uploaded}.items())), created_at=created
        ).to_json()
        local = Store(str(path))
        if self.output.is_s3:
            remote = self.output.child(path.name)
            for name in files:
                remote.upload_file(path / name, name)
            # last: now the checkpoint exists
            remote.write_bytes(MANIFEST_FILE, manifest, "application/json")
            local.write_bytes(MANIFEST_FILE, manifest, "application/json")
            step = checkpoint_step(path.name) or 0
            for old in self.local_root.glob("checkpoint-*"):
                if old.is_dir() and (checkpoint_step(old.name) or step) < step:
                    shutil.rmtree(old, ignore_errors=True)  # the S3 copy is the one that counts
        else:
            local.write_bytes(MANIFEST_FILE, manifest, "application/json")
        self.latest = path.name
        self._delete_superseded()
        self._prune()
        log.info(
            "checkpoint %s complete in %s (%.1fs in background)",
            path.name,
            self.output.uri,
            time.monotonic() - started,
        )
        return path.name

    def _delete_superseded(self, name: str | None = None) -> None:
        """Delete the superseded checkpoints (only the one named `name`, when given): the marker
        that makes one complete first, so that a half-deleted one never counts."""
        for ref in [ref for ref in self.superseded if name is None or ref.name == name]:
            ref.store.delete(MANIFEST_FILE if ref.manifest is not None else STOCK_CHECKPOINT_MARKER)
            ref.store.delete_prefix("")
            self.superseded.remove(ref)
            log.info("checkpoint %s of the earlier run removed (--resume_mismatch restart)", ref.store.uri)

    def _prune(self) -> None:
        if self.keep is None:
            return
        # every complete checkpoint counts, those diffusers' script wrote included (as it counts them)
        refs = complete_checkpoints(self.output)
        for ref in refs[: max(0, len(refs) - self.keep)]:
            # first: a half-deleted checkpoint must not count
            ref.store.delete(MANIFEST_FILE if ref.manifest is not None else STOCK_CHECKPOINT_MARKER)
            ref.store.delete_prefix("")
            log.info("checkpoint %s removed (--checkpoints_total_limit %d)", ref.store.uri, self.keep)

    def wait(self) -> str | None:
        """Block until every checkpoint is published. Raise only if the newest one failed: an
        older failure lost nothing that a newer checkpoint does not hold."""
        newest = self._pending[-1][0] if self._pending else None
        self._settle()
        if newest is not None and newest in self.failed:
            raise StorageError(f"the newest checkpoint {newest} could not be stored in {self.output.uri} (see the log)")
        return self.latest

    def close(self) -> None:
        self._pool.shutdown(wait=True)
