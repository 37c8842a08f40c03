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

    trained_text_encoders = (0, 1)

    def tokenize(self, parts: Parts, captions: Sequence[str]) -> list[torch.Tensor]:
        *clips, t5 = parts.tokenizers
        return [*(self.token_ids(t, captions) for t in clips), self.token_ids(t5, captions, self.max_sequence_length)]

    def encode_ids(
        self, parts: Parts, ids: Sequence[torch.Tensor | None], cached: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        clip_states, pooled = [], []
        for token_ids, encoder in zip(ids[:2], parts.text_encoders[:2], strict=True):
            out = encoder(token_ids, output_hidden_states=True)
            pooled.append(out[0])  # text_embeds: the projected pooled output
            clip_states.append(out.hidden_states[-2])
        clip = torch.cat(clip_states, dim=-1)
        if ids[2] is None:  # T5 is frozen: its states are the cached sequence's last tokens
            assert cached is not None
            t5 = cached["states"][:, -self.max_sequence_length :].to(clip.dtype)
        else:
            t5 = parts.text_encoders[2](ids[2])[0]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"states": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"encoder_hidden_states": batch["text.states"], "pooled_projections": batch["text.pooled"]}

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]
    ) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps, return_dict=False, **self.condition(batch))[0]
