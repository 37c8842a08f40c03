"""The flow-matching families end to end on tiny offline pipelines: FLUX.1 (full with EMA, LoRA)
and SD 3 (full, LoRA), whose outputs load with FluxPipeline / StableDiffusion3Pipeline (LoRA with
load_lora_weights) and generate; every text encoder's output (T5 included) is cached; resuming
ends where the uninterrupted run ends; two processes at the same global batch agree with one;
the timestep densities; DDPM-only flags are refused."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from trainer_testkit import (
    core_flags,
    max_difference,
    relative_update_difference,
    resume_in_a_new_output,
    train,
    train_on_two_processes,
    unet_weights,
)

from kubetune.api.layout import EXIT_INVALID

T5_TOKENS = 16
LORA = {"method": "lora", "rank": 4, "lora_alpha": 8, "use_ema": False}  # scale alpha / rank = 2


def flow_flags(model: Path, data: Path, output: Path, **overrides: object) -> list[str]:
    flags = {
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "gradient_accumulation_steps": 1,
        "max_sequence_length": T5_TOKENS,
        "latent_cache_dir": output.parent.parent / f"{model.name}-cache",
        **overrides,
    }
    return core_flags(model, data, output, **flags)


def run(model: Path, data: Path, root: Path, **flags: object) -> Path:
    output = root / "out"
    result = train(flow_flags(model, data, output, **flags))
    assert result.returncode == 0, result.stderr[-4000:]
    return output


@pytest.fixture(scope="module")
def flux_full(tiny_flux: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(
        tiny_flux,
        shapes_dataset,
        tmp_path_factory.mktemp("flux-full"),
        weighting_scheme="logit_normal",
        validation_prompts="a red circle",
        num_validation_images=1,
    )


@pytest.fixture(scope="module")
def flux_lora(tiny_flux: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tiny_flux, shapes_dataset, tmp_path_factory.mktemp("flux-lora"), **LORA)


def render(pipeline: Any, **extra: Any) -> Any:
    import numpy as np
    import torch

    image = pipeline(
        "a red circle", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0), **extra
    ).images[0]
    assert image.size == (32, 32)
    return np.asarray(image, dtype=np.float32)


def cache_of(model: Path, run: Path) -> Path:
    return next(p for p in (run.parent.parent / f"{model.name}-cache").iterdir() if (p / "manifest.json").exists())


def test_flux_full_fine_tune_publishes_a_flux_pipeline(flux_full: Path, tiny_flux: Path) -> None:
    import torch
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    pipeline = FluxPipeline.from_pretrained(flux_full)
    render(pipeline, max_sequence_length=T5_TOKENS)
    base = FluxPipeline.from_pretrained(tiny_flux).transformer.state_dict()
    trained = pipeline.transformer.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base), "the transformer was trained"
    assert {"transformer", "transformer_ema", "manifest.json"} <= {
        p.name for p in (flux_full / "checkpoint-2").iterdir()
    }
    assert list((flux_full / "samples").rglob("*.png")), "validation samples rendered"
    card = (flux_full / "README.md").read_text()
    assert "FluxPipeline.from_pretrained" in card and "| model family | flux (FluxPipeline) |" in card
    text = load_file(cache_of(tiny_flux, flux_full) / "text-00000.safetensors")
    # T5's states at --max_sequence_length and CLIP's pooled output, cached: training never runs them
    assert text["states"].shape[1:] == (T5_TOKENS, 64) and text["pooled"].shape[1:] == (32,)


def test_flux_resume_matches_the_uninterrupted_run(
    flux_full: Path, tiny_flux: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    flags = functools.partial(
        flow_flags, tiny_flux, shapes_dataset, weighting_scheme="logit_normal", resume_from_checkpoint="latest"
    )
    output, result = resume_in_a_new_output(flux_full, "checkpoint-2", tmp_path, flags)
    assert "resuming from" in result.stderr
    assert max_difference(unet_weights(output, "transformer"), unet_weights(flux_full, "transformer")) < 1e-6


def test_flux_lora_loads_with_load_lora_weights_is_written_in_kohya_layout_and_resumes_exactly(
    flux_lora: Path, tiny_flux: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    import torch
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    pipeline = FluxPipeline.from_pretrained(tiny_flux)
    before = render(pipeline, max_sequence_length=T5_TOKENS)
    pipeline.load_lora_weights(flux_lora)
    (config,) = pipeline.transformer.peft_config.values()
    assert (config.r, config.lora_alpha) == (4, 8), "rank and alpha travel in the file's metadata"
    assert abs(render(pipeline, max_sequence_length=T5_TOKENS) - before).max() > 1e-4, "the adapter changes images"
    saved = load_file(flux_lora / "pytorch_lora_weights.safetensors")
    assert saved and all(k.startswith("transformer.") and ".lora_" in k for k in saved), sorted(saved)[:3]

    # kohya's layout: q, k, v fused as in FLUX's original modules, the same update exactly
    kohya = load_file(flux_lora / "pytorch_lora_weights_kohya.safetensors")

    def update(module: str) -> Any:  # diffusers' file: the scale alpha / rank is in its metadata
        return 2 * saved[f"transformer.{module}.lora_B.weight"] @ saved[f"transformer.{module}.lora_A.weight"]

    def kohya_update(module: str) -> Any:
        down, up = kohya[f"lora_unet_{module}.lora_down.weight"], kohya[f"lora_unet_{module}.lora_up.weight"]
        return float(kohya[f"lora_unet_{module}.alpha"]) / down.shape[0] * up @ down

    qkv = [update(f"transformer_blocks.0.attn.to_{p}") for p in "qkv"]
    assert max_difference({"u": kohya_update("double_blocks_0_img_attn_qkv")}, {"u": torch.cat(qkv)}) < 1e-6
    assert (
        max_difference(
            {"u": kohya_update("double_blocks_0_img_attn_proj")}, {"u": update("transformer_blocks.0.attn.to_out.0")}
        )
        < 1e-6
    )
    linear1 = kohya_update("single_blocks_0_linear1")
    single = torch.cat([update(f"single_transformer_blocks.0.attn.to_{p}") for p in "qkv"])
    assert max_difference({"u": linear1[: len(single)]}, {"u": single}) < 1e-6
    assert not linear1[len(single) :].any(), "the fused MLP rows are not adapted"
    assert {k.split(".")[0] for k in kohya} == {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_single_blocks_0_linear1",
    }

    flags = functools.partial(flow_flags, tiny_flux, shapes_dataset, **LORA, resume_from_checkpoint="latest")
    output, _ = resume_in_a_new_output(flux_lora, "checkpoint-2", tmp_path, flags)
    resumed = load_file(output / "pytorch_lora_weights.safetensors")
    assert max_difference(resumed, saved) < 1e-6


def test_flux_on_two_processes_agrees_with_one(
    flux_full: Path, tiny_flux: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    # 2 processes x batch 1 = the full run's 1 x 2
    args = flow_flags(tiny_flux, shapes_dataset, output, weighting_scheme="logit_normal", train_batch_size=1)
    assert train_on_two_processes(args, output / "checkpoint-4")["worldSize"] == 2
    assert relative_update_difference(output, flux_full, tiny_flux, "transformer") < 0.01


def test_sd3_full_and_lora_load_with_the_sd3_pipeline(tiny_sd3: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    full = run(tiny_sd3, shapes_dataset, tmp_path / "full", use_ema=False)
    render(StableDiffusion3Pipeline.from_pretrained(full), max_sequence_length=T5_TOKENS)
    text = load_file(cache_of(tiny_sd3, full) / "text-00000.safetensors")
    # 77 CLIP tokens (both CLIPs' states side by side, padded to T5's width) + T5's tokens; pooled: both CLIPs'
    assert text["states"].shape[1:] == (77 + T5_TOKENS, 64) and text["pooled"].shape[1:] == (64,)

    lora = run(tiny_sd3, shapes_dataset, tmp_path / "lora", method="lora", rank=4, use_ema=False)
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    before = render(pipeline, max_sequence_length=T5_TOKENS)
    pipeline.load_lora_weights(lora)
    assert abs(render(pipeline, max_sequence_length=T5_TOKENS) - before).max() > 1e-4


def test_ddpm_only_flags_are_refused_for_a_flow_matching_family(
    tiny_flux: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    result = train(flow_flags(tiny_flux, shapes_dataset, tmp_path / "out", snr_gamma=5.0))
    assert result.returncode == EXIT_INVALID
    assert "--snr_gamma: not for the flux family" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(("scheme", "peaked"), [("none", False), ("logit_normal", True), ("mode", True)])
def test_timesteps_follow_the_weighting_schemes_density(scheme: str, peaked: bool) -> None:
    import types

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from kubetune.trainer.families.flux import Flux

    family = Flux()
    family.cfg = types.SimpleNamespace(weighting_scheme=scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    scheduler = FlowMatchEulerDiscreteScheduler()
    draws = [family.draw_timestep(scheduler, torch.Generator().manual_seed(i)) for i in range(2000)]
    share = torch.cat(draws).float() / scheduler.config.num_train_timesteps
    assert 0.45 < float(share.mean()) < 0.55
    middle = float(((share > 0.25) & (share < 0.75)).float().mean())
    # logit-normal and mode (scale 1.29) put more of their mass in the middle than the uniform draw (0.5)
    assert (middle > 0.6) == peaked
    again = family.draw_timestep(scheduler, torch.Generator().manual_seed(7))
    assert torch.equal(again, draws[7]), "a sample's timestep is a function of its generator"
