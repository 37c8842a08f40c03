"""Single-process training end to end: the seed's core command flag for flag, the published
pipeline and model card, LoRA, and bad input ending in one line with the right exit code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trainer_testkit import core_flags, env, train, write_imagefolder

from kubetune.api.layout import EXIT_INVALID


def seed_core_command(model: Path, data: Path, output: Path) -> list[str]:
    """main.py's command, flag for flag (resolution and steps scaled down for a CPU)."""
    return [
        f"--pretrained_model_name_or_path={model}",
        f"--dataset_name={data}",
        "--use_ema",
        "--resolution=32",
        "--center_crop",
        "--random_flip",
        "--train_batch_size=1",
        "--gradient_accumulation_steps=4",
        "--gradient_checkpointing",
        "--mixed_precision=no",
        "--max_train_steps=3",
        "--learning_rate=1e-05",
        "--max_grad_norm=1",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--output_dir={output}",
    ]


def test_seed_core_command_publishes_a_loadable_pipeline(
    tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "model"
    result = train(seed_core_command(tiny_model, shapes_dataset, output))
    assert result.returncode == 0, result.stderr[-3000:]

    progress = json.loads((output / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["step"] == progress["maxSteps"] == 3
    assert progress["imagesPerSecond"] > 0 and set(progress) >= {"loss", "learningRate", "etaSeconds", "epoch"}
    assert list((output / "logs").glob("events.out.tfevents.*")), "TensorBoard logs"
    pipeline = StableDiffusionPipeline.from_pretrained(output, safety_checker=None)
    image = pipeline(
        "a red circle", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (32, 32)
    trained = pipeline.unet.state_dict()
    base = StableDiffusionPipeline.from_pretrained(tiny_model).unet.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base), "the UNet was trained"

    card = (output / "README.md").read_text()
    assert f"# Fine-tuned {tiny_model}" in card and "| gradient accumulation | 4 |" in card
    assert "| cc0-1.0 | 8 |" in card and "kubetune tests" in card and "https://example.org/" in card
    cache = [p for p in (output / "cache").iterdir() if (p / "manifest.json").exists()]
    assert len(cache) == 1, "the latent cache is kept for later runs"


def test_validation_samples_and_unreadable_images(tiny_model: Path, tmp_path: Path) -> None:
    data = write_imagefolder(tmp_path / "dataset", 6)
    (data / "train" / next(iter(sorted((data / "train").glob("*.jpg")))).name).write_bytes(b"not a jpeg")
    output = tmp_path / "model"
    result = train(
        core_flags(
            tiny_model,
            data,
            output,
            max_train_steps=2,
            checkpointing_steps=1,
            checkpoints_total_limit=1,
            validation_prompts="a red circle",
            validation_steps=2,
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1 unreadable images skipped)" in (output / "README.md").read_text()
    assert sorted(p.name for p in (output / "samples" / "step-00000002").iterdir()) == [
        "00.png",
        "grid.png",
        "prompts.json",
    ]
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-2"], "only the newest is kept"
    # The dataset sits in a folder named `dataset`: the cache goes beside it, where later jobs find it.
    assert (tmp_path / "cache").is_dir()


def render(pipeline: Any) -> Any:
    """The same 2-step 32 px image of "a blue square", as a numpy array."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return pipeline(
        "a blue square", num_inference_steps=2, height=32, width=32, output_type="np", generator=generator
    ).images


def test_lora_weights_load_with_load_lora_weights(tiny_model: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "lora"
    result = train(
        core_flags(
            tiny_model,
            shapes_dataset,
            output,
            method="lora",
            rank=4,
            max_train_steps=4,
            learning_rate=1e-2,
            checkpointing_steps=2,
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "pytorch_lora_weights.safetensors").exists()
    manifest = json.loads((output / "checkpoint-4" / "manifest.json").read_text())
    assert manifest["files"]["pytorch_lora_weights.safetensors"]["size"] < 200_000, "LoRA checkpoints hold the adapter"
    assert set(manifest["files"]) == {"pytorch_lora_weights.safetensors", "optimizer.pt"}

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    before = render(pipeline)
    pipeline.load_lora_weights(output)
    after = render(pipeline)
    assert abs(after - before).max() > 1e-4, "the adapter changes the images"
    assert "pipe.load_lora_weights" in (output / "README.md").read_text()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_model", "--pretrained_model_name_or_path ./nowhere: no such folder"),
        ("not_a_model", "not a diffusers Stable Diffusion folder"),
        ("missing_data", "no metadata.jsonl"),
        ("empty_dataset", "the dataset is empty"),
        ("caption_column", "--caption_column 'caption' is not a column"),
        ("all_unreadable", "none of the dataset's 2 images could be read"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    case: str, message: str, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    model, data, extra = str(tiny_model), str(shapes_dataset), []
    if case == "missing_model":
        model = "./nowhere"
    elif case == "not_a_model":
        model = str(tmp_path)
    elif case == "missing_data":
        data = str(tmp_path / "nothing")
        (tmp_path / "nothing").mkdir()
    elif case == "empty_dataset":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "metadata.jsonl").write_text("\n")
        data = str(tmp_path / "empty")
    elif case == "caption_column":
        extra = ["--caption_column", "caption"]
    elif case == "all_unreadable":
        shutil.copytree(shapes_dataset, tmp_path / "broken")
        rows = [
            json.loads(line) for line in (tmp_path / "broken" / "train" / "metadata.jsonl").read_text().splitlines()
        ][:2]
        (tmp_path / "broken" / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for row in rows:
            (tmp_path / "broken" / "train" / row["file_name"]).write_bytes(b"\xff\xd8 truncated")
        data = str(tmp_path / "broken")
    output = tmp_path / "out"
    result = train(
        [
            "--pretrained_model_name_or_path",
            model,
            "--train_data_dir",
            data,
            "--output_dir",
            str(output),
            "--resolution",
            "32",
            "--max_train_steps",
            "1",
            *extra,
        ]
    )
    assert result.returncode == EXIT_INVALID, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert json.loads((output / "progress.json").read_text())["state"] == "failed"


def test_cuda_out_of_memory_is_one_line_with_settings_that_use_less_memory(
    tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    # No GPU here: the UNet's forward raises the exception torch raises when CUDA runs out of
    # memory, and the real trainer handles it from there.
    output = tmp_path / "out"
    args = [
        "--pretrained_model_name_or_path",
        str(tiny_model),
        "--train_data_dir",
        str(shapes_dataset),
        "--output_dir",
        str(output),
        "--resolution",
        "32",
        "--train_batch_size",
        "4",
        "--max_train_steps",
        "2",
    ]
    script = (
        "import sys, torch, diffusers\n"
        "def forward(*args, **kwargs):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
        "diffusers.UNet2DConditionModel.forward = forward\n"
        "from kubetune.trainer.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode == EXIT_INVALID, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "CUDA out of memory at --resolution 32, --train_batch_size 4" in errors[0]
    for hint in (
        "--gradient_checkpointing",
        "--train_batch_size 2 with --gradient_accumulation_steps 2",
        "--mixed_precision bf16",
        "--method lora",
    ):
        assert hint in errors[0]
    assert "Traceback" not in result.stderr
    assert json.loads((output / "progress.json").read_text())["state"] == "failed"
