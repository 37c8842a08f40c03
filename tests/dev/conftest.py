"""The `api` fixture: raw HTTP against the session's local cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kubetune.dev.cluster.local import ClusterInfo
from kubetune.dev.testing import Api


@pytest.fixture
def api(local_cluster: ClusterInfo) -> Iterator[Api]:
    client = Api(local_cluster.api_url)
    yield client
    client.session.close()
