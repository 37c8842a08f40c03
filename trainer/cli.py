"""`kubetune train`: parse flags (no torch yet), run, and turn every ending into an exit code
(kubetune.api.layout: 0 ok, 1 retryable, 2 invalid input, 4 storage owned by another job, 75 preempted) and one line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kubetune.api import layout
from kubetune.cli_util import OneLineError
from kubetune.launch import EXIT_DIR_ENV
from kubetune.storage import storage_env
from kubetune.trainer.config import TrainConfig, parse_config


def main(argv: Sequence[str], prog: str = "kubetune train") -> int:
    try:
        cfg = parse_config(argv, prog)
    except OneLineError as error:
        return _finish(prog, layout.EXIT_INVALID, str(error))
    apply_storage_env(cfg)
    if cfg.hub_token:
        print(f"{prog}: warning: --hub_token shows in process listings; prefer $HF_TOKEN", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    noisy_loggers = ("diffusers", "transformers", "accelerate", "torch.distributed", "botocore", "urllib3")
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from kubetune.ownership import StorageOwnedError
    from kubetune.storage import StorageError
    from kubetune.trainer.checkpoint import CheckpointError
    from kubetune.trainer.data import DataError
    from kubetune.trainer.train import TrainError, cuda_oom_message, run

    try:
        return _end_process(_finish(prog, run(cfg)))
    except StorageOwnedError as error:  # another job's prefix: nothing is written there, progress neither
        return _finish(prog, layout.EXIT_STORAGE_OWNED, str(error))
    except TrainError as error:
        return _finish(prog, error.code, str(error), cfg.output_dir)
    except (DataError, CheckpointError) as error:
        return _finish(prog, layout.EXIT_INVALID, str(error), cfg.output_dir)
    except torch.OutOfMemoryError:
        return _finish(prog, layout.EXIT_INVALID, cuda_oom_message(cfg), cfg.output_dir)
    except StorageError as error:
        return _finish(prog, layout.EXIT_FAILED, str(error), cfg.output_dir)
    except Exception as error:  # a bug or an unforeseen failure: keep the traceback, one line
        logging.getLogger("kubetune.trainer").exception("training failed")
        return _finish(prog, layout.EXIT_FAILED, f"{type(error).__name__}: {error}", cfg.output_dir)


def apply_storage_env(cfg: TrainConfig) -> None:
    """The spec's storage settings (endpoint, region) into the environment, where not set there
    already: the one place `--spec` reaches beyond the TrainConfig."""
    if cfg.spec_storage is None:
        return
    for key, value in storage_env(cfg.spec_storage).items():
        if not os.environ.get(key):
            os.environ[key] = value


def _finish(prog: str, code: int, message: str = "", output_dir: str | None = None) -> int:
    """Print the one-line error, mark progress failed, leave the exit code for the supervisor."""
    if message:
        print(f"{prog}: error: {message}", file=sys.stderr)
    if code not in (layout.EXIT_OK, layout.EXIT_PREEMPTED) and output_dir and _is_main():
        _mark_failed(output_dir, message)
    exit_dir = os.environ.get(EXIT_DIR_ENV)
    if exit_dir and Path(exit_dir).is_dir():
        rank = os.environ.get("RANK", "0")
        if message:  # the supervisor repeats it as the pod's last log line (termination message)
            (Path(exit_dir) / f"message-{rank}").write_text(message)
        (Path(exit_dir) / f"exit-{rank}").write_text(str(code))
    return code


def _end_process(code: int) -> int:
    """After a successful run of several processes (accelerate launch sets WORLD_SIZE), exit now:
    the run ended its process group (Session.close), but in the interpreter's teardown a c10d/gloo
    C++ thread still joinable could abort the finished process ("terminate called without an active
    exception", exit -6, seen with FSDP on gloo) and fail the launch. Everything is written by now
    (outputs, progress, the exit file); the logs and streams are flushed first."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _mark_failed(output_dir: str, message: str) -> None:
    from kubetune.storage import StorageError, Store

    store = Store(output_dir)
    try:
        progress = store.read_json(layout.PROGRESS_FILE)
    except (FileNotFoundError, ValueError, StorageError):
        progress = {}
    progress.update(state="failed", message=message)
    with contextlib.suppress(StorageError):
        store.write_json(layout.PROGRESS_FILE, progress)
