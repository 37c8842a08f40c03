"""What the collector and the trainer really write, read by the operator (kubetune.api.contracts).

The collector's output merge, the trainer's progress writer and checkpointer write to S3 (moto);
the operator reads those files the way `kube.observe` does and decides on them. An empty
collection travels as a count and an exit code, end to end.
"""

from __future__ import annotations

import copy
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from kubetune.api.contracts import (
    CheckpointManifest,
    CheckpointState,
    DatasetManifest,
    TrainingProgress,
)
from kubetune.api.layout import (
    DATASET_DIR,
    DATASET_MANIFEST,
    EXIT_EMPTY_DATASET,
    EXIT_OK,
    PROGRESS_FILE,
    dataset_fingerprint,
)
from kubetune.api.load import parse_spec
from kubetune.collector.cli import report
from kubetune.collector.errors import Skip
from kubetune.collector.images import ImageSettings, clean
from kubetune.collector.output import DatasetOutput
from kubetune.collector.sources import Candidate
from kubetune.dev.testing.specs import checkpoint_state
from kubetune.operator import builders as b
from kubetune.operator.decide import Decision, Observed, decide
from kubetune.operator.kube import latest_complete_checkpoint
from kubetune.storage import Store
from kubetune.trainer.checkpoint import Checkpointer, complete_checkpoints
from kubetune.trainer.progress import Progress

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
IMAGES = ImageSettings(size=64, min_size=64)


def spec_for(bucket: str) -> dict[str, Any]:
    return {
        "dataset": {
            "urls": {"uri": f"s3://{bucket}/lists/urls.jsonl"},
            "resolution": 64,
            "minSize": 64,
        },
        "model": {"base": "tiny"},
        "storage": {"uri": f"s3://{bucket}/job/"},
    }


def jpeg(width: int, height: int, shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 255 - shade, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def collect(bucket: str, spec: dict[str, Any], photos: list[bytes], broken: int) -> tuple[DatasetManifest | None, int]:
    """The collector's output as `kubetune collect` drives it (one shard): kept images, skips,
    the merge, and the exit code its report gives."""
    fingerprint = dataset_fingerprint(parse_spec(spec).dataset)
    info = {
        "fingerprint": fingerprint,
        "settings": {"resolution": 64},
        "dedupe": True,
        "nearDedupe": False,
    }
    output = DatasetOutput(
        Store(f"s3://{bucket}/job/{DATASET_DIR}"), f"{fingerprint}-1", "processing", 0, 1, info
    ).open()
    for i, data in enumerate(photos):
        candidate = Candidate(key=f"k{i}", caption=f"photo {i}", source="urls", url=f"http://x/{i}.jpg")
        try:
            output.write(candidate, clean(data, IMAGES))
        except Skip as skip:
            output.skip(candidate, skip.reason)
    for i in range(broken):
        output.skip(
            Candidate(key=f"broken{i}", caption="", source="urls", url=f"http://x/b{i}.jpg"),
            "http-404",
        )
    manifest = output.finish(len(photos) + broken, [])
    code = report({"output": output.store.uri, "shard": (0, 1)}, output, None, manifest, [])
    return manifest, code


class Operator:
    """Passes of decide() over what S3 holds, the way kube.observe reads it."""

    def __init__(self, bucket: str, spec: dict[str, Any]) -> None:
        self.storage = Store(f"s3://{bucket}/job/")
        self.spec = spec
        self.status: dict[str, Any] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.now = T0

    def read(self, key: str) -> dict[str, Any] | None:
        return self.storage.read_json(key) if self.storage.exists(key) else None

    def step(self, latest_checkpoint: str = "") -> Decision:
        self.now = self.now.replace(second=self.now.second + 5)
        observed = Observed(
            name="shapes",
            namespace="default",
            uid="uid-1",
            generation=1,
            spec=parse_spec(self.spec),
            status=copy.deepcopy(self.status),
            now=self.now,
            jobs=copy.deepcopy(self.jobs),
            pods=copy.deepcopy(self.pods),
            service_exists=True,
            dataset_manifest=self.read(DATASET_MANIFEST),
            progress=self.read(PROGRESS_FILE),
            latest_checkpoint=latest_checkpoint,
        )
        decision = decide(observed)
        self.status = decision.status
        for obj in decision.create:
            if obj["kind"] == "Job":
                self.jobs[obj["metadata"]["name"]] = obj
        return decision

    def collector_exits(self, code: int, last_line: str) -> None:
        name = b.collector_job_name("shapes")
        self.jobs[name]["status"] = {"conditions": [{"type": "Failed" if code else "Complete", "status": "True"}]}
        self.pods.append(
            {
                "metadata": {
                    "name": f"{name}-0",
                    "uid": "pod-0",
                    "labels": {
                        "batch.kubernetes.io/job-name": name,
                        b.LABEL_COMPONENT: b.COLLECTOR,
                    },
                },
                "status": {
                    "phase": "Failed" if code else "Succeeded",
                    "containerStatuses": [
                        {
                            "name": b.COLLECTOR,
                            "state": {"terminated": {"exitCode": code, "message": last_line}},
                        }
                    ],
                },
            }
        )

    def condition(self, kind: str) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == kind)


def test_an_empty_collection_fails_the_job_as_an_empty_dataset(s3_bucket: str) -> None:
    spec = spec_for(s3_bucket)
    operator = Operator(s3_bucket, spec)
    operator.step()
    assert operator.status["phase"] == "Collecting"

    manifest, code = collect(s3_bucket, spec, [jpeg(32, 32, 1)], broken=2)  # too small, and two 404s
    assert code == EXIT_EMPTY_DATASET
    assert manifest is not None and manifest.empty
    written = DatasetManifest.model_validate_json(operator.storage.read_bytes(DATASET_MANIFEST))
    assert written == manifest and written.counts.skipped == {"http-404": 2, "too-small": 1}

    operator.collector_exits(code, "kubetune collect: error: nothing could be collected: 0 images kept of 3 requested")
    decision = operator.step()
    assert decision.phase == "Failed" and operator.condition("Succeeded")["reason"] == "EmptyDataset"
    assert operator.status["dataset"]["kept"] == 0 and "http-404" in operator.status["message"]
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "EmptyDataset")]

    # without its manifest, the exit code alone says the same
    operator.storage.delete(DATASET_MANIFEST)
    operator.status = {k: v for k, v in operator.status.items() if k not in ("phase", "conditions", "dataset")}
    assert operator.step().phase == "Failed" and operator.condition("Succeeded")["reason"] == "EmptyDataset"
    assert operator.status["message"].startswith("the collector kept no images: kubetune collect: error: nothing")


def test_an_empty_dataset_left_by_an_earlier_job_is_collected_again(s3_bucket: str) -> None:
    spec = spec_for(s3_bucket)
    _, code = collect(s3_bucket, spec, [], broken=1)
    assert code == EXIT_EMPTY_DATASET
    operator = Operator(s3_bucket, spec)  # a new FineTuneJob on the same storage
    decision = operator.step()
    assert operator.status["phase"] == "Collecting"
    assert [o["metadata"]["name"] for o in decision.create] == [b.collector_job_name("shapes")]


def test_a_manifest_of_the_wrong_shape_fails_naming_the_key(s3_bucket: str) -> None:
    spec = spec_for(s3_bucket)
    operator = Operator(s3_bucket, spec)
    operator.step()
    operator.storage.write_json(
        DATASET_MANIFEST,
        {"fingerprint": dataset_fingerprint(parse_spec(spec).dataset), "counts": {"kept": "many"}},
    )
    operator.collector_exits(EXIT_OK, "")
    assert operator.step().phase == "Failed"
    assert operator.condition("Succeeded")["reason"] == "DatasetIncomplete"
    assert operator.status["message"].endswith(
        "is not a dataset manifest: counts.kept: Input should be a valid integer"
    )


def test_dataset_progress_and_checkpoints_written_by_the_components_drive_the_operator(
    s3_bucket: str, tmp_path: Path
) -> None:
    spec = spec_for(s3_bucket)
    operator = Operator(s3_bucket, spec)
    operator.step()
    manifest, code = collect(s3_bucket, spec, [jpeg(80, 64, 1), jpeg(96, 64, 200)], broken=1)
    assert code == EXIT_OK and manifest is not None and manifest.counts.kept == 2
    operator.collector_exits(EXIT_OK, "")
    operator.step()
    assert operator.status["phase"] == "Training" and operator.condition("DatasetReady")["reason"] == "Collected"
    assert operator.status["dataset"] == {
        "uri": f"s3://{s3_bucket}/job/dataset",
        "requested": 3,
        "kept": 2,
        "skipped": {"http-404": 1},
    }

    # the trainer's progress writer and checkpointer, into the same storage
    output = Store(f"s3://{s3_bucket}/job/")
    progress = Progress(output, max_steps=10)
    checkpointer = Checkpointer(output, tmp_path / "staging", keep=2)
    folder = checkpointer.folder(4)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    checkpointer.commit(
        folder,
        CheckpointState.model_validate(checkpoint_state()),
    )
    progress.step(4, 8, loss=0.25, learningRate=1e-4, epoch=4)
    progress.state("training", latestCheckpoint=checkpointer.wait())
    checkpointer.close()

    assert TrainingProgress.model_validate_json(output.read_bytes(PROGRESS_FILE)).latest_checkpoint == "checkpoint-4"
    (ref,) = complete_checkpoints(output)
    assert (
        isinstance(ref.manifest, CheckpointManifest)
        and ref.manifest.files["pytorch_lora_weights.safetensors"].size == 7
    )

    operator.step()
    training = operator.status["training"]
    assert training["step"] == 4 and training["maxSteps"] == 10 and training["progress"] == "40%"
    assert training["loss"] == "0.25" and training["latestCheckpoint"] == "checkpoint-4"

    # the attempt fails; the next one resumes from the checkpoint the operator finds in storage
    train_name = b.trainer_job_name("shapes", 0)
    operator.jobs[train_name]["status"] = {"conditions": [{"type": "Failed", "status": "True", "message": "boom"}]}
    operator.step()
    assert operator.status["attempts"][-1]["reason"] == "Failed"
    decision = operator.step(latest_checkpoint=latest_complete_checkpoint(output))
    assert operator.status["attempts"][-1]["startStep"] == 4
    assert "resuming from checkpoint-4" in operator.status["message"]
    assert [o["metadata"]["name"] for o in decision.create] == [b.trainer_job_name("shapes", 1)]


def test_the_model_card_reads_the_collectors_counts(s3_bucket: str) -> None:
    from kubetune.trainer.publish import _dataset_manifest_lines

    spec = spec_for(s3_bucket)
    manifest, _ = collect(s3_bucket, spec, [jpeg(80, 64, 1)], broken=1)
    assert manifest is not None
    raw = Store(f"s3://{s3_bucket}/job/").read_json(DATASET_MANIFEST)  # as trainer/data.py reads it
    lines = _dataset_manifest_lines(raw)
    assert lines[:2] == [f"- fingerprint: {manifest.fingerprint}", "- kept: 1 of 2 requested"]
