"""FLUX.1 (dev and schnell), as diffusers' train_dreambooth_flux.py and
train_dreambooth_lora_flux.py train it: CLIP-L's pooled output and T5-XXL's hidden states
(`--max_sequence_length` tokens, 512 by default) condition a transformer that sees the latents
packed in 2x2 patches with their positions (image ids; text ids are zeros), the timestep divided
by 1000, and, for FLUX.1-dev (`guidance_embeds`), the distilled guidance `--guidance_scale`.
The VAE's latents are shifted and scaled (`shift_factor`, `scaling_factor`). Both encoders'
outputs are cached: training never loads T5."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kubetune.trainer.families.base import FamilyError, Parts, TextEncoder
from kubetune.trainer.families.flow import FlowMatchingFamily


class Flux(FlowMatchingFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    text_encoders = (
        TextEncoder("text_encoder", "tokenizer", "CLIPTextModel"),
        TextEncoder("text_encoder_2", "tokenizer_2", "T5EncoderModel", "T5TokenizerFast"),
    )
    tags = ("flux", "flux-diffusers")
    default_weighting = "none"
    default_max_sequence_length = 512

    def load(self, path: Any, variant: str | None, vae: str | None = None) -> Parts:
        parts = super().load(path, variant, vae)
        self.guidance_embeds = bool(parts.denoiser.config.guidance_embeds)
        # latents are packed in 2x2 patches: every trained size must be a multiple of twice the VAE's factor
        multiple = 2 ** len(parts.vae.config.block_out_channels)
        for flag, value in (("--resolution", self.cfg.resolution), ("--bucket_reso_steps", self.cfg.bucket_reso_steps)):
            if value % multiple and (flag == "--resolution" or self.cfg.enable_bucket):
                raise FamilyError(f"{flag} {value}: the flux family needs a multiple of {multiple}")
        return parts

    def encode(self, parts: Parts, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        (clip_tokenizer, t5_tokenizer), (clip, t5) = parts.tokenizers, parts.text_encoders
        pooled = clip(self.token_ids(clip_tokenizer, captions).to(device), output_hidden_states=False).pooler_output
        ids = t5_tokenizer(
            list(captions),
            max_length=self.max_sequence_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        states = t5(ids.to(device), output_hidden_states=False)[0]
        return {"states": states.float().cpu(), "pooled": pooled.float().cpu()}

    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        states = batch["text.states"]
        size = len(states)
        guidance = torch.full((size,), self.cfg.guidance_scale, device=states.device) if self.guidance_embeds else None
        return {
            "encoder_hidden_states": states,
            "pooled_projections": batch["text.pooled"],
            "txt_ids": torch.zeros(states.shape[1], 3, device=states.device, dtype=states.dtype),
            "guidance": guidance,
        }

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]
    ) -> torch.Tensor:
        from diffusers import FluxPipeline

        size, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, size, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, noisy.device, noisy.dtype)
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,
            img_ids=image_ids,
            return_dict=False,
            **self.condition(batch),
        )[0]
        return FluxPipeline._unpack_latents(out, height, width, 1)  # latent sizes in, latent sizes out
