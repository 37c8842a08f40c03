"""The typed files between components: what a reader accepts, ignores and rejects."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from kubetune.api.contracts import (
    SOURCE_SECRET_ENV,
    CheckpointManifest,
    DatasetManifest,
    ExitCode,
    TrainingProgress,
    problem,
)
from kubetune.api.layout import EXIT_EMPTY_DATASET, EXIT_INVALID, EXIT_OK, EXIT_PREEMPTED


def test_exit_codes_are_plain_ints_on_the_wire() -> None:
    assert (EXIT_OK, EXIT_INVALID, EXIT_EMPTY_DATASET, EXIT_PREEMPTED) == (0, 2, 65, 75)
    assert json.dumps([ExitCode.PREEMPTED]) == "[75]" and str(ExitCode.INVALID) == "2"
    assert len({int(code) for code in ExitCode}) == len(ExitCode)


def test_a_dataset_manifest_reads_its_counts_and_ignores_keys_it_does_not_know() -> None:
    text = json.dumps(
        {
            "fingerprint": "abc",
            "counts": {"requested": 20, "kept": 12, "skipped": {"too-small": 8}},
            "fromANewerCollector": {"x": 1},
        }
    )
    manifest = DatasetManifest.model_validate_json(text)
    assert manifest.counts.kept == 12 and manifest.counts.skipped == {"too-small": 8} and not manifest.empty


def test_an_empty_dataset_is_a_count_not_a_sentence() -> None:
    manifest = DatasetManifest(fingerprint="abc", counts={"requested": 5, "kept": 0, "skipped": {"no-image": 5}})
    again = DatasetManifest.model_validate_json(manifest.to_json())
    assert again == manifest and again.empty and again.metadata is None


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"fingerprint": "abc", "counts": {"kept": "12"}}, "counts.kept"),
        ({"fingerprint": "abc", "counts": {"kept": 1, "skipped": ["too-small"]}}, "counts.skipped"),
        ({"fingerprint": "abc", "kept": 12}, "counts"),  # the old top-level shape is not a manifest
        ({"counts": {"kept": 1}}, "fingerprint"),
    ],
)
def test_a_dataset_manifest_of_the_wrong_shape_is_rejected_naming_the_key(body: dict, where: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DatasetManifest.model_validate_json(json.dumps(body))
    assert problem(caught.value).startswith(f"{where}: ")


def test_progress_round_trips_with_camel_case_keys_and_a_nan_loss() -> None:
    progress = TrainingProgress.model_validate(
        {
            "state": "training",
            "step": 3,
            "maxSteps": 10,
            "loss": float("nan"),
            "updatedAt": "2026-01-01T12:00:00Z",
        }
    )
    wire = json.loads(progress.to_json())
    assert wire["maxSteps"] == 10 and wire["updatedAt"] == "2026-01-01T12:00:00Z"
    again = TrainingProgress.model_validate_json(progress.to_json())
    assert math.isnan(again.loss or 0.0) and again.updated_at == progress.updated_at


def test_progress_rejects_an_unknown_state_or_a_text_step() -> None:
    for body in ({"state": "dancing"}, {"step": "3"}):
        with pytest.raises(ValidationError):
            TrainingProgress.model_validate_json(json.dumps(body))


def test_a_checkpoint_manifest_needs_its_files_and_position() -> None:
    state = {
        "step": 4,
        "samplesSeen": 8,
        "epoch": 1,
        "seed": 7,
        "method": "lora",
        "globalBatchSize": 2,
        "worldSize": 1,
        "cacheKey": "k",
        "ema": None,
        "dataloader": {"position": 8, "epoch": 1, "indexInEpoch": 2, "samples": 6},
        "rng": {"seed": 7, "scheme": "s"},
    }
    manifest = CheckpointManifest.model_validate({**state, "files": {"a.pt": {"size": 1, "sha256": "00"}}})
    assert CheckpointManifest.model_validate_json(manifest.to_json()) == manifest
    with pytest.raises(ValidationError, match="files"):
        CheckpointManifest.model_validate(state)


def test_every_secret_reference_of_a_source_has_its_environment_variable() -> None:
    from kubetune.api import models

    for source in models.DATASET_SOURCES:
        model = models.Dataset.model_fields[source].annotation
        refs = {
            name for name, info in _source_model(model).model_fields.items() if "SecretKeyRef" in str(info.annotation)
        }
        assert set(SOURCE_SECRET_ENV.get(source, {})) == refs, source


def _source_model(annotation: object) -> type:
    """`UnsplashSource | None` -> UnsplashSource."""
    from typing import get_args

    from pydantic import BaseModel

    return next(a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel))


def test_resume_mismatches_name_each_recorded_setting_old_to_new_and_skip_unrecorded_ones() -> None:
    from kubetune.api.contracts import StorageOwner, resume_mismatches
    from kubetune.dev.testing.specs import checkpoint_state

    recorded = CheckpointManifest.model_validate(
        checkpoint_state(epoch=1, globalBatchSize=8, cacheKey="k", files={}, loraRank=4)
    )
    same = {"method": "lora", "global_batch_size": 8, "lora_rank": 4, "model": "other", "resolution": 512}
    assert resume_mismatches(recorded, same) == []  # model and resolution were not recorded (an older manifest)
    changed = {"method": "full", "global_batch_size": 4, "lora_rank": 8, "cache_key": "k2"}
    assert resume_mismatches(recorded, changed) == [
        "method lora -> full",
        "global batch size 8 -> 4",
        "LoRA rank 4 -> 8",
        "data/cache key k -> k2",
    ]
    owner = StorageOwner.model_validate_json('{"namespace": "ns", "name": "a", "uid": "u", "createdAt": null}')
    assert owner.job == "ns/a"
