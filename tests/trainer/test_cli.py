"""`kubetune train`'s command line without training: instant help, one-line errors, --spec
mapping, and the `accelerate launch` command kubetune.launch renders."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.launch import accelerate_launch_command
from kubetune.trainer.config import parse_config


def test_help_and_dispatch_do_not_import_torch() -> None:
    code = (
        "import sys; from kubetune.cli import main; import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: main(['train', '--help'])\n"
        "    except SystemExit: pass\n"
        "assert '--pretrained_model_name_or_path' in out.getvalue()\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resolution", "30"], "--resolution: must be a positive multiple of 8 (got 30)"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--mixed_precision", "fp64"], "--mixed_precision: invalid choice"),
        (["--validation_guidance_scale", "-1"], "--validation_guidance_scale: must be 0 or more (got -1)"),
        (["--train_data_dir", "d"], "--pretrained_model_name_or_path: required"),
        (["--pretrained_model_name_or_path", "m"], "--train_data_dir or --dataset_name: one is required"),
        pytest.param(
            ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--use_8bit_adam"],
            "--use_8bit_adam: needs the bitsandbytes package, which is not installed (pip install bitsandbytes)",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here"
            ),
        ),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "kubetune.trainer", *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_spec_maps_training_model_and_storage(tmp_path: Path) -> None:
    spec = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "shapes"},
        "spec": {
            "dataset": {"unsplash": {"prompts": ["a lighthouse"], "accessKeySecretRef": {"name": "u", "key": "k"}}},
            "model": {"base": "org/model", "revision": "v2"},
            "training": {
                "method": "lora",
                "loraRank": 8,
                "resolution": 256,
                "mixedPrecision": "fp32",
                "checkpointEverySteps": 10,
                "checkpointsToKeep": 3,
                "validationEverySteps": 5,
                "validationPrompts": ["a red circle"],
                "validationGuidanceScale": 1.0,
                "batchSize": 2,
                "maxTrainSteps": 30,
            },
            "storage": {"uri": "s3://bucket/jobs/shapes/"},
        },
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    cfg = parse_config(["--spec", str(path), "--max_train_steps", "12"], "kubetune train")
    assert cfg.pretrained_model_name_or_path == "org/model" and cfg.revision == "v2"
    assert cfg.output_dir == "s3://bucket/jobs/shapes/"
    assert cfg.train_data_dir == "s3://bucket/jobs/shapes/dataset"
    assert cfg.latent_cache_dir == "s3://bucket/jobs/shapes/cache"
    assert cfg.resume_from_checkpoint == "latest"
    assert (cfg.method, cfg.rank, cfg.resolution, cfg.precision) == ("lora", 8, 256, "no")
    assert (cfg.checkpointing_steps, cfg.checkpoints_total_limit, cfg.validation_steps) == (10, 3, 5)
    assert cfg.validation_guidance_scale == 1.0
    assert cfg.train_batch_size == 2 and cfg.gradient_accumulation_steps == 4 and cfg.use_ema
    assert cfg.max_train_steps == 12  # a flag given on the command line wins over the spec
    assert (cfg.report_to, cfg.tracker_project_name, cfg.push_to_hub) == ("tensorboard", "text2image-fine-tune", False)

    spec["spec"]["output"] = {
        "reportTo": "mlflow",
        "trackerProjectName": "lighthouses",
        "hub": {"repo": "org/shapes", "tokenSecretRef": {"name": "hf", "key": "token"}, "pushCheckpoints": True},
    }
    path.write_text(json.dumps(spec))
    cfg = parse_config(["--spec", str(path)], "kubetune train")
    assert (cfg.report_to, cfg.tracker_project_name) == ("mlflow", "lighthouses")
    assert (cfg.push_to_hub, cfg.hub_model_id, cfg.hub_push_checkpoints) == (True, "org/shapes", True)


def test_spec_from_environment_with_imagefolder_source(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {
        "dataset": {"imagefolder": {"uri": "s3://data/mine/"}},
        "model": {"base": "s3://models/base/"},
        "storage": {"uri": "s3://bucket/job/"},
    }
    monkeypatch.setenv("KUBETUNE_SPEC", json.dumps(spec))
    cfg = parse_config(["--spec", "env:KUBETUNE_SPEC"], "kubetune train")
    assert cfg.train_data_dir == "s3://data/mine/" and cfg.pretrained_model_name_or_path == "s3://models/base/"


def test_bad_spec_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--spec", "env:KUBETUNE_SPEC"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin", "KUBETUNE_SPEC": '{"model": {}}'},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "spec." in result.stderr


def test_launch_command_for_pods() -> None:
    command = accelerate_launch_command(
        2, 4, "$(JOB_COMPLETION_INDEX)", "job-0.job", 29500, ["--spec", "env:KUBETUNE_SPEC"], mixed_precision="bf16"
    )
    assert command[:2] == ["accelerate", "launch"]
    text = " ".join(command)
    assert "--multi_gpu" in command
    assert (
        "--num_processes 8 --num_machines 2 --machine_rank $(JOB_COMPLETION_INDEX) --main_process_ip job-0.job"
    ) in text
    assert "--main_process_port 29500" in text and "--mixed_precision bf16" in text
    assert command[-4:] == ["-m", "kubetune.trainer", "--spec", "env:KUBETUNE_SPEC"]


def test_launch_command_single_process_and_cpu_nodes() -> None:
    one_gpu = accelerate_launch_command(1, 1, 0, "127.0.0.1", 29500, ["--mixed_precision", "fp32"])
    assert "--multi_gpu" not in one_gpu and "--machine_rank" not in one_gpu
    assert one_gpu[one_gpu.index("--num_processes") + 1] == "1"
    assert one_gpu[one_gpu.index("--mixed_precision") + 1] == "no"
    cpu_nodes = accelerate_launch_command(3, 0, 2, "10.0.0.1", 29501, [])
    assert "--multi_gpu" in cpu_nodes and "--cpu" not in cpu_nodes  # --cpu would run one process
    assert cpu_nodes[cpu_nodes.index("--num_processes") + 1] == "3"
    with pytest.raises(ValueError, match="nodes"):
        accelerate_launch_command(0, 1, 0, "x", 1, [])
