"""The model card's front matter, as the Hub reads it (huggingface_hub's ModelCard), and the
FineTuneJob's spec.output.hub as trainer flags."""

from __future__ import annotations

from pathlib import Path

from kubetune.api.load import parse_spec
from kubetune.trainer.config import TrainConfig
from kubetune.trainer.data import TrainingData
from kubetune.trainer.families import family_for
from kubetune.trainer.options import spec_config_values
from kubetune.trainer.publish import Sample, base_model_license, hub_dataset_id, model_card


def card_meta(cfg: TrainConfig, **extra: object) -> dict[str, object]:
    from huggingface_hub import ModelCard

    family = family_for({"_class_name": "StableDiffusionXLPipeline"})
    data = TrainingData("org/pokemon", ["a"], "f", records=[{"license": "cc-by-4.0", "source": "hub"}])
    text = model_card(cfg, family, data, 1, 0, 10, 3, **extra)  # type: ignore[arg-type]
    return ModelCard(text).data.to_dict()


def test_a_hub_dataset_and_a_lora_are_named_in_the_front_matter() -> None:
    cfg = TrainConfig(pretrained_model_name_or_path="org/sdxl", dataset_name="org/pokemon", method="lora")
    samples = [Sample("a: [tricky] prompt", "samples/step-00000010/00.png", b"")]
    meta = card_meta(cfg, license="openrail++", samples=samples)
    assert meta["license"] == "openrail++" and meta["base_model"] == "org/sdxl"
    assert meta["datasets"] == ["org/pokemon"] and meta["pipeline_tag"] == "text-to-image"
    assert {"stable-diffusion-xl", "lora", "kubetune"} <= set(meta["tags"])  # type: ignore[arg-type]
    assert meta["widget"] == [{"text": "a: [tricky] prompt", "output": {"url": "samples/step-00000010/00.png"}}]


def test_without_a_license_or_samples_those_keys_are_left_out(tmp_path: Path) -> None:
    cfg = TrainConfig(pretrained_model_name_or_path="org/sdxl", train_data_dir=str(tmp_path))
    meta = card_meta(cfg)
    assert "license" not in meta and "widget" not in meta and "datasets" not in meta
    local = TrainConfig(pretrained_model_name_or_path=str(tmp_path), train_data_dir=str(tmp_path))
    assert "base_model" not in card_meta(local), "the Hub refuses a base_model that is no model id"
    assert base_model_license(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    assert base_model_license(tmp_path) == "mit"
    (tmp_path / "README.md").write_text("no front matter\n")
    assert base_model_license(tmp_path) is None
    assert hub_dataset_id(TrainConfig(dataset_name=str(tmp_path))) is None
    assert hub_dataset_id(TrainConfig(dataset_name="s3://bucket/data")) is None


def test_spec_output_hub_sets_the_push_flags() -> None:
    spec = {
        "dataset": {"wikimedia": {"prompts": ["x"]}},
        "model": {"base": "org/base"},
        "storage": {"uri": "s3://bucket/job/"},
    }
    assert spec_config_values(parse_spec(spec))["push_to_hub"] is False
    hub = {"repo": "org/tuned", "tokenSecretRef": {"name": "hf", "key": "token"}, "private": True, "revision": "v1"}
    values = spec_config_values(parse_spec({**spec, "output": {"hub": hub}}))
    assert values["push_to_hub"] is True and values["hub_model_id"] == "org/tuned"
    assert values["hub_private_repo"] is True and values["hub_revision"] == "v1"
    assert "hub_token" not in values, "the token comes from the environment, never from the spec"
