"""Fixtures shared by every test module: a real S3 endpoint (moto's server) on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kubetune.launch import free_port

pytest_plugins = ["kubetune.dev.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint; code under test reaches it through AWS_ENDPOINT_URL, as it would
    reach MinIO or AWS."""
    from kubetune.dev.s3.server import serve

    port = free_port()
    stop_server = serve("127.0.0.1", port)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    stop_server()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket for one test; returns its name."""
    from kubetune.storage import s3_client

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=name)
    return name
