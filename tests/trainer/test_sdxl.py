"""The SDXL family end to end on a tiny offline pipeline: a full fine-tune (EMA, min-SNR, noise
offset, empty prompts, validation samples) and a LoRA, whose outputs load with
StableDiffusionXLPipeline and generate; resuming from a checkpoint ends where the uninterrupted
run ends; two processes at the same global batch end where one does (full and LoRA); the LoRA is
also written in kohya's key format. The runs are shared by the tests."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from trainer_testkit import (
    core_flags,
    max_difference,
    relative_lora_difference,
    relative_update_difference,
    resume_in_a_new_output,
    train,
    train_on_two_processes,
    unet_weights,
)

from kubetune.api.layout import EXIT_INVALID


@pytest.fixture(scope="module")
def separate_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE of the same layout with other weights, as --pretrained_vae_model_name_or_path (SDXL's
    fp16-fix VAE in real runs)."""
    import torch

    from kubetune.dev.testing.tiny_sd import _vae

    torch.manual_seed(99)
    folder = tmp_path_factory.getbasetemp() / "sdxl-vae"
    _vae([32, 64], layers_per_block=1, sample_size=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six captioned images of different sizes and aspect ratios (so crops and sizes differ)."""
    from PIL import Image

    train_dir = tmp_path_factory.mktemp("sdxl-data") / "train"
    train_dir.mkdir()
    rows = []
    for i, (size, colour, shape) in enumerate(
        [((48, 40), "red", "circle"), ((40, 56), "blue", "square"), ((64, 48), "green", "triangle")] * 2
    ):
        Image.new("RGB", size, colour).save(train_dir / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {colour} {shape}" if i % 3 else ""})
    (train_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train_dir.parent


LORA = {"method": "lora", "rank": 4, "use_ema": False, "max_train_steps": 2}
# Two processes vs one, as in tests/trainer/test_distributed.py (the same arithmetic in another
# order): measured 0.15% (full) and 0.002% (LoRA) of the update; other noise or data gives about 100%.
TOLERANCE = 0.01


def sdxl_flags(model: Path, data: Path, output: Path, **overrides: object) -> list[str]:
    flags = {
        "pretrained_vae_model_name_or_path": output.parent.parent / "sdxl-vae",  # separate_vae's
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "gradient_accumulation_steps": 1,
        "center_crop": False,
        "snr_gamma": 5.0,
        "noise_offset": 0.05,
        "proportion_empty_prompts": 0.2,
        "latent_cache_dir": output.parent.parent / "sdxl-cache",
        **overrides,
    }
    return core_flags(model, data, output, **flags)


@pytest.fixture(scope="module")
def full_run(tiny_sdxl: Path, photos: Path, separate_vae: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("sdxl-full") / "out"
    flags = sdxl_flags(tiny_sdxl, photos, output, validation_prompts="a red circle", num_validation_images=1)
    result = train(flags)
    assert result.returncode == 0, result.stderr[-4000:]
    return output


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl: Path, photos: Path, separate_vae: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("sdxl-lora") / "out"
    result = train(sdxl_flags(tiny_sdxl, photos, output, **LORA))
    assert result.returncode == 0, result.stderr[-4000:]
    return output


def render(pipeline: object) -> object:
    import numpy as np
    import torch

    image = pipeline(  # type: ignore[operator]
        "a red circle", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (32, 32)
    return np.asarray(image, dtype=np.float32)


def test_full_fine_tune_publishes_an_sdxl_pipeline(full_run: Path, tiny_sdxl: Path, separate_vae: Path) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipeline = StableDiffusionXLPipeline.from_pretrained(full_run)
    render(pipeline)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl).unet.state_dict()
    trained = pipeline.unet.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base), "the UNet was trained"
    assert pipeline.config.force_zeros_for_empty_prompt is True
    vae = load_file(separate_vae / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pipeline.vae.state_dict()[k], vae[k]) for k in vae), "published with the separate VAE"
    assert json.loads((full_run / "progress.json").read_text())["state"] == "succeeded"
    assert list((full_run / "samples" / "step-00000002").glob("*.png")), "validation samples rendered"
    card = (full_run / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "stable-diffusion-xl" in card
    assert "| model family | sdxl (StableDiffusionXLPipeline) |" in card
    cache = next(p for p in (full_run.parent.parent / "sdxl-cache").iterdir() if (p / "manifest.json").exists())
    text = load_file(cache / "text-00000.safetensors")
    assert text["states"].shape[1:] == (77, 64) and text["pooled"].shape[1:] == (32,), "both encoders cached"
    latents = load_file(cache / "latents-00000.safetensors")
    assert latents["original_size"][:3].tolist() == [[40, 48], [56, 40], [48, 64]], "(height, width) per image"
    # resized to 38x32, 32x44 and 42x32 (width x height), then a random 32 px crop: (top, left)
    crops, flipped = latents["crop_top_left"][:3].tolist(), latents["crop_top_left_flip"][:3].tolist()
    assert crops[0][0] == 0 and crops[1][1] == 0 and crops[2][0] == 0
    assert flipped == [[crops[0][0], 6 - crops[0][1]], crops[1], [0, 10 - crops[2][1]]]


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(
    full_run: Path, tiny_sdxl: Path, photos: Path, tmp_path: Path, separate_vae: Path
) -> None:
    flags = functools.partial(sdxl_flags, tiny_sdxl, photos, resume_from_checkpoint="latest")
    output, result = resume_in_a_new_output(full_run, "checkpoint-2", tmp_path, flags)
    assert "resuming from" in result.stderr and "checkpoint-2" in result.stderr
    assert max_difference(unet_weights(output), unet_weights(full_run)) < 1e-6


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_agree_with_one(
    method: str, full_run: Path, lora_run: Path, tiny_sdxl: Path, photos: Path, tmp_path: Path
) -> None:
    # 2 processes x batch 1 = the reference's 1 x 2 (gradient accumulation 1)
    output = tmp_path / "out"
    overrides: dict[str, object] = LORA if method == "lora" else {}
    args = sdxl_flags(tiny_sdxl, photos, output, train_batch_size=1, **overrides)
    manifest = train_on_two_processes(args, output / "checkpoint-2")
    assert manifest["worldSize"] == 2 and manifest["globalBatchSize"] == 2
    if method == "lora":
        assert relative_lora_difference(output, lora_run) < TOLERANCE
    else:
        assert relative_update_difference(output, full_run, tiny_sdxl) < TOLERANCE


def test_lora_loads_into_the_sdxl_pipeline_and_in_kohya_format(lora_run: Path, tiny_sdxl: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    before = render(pipeline)
    pipeline.load_lora_weights(lora_run)
    after = render(pipeline)
    assert abs(after - before).max() > 1e-4, "the adapter changes the images"  # type: ignore[operator]
    assert "pipe.load_lora_weights" in (lora_run / "README.md").read_text()

    kohya = load_file(lora_run / "pytorch_lora_weights_kohya.safetensors")
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in kohya)
    for down in downs:
        module = down.removesuffix(".lora_down.weight")
        assert "." not in module and {f"{module}.lora_up.weight", f"{module}.alpha"} <= kohya.keys()
        assert float(kohya[f"{module}.alpha"]) == 4 and kohya[down].shape[0] == 4
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    diffusers_keys = load_file(lora_run / "pytorch_lora_weights.safetensors").keys()
    assert len(diffusers_keys) == len(downs) * 2


def test_a_stated_family_that_is_not_the_pipelines_is_refused(tiny_sdxl: Path, photos: Path, tmp_path: Path) -> None:
    result = train(sdxl_flags(tiny_sdxl, photos, tmp_path / "out", model_family="sd"))
    assert result.returncode == EXIT_INVALID
    assert "--model_family sd: the pipeline is a StableDiffusionXLPipeline (sdxl)" in result.stderr
