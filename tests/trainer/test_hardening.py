"""Failure semantics of the trainer: a diverged run stops without saving or publishing NaN weights,
a checkpoint from the bucket cannot run code or write outside its folder, and a checkpoint that
fails to upload is retried and fails the run only when it is the newest one."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from trainer_testkit import copy_of, core_flags, env, train, trained_output

from kubetune.api.contracts import CheckpointState, DataloaderPosition, RngState
from kubetune.api.layout import EXIT_DIVERGED, EXIT_INVALID


def train_with_nan_unet(args: list[str], nan_calls: tuple[int, int]) -> subprocess.CompletedProcess[str]:
    """The real trainer, with the UNet's training forward passes number nan_calls[0] up to (not
    including) nan_calls[1] (counted from 0) returning NaN: what a diverging run produces."""
    first, end = nan_calls
    script = (
        "import sys, torch, diffusers\n"
        "original = diffusers.UNet2DConditionModel.forward\n"
        "calls = [0]\n"
        "def forward(self, *args, **kwargs):\n"
        "    out = original(self, *args, **kwargs)\n"
        "    if self.training:\n"
        "        calls[0] += 1\n"
        f"        if {first} < calls[0] <= {end}:\n"
        "            out = (out[0] * float('nan'),) + tuple(out[1:])\n"
        "    return out\n"
        "diffusers.UNet2DConditionModel.forward = forward\n"
        "from kubetune.trainer.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_nan_loss_stops_before_checkpointing_it_and_keeps_the_last_good_checkpoint(
    tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    # two forward passes per step (accumulation 2): passes 6 and 7 are step 4's
    args = core_flags(
        tiny_model, shapes_dataset, output, max_train_steps=8, checkpointing_steps=2, checkpoints_total_limit=1
    )
    result = train_with_nan_unet(args, (6, 10**6))
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "NaN or inf" in errors[0] and "checkpoint-2" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    checkpoints = sorted(p.name for p in output.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"], "the good checkpoint is kept, no NaN one is written"
    assert (output / "checkpoint-2" / "manifest.json").exists()
    assert not (output / "model_index.json").exists() and not (output / "unet").exists(), "nothing published"
    assert json.loads((output / "progress.json").read_text())["state"] == "failed"


def one_skip_allowed(model: Path, data: Path, output: Path) -> list[str]:
    """6 steps, a checkpoint at 3, at most one non-finite step skipped."""
    return core_flags(
        model, data, output, max_train_steps=6, checkpointing_steps=3, max_nonfinite_steps=1, use_ema=False
    )


def test_max_nonfinite_steps_skips_a_bad_step_and_finishes(
    tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    output = tmp_path / "out"
    args = one_skip_allowed(tiny_model, shapes_dataset, output)
    result = train_with_nan_unet(args, (4, 6))  # one step (the third) goes NaN
    assert result.returncode == 0, result.stderr[-3000:]
    assert "non-finite loss or gradients; update skipped (1 of at most 1)" in result.stderr
    assert json.loads((output / "progress.json").read_text())["step"] == 6
    weights = load_file(output / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_more_nonfinite_steps_than_allowed_stop_the_run(tiny_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    args = one_skip_allowed(tiny_model, shapes_dataset, output)
    result = train_with_nan_unet(args, (4, 10**6))
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    assert "after 2 skipped steps" in error_lines(result.stderr)[0]


@pytest.fixture(scope="module")
def pristine_checkpoint(tiny_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step run with its checkpoint at step 2, trained once for the module (tests damage copies)."""
    output = tmp_path_factory.mktemp("checkpointed") / "out"
    return trained_output(tiny_model, shapes_dataset, output, max_train_steps=2, checkpointing_steps=2)


@pytest.fixture
def checkpointed_run(
    pristine_checkpoint: Path, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> tuple[Path, list[str]]:
    """A copy of the 2-step run's output, and the flags to resume it to step 4."""
    output = copy_of(pristine_checkpoint, tmp_path)
    return output, core_flags(
        tiny_model, shapes_dataset, output, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"
    )


def rewrite_manifest(folder: Path, change: Any) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


class WritesAFile:
    """A pickle that, when loaded without weights_only, creates a file: code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_optimizer_file_cannot_run_code(checkpointed_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    import torch

    output, resume = checkpointed_run
    folder = output / "checkpoint-2"
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": WritesAFile(marker)}, folder / "optimizer.pt")
    data = (folder / "optimizer.pt").read_bytes()

    def update(manifest: dict[str, Any]) -> None:
        manifest["files"]["optimizer.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    rewrite_manifest(folder, update)
    result = train(resume)
    assert result.returncode == EXIT_INVALID, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "not a plain optimizer state" in errors[0], result.stderr[-3000:]
    assert not marker.exists(), "loading the checkpoint ran code from it"


def test_a_checkpoint_whose_manifest_names_a_file_outside_it_is_refused(
    checkpointed_run: tuple[Path, list[str]],
) -> None:
    output, resume = checkpointed_run
    rewrite_manifest(
        output / "checkpoint-2", lambda m: m["files"].update({"../escape": {"size": 1, "sha256": "0" * 64}})
    )
    result = train(resume)
    assert result.returncode == EXIT_INVALID, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "is not a plain file name" in errors[0], result.stderr[-3000:]


@pytest.mark.parametrize(
    "name", ["../escape", "/etc/passwd", "..", "unet/../../escape", "unet//x", "./x", "a\\b", "a/b/c/d/e"]
)
def test_checkpoint_manifest_file_names_stay_inside_the_folder(
    checkpointed_run: tuple[Path, list[str]], name: str
) -> None:
    """What the trainer does when it resumes (the run above shows the exit code and the one line)."""
    from kubetune.storage import Store
    from kubetune.trainer.checkpoint import CheckpointError, fetch, find_checkpoint

    output, _ = checkpointed_run
    rewrite_manifest(output / "checkpoint-2", lambda m: m["files"].update({name: {"size": 1, "sha256": "0" * 64}}))
    ref = find_checkpoint(Store(str(output)), "latest")
    assert ref is not None and ref.name == "checkpoint-2"
    with pytest.raises(CheckpointError, match="is not a plain file name"):
        fetch(ref, output.parent / "staging")
    assert not (output.parent / "escape").exists()


# -- background uploads ------------------------------------------------------------------------


class FlakyUploads:
    """Store.upload_file that fails for the checkpoints named in `fail` (`times` times each, or
    always) and can be slowed down."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: dict[str, int], delay: float = 0.0) -> None:
        from kubetune.storage import StorageError, Store

        self.fail, self.delay, self.calls = dict(fail), delay, 0
        original = Store.upload_file

        def upload_file(store: Store, source: str | Path, key: str) -> None:
            self.calls += 1
            time.sleep(self.delay)
            checkpoint = next((p.name for p in Path(source).parents if p.name.startswith("checkpoint-")), "")
            if self.fail.get(checkpoint, 0) > 0:
                self.fail[checkpoint] -= 1
                raise StorageError(f"simulated outage uploading {checkpoint}")
            original(store, source, key)

        monkeypatch.setattr(Store, "upload_file", upload_file)


def write_checkpoint(checkpointer: Any, step: int) -> None:
    folder = checkpointer.folder(step)
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights %d" % step)
    checkpointer.commit(
        folder,
        CheckpointState(
            step=step,
            samples_seen=step,
            epoch=0,
            seed=0,
            method="full",
            global_batch_size=1,
            world_size=1,
            cache_key="k",
            dataloader=DataloaderPosition(position=step, epoch=0, index_in_epoch=step, samples=8),
            rng=RngState(seed=0, scheme="test"),
        ),
    )


@pytest.fixture
def checkpointer(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from kubetune.storage import Store
    from kubetune.trainer import checkpoint

    monkeypatch.setattr(checkpoint, "PUBLISH_RETRY_SECONDS", 0.0)
    made = checkpoint.Checkpointer(Store(f"s3://{s3_bucket}/run"), tmp_path / "staging", keep=None)
    yield made
    made.close()


def stored_steps(checkpointer: Any) -> list[int]:
    from kubetune.trainer.checkpoint import complete_checkpoints

    return [ref.step for ref in complete_checkpoints(checkpointer.output)]


def test_a_failed_upload_is_retried(checkpointer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    FlakyUploads(monkeypatch, {"checkpoint-1": 2})
    write_checkpoint(checkpointer, 1)
    assert checkpointer.wait() == "checkpoint-1"
    assert stored_steps(checkpointer) == [1] and checkpointer.failed == []


def test_an_older_failed_checkpoint_is_logged_and_does_not_fail_the_run(
    checkpointer: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    FlakyUploads(monkeypatch, {"checkpoint-1": 99})
    with caplog.at_level(logging.ERROR, logger="kubetune.trainer"):
        write_checkpoint(checkpointer, 1)
        write_checkpoint(checkpointer, 2)
        assert checkpointer.wait() == "checkpoint-2"
    assert stored_steps(checkpointer) == [2] and checkpointer.failed == ["checkpoint-1"]
    assert any("checkpoint-1 could not be stored" in r.getMessage() for r in caplog.records)


def test_the_newest_checkpoint_failing_fails_the_run(checkpointer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.storage import StorageError

    FlakyUploads(monkeypatch, {"checkpoint-2": 99})
    write_checkpoint(checkpointer, 1)
    write_checkpoint(checkpointer, 2)
    with pytest.raises(StorageError, match="newest checkpoint checkpoint-2 could not be stored"):
        checkpointer.wait()
    assert stored_steps(checkpointer) == [1]


def test_training_waits_for_the_previous_upload_before_staging_another(
    checkpointer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    FlakyUploads(monkeypatch, {}, delay=0.3)
    write_checkpoint(checkpointer, 1)
    checkpointer.folder(2)  # blocks until checkpoint 1 is stored: at most two on the staging disk
    assert stored_steps(checkpointer) == [1]
    staged = sorted(p.name for p in checkpointer.local_root.glob("checkpoint-*"))
    assert staged == ["checkpoint-1", "checkpoint-2"]
