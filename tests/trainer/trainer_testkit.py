"""Helpers of the trainer tests (imported by conftest and the tests: pytest's importlib mode does
not put this folder on sys.path, conftest does)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PYTHON = sys.executable
REFERENCE_STEPS = 24  # steps of the reference run (long enough to SIGTERM it mid-run)
ROOT = Path(__file__).resolve().parents[2]


def write_imagefolder(folder: Path, count: int, size: int = 48, extra: dict[str, Any] | None = None) -> Path:
    """`folder/train/metadata.jsonl` + JPEGs of coloured shapes, with license/source columns."""
    from kubetune.dev.testing.shapes import generate

    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in generate(count, size=size):
        (train / f"{item.name}.jpg").write_bytes(item.jpeg)
        rows.append(
            {
                "file_name": f"{item.name}.jpg",
                "text": item.caption,
                "source": "shapes",
                "license": "cc0-1.0",
                "author": "kubetune tests",
                "url": f"https://example.org/{item.name}",
                **(extra or {}),
            }
        )
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(
        {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
    )
    return out


def train(args: Sequence[str], **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m kubetune.trainer` to the end."""
    return subprocess.run(
        [PYTHON, "-m", "kubetune.trainer", *args],
        capture_output=True,
        text=True,
        env=env(**extra_env),
        cwd=ROOT,
        timeout=300,
    )


def launch(command: Sequence[str], **extra_env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(**extra_env), cwd=ROOT
    )


def wait_for_progress(
    path: Path, predicate: Any, process: subprocess.Popen[str], timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                progress = json.loads(path.read_text())
            except ValueError:
                progress = {}
            if predicate(progress):
                return progress
        if process.poll() is not None:
            raise AssertionError(
                f"trainer ended early ({process.returncode}):\n{process.stdout.read() if process.stdout else ''}"
            )
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting on {path}")


def unet_weights(output: Path, folder: str = "unet") -> dict[str, Any]:
    """The trained weights of a full fine-tune's output (`transformer` for FLUX and SD3)."""
    from safetensors.torch import load_file

    return load_file(output / folder / "diffusion_pytorch_model.safetensors")


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def core_flags(model: Path, data: Path, output: Path, **overrides: Any) -> list[str]:
    """The shared small-run flags: 32 px, EMA, flip, fixed seed."""
    flags = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "output_dir": output,
        "resolution": 32,
        "center_crop": True,
        "random_flip": True,
        "use_ema": True,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_train_steps": 8,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "max_grad_norm": 1,
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "seed": 7,
        "checkpointing_steps": 4,
        "progress_interval": 0.1,
        "report_to": "none",
    }
    flags.update(overrides)
    out: list[str] = []
    for name, value in flags.items():
        if value is True:
            out.append(f"--{name}")
        elif value is not None and value is not False:
            out += [f"--{name}", str(value)]
    return out


def relative_update_difference(output: Path, reference: Path, initial: Path, folder: str = "unet") -> float:
    """|w - w_ref| / |w_ref - w_initial| over the whole UNet: how far two runs' training updates
    disagree, as a fraction of the update itself (different data or noise gives about 1)."""
    from safetensors.torch import load_file

    a, ref = unet_weights(output, folder), unet_weights(reference, folder)
    init = load_file(initial / folder / "diffusion_pytorch_model.safetensors")
    difference = sum(float((a[k].float() - ref[k].float()).norm() ** 2) for k in ref) ** 0.5
    update = sum(float((ref[k].float() - init[k].float()).norm() ** 2) for k in ref) ** 0.5
    return difference / update


def relative_lora_difference(output: Path, reference: Path) -> float:
    """relative_update_difference for LoRA outputs: the update of each adapted layer is up @ down
    (zero before training: `up` starts at zero)."""
    from safetensors.torch import load_file

    def updates(folder: Path) -> dict[str, Any]:
        weights = load_file(folder / "pytorch_lora_weights.safetensors")
        downs = [k for k in weights if k.endswith(".lora.down.weight")]  # diffusers' LoRA format
        assert downs, sorted(weights)[:4]
        return {k: weights[k.replace(".down.", ".up.")].float() @ weights[k].float() for k in downs}

    a, ref = updates(output), updates(reference)
    assert a.keys() == ref.keys()
    difference = sum(float((a[k] - ref[k]).norm() ** 2) for k in ref) ** 0.5
    return difference / sum(float(ref[k].norm() ** 2) for k in ref) ** 0.5


def train_on_two_processes(args: Sequence[str], checkpoint: Path) -> dict[str, Any]:
    """Run the trainer as two processes on this machine (`accelerate launch --multi_gpu`, gloo on
    the CPU) to the end; CHECKPOINT's manifest."""
    from kubetune.launch import accelerate_launch_command, free_port

    command = accelerate_launch_command(1, 2, 0, "127.0.0.1", free_port(), list(args), python=PYTHON)
    assert "--multi_gpu" in command
    process = launch(command)
    log = process.communicate(timeout=300)[0]
    assert process.returncode == 0, log[-4000:]
    manifest: dict[str, Any] = json.loads((checkpoint / "manifest.json").read_text())
    return manifest


def trained_output(model: Path, data: Path, output: Path, **flags: Any) -> Path:
    """OUTPUT after a successful run of the core command with FLAGS (tests that damage or resume it
    work on a copy_of it)."""
    result = train(core_flags(model, data, output, **flags))
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def copy_of(run: Path, tmp_path: Path) -> Path:
    """A copy of a run's output at TMP_PATH/out."""
    return Path(shutil.copytree(run, tmp_path / "out"))


def resume_in_a_new_output(
    run: Path, checkpoint: str, tmp_path: Path, flags: Any
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A new output holding only RUN's CHECKPOINT, trained on with `flags(output)` (which resume
    from `latest`); the output and the finished run."""
    output = tmp_path / "out"
    output.mkdir()
    shutil.copytree(run / checkpoint, output / checkpoint)
    result = train(flags(output))
    assert result.returncode == 0, result.stderr[-4000:]
    return output, result
