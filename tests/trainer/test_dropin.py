"""kubetune as a drop-in for diffusers' train_text_to_image.py and train_text_to_image_lora.py: what
their own example tests check, restated against the tiny offline pipeline. Checkpoints are
`checkpoint-N/` in --output_dir holding what stock users load; `--resume_from_checkpoint` takes
`latest`, `checkpoint-N` and paths, and resumes from a checkpoint the stock script wrote."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trainer_testkit import copy_of, core_flags, env, resume_in_a_new_output, train, trained_output

from kubetune.api.layout import EXIT_INVALID


def checkpoints(output: Path) -> list[str]:
    return sorted((p.name for p in output.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


def progress(output: Path) -> dict[str, Any]:
    return json.loads((output / "progress.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def full_run(tiny_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps of a full fine-tune with EMA, a checkpoint every 2 steps."""
    output = tmp_path_factory.mktemp("dropin") / "out"
    return trained_output(tiny_model, shapes_dataset, output, max_train_steps=4, checkpointing_steps=2)


def resume(model: Path, data: Path, output: Path, max_steps: int, checkpoint: str, **overrides: Any) -> Any:
    """Train to `max_steps`, checkpointing every 2 steps, resuming from `checkpoint`."""
    flags = core_flags(model, data, output, max_train_steps=max_steps, checkpointing_steps=2, **overrides)
    return train([*flags, "--resume_from_checkpoint", checkpoint])


def test_checkpoints_are_named_and_filled_as_the_stock_script_does(full_run: Path) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file

    assert checkpoints(full_run) == ["checkpoint-2", "checkpoint-4"]
    assert not (full_run / "checkpoints").exists()
    unet = UNet2DConditionModel.from_pretrained(full_run / "checkpoint-2", subfolder="unet")
    assert isinstance(unet, UNet2DConditionModel)
    ema = EMAModel.from_pretrained(full_run / "checkpoint-4" / "unet_ema", UNet2DConditionModel)
    assert ema.optimization_step == 4
    manifest = json.loads((full_run / "checkpoint-4" / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "optimizer.pt",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema/config.json",
        "unet_ema/diffusion_pytorch_model.safetensors",
    }, "the UNet is written once per checkpoint (no separate trainable copy)"
    # the published model is the EMA one, as in the stock script
    published = load_file(full_run / "unet" / "diffusion_pytorch_model.safetensors")
    saved_ema = load_file(full_run / "checkpoint-4" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert all(bool((published[k] == saved_ema[k]).all()) for k in published)


@pytest.mark.parametrize(
    "value",
    ["checkpoint-2", "step-2", "step-00000002", "checkpoint-2/", "ABS", "OUT/checkpoint-2", "RELATIVE"],
)
def test_resume_from_checkpoint_forms(full_run: Path, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.storage import Store
    from kubetune.trainer.checkpoint import find_checkpoint

    monkeypatch.chdir(full_run.parent)
    value = {
        "ABS": str(full_run / "checkpoint-2"),
        "OUT/checkpoint-2": f"{full_run.name}/checkpoint-2",  # relative to the working directory
    }.get(value, value)
    if value == "RELATIVE":  # relative to --output_dir
        monkeypatch.chdir("/")
        value = "checkpoint-2/"
    ref = find_checkpoint(Store(str(full_run)), value)
    assert ref is not None and ref.step == 2 and ref.name == "checkpoint-2" and not ref.stock
    assert find_checkpoint(Store(str(full_run)), "latest").step == 4  # type: ignore[union-attr]


def test_named_and_latest_resume_and_total_limit(
    full_run: Path, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    output = copy_of(full_run, tmp_path)
    named = resume(tiny_model, shapes_dataset, output, 6, "checkpoint-2")
    assert named.returncode == 0, named.stderr[-3000:]
    assert f"resuming from {output}/checkpoint-2 (step 2)" in named.stderr
    assert checkpoints(output) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert progress(output)["step"] == 6

    latest = resume(tiny_model, shapes_dataset, output, 8, "latest", checkpoints_total_limit=2)
    assert latest.returncode == 0, latest.stderr[-3000:]
    assert f"resuming from {output}/checkpoint-6 (step 6)" in latest.stderr
    assert checkpoints(output) == ["checkpoint-6", "checkpoint-8"]

    missing = train(core_flags(tiny_model, shapes_dataset, output, resume_from_checkpoint="checkpoint-3"))
    assert missing.returncode == EXIT_INVALID
    assert "no complete checkpoint of step 3" in missing.stderr


def test_the_earlier_checkpoints_step_n_layout_still_resumes(
    full_run: Path, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    """One release of compatibility: `checkpoints/step-NNNNNNNN/` with trainable.safetensors,
    ema.safetensors (by position), optimizer.pt and its manifest."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    output = tmp_path / "out"
    new, old = full_run / "checkpoint-2", output / "checkpoints" / "step-00000002"
    old.mkdir(parents=True)
    unet = load_file(new / "unet" / "diffusion_pytorch_model.safetensors")
    save_file(unet, old / "trainable.safetensors")
    ema = load_file(new / "unet_ema" / "diffusion_pytorch_model.safetensors")
    order = [name for name, _ in UNet2DConditionModel.from_pretrained(new, subfolder="unet").named_parameters()]
    save_file({f"{i}": ema[k] for i, k in enumerate(order)}, old / "ema.safetensors")
    shutil.copy(new / "optimizer.pt", old / "optimizer.pt")
    manifest = json.loads((new / "manifest.json").read_text())
    manifest["files"] = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in old.iterdir()
    }
    (old / "manifest.json").write_text(json.dumps(manifest))
    result = resume(tiny_model, shapes_dataset, output, 4, "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {output}/checkpoints/step-00000002 (step 2)" in result.stderr
    assert checkpoints(output) == ["checkpoint-4"]
    # the same run as the uninterrupted one
    resumed = load_file(output / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors")
    reference = load_file(full_run / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max(float((resumed[k] - reference[k]).abs().max()) for k in reference) < 1e-6
    assert torch.load(output / "checkpoint-4" / "optimizer.pt", weights_only=True)["lr_scheduler"]["last_epoch"] == 4


# -- --dataset_name: what datasets.load_dataset takes locally ----------------------------------


def test_a_hub_datasets_local_parquet_copy_trains_as_its_imagefolder_does(
    full_run: Path, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    """The shapes imagefolder as a hub dataset's files (`data/train-*.parquet`, images embedded as
    an Image feature): the same images and captions in the same order give the same step-2 UNet."""
    import datasets
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (shapes_dataset / "train" / "metadata.jsonl").read_text().splitlines()]
    images = [{"bytes": (shapes_dataset / "train" / r["file_name"]).read_bytes(), "path": None} for r in rows]
    table = datasets.Dataset.from_dict({"image": images, "text": [r["text"] for r in rows]})
    copy = tmp_path / "hub-copy"
    (copy / "data").mkdir(parents=True)
    table.cast_column("image", datasets.Image()).to_parquet(str(copy / "data" / "train-00000-of-00001.parquet"))

    output = tmp_path / "out"
    flags = core_flags(tiny_model, shapes_dataset, output, max_train_steps=2, checkpointing_steps=2)
    flags[flags.index("--train_data_dir") : flags.index("--train_data_dir") + 2] = ["--dataset_name", str(copy)]
    result = train(flags, HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"))
    assert result.returncode == 0, result.stderr[-3000:]
    trained = load_file(output / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    reference = load_file(full_run / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max(float((trained[k] - reference[k]).abs().max()) for k in reference) < 1e-6
    ours = json.loads((output / "checkpoint-2" / "manifest.json").read_text())["cacheKey"]
    theirs = json.loads((full_run / "checkpoint-2" / "manifest.json").read_text())["cacheKey"]
    assert ours != theirs, "the cache is keyed by the dataset's own files"


# -- LoRA --------------------------------------------------------------------------------------


def lora_flags(model: Path, data: Path, output: Path, **overrides: Any) -> list[str]:
    """train_text_to_image_lora.py's README command, scaled down (8 images, batch 2: 4 steps an
    epoch), plus `--method lora`."""
    flags: dict[str, Any] = {
        "pretrained_model_name_or_path": model,
        "dataset_name": data,
        "caption_column": "text",
        "resolution": 32,
        "random_flip": True,
        "train_batch_size": 2,
        "num_train_epochs": 2,
        "checkpointing_steps": 4,
        "learning_rate": 1e-02,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "seed": 42,
        "output_dir": output,
        "validation_prompt": "a red circle",
        "num_validation_images": 2,
        "report_to": "tensorboard",
        "method": "lora",
        "mixed_precision": "no",
        **overrides,
    }
    return [
        part for k, v in flags.items() if v is not None for part in ([f"--{k}"] if v is True else [f"--{k}", str(v)])
    ]


@pytest.fixture(scope="module")
def lora_run(tiny_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("lora") / "out"
    result = train(lora_flags(tiny_model, shapes_dataset, output))
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_the_lora_scripts_documented_command(lora_run: Path, tiny_model: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    output = lora_run
    assert checkpoints(output) == ["checkpoint-4", "checkpoint-8"]
    assert sorted(p.name for p in (output / "checkpoint-4").iterdir()) == [
        "manifest.json",
        "optimizer.pt",
        "pytorch_lora_weights.safetensors",
    ]
    assert (output / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in (output / "samples" / "step-00000004").iterdir()) == [
        "00.png",
        "01.png",
        "grid.png",
        "prompts.json",
    ], "--num_validation_images per --validation_prompt"

    # --report_to tensorboard: the validation images are in the event file, as the stock script logs them
    events = EventAccumulator(str(output / "logs"), size_guidance={IMAGES: 0})
    events.Reload()
    assert "validation" in events.Tags()["images"], events.Tags()
    logged = events.Images("validation")
    assert [e.step for e in logged] == [4, 8]
    assert (logged[0].width, logged[0].height) == (64, 32), "two 32 px images side by side"

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)

    def render() -> Any:
        generator = torch.Generator().manual_seed(0)
        return pipeline(
            "a blue square", num_inference_steps=2, height=32, width=32, generator=generator, output_type="pt"
        ).images

    before = render()
    pipeline.load_lora_weights(output / "checkpoint-4")
    assert float((render() - before).abs().max()) > 0, "the checkpoint's LoRA weights changed the output"


def test_a_resumed_lora_run_ends_with_the_uninterrupted_runs_weights(
    lora_run: Path, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    flags = functools.partial(lora_flags, tiny_model, shapes_dataset, resume_from_checkpoint="latest")
    output, result = resume_in_a_new_output(lora_run, "checkpoint-4", tmp_path, flags)
    assert f"resuming from {output}/checkpoint-4 (step 4)" in result.stderr
    assert checkpoints(output) == checkpoints(lora_run) == ["checkpoint-4", "checkpoint-8"]
    for name in ("pytorch_lora_weights.safetensors", "checkpoint-8/pytorch_lora_weights.safetensors"):
        resumed, reference = load_file(output / name), load_file(lora_run / name)
        assert resumed.keys() == reference.keys()
        assert max(float((resumed[k] - reference[k]).abs().max()) for k in reference) < 1e-6, name


# -- a checkpoint the stock script wrote ---------------------------------------------------------

STOCK_CHECKPOINTS = r"""
import os, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

model, output, steps = Path(sys.argv[1]), Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
accelerator = Accelerator(cpu=True)
unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
with torch.no_grad():  # recognisable weights: the tiny model's, plus 0.01
    for p in unet.parameters():
        p.add_(0.01)
ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)

def save_model_hook(models, weights, output_dir):  # as train_text_to_image.py registers it
    if accelerator.is_main_process:
        ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
        for model in models:
            model.save_pretrained(os.path.join(output_dir, "unet"))
            weights.pop()

accelerator.register_save_state_pre_hook(save_model_hook)
optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
lr_scheduler = get_scheduler("constant", optimizer=optimizer)
unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
generator = torch.Generator().manual_seed(0)
for step in range(1, max(steps) + 1):
    for p in unet.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()
    ema.step(unet.parameters())
    if step in steps:
        accelerator.save_state(output / f"checkpoint-{step}")
"""


def write_stock_checkpoints(model: Path, output: Path, steps: str, script: str = STOCK_CHECKPOINTS) -> None:
    result = subprocess.run(
        [sys.executable, "-c", script, str(model), str(output), steps],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def stock_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint-2 and checkpoint-4 as train_text_to_image.py writes them (written once, copied)."""
    output = tmp_path_factory.mktemp("stock") / "out"
    write_stock_checkpoints(tiny_model, output, "2,4")
    return output


def test_resumes_from_checkpoints_the_stock_script_wrote(
    stock_run: Path, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    output = copy_of(stock_run, tmp_path)
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "unet", "unet_ema"} <= {
        p.name for p in (output / "checkpoint-4").iterdir()
    }
    result = resume(tiny_model, shapes_dataset, output, 8, "latest", checkpoints_total_limit=2, learning_rate=1e-4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {output}/checkpoint-4 (step 4) (written by diffusers' script)" in result.stderr
    assert "the data order restarts at the beginning of epoch 2" in result.stderr  # 2 steps an epoch
    assert progress(output)["step"] == 8
    # the stock checkpoints count towards --checkpoints_total_limit, as in the stock script
    assert checkpoints(output) == ["checkpoint-6", "checkpoint-8"]

    # weights, optimizer state and EMA continued from the stock checkpoint
    tiny = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(output / "checkpoint-6" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max(float((resumed[k] - tiny[k] - 0.01).abs().max()) for k in tiny) < 0.005
    optimizer = torch.load(output / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["optimizer"]["state"].values()} == {6.0}
    assert optimizer["lr_scheduler"]["last_epoch"] == 6
    ema = json.loads((output / "checkpoint-6" / "unet_ema" / "config.json").read_text())
    assert ema["optimization_step"] == 6


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_stock_checkpoint_it_cannot_use_is_refused_not_ignored(
    stock_run: Path, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    import torch

    output = copy_of(stock_run, tmp_path)
    shutil.rmtree(output / "checkpoint-4")
    marker = tmp_path / "code-ran"
    torch.save({"state": RunsCode(marker)}, output / "checkpoint-2" / "optimizer.bin")
    result = train(core_flags(tiny_model, shapes_dataset, output, resume_from_checkpoint="latest"))
    assert result.returncode == EXIT_INVALID, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "checkpoint-2/optimizer.bin: not a plain optimizer state" in errors[0], errors
    assert not marker.exists(), "loading the checkpoint ran code from it"


STOCK_LORA_CHECKPOINTS = r"""
import sys
from pathlib import Path
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

model, output, steps = Path(sys.argv[1]), Path(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
accelerator = Accelerator(cpu=True)
unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
unet.requires_grad_(False)
unet.add_adapter(  # as train_text_to_image_lora.py does, --rank 4
    LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
)
lora_layers = [p for p in unet.parameters() if p.requires_grad]
with torch.no_grad():  # recognisable weights: lora_B is 0 after the init; here everything is +0.01
    for p in lora_layers:
        p.add_(0.01)
optimizer = torch.optim.AdamW(lora_layers, lr=1e-4)
lr_scheduler = get_scheduler("constant", optimizer=optimizer)
unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
generator = torch.Generator().manual_seed(0)
for step in range(1, max(steps) + 1):
    for p in lora_layers:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()
    if step in steps:  # the script's checkpoint: save_state, then the LoRA weights beside it
        save_path = output / f"checkpoint-{step}"
        accelerator.save_state(save_path)
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
        StableDiffusionPipeline.save_lora_weights(save_path, unet_lora_layers=layers, safe_serialization=True)
"""


def test_resumes_from_a_checkpoint_the_stock_lora_script_wrote(
    tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    output = tmp_path / "out"
    write_stock_checkpoints(tiny_model, output, "4", STOCK_LORA_CHECKPOINTS)
    stock = output / "checkpoint-4"
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "pytorch_lora_weights.safetensors"} <= {
        p.name for p in stock.iterdir()
    }
    flags = lora_flags(
        tiny_model, shapes_dataset, output, resume_from_checkpoint="latest", learning_rate=1e-4, validation_prompt=None
    )
    result = train(flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {stock} (step 4) (written by diffusers' script)" in result.stderr
    assert "UNet (LoRA), optimizer, LR schedule and step 4 restored" in result.stderr
    assert "the data order restarts at the beginning of epoch 1" in result.stderr  # 4 steps an epoch
    assert checkpoints(output) == ["checkpoint-4", "checkpoint-8"]
    assert progress(output)["step"] == 8

    # the LoRA weights continued from the stock ones (a fresh adapter's lora_B is 0, theirs 0.01)
    before, after = (
        load_file(stock / "pytorch_lora_weights.safetensors"),
        load_file(output / "checkpoint-8" / "pytorch_lora_weights.safetensors"),
    )
    assert before.keys() == after.keys()
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 0.005
    optimizer = torch.load(output / "checkpoint-8" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["optimizer"]["state"].values()} == {8.0}
    assert optimizer["lr_scheduler"]["last_epoch"] == 8


def test_the_lora_scripts_flags_parse_with_their_meanings() -> None:
    from kubetune.trainer.config import parse_config

    cfg = parse_config(
        [
            "--pretrained_model_name_or_path=m",
            "--dataset_name=d",
            "--method=lora",
            "--rank=8",
            "--validation_prompt=cute dragon creature",
            "--num_validation_images=3",
            "--validation_epochs=2",
        ],
        "x",
    )
    assert (cfg.rank, cfg.num_validation_images, cfg.validation_epochs) == (8, 3, 2)
    assert cfg.validation_prompts == ["cute dragon creature"]
