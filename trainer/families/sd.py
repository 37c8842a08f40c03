"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, whose last hidden state conditions the UNet
through cross-attention (train_text_to_image.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kubetune.trainer.families.base import ModelFamily, Parts, TextEncoder


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    text_encoders = (TextEncoder("text_encoder", "tokenizer", "CLIPTextModel"),)
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    tags = ("stable-diffusion",)

    def encode_ids(
        self, parts: Parts, ids: Sequence[torch.Tensor | None], cached: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        return {"states": parts.text_encoders[0](ids[0], return_dict=False)[0]}

    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": batch["text.states"]}
