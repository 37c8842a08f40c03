"""`--optimizer`: Adafactor and (where bitsandbytes is installed) 8-bit AdamW train, checkpoint their
own state and resume exactly; 8-bit AdamW without bitsandbytes is refused in one line
(tests/trainer/test_cli.py)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
from trainer_testkit import core_flags, max_difference, resume_in_a_new_output, trained_output, unet_weights

ADAFACTOR = {"optimizer": "adafactor", "max_train_steps": 4, "checkpointing_steps": 2, "use_ema": False}


@pytest.fixture(scope="module")
def adafactor_run(tiny_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_output(tiny_model, shapes_dataset, tmp_path_factory.mktemp("adafactor") / "out", **ADAFACTOR)


def test_adafactor_trains_with_its_factored_state_and_resumes_exactly(
    adafactor_run: Path, tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    import torch

    saved = torch.load(adafactor_run / "checkpoint-2" / "optimizer.pt", weights_only=True)["optimizer"]
    moments = {key for state in saved["state"].values() for key in state}
    assert "exp_avg_sq_row" in moments and "exp_avg" not in moments, sorted(moments)
    initial = unet_weights(tiny_model)
    assert max_difference(unet_weights(adafactor_run), initial) > 0, "the UNet was trained"

    flags = functools.partial(core_flags, tiny_model, shapes_dataset, resume_from_checkpoint="latest", **ADAFACTOR)
    output, _ = resume_in_a_new_output(adafactor_run, "checkpoint-2", tmp_path, flags)
    assert max_difference(unet_weights(output), unet_weights(adafactor_run)) < 1e-6


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_8bit_adam_keeps_8bit_moments_and_resumes_exactly(
    tiny_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    import torch

    settings = {**ADAFACTOR, "optimizer": None, "use_8bit_adam": True}
    run = trained_output(tiny_model, shapes_dataset, tmp_path_factory.mktemp("adam8bit") / "out", **settings)
    saved = torch.load(run / "checkpoint-2" / "optimizer.pt", weights_only=True)["optimizer"]
    moments = {key for state in saved["state"].values() for key in state}
    # bitsandbytes' state (its moments are 8-bit for tensors of 4096 elements or more)
    assert moments & {"state1", "__bnb_optimizer_quant_state__"} and "exp_avg" not in moments, sorted(moments)
    flags = functools.partial(core_flags, tiny_model, shapes_dataset, resume_from_checkpoint="latest", **settings)
    output, _ = resume_in_a_new_output(run, "checkpoint-2", tmp_path, flags)
    assert max_difference(unet_weights(output), unet_weights(run)) < 1e-6
