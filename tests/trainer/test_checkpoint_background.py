"""Checkpoints written in the background: training waits only for a CPU copy of the weights, EMA
and optimizer state, which later steps cannot change; the files are those a synchronous save
writes, and a copy too large for the memory available is written before training goes on."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_testkit import core_flags, train

from kubetune.api.contracts import CheckpointState
from kubetune.storage import StorageError, Store
from kubetune.trainer import checkpoint
from kubetune.trainer.checkpoint import Checkpointer, available_memory, background_copy_limit, cpu_copy, tensor_bytes


def test_the_copy_is_its_own_memory_and_later_changes_do_not_reach_it() -> None:
    weight, moment = torch.ones(4, 3), torch.zeros(5, dtype=torch.bfloat16)
    state = {"w": weight, "opt": {"state": {0: {"exp_avg": moment, "step": torch.tensor(3.0)}}, "groups": [{"lr": 1}]}}
    copy = cpu_copy(state)
    weight.add_(1)
    moment.add_(2)
    state["opt"]["groups"][0]["lr"] = 7  # a scheduler changing the live group
    assert torch.equal(copy["w"], torch.ones(4, 3)) and torch.equal(copy["opt"]["state"][0]["exp_avg"], torch.zeros(5))
    assert copy["opt"]["groups"][0]["lr"] == 1
    assert tensor_bytes(state) == 4 * 3 * 4 + 5 * 2 + 4


def test_the_copy_may_take_half_the_memory_available_or_what_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable"))
    assert 0 < available_memory() <= int(meminfo.split()[1]) * 1024
    monkeypatch.delenv(checkpoint.COPY_LIMIT_ENV, raising=False)
    assert 0 < background_copy_limit() <= available_memory()
    monkeypatch.setenv(checkpoint.COPY_LIMIT_ENV, "2.5")
    assert background_copy_limit() == 2.5e9
    monkeypatch.setenv(checkpoint.COPY_LIMIT_ENV, "lots")
    assert 0 < background_copy_limit() <= available_memory()


def state() -> CheckpointState:
    return CheckpointState.model_validate(
        {
            "step": 2,
            "samplesSeen": 8,
            "epoch": 0,
            "seed": 1,
            "method": "full",
            "globalBatchSize": 4,
            "worldSize": 1,
            "cacheKey": "k",
            "dataloader": {"position": 8, "epoch": 0, "indexInEpoch": 8, "samples": 12},
            "rng": {"seed": 1, "scheme": "s"},
        }
    )


def test_commit_returns_before_the_write_and_the_manifest_comes_after_it(tmp_path: Path) -> None:
    checkpointer = Checkpointer(Store(str(tmp_path / "out")), tmp_path / "staging", keep=None)
    folder = checkpointer.folder(2)
    release = threading.Event()

    def write() -> None:
        release.wait(30)
        (folder / "optimizer.pt").write_bytes(b"state")

    checkpointer.commit(folder, state(), write=write)
    assert not (folder / "manifest.json").exists()  # training goes on while the write waits
    release.set()
    assert checkpointer.wait() == "checkpoint-2"
    assert (folder / "manifest.json").exists() and "optimizer.pt" in (folder / "manifest.json").read_text()
    checkpointer.close()


def test_a_failed_background_write_fails_the_newest_checkpoint(tmp_path: Path) -> None:
    checkpointer = Checkpointer(Store(str(tmp_path / "out")), tmp_path / "staging", keep=None)
    folder = checkpointer.folder(2)

    def write() -> None:
        raise OSError(28, "No space left on device")

    checkpointer.commit(folder, state(), write=write)
    with pytest.raises(StorageError, match="checkpoint-2"):
        checkpointer.wait()
    assert not (folder / "manifest.json").exists()
    checkpointer.close()


def test_a_full_checkpoint_is_the_same_written_in_the_background_or_first(
    tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    """The same run twice, its checkpoint written in the background and (no copy allowed) before
    training goes on: the same weights, EMA and optimizer state; the log says which."""
    runs = {}
    for how, env in (("background", {}), ("first", {checkpoint.COPY_LIMIT_ENV: "0"})):
        output = tmp_path / how
        flags = core_flags(tiny_model, shapes_dataset, output, max_train_steps=3, checkpointing_steps=2)
        result = train([*flags, "--use_ema"], **env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "checkpoint-2: training paused" in result.stderr
        assert ("written before training goes on" in result.stderr) == (how == "first")
        runs[how] = output / "checkpoint-2"
    for name in ("unet/diffusion_pytorch_model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"):
        background, first = (load_file(runs[how] / name) for how in ("background", "first"))
        assert background.keys() == first.keys()
        assert all(torch.equal(background[k], first[k]) for k in background), name
    background, first = (torch.load(runs[how] / "optimizer.pt", weights_only=True) for how in ("background", "first"))
    assert all(
        torch.equal(a, b)
        for index, moments in background["optimizer"]["state"].items()
        for (a, b) in ((moments[k], first["optimizer"]["state"][index][k]) for k in moments)
    )
