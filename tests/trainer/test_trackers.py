"""`--report_to wandb|mlflow`: a tiny run records its settings, loss and a validation image in each
tracker's offline store (wandb offline mode, an mlflow file store)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_testkit import core_flags, env, train, write_imagefolder

pytestmark = pytest.mark.slow


def tracked_run(tiny_model: Path, tmp_path: Path, report_to: str, **env: str) -> None:
    data = write_imagefolder(tmp_path / "dataset", 4)
    flags = core_flags(
        tiny_model,
        data,
        tmp_path / "out",
        max_train_steps=2,
        checkpointing_steps=2,
        use_ema=False,
        validation_prompts="a red circle",
        report_to=report_to,
        tracker_project_name="kubetune-tests",
    )
    result = train(flags, **env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_wandb_offline_records_the_loss_and_validation_images(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    tracked_run(tiny_model, tmp_path, "wandb", WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"))
    (run,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    (log,) = run.glob("*.wandb")  # the offline run's records (wandb has no Python reader for them)
    records = log.read_bytes()
    # each step's values appear twice (the history record and the run's summary update)
    assert len(set(history(records, "train_loss"))) == 2 and set(history(records, "lr")) == {0.001}
    assert history(records, "images_per_second")[-1] > 0
    assert list((run / "files" / "media" / "images").glob("validation_*.png")), "the validation image"
    assert b"learning_rate" in records and b"hub_token" not in records, "the settings, without credentials"


def history(records: bytes, key: str) -> list[float]:
    """The values of a history key in a .wandb file: protobuf HistoryItem {key: field 2, value_json:
    field 16}, found by their tags (the records are stored uncompressed)."""
    name = key.encode()
    values = []
    for match in re.finditer(re.escape(b"\x12" + bytes([len(name)]) + name + b"\x82\x01"), records):
        size = records[match.end()]
        values.append(float(records[match.end() + 1 : match.end() + 1 + size]))
    return values


def test_mlflow_file_store_records_the_loss_and_validation_images(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "mlruns"
    # the file store (mlflow-skinny has no database backend; mlflow 3 asks to opt in to it)
    tracked_run(tiny_model, tmp_path, "mlflow", MLFLOW_TRACKING_URI=f"file:{store}", MLFLOW_ALLOW_FILE_STORE="true")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"file:{store}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "kubetune-tests"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["train_loss"] > 0 and run.data.params["learning_rate"] == "0.001"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert "hub_token" not in run.data.params
    images = [p for p in (store / experiment.experiment_id / run.info.run_id).rglob("*.png")]
    assert images, "the validation image"


def test_a_tracker_that_is_not_installed_fails_fast(tmp_path: Path) -> None:
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", str(tmp_path)]
    # sys.modules[name] = None: the module cannot be imported (nor found), as when not installed
    hidden = (
        "import sys; sys.modules['wandb'] = None; from kubetune.trainer.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", hidden, *base, "--report_to", "wandb"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "kubetune train: error: --report_to wandb: the wandb package is not installed "
        "(pip install 'kubetune[trackers]' or pip install wandb)"
    )


def test_the_hub_token_flag_is_refused_with_wandb(tmp_path: Path) -> None:
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", str(tmp_path)]
    result = train([*base, "--report_to", "wandb", "--hub_token", "hf_secretvalue"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "kubetune train: error: --hub_token: not with --report_to wandb (it would record the token); set $HF_TOKEN "
        "instead"
    )
    assert "hf_secretvalue" not in result.stdout + result.stderr


def test_all_takes_the_trackers_that_are_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.trainer import trackers

    for variable in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(variable, raising=False)
    assert trackers.selected("all") == [] and trackers.selected("tensorboard") == []
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:/tmp/x")
    expected = [name for name in ("wandb", "mlflow") if trackers.installed(name)]
    assert trackers.selected("all") == expected and trackers.selected("mlflow") == ["mlflow"]
