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


def test_a_hub_model_is_refused_from_its_model_index_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only model_index.json is fetched (hf_hub_download); the snapshot never starts."""
    import contextlib
    from types import SimpleNamespace

    import huggingface_hub

    from kubetune.trainer.config import TrainConfig
    from kubetune.trainer.train import TrainError, resolve_model

    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    fetched: list[str] = []

    def hf_hub_download(repo_id: str, filename: str, **_: object) -> str:
        fetched.append(filename)
        return str(index)

    def snapshot_download(*_: object, **__: object) -> str:
        raise AssertionError("the weights must not be downloaded")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    session = SimpleNamespace(accelerator=SimpleNamespace(local_main_process_first=contextlib.nullcontext))
    cfg = TrainConfig(pretrained_model_name_or_path="org/kandinsky", cache_dir=str(tmp_path / "hub"))
    with pytest.raises(TrainError, match="org/kandinsky: pipeline class KandinskyPipeline is not supported") as caught:
        resolve_model(cfg, session)  # type: ignore[arg-type]
    assert caught.value.code == ExitCode.INVALID and fetched == ["model_index.json"]
