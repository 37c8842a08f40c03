"""A tiny Stable Diffusion XL pipeline built offline (random weights, small configs), for tests:
two CLIP text encoders (the second with a projection, whose pooled output SDXL adds to the
timestep embedding), and a UNet with SDXL's "text_time" added conditioning. Nothing here
downloads anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.dev.testing.tiny_sd import TINY_UNET, _vae, text_model

TEXT_HIDDEN = (32, 32)  # the two encoders' hidden sizes: the UNet's cross-attention width is their sum
PROJECTION = 32  # the second encoder's projection (the pooled text embedding)
TIME_EMBED = 8  # per time id; SDXL has six (original size, crop top-left, target size)


def build_tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A complete, tiny StableDiffusionXLPipeline (a few M parameters) that trains at 32 px on a
    CPU; latents are half the image size, as with the tiny SD pipeline."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION,
        cross_attention_dim=sum(TEXT_HIDDEN),
    )
    torch.manual_seed(seed + 1)
    vae = _vae([32, 64], layers_per_block=1, sample_size=64)
    text = {"intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "gelu"}
    encoders: dict[str, Any] = {}
    for number, (suffix, model_class, extra) in enumerate(
        [("", CLIPTextModel, {}), ("_2", CLIPTextModelWithProjection, {"projection_dim": PROJECTION})]
    ):
        config = {**text, "hidden_size": TEXT_HIDDEN[number], **extra}
        tokenizer, encoder = text_model(path / f"tokenizer{suffix}", model_class, config, seed + 2 + number)
        encoders[f"tokenizer{suffix}"], encoders[f"text_encoder{suffix}"] = tokenizer, encoder
    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**schedule, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True,
        **encoders,
    )
    pipeline.save_pretrained(path)
    return path
