"""--train_text_encoder (spec.training.trainTextEncoder): the text encoders the stock DreamBooth
and LoRA scripts train (SD's CLIP, both of SDXL's, FLUX's CLIP, SD3's two CLIPs; T5 stays frozen)
are trained, checkpointed, resumed and published, full or LoRA, on every family; two processes
train them as one does."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.version import Version
from trainer_testkit import core_flags, resume_in_a_new_output, train, train_on_two_processes

from kubetune.cli_util import OneLineError
from kubetune.trainer.config import parse_config

FIXTURES = {"sd": "tiny_model", "sdxl": "tiny_sdxl", "flux": "tiny_flux", "sd3": "tiny_sd3"}
PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
}
TRAINED = {
    "sd": ["text_encoder"],
    "sdxl": ["text_encoder", "text_encoder_2"],
    "flux": ["text_encoder"],
    "sd3": ["text_encoder", "text_encoder_2"],
}
FROZEN = {"sd": [], "sdxl": [], "flux": ["text_encoder_2"], "sd3": ["text_encoder_3"]}
DENOISER = {"sd": "unet", "sdxl": "unet", "flux": "transformer", "sd3": "transformer"}
PROMPT = "a red circle"


def flags(model: Path, data: Path, output: Path, method: str, **overrides: Any) -> list[str]:
    settings: dict[str, Any] = {
        "train_text_encoder": True,
        "use_ema": False,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        **({"method": "lora", "rank": 4} if method == "lora" else {}),
        **overrides,
    }
    return core_flags(model, data, output, **settings)


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(family, method) -> the output of a 4-step run training the text encoders (run once)."""
    done: dict[tuple[str, str], Path] = {}

    def run(family: str, method: str) -> Path:
        if (family, method) not in done:
            model = request.getfixturevalue(FIXTURES[family])
            output = tmp_path_factory.mktemp(f"{family}-{method}") / "out"
            extra = {"validation_prompt": PROMPT} if (family, method) == ("flux", "full") else {}
            result = train(flags(model, shapes_dataset, output, method, **extra))
            assert result.returncode == 0, result.stderr[-4000:]
            done[family, method] = output
        return done[family, method]

    return run


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (file,) = sorted(folder.glob("*.safetensors"))
    return load_file(file)


def largest_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def text_states(pipeline: Any, folder: str) -> torch.Tensor:
    """What the pipeline's text encoder `folder` makes of PROMPT."""
    tokenizer = getattr(pipeline, folder.replace("text_encoder", "tokenizer"))
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return getattr(pipeline, folder)(ids.input_ids, output_hidden_states=True).hidden_states[-2]


@pytest.fixture
def peft_adapters_for_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a text encoder's LoRA goes through transformers' load_adapter, which transformers 5
    refuses with peft before 0.22 by version number alone (the trainer injects its adapters with
    peft itself). Lifted here, so that diffusers' own loader reads the file as it does for a user
    with a newer peft."""
    from transformers.integrations import peft as transformers_peft

    if Version(importlib.metadata.version("peft")) < Version(transformers_peft.MIN_PEFT_VERSION):
        monkeypatch.setattr(transformers_peft, "check_peft_version", lambda min_version: None)


@pytest.mark.parametrize("family", list(FIXTURES))
def test_a_full_fine_tune_trains_and_publishes_the_text_encoders(
    family: str, runs: Any, request: pytest.FixtureRequest
) -> None:
    import diffusers

    model, output = request.getfixturevalue(FIXTURES[family]), runs(family, "full")
    for folder in TRAINED[family]:
        assert largest_change(weights(output / folder), weights(model / folder)) > 1e-4, f"{folder} is trained"
        assert largest_change(weights(output / "checkpoint-4" / folder), weights(output / folder)) == 0
    for folder in FROZEN[family]:
        assert largest_change(weights(output / folder), weights(model / folder)) == 0, f"{folder} stays frozen"
    assert largest_change(weights(output / DENOISER[family]), weights(model / DENOISER[family])) > 1e-4
    pipeline = getattr(diffusers, PIPELINES[family]).from_pretrained(output)
    base = getattr(diffusers, PIPELINES[family]).from_pretrained(model)
    for folder in TRAINED[family]:
        assert float((text_states(pipeline, folder) - text_states(base, folder)).abs().max()) > 1e-4
    pipeline.set_progress_bar_config(disable=True)
    pipeline(PROMPT, num_inference_steps=2, height=32, width=32)
    card = (output / "README.md").read_text()
    assert f"full fine-tune of the {DENOISER[family]}, with the {' and '.join(TRAINED[family])}" in card
    if family == "flux":  # sampled while training: the trained CLIP on the device, T5 parked on the CPU
        assert sorted(p.parent.name for p in (output / "samples").rglob("00.png")) == ["step-00000002", "step-00000004"]


@pytest.mark.parametrize("family", list(FIXTURES))
def test_a_lora_trains_text_encoder_adapters_that_load_with_load_lora_weights(
    family: str, runs: Any, request: pytest.FixtureRequest, peft_adapters_for_transformers: None
) -> None:
    import diffusers
    from safetensors.torch import load_file

    model, output = request.getfixturevalue(FIXTURES[family]), runs(family, "lora")
    saved = load_file(output / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in saved} == {DENOISER[family], *TRAINED[family]}
    pipeline = getattr(diffusers, PIPELINES[family]).from_pretrained(model)
    before = {folder: text_states(pipeline, folder) for folder in TRAINED[family]}
    pipeline.load_lora_weights(output)
    for folder in TRAINED[family]:
        encoder = getattr(pipeline, folder)
        loaded = sum(float(p.abs().sum()) for name, p in encoder.named_parameters() if "lora_" in name)
        in_file = sum(float(v.abs().sum()) for k, v in saved.items() if k.startswith(f"{folder}."))
        assert loaded == pytest.approx(in_file, rel=1e-5), f"{folder}: the file's adapters are what loads"
        assert float((text_states(pipeline, folder) - before[folder]).abs().max()) > 1e-5, f"{folder} changes"
    card = (output / "README.md").read_text()
    assert f"LoRA rank 4, also on the {' and '.join(TRAINED[family])}" in card


@pytest.mark.parametrize("method", ["full", "lora"])
def test_an_interrupted_run_resumes_the_text_encoder_where_it_was(
    method: str, runs: Any, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    reference = runs("sd", method)
    output, result = resume_in_a_new_output(
        reference,
        "checkpoint-2",
        tmp_path,
        lambda out: flags(tiny_model, shapes_dataset, out, method, resume_from_checkpoint="latest"),
    )
    assert "resuming from" in result.stderr
    if method == "full":
        assert largest_change(weights(output / "text_encoder"), weights(reference / "text_encoder")) < 1e-6
    else:
        got, want = (weights(run / "checkpoint-4") for run in (output, reference))
        assert largest_change(got, want) < 1e-6  # the text encoder's adapters among them
        assert any(key.startswith("text_encoder.") for key in got)


def test_the_text_encoders_train_at_their_own_learning_rate(
    runs: Any, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    result = train(flags(tiny_model, shapes_dataset, output, "full", text_encoder_lr=1e-9))
    assert result.returncode == 0, result.stderr[-3000:]
    moved = largest_change(weights(output / "text_encoder"), weights(tiny_model / "text_encoder"))
    assert (
        moved
        < 1e-4
        < largest_change(weights(runs("sd", "full") / "text_encoder"), weights(tiny_model / "text_encoder"))
    )
    assert largest_change(weights(output / "unet"), weights(tiny_model / "unet")) > 1e-4, "the UNet trains at its own"
    assert "| text encoders | trained, learning rate 1e-09 |" in (output / "README.md").read_text()


def test_a_checkpoint_of_frozen_text_encoders_is_not_resumed_with_trained_ones(
    tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    first = train(flags(tiny_model, shapes_dataset, output, "full", train_text_encoder=False, max_train_steps=2))
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(flags(tiny_model, shapes_dataset, output, "full", resume_from_checkpoint="latest"))
    assert second.returncode == 2
    assert "text encoders frozen -> trained" in second.stderr.strip().splitlines()[-1]


def test_two_processes_train_the_text_encoders_as_one_does(
    runs: Any, tiny_sdxl: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    """SDXL: its first encoder's last layer gets no gradient (the penultimate states condition)."""
    reference = runs("sdxl", "full")
    output = tmp_path / "out"
    manifest = train_on_two_processes(
        flags(tiny_sdxl, shapes_dataset, output, "full", train_batch_size=1), output / "checkpoint-4"
    )
    assert manifest["worldSize"] == 2 and manifest["textEncoders"] == "trained"
    for folder in TRAINED["sdxl"]:
        got, want = weights(output / "checkpoint-4" / folder), weights(reference / "checkpoint-4" / folder)
        initial = weights(tiny_sdxl / folder)
        update = sum(float((want[k].float() - initial[k].float()).norm() ** 2) for k in want) ** 0.5
        disagreement = sum(float((got[k].float() - want[k].float()).norm() ** 2) for k in want) ** 0.5
        assert disagreement / update < 0.01, folder


def test_text_encoder_training_is_refused_with_fsdp_and_comes_from_the_spec(tmp_path: Path) -> None:
    with pytest.raises(OneLineError) as error:
        parse_config(
            [
                "--pretrained_model_name_or_path",
                "m",
                "--train_data_dir",
                "d",
                "--train_text_encoder",
                "--strategy",
                "fsdp",
            ],
            "x",
        )
    assert str(error.value).startswith("--train_text_encoder: not with --strategy fsdp")
    spec = {
        "dataset": {"imagefolder": {"uri": "s3://bucket/images/"}},
        "model": {"base": "org/m"},
        "training": {"trainTextEncoder": True, "textEncoderLearningRate": 5e-6},
        "storage": {"uri": "s3://bucket/job/"},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cfg = parse_config(["--spec", str(tmp_path / "spec.json")], "kubetune train")
    assert (cfg.train_text_encoder, cfg.text_encoder_lr) == (True, 5e-6)
    plain = parse_config(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"], "x")
    assert (plain.train_text_encoder, plain.text_encoder_lr) == (False, None)
