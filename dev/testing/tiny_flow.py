"""Tiny FLUX.1 and Stable Diffusion 3 pipelines built offline (random weights, small configs), for
tests: the real pipeline classes, transformers, VAEs with a shift and scale, CLIP encoders and a
T5 encoder with a tokenizer written here (a character-level Unigram vocabulary: nothing is
downloaded). They train at 32 px on a CPU; latents are half the image size."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from kubetune.dev.testing.tiny_sd import _vae, text_model

CLIP_HIDDEN = 32
T5_WIDTH = 64  # SD3's joint attention width: the two CLIPs' states (32 + 32) padded to it


def t5_encoder(tokenizer_dir: Path, d_model: int, seed: int) -> tuple[Any, Any]:
    """A T5 tokenizer (written to `tokenizer_dir`) and a randomly initialised T5 encoder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + ",.'-"]
    pieces += [("▁" + c, -1.5) for c in string.ascii_lowercase]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )
    tokenizer.save_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(pieces),
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5TokenizerFast.from_pretrained(tokenizer_dir), T5EncoderModel(config)


def _flow_vae(seed: int, shift: float, scale: float) -> Any:
    import torch

    torch.manual_seed(seed)
    vae = _vae([32, 64], layers_per_block=1, sample_size=64)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae


def _clip(path: Path, folder: str, model_class: Any, seed: int, **extra: Any) -> tuple[Any, Any]:
    config = {
        "hidden_size": CLIP_HIDDEN,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "gelu",
        **extra,
    }
    return text_model(path / folder, model_class, config, seed)


def build_tiny_flux_pipeline(path: str | Path, seed: int = 0, guidance: bool = True) -> Path:
    """A complete, tiny FluxPipeline: FLUX.1-dev's layout (guidance embedding) or, with
    `guidance=False`, schnell's."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    tokenizer, text_encoder = _clip(path, "tokenizer", CLIPTextModel, seed + 2)
    tokenizer_2, text_encoder_2 = t5_encoder(path / "tokenizer_2", T5_WIDTH, seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=16,
        max_image_seq_len=256,
    )
    FluxPipeline(
        scheduler=scheduler,
        vae=_flow_vae(seed + 1, shift=0.1159, scale=0.3611),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    ).save_pretrained(path)
    return path


def build_tiny_sd3_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A complete, tiny StableDiffusion3Pipeline (MMDiT, three text encoders)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=2 * CLIP_HIDDEN,
    )
    encoders: dict[str, Any] = {}
    for number, suffix in enumerate(("", "_2")):
        tokenizer, encoder = _clip(
            path, f"tokenizer{suffix}", CLIPTextModelWithProjection, seed + 2 + number, projection_dim=CLIP_HIDDEN
        )
        encoders[f"tokenizer{suffix}"], encoders[f"text_encoder{suffix}"] = tokenizer, encoder
    encoders["tokenizer_3"], encoders["text_encoder_3"] = t5_encoder(path / "tokenizer_3", T5_WIDTH, seed + 4)
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(seed + 1, shift=0.0609, scale=1.5035),
        **encoders,
    ).save_pretrained(path)
    return path
