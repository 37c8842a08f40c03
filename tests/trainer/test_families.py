"""Model families: which family trains a pipeline, from its model_index.json, and the refusal of
pipelines no family trains, before any weights are read or downloaded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from trainer_testkit import core_flags, train

from kubetune.api import defaults
from kubetune.api.contracts import ExitCode
from kubetune.trainer.families import FAMILIES, FamilyError, family_for


def test_the_family_comes_from_the_pipeline_class_or_the_flag() -> None:
    assert family_for({"_class_name": "StableDiffusionPipeline"}).name == "sd"
    assert family_for({"_class_name": "MyCustomPipeline"}, "sd").name == "sd"
    with pytest.raises(FamilyError, match="KandinskyPipeline is not supported; supported families: sd"):
        family_for({"_class_name": "KandinskyPipeline"})
    assert tuple(FAMILIES) == defaults.MODEL_FAMILIES, "--model_family's choices and spec.model.family's enum"


def test_an_unsupported_pipeline_is_refused_at_once(shapes_dataset: Path, tmp_path: Path) -> None:
    model = tmp_path / "kandinsky"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline", "unet": ["x", "y"]}))
    started = time.monotonic()
    result = train(core_flags(model, shapes_dataset, tmp_path / "out", max_train_steps=1))
    assert result.returncode == ExitCode.INVALID == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "KandinskyPipeline" in line]
    assert len(lines) == 1 and "supported families: sd (StableDiffusionPipeline)" in lines[0], result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("source", ["hub", "s3"])
def test_a_remote_model_is_refused_from_its_model_index_alone(
    source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Only model_index.json is fetched (from the Hub: hf_hub_download; from S3: that one object);
    the weights never are."""
    import contextlib
    from types import SimpleNamespace

    import huggingface_hub

    from kubetune.storage import Store
    from kubetune.trainer.config import TrainConfig
    from kubetune.trainer.train import TrainError, resolve_model

    index = {"_class_name": "KandinskyPipeline"}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(index))
    fetched: list[str] = []

    def hf_hub_download(repo_id: str, filename: str, **_: object) -> str:
        fetched.append(filename)
        return str(tmp_path / "model" / filename)

    def never(*_: object, **__: object) -> None:
        raise AssertionError("the weights must not be downloaded")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    monkeypatch.setattr(Store, "download_tree", never)
    name = "org/kandinsky"
    if source == "s3":
        name = f"s3://{request.getfixturevalue('s3_bucket')}/models/kandinsky"
        (tmp_path / "model" / "unet").mkdir()
        (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 1024)
        Store(name).upload_tree(tmp_path / "model")
    session = SimpleNamespace(accelerator=SimpleNamespace(local_main_process_first=contextlib.nullcontext))
    cfg = TrainConfig(pretrained_model_name_or_path=name, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(TrainError, match=f"{name}: pipeline class KandinskyPipeline is not supported") as caught:
        resolve_model(cfg, session)  # type: ignore[arg-type]
    assert caught.value.code == ExitCode.INVALID
    assert fetched == (["model_index.json"] if source == "hub" else [])
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
