"""Stable Diffusion 3 / 3.5 (MMDiT), as diffusers' train_dreambooth_lora_sd3.py trains it: two
CLIP encoders (penultimate hidden states concatenated, padded to T5's width, then T5-XXL's states
appended along the sequence; their pooled outputs concatenated) condition an SD3 transformer on
the shifted, scaled latents; the timestep as the scheduler has it; logit-normal timesteps and,
with `--precondition_outputs` (the script's default), the loss on the preconditioned output.
All three encoders' outputs are cached: training never loads them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kubetune.trainer.families.base import Parts, TextEncoder
from kubetune.trainer.families.flow import FlowMatchingFamily


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    text_encoders = (
        TextEncoder("text_encoder", "tokenizer", "CLIPTextModelWithProjection"),
        TextEncoder("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
        TextEncoder("text_encoder_3", "tokenizer_3", "T5EncoderModel", "T5TokenizerFast"),
    )
    tags = ("sd3", "sd3-diffusers")
    default_weighting = "logit_normal"
    default_max_sequence_length = 77
    precondition = True

    def encode(self, parts: Parts, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        clip_states, pooled = [], []
        for tokenizer, encoder in zip(parts.tokenizers[:2], parts.text_encoders[:2], strict=True):
            out = encoder(self.token_ids(tokenizer, captions).to(device), output_hidden_states=True)
            pooled.append(out[0])  # text_embeds: the projected pooled output
            clip_states.append(out.hidden_states[-2])
        ids = self.token_ids(parts.tokenizers[2], captions, self.max_sequence_length)
        t5 = parts.text_encoders[2](ids.to(device))[0]
        clip = torch.cat(clip_states, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "states": torch.cat([clip, t5], dim=-2).float().cpu(),
            "pooled": torch.cat(pooled, dim=-1).float().cpu(),
        }

    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": batch["text.states"], "pooled_projections": batch["text.pooled"]}

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]
    ) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps, return_dict=False, **self.condition(batch))[0]
