"""pytest fixtures that give tests the local cluster.

    pytest_plugins = ["kubetune.dev.testing.pytest_plugin"]

    def test_something(local_cluster, k8s_namespace):
        api = kubernetes.client.CoreV1Api(local_cluster.api_client())
        ...

`local_cluster` (session scope) is a `ClusterInfo`: kubeconfig, api_url, s3_endpoint, s3_access_key,
s3_secret_key, bucket, host_ip, network, images_url, `env()` (KUBECONFIG and AWS_* for a
subprocess such as the operator) and `api_client()`. It runs in-process (a thread) by default;
`KUBETUNE_DEV_CLUSTER=subprocess` runs `kubetune dev serve` as a child process instead (what
users get from `kubetune dev up`). `KUBETUNE_DEV_NETWORK=host|netns|auto` picks the pod network.
Pod-restart and Job pod-creation backoffs are 0.5 s instead of 10 s here, so retry tests are fast.

`k8s_namespace` creates a fresh namespace per test and deletes it afterwards (its pods stop).
`local_cluster_factory` starts an extra, private cluster (in-process) for tests that need one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.dev.cli import serve_command
from kubetune.dev.cluster.local import ClusterInfo, LocalCluster

TEST_BACKOFF = 0.5


def _start_subprocess(state_dir: Path) -> tuple[ClusterInfo, subprocess.Popen[bytes]]:
    state_dir.mkdir(parents=True, exist_ok=True)
    log = open(state_dir / "cluster.log", "ab")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        serve_command(
            state_dir, "--no-operator", "--no-model", "--network", os.environ.get("KUBETUNE_DEV_NETWORK", "auto")
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            document = json.loads((state_dir / "cluster.json").read_text())
        except (OSError, ValueError):
            document = {}
        if document.get("ready"):
            fields = ClusterInfo.__dataclass_fields__
            return ClusterInfo(**{k: v for k, v in document.items() if k in fields}), process
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the local cluster did not start; see {state_dir / 'cluster.log'}")


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterInfo]:
    state_dir = tmp_path_factory.mktemp("kubetune-dev")
    if os.environ.get("KUBETUNE_DEV_CLUSTER") == "subprocess":
        info, process = _start_subprocess(state_dir)
        try:
            yield info
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return
    cluster = LocalCluster(
        state_dir,
        network=os.environ.get("KUBETUNE_DEV_NETWORK", "auto"),
        job_backoff_base=TEST_BACKOFF,
        restart_backoff_base=TEST_BACKOFF,
    )
    info = cluster.start()
    try:
        yield info
    finally:
        cluster.stop()


@pytest.fixture
def local_cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LocalCluster]]:
    """Start private clusters with custom settings; each is stopped after the test."""
    started: list[LocalCluster] = []

    def make(**options: Any) -> LocalCluster:
        options.setdefault("job_backoff_base", TEST_BACKOFF)
        options.setdefault("restart_backoff_base", TEST_BACKOFF)
        options.setdefault("network", os.environ.get("KUBETUNE_DEV_NETWORK", "auto"))
        cluster = LocalCluster(tmp_path_factory.mktemp("kubetune-dev-extra"), **options)
        started.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in started:
        cluster.stop()


@pytest.fixture
def k8s_namespace(local_cluster: ClusterInfo, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test; deleted (with everything in it) afterwards."""
    import requests

    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:5]}"
    url = f"{local_cluster.api_url}/api/v1/namespaces"
    response = requests.post(
        url, json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}, timeout=30
    )
    response.raise_for_status()
    yield name
    requests.delete(f"{url}/{name}", timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and requests.get(f"{url}/{name}", timeout=30).status_code == 200:
        time.sleep(0.1)
