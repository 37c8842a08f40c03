"""Stable Diffusion XL pipelines built offline: a tiny one (random weights, small configs) for
tests, and the SDXL 1.0 base architecture (random weights) for benchmarks. Both have two CLIP text
encoders (the second with a projection, whose pooled output SDXL adds to the timestep embedding),
and a UNet with SDXL's "text_time" added conditioning. Nothing here downloads anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.dev.testing.tiny_sd import CLIP_L_TEXT, SD_SCHEDULE, TINY_UNET, _vae, text_model

TEXT_HIDDEN = (32, 32)  # the two encoders' hidden sizes: the UNet's cross-attention width is their sum
PROJECTION = 32  # the second encoder's projection (the pooled text embedding)
TIME_EMBED = 8  # per time id; SDXL has six (original size, crop top-left, target size)


def build_tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A complete, tiny StableDiffusionXLPipeline (a few M parameters) that trains at 32 px on a
    CPU; latents are half the image size, as with the tiny SD pipeline."""
    import torch
    from diffusers import UNet2DConditionModel

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
    texts = (
        {**text, "hidden_size": TEXT_HIDDEN[0]},
        {**text, "hidden_size": TEXT_HIDDEN[1], "projection_dim": PROJECTION},
    )
    return _save(path, unet, vae, texts, seed)


# SDXL 1.0 base's published configs (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/,
# text_encoder/, text_encoder_2/ config.json), less the entries that are diffusers' defaults.
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' name for the number of heads here (64 channels each)
    "use_linear_projection": True,
    "cross_attention_dim": 2048,  # 768 + 1280: both encoders' hidden states, concatenated
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the 1280 pooled text embedding
}
SDXL_VAE_SCALING = 0.13025
SDXL_TEXT: tuple[dict[str, Any], dict[str, Any]] = (
    CLIP_L_TEXT,  # CLIP ViT-L/14's text tower
    {  # OpenCLIP ViT-bigG/14's text tower, with its projection
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "projection_dim": 1280,
        "hidden_act": "gelu",
        "vocab_size": 49408,
    },
)


def build_sdxl_base_pipeline(path: str | Path, seed: int = 0) -> Path:
    """The SDXL 1.0 base architecture from its published configs, randomly initialised: UNet 2.6 B
    parameters, VAE 84 M, text encoders 123 M and 695 M. True SDXL training cost, no download
    (about 14 GB written, fp32)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET)
    torch.manual_seed(seed + 1)
    vae = _vae([128, 256, 512, 512], layers_per_block=2, sample_size=1024)
    vae.register_to_config(scaling_factor=SDXL_VAE_SCALING, force_upcast=True)
    return _save(Path(path), unet, vae, SDXL_TEXT, seed)


def _save(path: Path, unet: Any, vae: Any, texts: tuple[dict[str, Any], dict[str, Any]], seed: int) -> Path:
    """Write the pipeline with character-level tokenizers and text encoders of configs TEXTS."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    encoders: dict[str, Any] = {}
    for number, (suffix, model_class) in enumerate([("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)]):
        tokenizer, encoder = text_model(path / f"tokenizer{suffix}", model_class, texts[number], seed + 2 + number)
        encoders[f"tokenizer{suffix}"], encoders[f"text_encoder{suffix}"] = tokenizer, encoder
    schedule = {k: v for k, v in SD_SCHEDULE.items() if k != "set_alpha_to_one"}
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**schedule, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True,
        **encoders,
    )
    pipeline.save_pretrained(path)
    return path
