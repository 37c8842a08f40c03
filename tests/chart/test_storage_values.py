"""The chart values for whose identity reads a job's storage (#13 item 11)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator.cli import build_parser


def test_storage_endpoint_allowlist_and_own_identity_reach_the_operators_flags(render: Any) -> None:
    args = render(
        None,
        "operator.allowedStorageEndpoints={http://minio.minio.svc:9000,https://s3.internal}",
        "operator.storageOwnIdentity=true",
    ).operator_container["args"]
    assert [arg for arg in args if "storage" in arg] == [
        "--allowed-storage-endpoint=http://minio.minio.svc:9000",
        "--allowed-storage-endpoint=https://s3.internal",
        "--storage-own-identity",
    ]
    parsed = build_parser("kubetune operator").parse_args(args[1:])
    assert parsed.allowed_storage_endpoint == ["http://minio.minio.svc:9000", "https://s3.internal"]
    assert parsed.storage_own_identity is True
    defaults = render().operator_container["args"]
    assert not any("storage" in arg for arg in defaults)  # off by default: jobs read with their own Secret


def test_an_allowed_endpoint_must_be_a_url(tools: Any) -> None:
    from .conftest import _template

    with pytest.raises(AssertionError, match="allowedStorageEndpoints"):
        _template(tools.helm, None, ("operator.allowedStorageEndpoints={minio:9000}",))
