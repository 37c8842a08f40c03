"""What `kubetune dev up` puts into a fresh cluster: fixture images served over HTTP, a URL list
and a tiny Stable Diffusion pipeline in S3 (the CRD and the S3 Secret come with every cluster)."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from kubetune.dev.cluster import ClusterInfo, s3_client_for

log = logging.getLogger("kubetune.dev.seed")
URL_LIST_KEY = "datasets/shapes.jsonl"
MODEL_PREFIX = "models/tiny-sd/"


def seed_images(info: ClusterInfo, count: int = 48) -> str:
    """Generated captioned shapes on the image server, listed in s3://<bucket>/datasets/shapes.jsonl."""
    from kubetune.fixtures.shapes import generate

    folder = Path(info.state_dir) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for image in generate(count):
        (folder / f"{image.name}.jpg").write_bytes(image.jpeg)
        lines.append(json.dumps({"url": f"{info.images_url}/{image.name}.jpg", "caption": image.caption}))
    s3_client_for(info.s3_endpoint).put_object(Bucket=info.bucket, Key=URL_LIST_KEY, Body=("\n".join(lines) + "\n").encode())
    return f"s3://{info.bucket}/{URL_LIST_KEY}"


def seed_model(info: ClusterInfo) -> str | None:
    """The tiny SD pipeline at s3://<bucket>/models/tiny-sd/ (None when its builder is absent)."""
    try:
        from kubetune.fixtures.tiny_sd import build_tiny_pipeline
    except ImportError:
        log.warning("kubetune.fixtures.tiny_sd is not available; models/tiny-sd/ is not seeded")
        return None
    client = s3_client_for(info.s3_endpoint)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(build_tiny_pipeline(Path(tmp) / "tiny-sd"))
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            client.upload_file(str(path), info.bucket, MODEL_PREFIX + path.relative_to(root).as_posix())
    return f"s3://{info.bucket}/{MODEL_PREFIX}"
