"""build_flux_dev_pipeline (the FLUX.1-dev architecture for GPU benchmarks), checked at reduced
depth: the published configs reach the saved pipeline, weights are bf16 and finite, T5's shared
embedding stays tied, the tokenizers have FLUX's lengths, and the pipeline loads and denoises."""

from __future__ import annotations

import json
from pathlib import Path


def test_flux_dev_builder_keeps_the_published_configs_at_reduced_depth(tmp_path: Path) -> None:
    import torch
    from diffusers import FluxPipeline

    from kubetune.dev.testing.tiny_flow import FLUX_DEV_TRANSFORMER, build_flux_dev_pipeline

    path = build_flux_dev_pipeline(
        tmp_path / "flux",
        transformer={"num_layers": 1, "num_single_layers": 1},
        text_encoder={"num_hidden_layers": 1},
        text_encoder_2={"num_layers": 1, "d_ff": 64},
        vae={"layers_per_block": 1},
    )
    config = json.loads((path / "transformer" / "config.json").read_text())
    for key, value in FLUX_DEV_TRANSFORMER.items():
        if key not in ("num_layers", "num_single_layers"):
            assert config[key] == (list(value) if isinstance(value, tuple) else value), key
    pipeline = FluxPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
    assert pipeline.vae.config.latent_channels == 16
    assert (pipeline.vae.config.shift_factor, pipeline.vae.config.scaling_factor) == (0.1159, 0.3611)
    assert (pipeline.tokenizer.model_max_length, pipeline.tokenizer_2.model_max_length) == (77, 512)
    t5 = pipeline.text_encoder_2
    assert t5.config.d_model == 4096 and t5.config.vocab_size == 32128
    assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()
    for module in (pipeline.transformer, t5):
        assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in module.parameters())
    latents = pipeline(
        "a red circle", height=32, width=32, num_inference_steps=1, max_sequence_length=16, output_type="latent"
    ).images
    assert latents.shape == (1, 4, 64) and torch.isfinite(latents).all()
