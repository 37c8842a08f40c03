"""Stable Diffusion XL, as diffusers' train_text_to_image_sdxl.py trains it: two CLIP text
encoders (their penultimate hidden states concatenated; the second one's pooled, projected
output), and "time ids" from each image's original size, crop and target size
(micro-conditioning), both cached so that training never runs an encoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kubetune.trainer.families.base import ModelFamily, Parts, TextEncoder, lora_state

KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders = (
        TextEncoder("text_encoder", "tokenizer", "CLIPTextModel"),
        TextEncoder("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
    )
    tags = ("stable-diffusion-xl",)

    trained_text_encoders = (0, 1)

    def encode_ids(
        self, parts: Parts, ids: Sequence[torch.Tensor | None], cached: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        states, pooled = [], None
        for token_ids, encoder in zip(ids, parts.text_encoders, strict=True):
            out = encoder(token_ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
            states.append(out[-1][-2])  # the penultimate layer's hidden states
        assert pooled is not None
        return {"states": torch.cat(states, dim=-1), "pooled": pooled}

    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        states = batch["text.states"]
        original = batch["original_size"]
        target = batch["target_size"]  # the bucket's (height, width); the resolution square without buckets
        time_ids = torch.cat([original, batch["crop_top_left"], target], dim=1).to(states.dtype)
        return {
            "encoder_hidden_states": states,
            "added_cond_kwargs": {"text_embeds": batch["text.pooled"], "time_ids": time_ids},
        }

    def publish_lora_extras(self, denoiser: Any, folder: Path) -> list[str]:
        """The LoRA in kohya's key format too (`lora_unet_..._to_k.lora_down.weight`, `lora_up`,
        `alpha`), as ComfyUI and AUTOMATIC1111 load it."""
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
        from safetensors.torch import save_file

        peft = {f"unet.{k}": v for k, v in lora_state(denoiser, scaled=True).items()}
        kohya = {k: v.detach().contiguous().float() for k, v in convert_state_dict_to_kohya(peft).items()}
        save_file(kohya, folder / KOHYA_FILE, metadata={"format": "pt", "ss_base_model_version": "sdxl_base_v1-0"})
        return [KOHYA_FILE]
