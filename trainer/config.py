"""The trainer's settings from its command line: flags, `--spec` (a FineTuneJob) and the checks
across flags. The settings themselves are declared once, in kubetune.trainer.options. No torch
here: `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from typing import Any

from kubetune.cli_util import OneLineError
from kubetune.trainer.options import (
    CONFIG_OPTIONS,
    INTERPOLATIONS,
    LR_SCHEDULERS,
    UNSUPPORTED,
    TrainConfig,
    build_parser,
    spec_config_values,
)

__all__ = [
    "INTERPOLATIONS",
    "LR_SCHEDULERS",
    "UNSUPPORTED",
    "TrainConfig",
    "build_parser",
    "fsdp_conflict",
    "parse_config",
    "spec_values",
]


def parse_config(argv: Sequence[str], prog: str) -> TrainConfig:
    """Flags (and --spec) to a validated TrainConfig; bad input raises OneLineError.

    Nothing outside is changed: the spec's storage settings come back as `spec_storage`, for the
    caller to apply to the environment (kubetune.trainer.cli)."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))
    for name, why in UNSUPPORTED.items():
        if getattr(args, name):
            raise OneLineError(f"--{name}: {why}")
    values = {o.name: getattr(args, o.name) for o in CONFIG_OPTIONS if o.flag}
    if args.spec:
        given = _explicit_flags(parser, argv)
        values.update({k: v for k, v in spec_values(args.spec).items() if k not in given})
    config = TrainConfig(**values)
    if not config.pretrained_model_name_or_path:
        raise OneLineError("--pretrained_model_name_or_path: required (a hub id, a local folder or s3://)")
    if not config.dataset_name and not config.train_data_dir and not config.instance_data_dir:
        raise OneLineError("--train_data_dir or --dataset_name: one is required")
    _check_dreambooth(config)
    if config.resolution % 8:
        raise OneLineError(f"--resolution: must be a multiple of 8 (got {config.resolution})")
    if config.enable_bucket:
        low, high = config.min_bucket_reso, config.max_bucket_reso
        if low is not None and high is not None and low > high:
            raise OneLineError(f"--min_bucket_reso {low}: must not be above --max_bucket_reso ({high})")
        if low is not None and low > config.resolution or high is not None and high < config.resolution:
            raise OneLineError(
                f"--min_bucket_reso/--max_bucket_reso: the range {low or '-'}..{high or '-'} must include "
                f"--resolution ({config.resolution})"
            )
    if config.use_8bit_adam:
        if config.optimizer not in ("adamw", "adamw_8bit"):
            raise OneLineError(f"--use_8bit_adam: means --optimizer adamw_8bit, not {config.optimizer}")
        config.optimizer = "adamw_8bit"
    if config.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        flag = "--use_8bit_adam" if config.use_8bit_adam else "--optimizer adamw_8bit"
        raise OneLineError(f"{flag}: needs the bitsandbytes package, which is not installed (pip install bitsandbytes)")
    if config.strategy == "fsdp":
        conflict = fsdp_conflict(config)
        if conflict:
            raise OneLineError(conflict)
    elif config.fsdp_cpu_offload:
        raise OneLineError(f"--fsdp_cpu_offload: needs --strategy fsdp (got {config.strategy})")
    _check_hub(config)
    from kubetune.trainer.trackers import missing

    if message := missing(config.report_to):
        raise OneLineError(message)
    return config


def _check_dreambooth(config: TrainConfig) -> None:
    """train_dreambooth.py's checks, and what kubetune cannot combine with DreamBooth."""
    if config.offset_noise and not config.noise_offset:
        config.noise_offset = 0.1  # train_dreambooth.py's --offset_noise
    if config.instance_data_dir and not config.instance_prompt:
        raise OneLineError("--instance_data_dir: needs --instance_prompt (the prompt of every instance image)")
    if not config.instance_prompt:
        if config.with_prior_preservation:
            raise OneLineError("--with_prior_preservation: needs --instance_prompt (DreamBooth training)")
        return
    if config.caption_model:
        raise OneLineError("--caption_model: not with --instance_prompt (every instance image has that prompt)")
    if not config.with_prior_preservation:
        return
    if not config.class_prompt:
        raise OneLineError("--with_prior_preservation: needs --class_prompt (spec.training.dreambooth.classPrompt)")
    if config.enable_bucket:
        raise OneLineError("--enable_bucket: not with --with_prior_preservation (a batch pairs square images)")


def fsdp_conflict(config: TrainConfig) -> str | None:
    """Why these settings cannot run sharded (FSDP), as a one-line message; None when they can."""
    if config.optimizer != "adamw":
        return f"--optimizer {config.optimizer}: not with --strategy fsdp (which shards AdamW's state; use adamw)"
    if config.method != "full":
        return "--strategy fsdp: full fine-tunes only (LoRA fits one GPU: use --strategy ddp or auto)"
    if config.precision == "fp16":
        return "--mixed_precision fp16: not with --strategy fsdp (use bf16; sharded steps have no gradient scaler)"
    if config.compile:
        return "--compile: not with --strategy fsdp (untested with sharded blocks)"
    if config.offload_ema:
        return "--offload_ema: not with --strategy fsdp (the EMA is sharded with the weights)"
    if config.train_text_encoder:
        return "--train_text_encoder: not with --strategy fsdp (only the denoiser is sharded; use --strategy ddp)"
    return None


def _check_hub(config: TrainConfig) -> None:
    import re

    from kubetune.api.models import HUB_REPO

    if config.push_to_hub and not config.hub_model_id:
        raise OneLineError("--push_to_hub: needs --hub_model_id ORG/NAME (spec.output.hub.repo)")
    if config.hub_push_checkpoints and not config.push_to_hub:
        raise OneLineError("--hub_push_checkpoints: needs --push_to_hub")
    repo = config.hub_model_id
    if repo is not None and (len(repo) > 193 or not re.fullmatch(HUB_REPO, repo) or "--" in repo or ".." in repo):
        raise OneLineError(
            f"--hub_model_id: a Hub repository id namespace/name is required: letters, digits, '-', '_' and '.', "
            f"at most 96 each, no '--' or '..' (got {repo[:100]!r})"
        )
    from kubetune.trainer.trackers import selected

    if config.hub_token is not None and "wandb" in selected(config.report_to):
        # as diffusers' scripts: wandb records the command line, token included
        raise OneLineError("--hub_token: not with --report_to wandb (it would record the token); set $HF_TOKEN instead")


def spec_values(spec_arg: str) -> dict[str, Any]:
    """TrainConfig fields from a FineTuneJob spec (`--spec`); changes nothing (no environment)."""
    from kubetune.api.load import SpecError, read_spec_arg

    try:
        spec = read_spec_arg(spec_arg)
    except SpecError as error:
        raise OneLineError(str(error)) from None
    return spec_config_values(spec)


def _explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the flags actually present in argv (they win over --spec)."""
    by_option = {option: a.dest for a in parser._actions for option in a.option_strings}
    return {by_option[a.split("=", 1)[0]] for a in argv if a.split("=", 1)[0] in by_option}
