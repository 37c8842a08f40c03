"""Real clients against the local cluster, unchanged: kubectl 1.37, the official kubernetes
Python client, and the `kubetune dev` command line (no process left behind)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.dev.cluster.local import ClusterInfo
from kubetune.dev.testing import Api, wait_for

REPO = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl", path=str(REPO / ".tools" / "bin")) or shutil.which("kubectl")

JOB = """
apiVersion: batch/v1
kind: Job
metadata: {name: greet}
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: python:3.11
        command: [python, -c, "print('hello via kubectl')"]
"""
FTJ = """
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: shapes}
spec:
  dataset: {urls: {uri: "s3://kubetune-dev/datasets/shapes.jsonl"}}
  model: {base: "s3://kubetune-dev/models/tiny-sd/"}
  training: {maxTrainSteps: 10, resolution: RES}
  storage: {uri: "s3://kubetune-dev/runs/shapes/"}
"""


@pytest.fixture
def kubectl(local_cluster: ClusterInfo, k8s_namespace: str, tmp_path: Path) -> Any:
    if KUBECTL is None:
        pytest.fail("kubectl not found: run `make tools` (installs kubectl 1.37 into .tools/bin)")
    env = {**os.environ, "KUBECONFIG": local_cluster.kubeconfig, "KUBECACHEDIR": str(tmp_path / "cache")}

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [KUBECTL, "-n", k8s_namespace, *args], input=stdin, env=env, capture_output=True, text=True, timeout=60
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    run.env = env  # type: ignore[attr-defined]
    return run


def test_kubectl_end_to_end(kubectl: Any, k8s_namespace: str) -> None:
    """kubectl apply, wait, get (server-side printer columns), logs, describe, label,
    patch --subresource=status, get -w and delete all work against the stand-in."""
    assert "job.batch/greet created" in kubectl("apply", "-f", "-", stdin=JOB).stdout
    assert "job.batch/greet unchanged" in kubectl("apply", "-f", "-", stdin=JOB).stdout
    kubectl("wait", "--for=condition=Complete", "job/greet", "--timeout=60s")
    table = kubectl("get", "jobs").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "COMPLETIONS", "DURATION", "AGE"] and table[1].split()[:3] == [
        "greet",
        "Complete",
        "1/1",
    ]
    assert kubectl("logs", "job/greet").stdout == "hello via kubectl\n"
    described = kubectl("describe", "job", "greet").stdout
    assert (
        "Pods Statuses:    0 Active (0 Ready) / 1 Succeeded / 0 Failed" in described and "SuccessfulCreate" in described
    )

    invalid = kubectl("apply", "-f", "-", stdin=FTJ.replace("RES", "500"), check=False)
    assert invalid.returncode != 0 and "spec.training.resolution" in invalid.stderr
    unknown = kubectl(
        "apply",
        "-f",
        "-",
        stdin=FTJ.replace("RES", "64").replace("maxTrainSteps: 10", "maxTrainSteps: 10, bogus: 1"),
        check=False,
    )
    assert unknown.returncode != 0 and 'unknown field "spec.training.bogus"' in unknown.stderr
    assert (
        "finetunejob.kubetune.dev/shapes created" in kubectl("apply", "-f", "-", stdin=FTJ.replace("RES", "64")).stdout
    )
    kubectl(
        "patch",
        "ftj",
        "shapes",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"phase":"Training","training":{"step":3}}}',
    )
    header, row = kubectl("get", "ftj").stdout.splitlines()
    assert (
        header.split()[:4] == ["NAME", "PHASE", "PROGRESS", "STEP"]
        and row.split()[:2] == ["shapes", "Training"]
        and "3" in row.split()
    )
    assert "shapes labeled" in kubectl("label", "ftj", "shapes", "team=vision").stdout
    assert kubectl("get", "ftj", "-l", "team=vision", "-o", "name").stdout.strip() == "finetunejob.kubetune.dev/shapes"

    watcher = subprocess.Popen(
        [KUBECTL, "-n", k8s_namespace, "get", "ftj", "-w", "--no-headers"],
        env=kubectl.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().split()[:2] == ["shapes", "Training"]
        kubectl(
            "patch", "ftj", "shapes", "--subresource=status", "--type=merge", "-p", '{"status":{"phase":"Succeeded"}}'
        )
        assert watcher.stdout.readline().split()[:2] == ["shapes", "Succeeded"]
    finally:
        watcher.kill()
        watcher.wait()
    assert "deleted" in kubectl("delete", "ftj", "shapes").stdout
    assert "deleted" in kubectl("delete", "job", "greet").stdout
    assert kubectl("get", "jobs", "-o", "name").stdout == ""


def test_official_python_client_crud_and_watch(local_cluster: ClusterInfo, k8s_namespace: str) -> None:
    """The kubernetes Python client creates, patches (strategic and JSON patch) and watches."""
    from kubernetes import client, watch

    core = client.CoreV1Api(local_cluster.api_client())
    core.create_namespaced_config_map(
        k8s_namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="pc"), data={"a": "1"})
    )
    core.patch_namespaced_config_map("pc", k8s_namespace, {"data": {"b": "2"}})
    core.patch_namespaced_config_map("pc", k8s_namespace, [{"op": "add", "path": "/data/c", "value": "3"}])
    assert core.read_namespaced_config_map("pc", k8s_namespace).data == {"a": "1", "b": "2", "c": "3"}
    listing = core.list_namespaced_config_map(k8s_namespace)
    stream = watch.Watch().stream(
        core.list_namespaced_config_map,
        k8s_namespace,
        resource_version=listing.metadata.resource_version,
        timeout_seconds=10,
    )
    core.delete_namespaced_config_map("pc", k8s_namespace)
    event = next(stream)
    assert event["type"] == "DELETED" and event["object"].metadata.name == "pc"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(proc.name))
    return found


def test_dev_up_status_down_leaves_no_process(tmp_path: Path) -> None:
    """`kubetune dev up` starts everything in the background and prints the export line; `dev
    status` reports it; `dev down` stops every process it started, pods and operator included."""
    state = tmp_path / "state"
    cli = [sys.executable, "-m", "kubetune.cli", "dev"]
    up = subprocess.run(
        [*cli, "up", "--state-dir", str(state), "--no-model"], capture_output=True, text=True, timeout=300
    )
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip().endswith(f"export KUBECONFIG={state / 'kubeconfig'}")
        assert (
            subprocess.run(
                [*cli, "status", "--state-dir", str(state)], capture_output=True, text=True, timeout=60
            ).returncode
            == 0
        )
        import json

        info = json.loads((state / "cluster.json").read_text())
        api = Api(info["api_url"])
        assert api.ok(api.get("/api/v1/namespaces/default/secrets/kubetune-dev-s3"))["data"]["AWS_ACCESS_KEY_ID"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleeper"},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "image": "x:1",
                        "command": ["sleep", "300"],
                        "env": [{"name": "MARK", "value": str(state)}],
                    }
                ]
            },
        }
        api.ok(api.post("/api/v1/namespaces/default/pods", pod))
        wait_for(lambda: api.ok(api.get("/api/v1/namespaces/default/pods/sleeper"))["status"].get("phase") == "Running")
        assert _processes_mentioning(str(state))
    finally:
        down = subprocess.run([*cli, "down", "--state-dir", str(state)], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "stopped" in down.stdout
    time.sleep(0.5)
    leftovers = _processes_mentioning(str(state))
    assert leftovers == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in leftovers]
    assert (
        subprocess.run(
            [*cli, "status", "--state-dir", str(state)], capture_output=True, text=True, timeout=60
        ).returncode
        == 1
    )
