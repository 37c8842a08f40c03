"""What `kubetune dev up` puts into a fresh cluster: fixture images served over HTTP, a URL list
and a tiny Stable Diffusion pipeline in S3 (the CRD and the S3 Secret come with every cluster)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubetune.dev.cluster.local import ClusterInfo, s3_client_for

log = logging.getLogger("kubetune.dev.demo.seed")
URL_LIST_KEY = "datasets/shapes.jsonl"
MODEL_PREFIX = "models/tiny-sd/"


def seed_images(info: ClusterInfo, count: int = 48) -> str:
    """Generated captioned shapes on the image server, listed in s3://<bucket>/datasets/shapes.jsonl."""
    from kubetune.dev.testing.shapes import generate

    folder = Path(info.state_dir) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for image in generate(count):
        (folder / f"{image.name}.jpg").write_bytes(image.jpeg)
        lines.append(json.dumps({"url": f"{info.images_url}/{image.name}.jpg", "caption": image.caption}))
    s3_client_for(info.s3_endpoint).put_object(
        Bucket=info.bucket, Key=URL_LIST_KEY, Body=("\n".join(lines) + "\n").encode()
    )
    return f"s3://{info.bucket}/{URL_LIST_KEY}"


# The demo model's VAE is taught to reconstruct the shape images first: a randomly initialised VAE
# reconstructs nothing, so no amount of UNet training would show shapes. The result is cached on
# disk (it takes two minutes or so), keyed by these settings and TINY_MODEL_VERSION. lr 4e-3
# reconstructs much better than 1e-3 in the same steps (mean squared error 0.019 against 0.067 on
# held-out shapes at 32 px, pixels in [-1, 1]).
VAE_PRETRAINING = {"steps": 600, "resolution": 32, "batch_size": 16, "seed": 0, "lr": 4e-3}
TINY_MODEL_VERSION = 2  # raise when build_tiny_pipeline or pretrain_vae change what they make (2: v-prediction)


def vae_pretraining(vae_steps: int | None = None) -> dict[str, Any]:
    """VAE_PRETRAINING, with `vae_steps` steps when given."""
    return {**VAE_PRETRAINING, **({"steps": vae_steps} if vae_steps is not None else {})}


def tiny_model_dir(cache_dir: Path, vae_steps: int | None = None) -> Path:
    """Where `tiny_model` keeps the model built with these settings."""
    settings = vae_pretraining(vae_steps)
    return cache_dir / (f"tiny-sd-v{TINY_MODEL_VERSION}-" + "-".join(f"{k}{v}" for k, v in sorted(settings.items())))


def tiny_model(cache_dir: Path, vae_steps: int | None = None) -> Path:
    """A local tiny SD pipeline whose VAE is pre-trained on shapes, built once per settings."""
    from kubetune.dev.testing.tiny_sd import build_tiny_pipeline, pretrain_vae

    settings = vae_pretraining(vae_steps)
    root = tiny_model_dir(cache_dir, vae_steps)
    if not (root / "model_index.json").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            built = Path(build_tiny_pipeline(Path(tmp) / "tiny-sd"))
            if settings["steps"]:
                log.info(
                    "pre-training the tiny model's VAE on shapes (%s steps, once; cached in %s)",
                    settings["steps"],
                    root,
                )
                pretrain_vae(built, **settings)
            shutil.move(str(built), root)  # complete folders only: model_index.json marks the cache
    return root


def seed_model(info: ClusterInfo, cache_dir: Path | None = None) -> str | None:
    """The tiny SD pipeline, its VAE pre-trained on shapes, at s3://<bucket>/models/tiny-sd/."""
    try:
        root = tiny_model(cache_dir or Path(info.state_dir).parent / "cache")
    except ImportError:
        log.warning("kubetune.dev.testing.tiny_sd is not available; models/tiny-sd/ is not seeded")
        return None
    client = s3_client_for(info.s3_endpoint)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), info.bucket, MODEL_PREFIX + path.relative_to(root).as_posix())
    return f"s3://{info.bucket}/{MODEL_PREFIX}"


def write_fixtures(folder: Path, vae_steps: int | None = None, images: int = 48) -> tuple[Path, Path]:
    """`kubetune dev fixtures`: the tiny model and a captioned-shapes imagefolder in `folder`, for
    `kubetune run examples/local.yaml` on a machine with no cluster and no S3."""
    from kubetune.dev.testing.shapes import generate

    model = folder / "tiny-sd"
    if not (model / "model_index.json").exists():
        source = tiny_model(folder / ".cache", vae_steps)
        shutil.copytree(source, model, dirs_exist_ok=True)
    data = folder / "shapes"
    data.mkdir(parents=True, exist_ok=True)
    lines = []
    for image in generate(images, size=64):
        (data / f"{image.name}.jpg").write_bytes(image.jpeg)
        lines.append(json.dumps({"file_name": f"{image.name}.jpg", "text": image.caption}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")  # written last: the folder is complete
    return model, data
