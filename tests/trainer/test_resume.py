"""Preemption: SIGTERM mid-run (through the pod's launcher: supervisor + accelerate launch) saves a
checkpoint and exits 75; resuming from it ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from trainer_testkit import (
    REFERENCE_STEPS,
    core_flags,
    launch,
    max_difference,
    unet_weights,
    wait_for_progress,
)

from kubetune.api.layout import EXIT_PREEMPTED
from kubetune.launch import accelerate_launch_command


def pod_command(args: list[str]) -> list[str]:
    command = accelerate_launch_command(1, 0, 0, "127.0.0.1", 29500, args, python=sys.executable)
    return [sys.executable, "-m", "kubetune.launch", *command]


def test_sigterm_mid_run_then_resume_matches_uninterrupted(
    tiny_model: Path, shapes_dataset: Path, reference_run: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    args = core_flags(
        tiny_model,
        shapes_dataset,
        output,
        max_train_steps=REFERENCE_STEPS,
        checkpointing_steps=12,
        latent_cache_dir=reference_run.parent.parent / "latent_cache",
        resume_from_checkpoint="latest",
    )
    first = launch(pod_command(args))
    progress = output / "progress.json"
    wait_for_progress(progress, lambda p: p.get("state") == "training" and p.get("step", 0) >= 2, first)
    first.send_signal(signal.SIGTERM)
    log = first.communicate(timeout=120)[0]
    assert first.returncode == EXIT_PREEMPTED, log[-3000:]

    stopped = json.loads(progress.read_text())
    assert stopped["state"] == "preempted"
    step = stopped["step"]
    assert 2 <= step < REFERENCE_STEPS
    manifest = json.loads((output / f"checkpoint-{step}" / "manifest.json").read_text())
    assert manifest["step"] == step and manifest["samplesSeen"] == step * 4 and manifest["seed"] == 7
    unet, ema = "unet/diffusion_pytorch_model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"
    assert {unet, ema, "optimizer.pt"} <= set(manifest["files"])
    assert not (output / "model_index.json").exists()

    second = launch(pod_command(args))
    log = second.communicate(timeout=180)[0]
    assert second.returncode == 0, log[-3000:]
    assert f"resuming from {output}/checkpoint-{step} " in log
    assert json.loads(progress.read_text())["state"] == "succeeded"
    assert max_difference(unet_weights(output), unet_weights(reference_run)) < 1e-6
