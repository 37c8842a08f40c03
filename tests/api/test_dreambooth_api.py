"""spec.training.dreambooth: instancePrompt required, classPrompt required with priorPreservation
(one line naming it), every number bounded, and the defaults train_dreambooth.py has."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubetune.api.load import SpecError, parse_finetunejob
from kubetune.api.models import DreamBooth, Training


def job(dreambooth: dict) -> dict:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "dog"},
        "spec": {
            "dataset": {"imagefolder": {"uri": "s3://bucket/dog/"}},
            "model": {"base": "org/model"},
            "training": {"method": "lora", "dreambooth": dreambooth},
            "storage": {"uri": "s3://bucket/out/"},
        },
    }


def test_prior_preservation_without_a_class_prompt_is_one_line_naming_the_field() -> None:
    with pytest.raises(SpecError) as error:
        parse_finetunejob(job({"instancePrompt": "a photo of sks dog", "priorPreservation": True}))
    message = str(error.value)
    assert "spec.training.dreambooth" in message and "classPrompt is required when priorPreservation" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({}, "instancePrompt"),
        ({"instancePrompt": ""}, "instancePrompt"),
        ({"instancePrompt": "x" * 1001}, "instancePrompt"),
        ({"instancePrompt": "p", "priorLossWeight": -0.1}, "priorLossWeight"),
        ({"instancePrompt": "p", "priorLossWeight": 10.5}, "priorLossWeight"),
        ({"instancePrompt": "p", "numClassImages": 0}, "numClassImages"),
        ({"instancePrompt": "p", "numClassImages": 10001}, "numClassImages"),
        ({"instancePrompt": "p", "sampleBatchSize": 65}, "sampleBatchSize"),
        ({"instancePrompt": "p", "classPrompt": "a\nb"}, "classPrompt"),
    ],
)
def test_bad_values_are_refused_naming_the_field(fields: dict, named: str) -> None:
    with pytest.raises(ValidationError) as error:
        Training.model_validate({"dreambooth": fields})
    assert f"dreambooth.{named}" in str(error.value)


def test_defaults_are_train_dreambooth_pys_and_unset_means_no_dreambooth() -> None:
    block = DreamBooth.model_validate({"instancePrompt": "a photo of sks dog"})
    assert (block.class_prompt, block.prior_preservation, block.prior_loss_weight) == ("", False, 1.0)
    assert (block.num_class_images, block.sample_batch_size) == (100, 4)
    assert Training().dreambooth is None
