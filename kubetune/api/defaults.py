"""Defaults that a FineTuneJob's `spec.training` (kubetune.api.models.Training) and the trainer's
flags (kubetune.trainer.options) share: the same setting with the same default on both sides.

Where the two differ on purpose (the stock script's CLI defaults against the defaults a
FineTuneJob gets, e.g. `--train_batch_size 16` against `batchSize: 1`), each side declares its
own; tests/trainer/test_options.py lists those differences. Plain constants only: models.py
imports this module.
"""

from __future__ import annotations

from typing import Final

METHOD: Final = "full"  # Final: mypy keeps the literal type the API's Literal fields need
"""Fine-tune the whole UNet (`lora`: adapters only)."""
LORA_RANK = 4
"""Rank of the LoRA adapters (diffusers' train_text_to_image_lora.py default)."""
RESOLUTION = 512
"""Training resolution in pixels (Stable Diffusion 1.x)."""
LR_SCHEDULER: Final = "constant"
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_WEIGHT_DECAY = 1e-2
ADAM_EPSILON = 1e-8
MAX_GRAD_NORM = 1.0
VALIDATION_GUIDANCE_SCALE = 7.5
"""Classifier-free guidance scale of the validation samples: the diffusers pipeline's default."""
CHECKPOINT_EVERY_STEPS = 500
"""Steps between resumable checkpoints: the stock script's default; a full SD 1.5 checkpoint with
EMA and AdamW state is about 14 GB, too much to write every few dozen steps."""
OPTIMIZER: Final = "adamw"
OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor")
"""torch's AdamW; bitsandbytes' AdamW8bit (8-bit moments); transformers' Adafactor (factored second moments)."""
STRATEGY: Final = "auto"
STRATEGIES = ("auto", "ddp", "fsdp")
"""How the trainer spreads the model over its processes (kubetune.trainer.sharding)."""
MODEL_FAMILIES = ("sd", "sdxl", "sd3", "flux")
"""The model families the trainer trains (kubetune.trainer.families; spec.model.family's enum)."""

BUCKET_STEP = 64
"""Aspect-ratio bucket sides are multiples of this (pixels), as in kohya's sd-scripts."""

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
"""Flow-matching timestep densities and loss weightings (diffusers.training_utils)."""
