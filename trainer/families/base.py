"""What a model family is: the few things that differ between pipelines (which parts to load,
how captions become the denoiser's conditioning, which pipeline class publishes and samples),
behind one small interface. The training loop, the latent cache, checkpoints and resume only talk
to a `ModelFamily` and never branch on which one it is.

A family's methods, in the order a run calls them:

- `load(path, variant, vae)`: the parts (`Parts`: UNet, VAE, text encoders, tokenizers, scheduler)
- `fingerprint_folders()`: the folders whose files decide the cached latents and text tensors
- `encode(parts, captions, device)`: captions to named tensors, cached once per caption
- `condition(batch)`: the denoiser's keyword arguments for a batch of cached samples
- `loss(...)`: noise, target and loss weighting (shared: epsilon / v-prediction, min-SNR)
- `pipeline(path, unet, parts)`: the diffusers pipeline, to `publish` (full or LoRA) and to `sample`
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F


class FamilyError(ValueError):
    """A model this family cannot train; one line naming what is wrong."""


@dataclass
class Parts:
    """A loaded pipeline's parts. `text_encoders` and `tokenizers` are in the family's
    `text_folders` order; the encoders are set to None once the cache is built (and no samples
    are rendered)."""

    unet: Any
    vae: Any
    noise_scheduler: Any
    text_encoders: list[Any] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)
    vae_source: str = ""  # a separate VAE (--pretrained_vae_model_name_or_path), else ""

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


class ModelFamily(ABC):
    """One model family: load / encode / condition / loss / publish / sample."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    """The diffusers pipeline class (model_index.json's `_class_name`)."""
    text_folders: ClassVar[tuple[tuple[str, str, str], ...]]
    """(text encoder folder, tokenizer folder, transformers class) for each text encoder."""
    pipeline_extras: ClassVar[dict[str, Any]] = {}
    """Extra from_pretrained arguments of the pipeline (e.g. no safety checker)."""
    tags: ClassVar[tuple[str, ...]] = ()
    """Model card tags."""

    # -- load ----------------------------------------------------------------------------------

    def load(self, path: Path, variant: str | None, vae: str | None = None) -> Parts:
        """The UNet, VAE (the pipeline's, or `vae`: a folder or hub id), text encoders, tokenizers
        and the DDPM training scheduler. The VAE and text encoders are frozen."""
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        parts = Parts(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant),
            vae=(
                AutoencoderKL.from_pretrained(vae)
                if vae
                else AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant)
            ),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            vae_source=vae or "",
        )
        for encoder_folder, tokenizer_folder, class_name in self.text_folders:
            encoder = getattr(transformers, class_name).from_pretrained(path, subfolder=encoder_folder, variant=variant)
            parts.text_encoders.append(encoder.requires_grad_(False))
            parts.tokenizers.append(transformers.CLIPTokenizer.from_pretrained(path, subfolder=tokenizer_folder))
        parts.vae.requires_grad_(False)
        return parts

    def fingerprint_folders(self) -> tuple[str, ...]:
        """Folders whose files decide the cached latents and text tensors."""
        return ("vae", *(folder for pair in self.text_folders for folder in pair[:2]))

    def check_folder(self, path: Path) -> None:
        """Refuse a folder that lacks a part this family loads."""
        missing = [f for f in ("unet", *self.fingerprint_folders()) if not (path / f).is_dir()]
        if missing:
            raise FamilyError(
                f"not a diffusers {self.pipeline_class} folder (no {', '.join(m + '/' for m in missing)})"
            )

    # -- encode --------------------------------------------------------------------------------

    @abstractmethod
    def encode(self, parts: Parts, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Captions to named tensors (one row per caption, on the CPU, float32), cached once."""

    @staticmethod
    def token_ids(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
        return tokenizer(
            list(captions),
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids

    # -- condition, loss -----------------------------------------------------------------------

    @abstractmethod
    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The denoiser's keyword arguments (besides the noisy latents and timesteps) for a batch:
        its `text.<name>` tensors (rows of `encode`'s), `original_size`, `crop_top_left` and
        `target_size` ([B, 2], pixels: the image before resizing, its crop as cached, and the size
        it is trained at: its bucket's, or the `resolution` square)."""

    @staticmethod
    def loss(
        scheduler: Any,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batch: dict[str, torch.Tensor],
        snr_gamma: float | None,
        input_perturbation: float,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """train_text_to_image.py's loss: MSE to the noise (or velocity), optionally min-SNR weighted."""
        from diffusers.training_utils import compute_snr

        latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = scheduler.add_noise(latents, batch["perturbed"] if input_perturbation else noise, timesteps)
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        prediction_type = scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        prediction = predict(noisy, timesteps)
        if snr_gamma is None:
            return F.mse_loss(prediction.float(), target.float(), reduction="mean")
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
        return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()

    # -- publish, sample -----------------------------------------------------------------------

    def pipeline_type(self) -> Any:
        return getattr(importlib.import_module("diffusers"), self.pipeline_class)

    def pipeline(
        self, path: Path, unet: Any, parts: Parts | None = None, variant: str | None = None, vae: Any = None
    ) -> Any:
        """The pipeline at `path` with `unet`. With `parts` (sampling): its loaded VAE and text
        encoders, no safety checker. Without (publishing): the rest as the base pipeline has it,
        but `vae` when given (a separate VAE the run trained with)."""
        components: dict[str, Any] = {"unet": unet}
        if vae is not None:
            components["vae"] = vae
        if parts is not None:
            components.update(vae=parts.vae, **self.pipeline_extras)
            for (encoder_folder, tokenizer_folder, _), encoder, tokenizer in zip(
                self.text_folders, parts.text_encoders, parts.tokenizers, strict=True
            ):
                components[encoder_folder], components[tokenizer_folder] = encoder, tokenizer
        return self.pipeline_type().from_pretrained(path, variant=variant, **components)

    def save_lora(self, unet: Any, folder: Path) -> None:
        """`folder/pytorch_lora_weights.safetensors` as the pipeline's save_lora_weights writes it
        (diffusers' LoRA format), loadable with `pipe.load_lora_weights(folder)`."""
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = convert_state_dict_to_diffusers(unet_lora_state(unet))
        layers = {k: v.detach().contiguous().float() for k, v in layers.items()}
        self.pipeline_type().save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)

    def publish_lora_extras(self, unet: Any, folder: Path) -> list[str]:
        """Files written beside the LoRA weights when publishing (none by default); their names."""
        return []


def unet_lora_state(unet: Any) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in peft's naming (`...to_k.lora_A.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(unet))
