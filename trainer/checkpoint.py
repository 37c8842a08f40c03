"""Resumable checkpoints: complete and atomic, uploaded in the background.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` under the output. Its `manifest.json`
(kubetune.api.contracts.CheckpointManifest: files with sizes and SHA-256, step, samples seen,
seed and the data position) is written last:
a folder without it does not exist for `--resume_from_checkpoint latest`. Writing the files is
the only part on the training path; hashing, the manifest, the upload to S3 and removing old
checkpoints (only after a newer one is complete) run in a background thread.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from kubetune.api.contracts import CheckpointFile, CheckpointManifest, CheckpointState, problem
from kubetune.api.layout import (
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    checkpoint_name,
    checkpoint_step,
    complete_checkpoint_names,
)
from kubetune.storage import StorageError, Store

log = logging.getLogger("kubetune.trainer")
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
# A whole checkpoint is tried this many times, PUBLISH_RETRY_SECONDS * 2**n apart. boto3 already
# retries each request (8 attempts, adaptive); this outer loop rides out a longer outage of the
# store. A hand-written loop: three lines, and no retry library is a dependency of the trainer.
PUBLISH_ATTEMPTS = 3
PUBLISH_RETRY_SECONDS = 5.0


class CheckpointError(RuntimeError):
    pass


@dataclass
class CheckpointRef:
    name: str
    step: int
    store: Store  # the checkpoint folder
    manifest: CheckpointManifest


def complete_checkpoints(output: Store) -> list[CheckpointRef]:
    """Complete checkpoints under `output/checkpoints`, oldest first."""
    found = []
    for name in complete_checkpoint_names(output.list(CHECKPOINTS_DIR)):
        folder = output.child(CHECKPOINTS_DIR, name)
        try:
            manifest = read_manifest(folder)
        except (FileNotFoundError, CheckpointError, StorageError):
            continue
        found.append(CheckpointRef(name, manifest.step, folder, manifest))
    return sorted(found, key=lambda ref: ref.step)


def find_checkpoint(output: Store, value: str) -> CheckpointRef | None:
    """`latest`, a name under output/checkpoints (`step-N`, `checkpoint-N`), or a folder path/URI."""
    if value == "latest":
        refs = complete_checkpoints(output)
        return refs[-1] if refs else None
    folder = (
        output.child(CHECKPOINTS_DIR, value)
        if checkpoint_step(value) is not None and "/" not in value
        else Store(value)
    )
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        raise CheckpointError(
            f"--resume_from_checkpoint {value}: no complete checkpoint there (no {MANIFEST_FILE})"
        ) from None
    return CheckpointRef(folder.uri.rstrip("/").rsplit("/", 1)[-1], manifest.step, folder, manifest)


def read_manifest(folder: Store) -> CheckpointManifest:
    """A checkpoint folder's manifest; FileNotFoundError when absent, CheckpointError when it is
    not one (not JSON, or a key of the wrong type)."""
    try:
        return CheckpointManifest.model_validate_json(folder.read_bytes(MANIFEST_FILE))
    except ValidationError as error:
        where = folder.uri_of(MANIFEST_FILE)
        raise CheckpointError(f"{where}: not a checkpoint manifest: {problem(error)}") from None


def fetch(ref: CheckpointRef, staging: Path) -> Path:
    """A local folder with the checkpoint's files, verified against its manifest."""
    local = Path(ref.store.uri) if not ref.store.is_s3 else staging / "resume" / ref.name
    for name, entry in ref.manifest.files.items():
        if not _SAFE_FILE_NAME.fullmatch(name) or name in (".", ".."):
            # the manifest comes from the bucket: a name must not lead outside the folder
            raise CheckpointError(
                f"{ref.store.uri_of(MANIFEST_FILE)}: file name {name[:80]!r} is not "
                "a plain file name (letters, digits, '.', '_', '-'); the checkpoint "
                "is damaged or was tampered with"
            )
        path = local / name
        if ref.store.is_s3 and not (path.exists() and path.stat().st_size == entry.size):
            ref.store.download_file(name, path)
        if path.stat().st_size != entry.size or _sha256(path) != entry.sha256:
            raise CheckpointError(
                f"{ref.store.uri_of(name)}: size or hash differs from the manifest; the checkpoint is damaged"
            )
    return local


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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

    def folder(self, step: int) -> Path:
        """A fresh, empty local folder for the checkpoint of `step` (files go in, then `commit`)."""
        self._settle()
        path = self.local_root / CHECKPOINTS_DIR / checkpoint_name(step)
        if path.exists():
            shutil.rmtree(path)  # an incomplete leftover of an interrupted save
        path.mkdir(parents=True)
        return path

    def commit(self, path: Path, state: CheckpointState) -> None:
        """Hash, write the manifest, upload and prune, in the background."""
        self._pending.append((path.name, self._pool.submit(self._publish_with_retries, path, state)))

    def _settle(self) -> None:
        """Wait for the publishes in flight; remember (and log) the ones that failed."""
        for name, future in self._pending:
            error = future.exception()
            if error is not None:
                self.failed.append(name)
                log.error(
                    "checkpoint %s could not be stored in %s: %s", name, self.output.uri_of(CHECKPOINTS_DIR), error
                )
        self._pending = []

    def _publish_with_retries(self, path: Path, state: CheckpointState) -> str:
        for attempt in range(1, PUBLISH_ATTEMPTS + 1):
            try:
                return self._publish(path, state)
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

    def _publish(self, path: Path, state: CheckpointState) -> str:
        started = time.monotonic()
        files = {
            p.name: CheckpointFile(size=p.stat().st_size, sha256=_sha256(p))
            for p in sorted(path.iterdir())
            if p.is_file() and p.name != MANIFEST_FILE
        }
        created = datetime.now(timezone.utc).replace(microsecond=0)
        manifest = CheckpointManifest(**dict(state), files=files, created_at=created).to_json()
        local = Store(str(path))
        if self.output.is_s3:
            remote = self.output.child(CHECKPOINTS_DIR, path.name)
            for name in files:
                remote.upload_file(path / name, name)
            # last: now the checkpoint exists
            remote.write_bytes(MANIFEST_FILE, manifest, "application/json")
            local.write_bytes(MANIFEST_FILE, manifest, "application/json")
            for old in sorted((self.local_root / CHECKPOINTS_DIR).iterdir()):
                if old != path and old.name < path.name:
                    shutil.rmtree(old, ignore_errors=True)  # the S3 copy is the one that counts
        else:
            local.write_bytes(MANIFEST_FILE, manifest, "application/json")
        self.latest = path.name
        self._prune()
        log.info(
            "checkpoint %s complete in %s (%.1fs in background)",
            path.name,
            self.output.uri_of(CHECKPOINTS_DIR),
            time.monotonic() - started,
        )
        return path.name

    def _prune(self) -> None:
        if self.keep is None:
            return
        refs = complete_checkpoints(self.output)
        for ref in refs[: max(0, len(refs) - self.keep)]:
            ref.store.delete(MANIFEST_FILE)  # first: a half-deleted checkpoint must not count
            ref.store.delete_prefix("")

    def wait(self) -> str | None:
        """Block until every checkpoint is published. Raise only if the newest one failed: an
        older failure lost nothing that a newer checkpoint does not hold."""
        newest = self._pending[-1][0] if self._pending else None
        self._settle()
        if newest is not None and newest in self.failed:
            raise StorageError(
                f"the newest checkpoint {newest} could not be stored in "
                f"{self.output.uri_of(CHECKPOINTS_DIR)} (see the log)"
            )
        return self.latest

    def close(self) -> None:
        self._pool.shutdown(wait=True)
