"""The trainer's settings: train_text_to_image.py's flags (same names, same meanings), kubetune's
additions, and how a FineTuneJob spec maps onto them. No torch here: `--help` stays instant."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from kubetune.api import layout
from kubetune.cli_util import OneLineArgumentParser, OneLineError
from kubetune.storage import join

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
# Flags of the stock script that kubetune refuses rather than silently ignores.
UNSUPPORTED = {
    "use_8bit_adam": "8-bit Adam (bitsandbytes) is not bundled; use --method lora to save memory",
    "dream_training": "DREAM training is not supported",
    "push_to_hub": "pushing to the Hub is not supported; the model is published to --output_dir",
}


@dataclass
class TrainConfig:
    # model
    pretrained_model_name_or_path: str = ""
    revision: str | None = None
    variant: str | None = None
    non_ema_revision: str | None = None
    # data
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    max_train_samples: int | None = None
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    image_interpolation_mode: str = "lanczos"
    dataloader_num_workers: int = 0
    cache_dir: str | None = None
    latent_cache_dir: str | None = None
    # optimisation
    train_batch_size: int = 16
    num_train_epochs: int = 100
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    allow_tf32: bool = False
    mixed_precision: str | None = None
    seed: int | None = None
    compile: bool = False
    # loss
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    prediction_type: str | None = None
    # EMA
    use_ema: bool = False
    offload_ema: bool = False
    foreach_ema: bool = False
    # LoRA
    method: str = "full"
    rank: int = 4
    # checkpoints, validation, logging
    output_dir: str = "sd-model-finetuned"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    max_nonfinite_steps: int = 0
    resume_from_checkpoint: str | None = None
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int | None = None
    validation_guidance_scale: float = 7.5
    validation_epochs: int = 5
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "text2image-fine-tune"
    progress_interval: float = 5.0
    enable_xformers_memory_efficient_attention: bool = False
    # provenance, for the model card
    spec_dataset: dict[str, Any] | None = None

    @property
    def precision(self) -> str:
        """`no`, `fp16` or `bf16`: the flag, else what `accelerate launch` was given, else `no`."""
        value = self.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
        return "no" if value == "fp32" else value


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=prog,
        description="Fine-tune a Stable Diffusion model: a drop-in for diffusers' train_text_to_image.py "
        "(same flags), with cached latents, resumable checkpoints in S3 and live progress.",
    )
    add = p.add_argument
    g = p.add_argument_group("kubetune")
    g.add_argument("--spec", metavar="FILE", help="read spec.model, spec.training and spec.storage of a FineTuneJob "
                   "(a file, '-' for stdin, or env:KUBETUNE_SPEC); other flags given override it")
    g.add_argument("--method", choices=("full", "lora"), default="full", help="fine-tune the whole UNet or LoRA adapters")
    g.add_argument("--rank", "--lora_rank", dest="rank", type=_positive_int, default=4, help="LoRA rank (--method lora)")
    g.add_argument("--validation_steps", type=_positive_int, help="render validation samples every N steps "
                   "(default: at every checkpoint)")
    g.add_argument("--validation_guidance_scale", type=_non_negative_float, default=7.5,
                   help="classifier-free guidance scale of the validation samples (1: no guidance)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    g.add_argument("--latent_cache_dir", help="where the latent/text-embedding cache lives (local or s3://); default: "
                   "'cache/' beside a dataset folder named 'dataset', else <output_dir>/cache")
    g.add_argument("--progress_interval", type=float, default=5.0, help="seconds between progress.json updates")

    add("--pretrained_model_name_or_path", help="hub id, local diffusers folder or s3:// folder")
    add("--revision")
    add("--variant")
    add("--non_ema_revision")
    add("--dataset_name", help="hub dataset, or a local/s3:// imagefolder")
    add("--dataset_config_name")
    add("--train_data_dir", help="imagefolder (metadata.jsonl with file_name + text), local or s3://")
    add("--image_column", default="image")
    add("--caption_column", default="text")
    add("--max_train_samples", type=_positive_int)
    add("--validation_prompts", nargs="+", default=[])
    add("--output_dir", default="sd-model-finetuned", help="local folder or s3:// prefix")
    add("--cache_dir", help="download cache for hub models and datasets")
    add("--seed", type=_non_negative_int)
    add("--resolution", type=_resolution, default=512)
    add("--center_crop", action="store_true")
    add("--random_flip", action="store_true")
    add("--train_batch_size", type=_positive_int, default=16)
    add("--num_train_epochs", type=_positive_int, default=100)
    add("--max_train_steps", type=_positive_int)
    add("--gradient_accumulation_steps", type=_positive_int, default=1)
    add("--gradient_checkpointing", action="store_true")
    add("--learning_rate", type=_positive_float, default=1e-4)
    add("--scale_lr", action="store_true")
    add("--lr_scheduler", choices=LR_SCHEDULERS, default="constant")
    add("--lr_warmup_steps", type=_non_negative_int, default=500)
    add("--snr_gamma", type=_positive_float)
    add("--dream_training", action="store_true")
    add("--dream_detail_preservation", type=float, default=1.0)
    add("--use_8bit_adam", action="store_true")
    add("--allow_tf32", action="store_true")
    add("--use_ema", action="store_true")
    add("--offload_ema", action="store_true")
    add("--foreach_ema", action="store_true")
    add("--dataloader_num_workers", type=_non_negative_int, default=0)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=_positive_float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0)
    add("--push_to_hub", action="store_true")
    add("--hub_token")
    add("--hub_model_id")
    add("--prediction_type", choices=("epsilon", "v_prediction"))
    add("--logging_dir", default="logs")
    add("--mixed_precision", choices=("no", "fp32", "fp16", "bf16"))
    add("--report_to", choices=("tensorboard", "all", "none"), default="tensorboard")
    add("--local_rank", type=int, default=-1)
    add("--checkpointing_steps", type=_positive_int, default=500)
    add("--checkpoints_total_limit", type=_positive_int)
    add("--max_nonfinite_steps", type=_non_negative_int, default=0, metavar="N",
        help="skip up to N steps whose loss or gradients are NaN/inf, then stop (default 0: stop at the first)")
    add("--resume_from_checkpoint", help="a checkpoint path, or 'latest'")
    add("--enable_xformers_memory_efficient_attention", action="store_true", help="accepted; PyTorch SDPA is used")
    add("--noise_offset", type=float, default=0.0)
    add("--input_perturbation", type=float, default=0.0)
    add("--validation_epochs", type=_positive_int, default=5)
    add("--tracker_project_name", default="text2image-fine-tune")
    add("--image_interpolation_mode", choices=INTERPOLATIONS, default="lanczos")
    return p


def parse_config(argv: Sequence[str], prog: str) -> TrainConfig:
    """Flags (and --spec) to a validated TrainConfig; bad input raises OneLineError."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))
    for name, why in UNSUPPORTED.items():
        if getattr(args, name):
            raise OneLineError(f"--{name}: {why}")
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.spec:
        given = _explicit_flags(parser, argv)
        values.update({k: v for k, v in spec_values(args.spec).items() if k not in given})
    config = TrainConfig(**values)
    if not config.pretrained_model_name_or_path:
        raise OneLineError("--pretrained_model_name_or_path: required (a hub id, a local folder or s3://)")
    if not config.dataset_name and not config.train_data_dir:
        raise OneLineError("--train_data_dir or --dataset_name: one is required")
    if config.resolution % 8:
        raise OneLineError(f"--resolution: must be a multiple of 8 (got {config.resolution})")
    return config


def spec_values(spec_arg: str) -> dict[str, Any]:
    """TrainConfig fields from a FineTuneJob spec (`--spec`)."""
    from kubetune.api.load import SpecError, read_spec_arg

    try:
        spec = read_spec_arg(spec_arg)
    except SpecError as error:
        raise OneLineError(str(error)) from None
    t = spec.training
    storage = spec.storage.uri
    if spec.storage.endpoint and not os.environ.get("AWS_ENDPOINT_URL"):
        os.environ["AWS_ENDPOINT_URL"] = spec.storage.endpoint
    if spec.storage.region and not os.environ.get("AWS_REGION"):
        os.environ["AWS_REGION"] = spec.storage.region
    data = spec.dataset.imagefolder.uri if spec.dataset.imagefolder else join(storage, layout.DATASET_DIR)
    return {
        "pretrained_model_name_or_path": spec.model.base,
        "revision": spec.model.revision,
        "variant": spec.model.variant or None,
        "train_data_dir": data,
        "dataset_name": None,
        "output_dir": storage,
        "latent_cache_dir": join(storage, layout.CACHE_DIR),
        "resume_from_checkpoint": "latest",
        "method": t.method,
        "rank": t.lora_rank,
        "resolution": t.resolution,
        "center_crop": t.center_crop,
        "random_flip": t.random_flip,
        "train_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_checkpointing": t.gradient_checkpointing,
        "mixed_precision": "no" if t.mixed_precision == "fp32" else t.mixed_precision,
        "max_train_steps": t.max_train_steps,
        "learning_rate": t.learning_rate,
        "scale_lr": t.scale_lr,
        "lr_scheduler": t.lr_scheduler,
        "lr_warmup_steps": t.lr_warmup_steps,
        "max_grad_norm": t.max_grad_norm,
        "adam_beta1": t.adam_beta1,
        "adam_beta2": t.adam_beta2,
        "adam_weight_decay": t.adam_weight_decay,
        "adam_epsilon": t.adam_epsilon,
        "use_ema": t.use_ema,
        "allow_tf32": t.allow_tf32,
        "compile": t.compile,
        "seed": t.seed,
        "snr_gamma": t.snr_gamma,
        "noise_offset": t.noise_offset,
        "prediction_type": t.prediction_type or None,
        "max_train_samples": t.max_train_samples,
        "dataloader_num_workers": t.dataloader_num_workers,
        "checkpointing_steps": t.checkpoint_every_steps,
        "checkpoints_total_limit": t.checkpoints_to_keep,
        "validation_prompts": list(t.validation_prompts),
        "validation_steps": t.validation_every_steps,
        "validation_guidance_scale": t.validation_guidance_scale,
        "spec_dataset": spec.dataset.model_dump(by_alias=True, mode="json", exclude_none=True),
    }


def _explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the flags actually present in argv (they win over --spec)."""
    by_option = {option: action.dest for action in parser._actions for option in action.option_strings}
    return {by_option[a.split("=", 1)[0]] for a in argv if a.split("=", 1)[0] in by_option}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value})")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0 (got {text})")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {text})")
    return value


def _resolution(text: str) -> int:
    value = int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (got {value})")
    return value
