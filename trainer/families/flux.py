"""FLUX.1 (dev and schnell), as diffusers' train_dreambooth_flux.py and
train_dreambooth_lora_flux.py train it: CLIP-L's pooled output and T5-XXL's hidden states
(`--max_sequence_length` tokens, 512 by default) condition a transformer that sees the latents
packed in 2x2 patches with their positions (image ids; text ids are zeros), the timestep divided
by 1000, and, for FLUX.1-dev (`guidance_embeds`), the distilled guidance `--guidance_scale`.
The VAE's latents are shifted and scaled (`shift_factor`, `scaling_factor`). Both encoders'
outputs are cached: training never loads T5."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from kubetune.trainer.families.base import FamilyError, Parts, TextEncoder, lora_state
from kubetune.trainer.families.flow import FlowMatchingFamily

log = logging.getLogger("kubetune.trainer")

KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
FUSED = {  # diffusers' separate projections -> Black Forest Labs' fused layer (kohya's module names)
    "transformer_blocks.{}.attn.to_{}": ("double_blocks.{}.img_attn.qkv", ("q", "k", "v")),
    "single_transformer_blocks.{}.attn.to_{}": ("single_blocks.{}.linear1", ("q", "k", "v", "mlp")),
}
SINGLE = {"transformer_blocks.{}.attn.to_out.0": "double_blocks.{}.img_attn.proj"}


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

    def load(self, path: Any, variant: str | None, vae: str | None = None, denoiser_on_meta: bool = False) -> Parts:
        parts = super().load(path, variant, vae, denoiser_on_meta)
        self.guidance_embeds = bool(parts.denoiser.config.guidance_embeds)
        # latents are packed in 2x2 patches: every trained size must be a multiple of twice the VAE's factor
        multiple = 2 ** len(parts.vae.config.block_out_channels)
        for flag, value in (("--resolution", self.cfg.resolution), ("--bucket_reso_steps", self.cfg.bucket_reso_steps)):
            if value % multiple and (flag == "--resolution" or self.cfg.enable_bucket):
                raise FamilyError(f"{flag} {value}: the flux family needs a multiple of {multiple}")
        return parts

    def tokenize(self, parts: Parts, captions: Sequence[str]) -> list[torch.Tensor]:
        clip_tokenizer, t5_tokenizer = parts.tokenizers
        return [
            self.token_ids(clip_tokenizer, captions),
            self.token_ids(t5_tokenizer, captions, self.max_sequence_length),
        ]

    def encode_ids(
        self, parts: Parts, ids: Sequence[torch.Tensor | None], cached: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        clip, t5 = parts.text_encoders
        pooled = clip(ids[0], output_hidden_states=False).pooler_output
        if ids[1] is None:  # T5 is frozen: its states as cached
            assert cached is not None
            return {"states": cached["states"], "pooled": pooled}
        return {"states": t5(ids[1], output_hidden_states=False)[0], "pooled": pooled}

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

    def publish_lora_extras(self, denoiser: Any, folder: Any) -> list[str]:
        """The LoRA in kohya's FLUX layout too (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
        `lora_up`, `alpha`), as sd-scripts writes it and ComfyUI loads it: FLUX's original modules fuse
        q, k and v (and, in single blocks, the MLP's input), so the three adapters become one of
        three times the rank whose up-projection is block-diagonal (zero rows for the MLP): the same
        update, exactly."""
        from safetensors.torch import save_file

        state, left_out = kohya_flux_state(denoiser)
        if left_out:  # a partial file would load as a different LoRA: none at all
            log.warning("no kohya-format LoRA file: no kohya name here for the adapted module %s", left_out[0])
            return []
        save_file(state, folder / KOHYA_FILE, metadata={"format": "pt", "ss_network_module": "networks.lora_flux"})
        return [KOHYA_FILE]


def kohya_flux_state(denoiser: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The denoiser's LoRA in kohya's FLUX key layout (alpha = rank, the trained scale folded into
    `lora_up`), and the adapted modules it has no kohya name for (the double blocks' and single
    blocks' attention q/k/v and out are mapped)."""
    peft = {k: v.detach().float().contiguous() for k, v in lora_state(denoiser, scaled=True).items()}
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()

    def put(module: str, down: torch.Tensor, up: torch.Tensor) -> None:
        key = "lora_unet_" + module.replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1

    blocks = {"transformer_blocks": len(denoiser.transformer_blocks)}
    blocks["single_transformer_blocks"] = len(denoiser.single_transformer_blocks)
    for pattern, (fused, parts) in FUSED.items():
        for block in range(blocks[pattern.split(".")[0]]):
            names = [pattern.format(block, p) for p in parts if p != "mlp"]
            if not all(f"{n}.lora_A.weight" in peft for n in names):
                continue
            downs = [peft[f"{n}.lora_A.weight"] for n in names]
            ups = [peft[f"{n}.lora_B.weight"] for n in names]
            if "mlp" in parts:  # the fused layer's MLP rows get no update
                mlp = denoiser.single_transformer_blocks[block].proj_mlp.out_features
                ups.append(torch.zeros(mlp, 0))
            put(fused.format(block), torch.cat(downs), torch.block_diag(*ups))
            done.update(names)
    for pattern, target in SINGLE.items():
        for block in range(blocks[pattern.split(".")[0]]):
            name = pattern.format(block)
            if f"{name}.lora_A.weight" in peft:
                put(target.format(block), peft[f"{name}.lora_A.weight"], peft[f"{name}.lora_B.weight"])
                done.add(name)
    adapted = sorted({k.removesuffix(".lora_A.weight") for k in peft if k.endswith(".lora_A.weight")})
    return out, [m for m in adapted if m not in done]
