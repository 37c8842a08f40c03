"""What a model family is: the few things that differ between pipelines (which parts to load,
how captions become the denoiser's conditioning, the training objective, which pipeline class
publishes and samples), behind one small interface. The training loop, the latent cache,
checkpoints and resume only talk to a `ModelFamily` and never branch on which one it is.

A family's methods, in the order a run calls them:

- `configure(cfg)`: the run's settings; refuses those the family cannot honour
- `load(path, variant, vae)`: the parts (`Parts`: denoiser (UNet or transformer), VAE, text
  encoders, tokenizers, the training scheduler)
- `fingerprint_folders()`, `cache_settings()`: what decides the cached latents and text tensors
- `encode(parts, captions, device)`: captions to named tensors, cached once per caption
  (`tokenize`, then `encode_ids`); with --train_text_encoder also the token ids of the encoders
  it trains (`trained_text_encoders`), which `encode_trained` runs again every step, with gradients
- `draw_timestep(scheduler, generator)`: one sample's timestep, from the sample's own generator
- `example_losses(denoiser, scheduler, batch)`: noise the latents, `predict`, weigh the error,
  one loss per example (here: the DDPM objective, epsilon or v-prediction, min-SNR; flow.py:
  flow matching); `loss` is their mean
- `predict(denoiser, noisy, timesteps, batch)`: the denoiser's output, with `condition(batch)`
- `pipeline(path, denoiser, parts)`: the diffusers pipeline, to `publish` (full or LoRA) and to `sample`
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F


class FamilyError(ValueError):
    """A model this family cannot train; one line naming what is wrong."""


@dataclass(frozen=True)
class TextEncoder:
    """Where a pipeline keeps a text encoder and its tokenizer, and their transformers classes."""

    folder: str
    tokenizer_folder: str
    model_class: str
    tokenizer_class: str = "CLIPTokenizer"


@dataclass
class Parts:
    """A loaded pipeline's parts. `text_encoders` and `tokenizers` are in the family's
    `text_encoders` order; the encoders are dropped once the cache is built (and no samples are
    rendered)."""

    denoiser: Any
    vae: Any
    noise_scheduler: Any
    text_encoders: list[Any] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)
    vae_source: str = ""  # a separate VAE (--pretrained_vae_model_name_or_path), else ""

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """Subtracted before scaling (FLUX's and SD3's VAEs); 0 for SD's."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)


class ModelFamily(ABC):
    """One model family: load / encode / condition / loss / publish / sample."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    """The diffusers pipeline class (model_index.json's `_class_name`)."""
    denoiser_folder: ClassVar[str] = "unet"
    """The trained model's folder in the pipeline (and in checkpoints: `<folder>/`, `<folder>_ema/`)."""
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"
    scheduler_class: ClassVar[str] = "DDPMScheduler"
    """The training scheduler, loaded from the pipeline's scheduler/ config."""
    text_encoders: ClassVar[tuple[TextEncoder, ...]]
    lora_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    """LoRA target modules (peft's suffix match), as the stock LoRA scripts choose them."""
    text_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    """LoRA target modules of a trained text encoder (its attention), as the stock LoRA scripts choose them."""
    trained_text_encoders: ClassVar[tuple[int, ...]] = (0,)
    """The text encoders --train_text_encoder trains (indices into `text_encoders`), as the stock
    scripts choose them: the CLIP encoders; T5 stays frozen and its output cached."""
    lora_in_diffusers_keys: ClassVar[bool] = True
    """UNet LoRA files hold diffusers' key names (`to_k.lora.down.weight`); transformer LoRA files
    hold peft's (`to_k.lora_A.weight`), as the stock scripts save them."""
    objective: ClassVar[str] = "denoising (DDPM)"
    pipeline_extras: ClassVar[dict[str, Any]] = {}
    """Extra from_pretrained arguments of the pipeline (e.g. no safety checker)."""
    tags: ClassVar[tuple[str, ...]] = ()
    """Model card tags."""

    def __init__(self) -> None:
        self.cfg: Any = None  # the run's TrainConfig, from `configure`

    def configure(self, cfg: Any) -> None:
        """Take the run's settings (a TrainConfig); raise FamilyError for one this family cannot
        honour."""
        self.cfg = cfg

    # -- load ----------------------------------------------------------------------------------

    def denoiser_type(self) -> Any:
        return getattr(importlib.import_module("diffusers"), self.denoiser_class)

    def load(self, path: Path, variant: str | None, vae: str | None = None, denoiser_on_meta: bool = False) -> Parts:
        """The denoiser, VAE (the pipeline's, or `vae`: a folder or hub id), text encoders,
        tokenizers and the training scheduler. The VAE and text encoders are frozen.
        `denoiser_on_meta`: the denoiser's structure only, no weights read (FSDP: the processes
        other than the first get their shards of the first's weights)."""
        import diffusers
        import transformers

        parts = Parts(
            denoiser=(
                self.denoiser_on_meta(path)
                if denoiser_on_meta
                else self.denoiser_type().from_pretrained(path, subfolder=self.denoiser_folder, variant=variant)
            ),
            vae=(
                diffusers.AutoencoderKL.from_pretrained(vae)
                if vae
                else diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant)
            ),
            noise_scheduler=getattr(diffusers, self.scheduler_class).from_pretrained(path, subfolder="scheduler"),
            vae_source=vae or "",
        )
        for text in self.text_encoders:
            model = getattr(transformers, text.model_class)
            encoder = model.from_pretrained(path, subfolder=text.folder, variant=variant)
            parts.text_encoders.append(encoder.requires_grad_(False))
            tokenizer = getattr(transformers, text.tokenizer_class)
            parts.tokenizers.append(tokenizer.from_pretrained(path, subfolder=text.tokenizer_folder))
        parts.vae.requires_grad_(False)
        return parts

    def denoiser_on_meta(self, path: Path) -> Any:
        """The denoiser built from its config on the meta device: shapes, no memory."""
        cls = self.denoiser_type()
        with torch.device("meta"):
            return cls.from_config(cls.load_config(path, subfolder=self.denoiser_folder))

    def fingerprint_folders(self) -> tuple[str, ...]:
        """Folders whose files decide the cached latents and text tensors."""
        return ("vae", *(folder for t in self.text_encoders for folder in (t.folder, t.tokenizer_folder)))

    def cache_settings(self) -> dict[str, Any]:
        """Settings besides the common ones that decide the cached tensors (e.g. the T5 length)."""
        return {}

    def check_folder(self, path: Path) -> None:
        """Refuse a folder that lacks a part this family loads."""
        missing = [f for f in (self.denoiser_folder, *self.fingerprint_folders()) if not (path / f).is_dir()]
        if missing:
            raise FamilyError(
                f"not a diffusers {self.pipeline_class} folder (no {', '.join(m + '/' for m in missing)})"
            )

    # -- encode --------------------------------------------------------------------------------

    @property
    def trains_text_encoders(self) -> bool:
        return bool(self.cfg is not None and self.cfg.train_text_encoder)

    def tokenize(self, parts: Parts, captions: Sequence[str]) -> list[torch.Tensor]:
        """Each text encoder's token ids for the captions (its tokenizer's length)."""
        return [self.token_ids(tokenizer, captions) for tokenizer in parts.tokenizers]

    def encode(self, parts: Parts, captions: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Captions to named tensors (one row per caption, on the CPU, float32), cached once; with
        --train_text_encoder also `ids<k>`, the token ids of each trained encoder k (int64)."""
        ids = self.tokenize(parts, captions)
        out = {k: v.float().cpu() for k, v in self.encode_ids(parts, [i.to(device) for i in ids]).items()}
        if self.trains_text_encoders:
            out.update({f"ids{k}": ids[k] for k in self.trained_text_encoders})
        return out

    @abstractmethod
    def encode_ids(
        self, parts: Parts, ids: Sequence[torch.Tensor | None], cached: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Token ids (`tokenize`'s, one per text encoder, on its device) to `encode`'s named
        tensors. An encoder whose ids are None is not run: its part comes from `cached` (the
        batch's cached tensors by name), as when only the trained encoders run."""

    def encode_trained(self, parts: Parts, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's text tensors (`text.<name>`) with the trained encoders run again on its
        token ids (`text.ids<k>`), so that gradients reach them; the frozen encoders' parts as cached."""
        ids = [batch.get(f"text.ids{k}") for k in range(len(self.text_encoders))]
        cached = {k.removeprefix("text."): v for k, v in batch.items() if k.startswith("text.")}
        return {f"text.{k}": v for k, v in self.encode_ids(parts, ids, cached).items()}

    @staticmethod
    def token_ids(tokenizer: Any, captions: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Token ids padded to `max_length` (default: the tokenizer's own limit, CLIP's 77)."""
        return tokenizer(
            list(captions),
            max_length=max_length or tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids

    # -- timesteps, loss, condition -----------------------------------------------------------

    def draw_timestep(self, scheduler: Any, generator: torch.Generator) -> torch.Tensor:
        """One sample's training timestep ([1]), drawn from its own generator (exact resume, and N
        processes drawing what one draws): uniform over the DDPM schedule."""
        return torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)

    def predict(
        self, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any]
    ) -> torch.Tensor:
        """The denoiser's output for the noisy latents, conditioned on the batch's texts."""
        return denoiser(noisy, timesteps, **self.condition(batch), return_dict=False)[0]

    @abstractmethod
    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The denoiser's keyword arguments (besides the noisy latents and timesteps) for a batch:
        its `text.<name>` tensors (rows of `encode`'s), `original_size`, `crop_top_left` and
        `target_size` ([B, 2], pixels: the image before resizing, its crop as cached, and the size
        it is trained at: its bucket's, or the `resolution` square)."""

    def loss(
        self, denoiser: Any, scheduler: Any, batch: dict[str, torch.Tensor], channels_last: bool = False
    ) -> torch.Tensor:
        """The batch's loss: the mean of `example_losses`."""
        return self.example_losses(denoiser, scheduler, batch, channels_last).mean()

    def example_losses(
        self, denoiser: Any, scheduler: Any, batch: dict[str, torch.Tensor], channels_last: bool = False
    ) -> torch.Tensor:
        """Each example's loss ([B]; the training loop weighs and averages them, e.g. DreamBooth's
        prior preservation): train_text_to_image.py's MSE to the noise (or velocity), optionally
        min-SNR weighted."""
        from diffusers.training_utils import compute_snr

        snr_gamma, input_perturbation = self.cfg.snr_gamma, self.cfg.input_perturbation
        latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = scheduler.add_noise(latents, batch["perturbed"] if input_perturbation else noise, timesteps)
        if channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        prediction_type = scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        prediction = self.predict(denoiser, noisy, timesteps, batch)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
        per_example = loss.mean(dim=list(range(1, loss.ndim)))
        if snr_gamma is None:
            return per_example
        snr = compute_snr(scheduler, timesteps)
        weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        return per_example * weights

    # -- publish, sample -----------------------------------------------------------------------

    def pipeline_type(self) -> Any:
        return getattr(importlib.import_module("diffusers"), self.pipeline_class)

    def pipeline(
        self,
        path: Path,
        denoiser: Any,
        parts: Parts | None = None,
        variant: str | None = None,
        vae: Any = None,
        text_encoders: dict[str, Any] | None = None,
    ) -> Any:
        """The pipeline at `path` with `denoiser`. With `parts` (sampling): its loaded VAE and text
        encoders, no safety checker. Without (publishing): the rest as the base pipeline has it,
        but `vae` when given (a separate VAE the run trained with) and `text_encoders` (folder ->
        the trained encoder)."""
        components: dict[str, Any] = {self.denoiser_folder: denoiser, **(text_encoders or {})}
        if vae is not None:
            components["vae"] = vae
        if parts is not None:
            components.update(vae=parts.vae, **self.pipeline_extras)
            for text, encoder, tokenizer in zip(self.text_encoders, parts.text_encoders, parts.tokenizers, strict=True):
                components[text.folder], components[text.tokenizer_folder] = encoder, tokenizer
        return self.pipeline_type().from_pretrained(path, variant=variant, **components)

    def generation_pipeline(
        self, path: Path, dtype: torch.dtype, variant: str | None = None, vae: str | None = None
    ) -> Any:
        """A fresh pipeline of the base model in `dtype`, to generate DreamBooth's class images
        (its own copy: the weights being trained are never cast); `vae`: a separate VAE's source."""
        import diffusers

        components = dict(self.pipeline_extras)
        if vae:
            components["vae"] = diffusers.AutoencoderKL.from_pretrained(vae, torch_dtype=dtype)
        pipeline = self.pipeline_type().from_pretrained(path, torch_dtype=dtype, variant=variant, **components)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def save_lora(self, denoiser: Any, folder: Path, text_encoders: dict[str, Any] | None = None) -> None:
        """`folder/pytorch_lora_weights.safetensors` as the pipeline's save_lora_weights writes it
        (the stock LoRA scripts' format), loadable with `pipe.load_lora_weights(folder)`; with
        `text_encoders` (folder -> encoder with adapters) their adapters too (`text_encoder.` keys)."""
        from diffusers.utils import convert_state_dict_to_diffusers

        adapted = {self.denoiser_folder: denoiser, **(text_encoders or {})}
        arguments: dict[str, Any] = {}
        for name, module in adapted.items():
            layers = lora_state(module)
            if self.lora_in_diffusers_keys:
                layers = convert_state_dict_to_diffusers(layers)
            arguments[f"{name}_lora_layers"] = {k: v.detach().contiguous().float() for k, v in layers.items()}
            # rank, alpha, targets: load_lora_weights reads them
            arguments[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        self.pipeline_type().save_lora_weights(folder, **arguments, safe_serialization=True)

    def load_lora(
        self, denoiser: Any, saved: dict[str, torch.Tensor], text_encoders: dict[str, Any] | None = None
    ) -> tuple[int, list[str]]:
        """A `save_lora` file's weights back into the adapters of the denoiser and `text_encoders`
        (folder -> encoder); (the fewest weights found for one of them, unexpected keys)."""
        from diffusers.utils import (
            convert_state_dict_to_diffusers,
            convert_state_dict_to_peft,
            convert_unet_state_dict_to_peft,
        )
        from peft.utils import set_peft_model_state_dict

        found, unexpected = [], []
        for name, module in {self.denoiser_folder: denoiser, **(text_encoders or {})}.items():
            state = {k.removeprefix(f"{name}."): v for k, v in saved.items() if k.startswith(f"{name}.")}
            if self.lora_in_diffusers_keys:
                is_denoiser = module is denoiser
                state = (
                    convert_unet_state_dict_to_peft(state)
                    if is_denoiser
                    else convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
                )
            result = set_peft_model_state_dict(module, state, adapter_name="default")
            found.append(len(state))
            unexpected += list(getattr(result, "unexpected_keys", None) or [])
        return min(found), unexpected

    def publish_lora_extras(self, denoiser: Any, folder: Path) -> list[str]:
        """Files written beside the LoRA weights when publishing (none by default); their names."""
        return []


def lora_state(denoiser: Any, scaled: bool = False) -> dict[str, torch.Tensor]:
    """The denoiser's LoRA weights in peft's naming (`...to_k.lora_A.weight`); `scaled`: each
    `lora_B` multiplied by alpha / rank, for formats that assume alpha = rank (kohya's, as written here)."""
    from peft.utils import get_peft_model_state_dict

    state = dict(get_peft_model_state_dict(denoiser))
    if scaled:
        config = denoiser.peft_config["default"]
        scale = config.lora_alpha / config.r
        state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
    return state


def add_text_encoder_lora(encoder: Any, config: Any) -> None:
    """LoRA adapters (peft's `default`) on a transformers text encoder, recorded in `peft_config`
    as transformers' `add_adapter` records them, so that peft's state-dict helpers read them.
    Not `add_adapter` itself: transformers 5 refuses peft releases before 0.22 by version number
    alone, and peft's own injection is what it calls."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, encoder, adapter_name="default")
    encoder.peft_config = {"default": config}
