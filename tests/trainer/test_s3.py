"""S3 (moto's real HTTP server) as model source, data source and output, driven by a FineTuneJob
spec as the operator's pods are: a second pod resumes from the checkpoint the first left in S3."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from trainer_testkit import train, write_imagefolder

from kubetune.dev.testing.specs import tiny_training
from kubetune.storage import Store


def test_spec_job_on_s3_resumes_from_s3_checkpoint(tiny_model: Path, s3_bucket: str, tmp_path: Path) -> None:
    storage = f"s3://{s3_bucket}/jobs/shapes"
    Store(f"s3://{s3_bucket}/models/tiny").upload_tree(tiny_model)
    dataset = write_imagefolder(tmp_path / "dataset", 6)
    (dataset / "manifest.json").write_text(json.dumps({"fingerprint": "abc123", "kept": 6, "source": "unsplash"}))
    Store(storage).upload_tree(dataset, "dataset")
    job = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "shapes"},
        "spec": {
            "dataset": {"unsplash": {"prompts": ["a red circle"], "accessKeySecretRef": {"name": "u", "key": "k"}}},
            "model": {"base": f"s3://{s3_bucket}/models/tiny/"},
            "training": tiny_training(checkpointsToKeep=1, seed=3, learningRate=1e-4),
            "storage": {"uri": storage + "/"},
        },
    }
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    common = ["--spec", str(spec), "--cache_dir", str(tmp_path / "models"), "--report_to", "none"]

    first = train([*common, "--max_train_steps", "2"], KUBETUNE_WORK_DIR=str(tmp_path / "pod-1"))
    assert first.returncode == 0, first.stderr[-3000:]
    out = Store(storage)
    assert out.exists("checkpoint-2/manifest.json")
    assert "cached latents-00000.safetensors" in first.stderr

    second = train(common, KUBETUNE_WORK_DIR=str(tmp_path / "pod-2"))  # a fresh pod: nothing local
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {storage}/checkpoint-2 " in second.stderr
    assert "cached latents" not in second.stderr, "the S3 cache is reused"

    progress = out.read_json("progress.json")
    assert progress["state"] == "succeeded" and progress["step"] == 4
    assert progress["latestCheckpoint"] == "checkpoint-4"
    keys = set(out.list(""))
    assert "model_index.json" in keys and "unet/diffusion_pytorch_model.safetensors" in keys
    assert not any(k.startswith("checkpoint-2/") for k in keys), "the older checkpoint was removed"
    assert any(k.startswith("cache/") and k.endswith("/manifest.json") for k in keys)
    assert "- fingerprint: abc123" in out.read_bytes("README.md").decode()

    from diffusers import StableDiffusionPipeline

    local = tmp_path / "published"
    out.download_tree("", local)
    pipeline = StableDiffusionPipeline.from_pretrained(local, safety_checker=None)
    assert pipeline("a red circle", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)
