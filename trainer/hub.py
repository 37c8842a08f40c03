"""Pushing the published model to the Hugging Face Hub (`--push_to_hub`, `spec.output.hub`).

One commit holds the model files, the model card and the final samples, so the repository never
shows half a model. create_commit rather than upload_folder: upload_folder with hf_xet installed
commits large folders in several batches. Files the Hub wants in LFS/Xet go through the client's
own upload path; the rest are sent inline in the commit.

The token: `--hub_token`, else $KUBETUNE_HUB_TOKEN (what the operator sets from
spec.output.hub.tokenSecretRef; HF_TOKEN stays the base model's read token), else the client's
own ($HF_TOKEN, the stored login). It never appears in a message: errors are built from the
status code and the repository only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.layout import MANIFEST_FILE, checkpoint_step

log = logging.getLogger("kubetune.trainer.hub")
TOKEN_ENV = "KUBETUNE_HUB_TOKEN"
ATTEMPTS = 4
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
WHERE = "--hub_model_id (spec.output.hub)"


class HubError(Exception):
    """The push failed; a one-line message without the token. `permanent`: retrying cannot help
    (the token refused, the namespace missing)."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class HubFile:
    path_in_repo: str
    content: Path | bytes


def push(
    repo: str,
    files: Iterable[HubFile],
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    message: str = "kubetune: fine-tuned model",
    delete_folders: Callable[[list[str]], list[str]] | None = None,
) -> str:
    """Create `repo` if missing, then commit `files` to `revision` (main if None); the commit URL.
    `delete_folders`: given the names of the top-level folders in the repository, those the same
    commit deletes. Transient failures (connection errors, 408/429/5xx) are retried with backoff."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, RepoFolder

    api = HfApi(token=token or os.environ.get(TOKEN_ENV) or None)
    operations = [CommitOperationAdd(f.path_in_repo, f.content) for f in files]

    def commit() -> str:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        # CommitOperationAdd objects are single-use: fresh ones for every attempt
        fresh: list[Any] = [CommitOperationAdd(o.path_in_repo, o.path_or_fileobj) for o in operations]
        if delete_folders is not None:
            tree = api.list_repo_tree(repo, revision=revision or None)
            folders = [entry.path for entry in tree if isinstance(entry, RepoFolder)]
            fresh += [CommitOperationDelete(f"{name}/", is_folder=True) for name in delete_folders(folders)]
        info = api.create_commit(repo, fresh, commit_message=message, revision=revision or None)
        return str(info.commit_url)

    delay = float(os.environ.get("KUBETUNE_HUB_RETRY_SECONDS", "2"))
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return commit()
        except Exception as error:
            status = _status(error)
            transient = status in RETRY_STATUS or (status is None and _is_connection_error(error))
            if not transient or attempt == ATTEMPTS:
                raise HubError(_message(repo, error, status), permanent=status in (401, 403, 404)) from None
            log.warning("pushing to %s failed (%s); retrying in %gs", repo, status or type(error).__name__, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# what kubetune's checkpoints hold besides the trained weights: resuming state, not a model anyone loads
_RESUME_STATE = ("optimizer.pt", MANIFEST_FILE)


def checkpoint_weights(folder: Path) -> list[str]:
    """The files of a stored checkpoint worth pushing: the trained weights and their configs
    (`unet/`, `unet_ema/`, `transformer/`, `pytorch_lora_weights.safetensors`), not the optimizer
    state, the manifest or FSDP shards (which load only into the same sharded run)."""
    from kubetune.trainer.sharding import SHARDED_SUFFIX

    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [name for name in names if name not in _RESUME_STATE and not name.split("/")[0].endswith(SHARDED_SUFFIX)]


def checkpoints_beyond(keep: int | None, new: str) -> Callable[[list[str]], list[str]]:
    """For `push(delete_folders=...)`: the `checkpoint-N` folders beyond the newest `keep` once
    `new` is added (none with no limit)."""

    def stale(folders: list[str]) -> list[str]:
        if keep is None:
            return []
        ours = {name for name in folders if name.startswith("checkpoint-")}  # never a folder kubetune did not name
        steps = {name: step for name in {*ours, new} if (step := checkpoint_step(name)) is not None}
        newest_first = sorted(steps, key=lambda name: steps[name], reverse=True)
        return sorted(name for name in newest_first[keep:] if name != new)

    return stale


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return int(status) if isinstance(status, int) else None


def _is_connection_error(error: Exception) -> bool:
    try:  # huggingface_hub's HTTP client
        from httpx2 import TransportError
    except ImportError:
        from httpx import TransportError
    return isinstance(error, TransportError | ConnectionError | TimeoutError)


def _message(repo: str, error: Exception, status: int | None) -> str:
    if status in (401, 403):
        return (
            f"{WHERE}: the Hub refused the token for {repo} (HTTP {status}): it needs write access to that "
            f"repository (set $HF_TOKEN or spec.output.hub.tokenSecretRef)"
        )
    if status == 404:
        return f"{WHERE}: {repo} or its namespace was not found on the Hub (HTTP 404)"
    if status is not None:
        return f"{WHERE}: pushing to {repo} failed: HTTP {status}"
    # connection errors and the like: the type only (their text may carry URLs with credentials)
    return f"{WHERE}: pushing to {repo} failed: {type(error).__name__}"
