"""spec.dataset.captioning and spec.dataset.filter: bounded, one-line errors, and not part of the
collected dataset's fingerprint (changing them must not collect the images again)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubetune.api.layout import dataset_fingerprint
from kubetune.api.models import Dataset

SOURCE = {"imagefolder": {"uri": "s3://bucket/data/"}}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"captioning": {"model": "m/n", "mode": "prefix"}}, "mode prefix needs a trigger"),
        ({"captioning": {"model": "m/n", "mode": "shout"}}, "captioning.mode"),
        ({"captioning": {"model": "m/n", "maxNewTokens": 5000}}, "captioning.maxNewTokens"),
        ({"captioning": {"model": "m/n", "prompt": "two\nlines"}}, "captioning.prompt"),
        ({"filter": {"minClipScore": 1.5}}, "filter.minClipScore"),
        ({"filter": {}}, "filter.minClipScore"),
    ],
)
def test_bad_fields_are_named(extra: dict, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        Dataset.model_validate({**SOURCE, **extra})
    assert message in str(error.value)


def test_preparation_settings_leave_the_collected_dataset_alone() -> None:
    plain = Dataset.model_validate(SOURCE)
    prepared = Dataset.model_validate(
        {
            **SOURCE,
            "captioning": {"model": "Salesforce/blip-image-captioning-base", "mode": "prefix", "trigger": "sks"},
            "filter": {"minClipScore": 0.2},
        }
    )
    assert prepared.filter is not None and prepared.filter.model == "openai/clip-vit-base-patch32"
    assert dataset_fingerprint(prepared) == dataset_fingerprint(plain)
