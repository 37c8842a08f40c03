"""Tiny FLUX.1 and Stable Diffusion 3 pipelines built offline (random weights, small configs), for
tests: the real pipeline classes, transformers, VAEs with a shift and scale, CLIP encoders and a
T5 encoder with a tokenizer written here (a character-level Unigram vocabulary: nothing is
downloaded). They train at 32 px on a CPU; latents are half the image size."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from kubetune.dev.testing.tiny_sd import CLIP_L_TEXT, _vae, text_model

CLIP_HIDDEN = 32
T5_WIDTH = 64  # SD3's joint attention width: the two CLIPs' states (32 + 32) padded to it


def t5_tokenizer(tokenizer_dir: Path, model_max_length: int | None = None) -> tuple[Any, int]:
    """A T5 tokenizer (a character-level Unigram vocabulary) written to `tokenizer_dir`, and its
    vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + ",.'-"]
    pieces += [("▁" + c, -1.5) for c in string.ascii_lowercase]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    extra = {"model_max_length": model_max_length} if model_max_length else {}
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0, **extra
    )
    tokenizer.save_pretrained(tokenizer_dir)
    return T5TokenizerFast.from_pretrained(tokenizer_dir), len(pieces)


def t5_encoder(tokenizer_dir: Path, d_model: int, seed: int) -> tuple[Any, Any]:
    """A T5 tokenizer (written to `tokenizer_dir`) and a randomly initialised T5 encoder."""
    import torch
    from transformers import T5Config, T5EncoderModel

    tokenizer, vocab_size = t5_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
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
    return tokenizer, T5EncoderModel(config)


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


# FLUX.1-dev's published configs (black-forest-labs/FLUX.1-dev: transformer/, vae/, text_encoder/,
# text_encoder_2/ and scheduler/ config.json), less the entries that are the classes' defaults.
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels packed 2x2
    "num_layers": 19,  # double-stream (MMDiT) blocks
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL's width
    "pooled_projection_dim": 768,  # CLIP-L's pooled output
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 1024,
    "shift_factor": 0.1159,
    "scaling_factor": 0.3611,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
FLUX_SCHEDULE: dict[str, Any] = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
T5_XXL: dict[str, Any] = {  # google/t5-v1_1-xxl's encoder: 4.76 B parameters
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def random_bf16(factory: Any, seed: int) -> Any:
    """The module `factory()` builds, randomly initialised in bf16 without ever holding fp32 weights
    or running the classes' own initialisers (minutes for 12 B parameters): built on the meta device,
    given bf16 storage, then weights ~ N(0, 1/fan_in), 1-D weights (norm scales) 1, biases 0. Good
    for throughput benchmarks, not for quality. The numbers are drawn on CUDA where there is one (a
    CPU draws about 140 M a second, on one thread), and the module returned on the CPU."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    with torch.device("meta"):
        module = factory().to(torch.bfloat16)
    persistent = set(module.state_dict()) & {name for name, _ in module.named_buffers()}
    if persistent:  # to_empty leaves buffers uninitialised too; the ones not saved are rebuilt on loading
        raise ValueError(f"{type(module).__name__} has persistent buffers: {sorted(persistent)[:3]}")
    module.to_empty(device=device)
    tie = getattr(module, "tie_weights", lambda: None)  # moves can give tied parameters (T5's embedding) storage each
    tie()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5, generator=generator)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)
    module.to("cpu")
    tie()
    return module


def build_flux_dev_pipeline(path: str | Path, seed: int = 0, **sizes: dict[str, Any]) -> Path:
    """The FLUX.1-dev architecture from its published configs, randomly initialised, in bf16: the
    transformer (11.9 B parameters), the VAE (84 M), CLIP-L's text encoder (123 M) and T5-XXL's
    encoder (4.76 B), with tokenizers written here (character-level; the configs' vocabulary sizes
    and model_max_length: 77 and 512). About 34 GB written. SIZES overrides entries of the
    transformer's, the VAE's, CLIP's or T5's config (`transformer=`, `vae=`, `text_encoder=`,
    `text_encoder_2=`), e.g. fewer layers to check this on a small machine.

    The full T5-XXL, not a narrower T5 of the same output width: both scripts load it, and the
    stock script, given per-image captions, encodes every batch's captions with it at each step
    (it has no text cache), so its cost and memory belong in the comparison."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    transformer = random_bf16(
        lambda: FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER, **sizes.get("transformer", {})}), seed
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**{**FLUX_VAE, **sizes.get("vae", {})}).to(torch.bfloat16)
    tokenizer, text_encoder = text_model(
        path / "tokenizer", CLIPTextModel, {**CLIP_L_TEXT, **sizes.get("text_encoder", {})}, seed + 2
    )
    tokenizer_2, vocab_size = t5_tokenizer(path / "tokenizer_2", model_max_length=512)
    t5 = {**T5_XXL, **sizes.get("text_encoder_2", {})}
    t5["vocab_size"] = max(t5["vocab_size"], vocab_size)
    text_encoder_2 = random_bf16(lambda: T5EncoderModel(T5Config(**t5)), seed + 3)
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE),
        vae=vae,
        text_encoder=text_encoder.to(torch.bfloat16),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    ).save_pretrained(path)
    return path
