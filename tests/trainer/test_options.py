"""The trainer's options are declared once (kubetune.trainer.options): the parser, the spec
mapping and docs/trainer.md come from the declaration, and the declaration covers the API."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from kubetune.api import defaults
from kubetune.api.models import BaseModelSpec, Training
from kubetune.trainer import options
from kubetune.trainer.cli import apply_storage_env
from kubetune.trainer.config import parse_config

SPECS = {o.spec: o for o in options.CONFIG_OPTIONS if o.spec}
# spec fields that the trainer does not take as an option, and why
NOT_OPTIONS = {
    "model.tokenSecretRef": "the operator passes the token as HF_TOKEN",
}
# spec.training defaults that differ from the flag's (the stock script's) on purpose: a FineTuneJob
# gets settings that fit one GPU and checkpoint often; `kubetune train` alone behaves as the script
INTENTIONALLY_DIFFERENT = {
    "center_crop",
    "random_flip",
    "dataloader_num_workers",
    "train_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "learning_rate",
    "lr_warmup_steps",
    "allow_tf32",
    "mixed_precision",
    "use_ema",
    "checkpoints_total_limit",
    "max_train_steps",
    "revision",
}


def test_docs_flag_table_is_generated_from_the_declaration() -> None:
    text = options.DOCS.read_text()
    assert options.docs_section(text) == options.markdown(), (
        "docs/trainer.md is stale: run `python -m kubetune.trainer.options --write`"
    )


def test_write_docs_rewrites_only_between_the_markers(tmp_path: Path) -> None:
    path = tmp_path / "trainer.md"
    path.write_text(f"intro\n{options.BEGIN}\nold table\n{options.END}\nrest\n")
    assert options.write_docs(path)
    text = path.read_text()
    assert text.startswith(f"intro\n{options.BEGIN}\n**")
    assert text.endswith(f"{options.END}\nrest\n")
    assert "| `--validation_guidance_scale` | `7.5` |" in text
    assert not options.write_docs(path)


def test_every_training_field_has_an_option() -> None:
    def paths(prefix: str, model: type[BaseModel]) -> set[str]:
        """Leaf field paths: a nested model's fields are options each (training.buckets.step)."""
        found = set()
        for info in model.model_fields.values():
            nested = options._model_of(info.annotation)  # a nested model, optional or not
            if nested is not None and f"{prefix}.{info.alias}" not in NOT_OPTIONS:
                found |= paths(f"{prefix}.{info.alias}", nested)
            else:
                found.add(f"{prefix}.{info.alias}")
        return found

    training, model = paths("training", Training), paths("model", BaseModelSpec)
    missing = (training | model) - set(SPECS) - set(NOT_OPTIONS)
    assert not missing, f"spec fields with no trainer option (declare them): {missing}"
    assert "storage.uri" in SPECS


def test_every_declared_spec_field_exists() -> None:
    for path in SPECS:
        options.spec_field(path)  # raises KeyError when the API has no such field
    with pytest.raises(KeyError):
        options.spec_field("training.noSuchField")


def test_spec_choices_are_flag_choices() -> None:
    for path, option in SPECS.items():
        values = get_args(options.spec_field(path).annotation)
        if option.choices and values:
            converted = {option.convert(v) if option.convert else v for v in values} - {None}
            assert converted <= set(option.choices), (path, converted)


def _spec_default(option: options.Option) -> Any:
    value = options.spec_field(option.spec).get_default(call_default_factory=True)
    return option.convert(value) if option.convert else value


def test_spec_and_flag_defaults_agree_unless_listed() -> None:
    shared = [
        o
        for o in SPECS.values()
        if o.spec.startswith(("training.", "model.")) and not options.spec_field(o.spec).is_required()
    ]
    differ = {o.name for o in shared if _spec_default(o) != o.default}
    assert differ == INTENTIONALLY_DIFFERENT
    assert options.TrainConfig().validation_guidance_scale == defaults.VALIDATION_GUIDANCE_SCALE
    assert Training().validation_guidance_scale == defaults.VALIDATION_GUIDANCE_SCALE


def test_parser_is_generated_from_the_declaration() -> None:
    parser = options.build_parser("kubetune train")
    actions = {a.dest: a for a in parser._actions}
    for option in options.OPTIONS:
        if option.flag:
            action = actions[option.name]
            assert tuple(action.option_strings) == option.flags
            assert action.default == option.default
        else:
            assert option.name not in actions
    defaults_only = parse_config(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"], "kubetune train")
    assert defaults_only == options.TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d")
    assert set(options.UNSUPPORTED) == {
        "dream_training",
        "tokenizer_name",
        "tokenizer_max_length",
        "text_encoder_use_attention_mask",
        "validation_images",
        "class_labels_conditioning",
        "validation_scheduler",
    }


def test_stock_spellings_parse_as_before() -> None:
    cfg = parse_config(
        [
            "--pretrained_model_name_or_path=m",
            "--dataset_name=./images",
            "--mixed_precision=no",
            "--lora_rank",
            "16",
            "--validation_prompts",
            "a",
            "b",
            "--report_to",
            "none",
            "--use_ema",
            "--local_rank",
            "0",
        ],
        "x",
    )
    assert (cfg.mixed_precision, cfg.precision, cfg.rank) == ("no", "no", 16)
    assert cfg.validation_prompts == ["a", "b"] and cfg.report_to == "none" and cfg.use_ema


def _spec(tmp_path: Path, storage: dict[str, str]) -> str:
    job = {
        "dataset": {"imagefolder": {"uri": "s3://data/mine/"}},
        "model": {"base": "org/m"},
        "training": {"mixedPrecision": "fp32", "predictionType": ""},
        "storage": storage,
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return str(path)


def test_spec_parsing_leaves_the_environment_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)  # restored after: apply_storage_env sets it
    before = dict(os.environ)
    storage = {"uri": "s3://bucket/job/", "endpoint": "http://minio:9000", "region": "eu-west-1"}
    cfg = parse_config(["--spec", _spec(tmp_path, storage)], "kubetune train")
    assert dict(os.environ) == before
    assert cfg.spec_storage is not None and cfg.spec_storage.endpoint == "http://minio:9000"
    assert (cfg.mixed_precision, cfg.prediction_type, cfg.variant) == ("no", None, None)
    assert cfg.spec_dataset == {
        "imagefolder": {"uri": "s3://data/mine/"},
        "resolution": 512,
        "minSize": 256,
        "dedupe": True,
        "nearDedupe": False,
        "allowPrivateNetwork": False,
    }

    monkeypatch.setenv("AWS_REGION", "us-east-2")  # set already: the environment wins
    apply_storage_env(cfg)
    assert os.environ["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert os.environ["AWS_REGION"] == "us-east-2"
    assert os.environ["AWS_DEFAULT_REGION"] == "eu-west-1"


def test_no_spec_no_storage_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    cfg = parse_config(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"], "x")
    assert cfg.spec_storage is None
    apply_storage_env(cfg)
    assert "AWS_ENDPOINT_URL" not in os.environ
