"""End-to-end fixtures: the operator (`kubetune operator`, a real process) on the local cluster, with
the real collector and trainer running as pod processes, S3 on moto's server.

`e2e` (one per test module) makes a namespace with the S3 credentials Secret, puts a tiny Stable
Diffusion pipeline and a URL list of shape images (served by the cluster's image server) into S3,
and runs the operator for that namespace. Its helpers create FineTuneJobs and read back what a
user would look at: the FineTuneJob's status, its Jobs, Services and pods, the files in S3.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kubetune.api.models import GROUP, VERSION
from kubetune.dev.cluster.local import S3_SECRET, ClusterInfo, s3_client_for
from kubetune.dev.testing import Api, operator_command
from kubetune.dev.testing.specs import tiny_training
from kubetune.launch import free_port

LABEL_JOB = "kubetune.dev/finetunejob"
IMAGES = 12  # shape images on the image server; the URL list names them all


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune.dev.testing.tiny_sd import build_tiny_pipeline

    return Path(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd"))


class E2E:
    """One namespace on the local cluster, with the operator watching it."""

    def __init__(self, cluster: ClusterInfo, namespace: str, log_dir: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.api = Api(cluster.api_url)
        self.s3 = s3_client_for(cluster.s3_endpoint)
        self.bucket = cluster.bucket
        self.prefix = f"e2e/{namespace}"
        self.log_dir = log_dir
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_starts = 0
        self.metrics_port = 0
        # The operator's own user (token): the API server's audit log records its requests, which
        # the RBAC tests check against the chart's rules.
        self.user = f"operator-{namespace}"

    # -- the operator ----------------------------------------------------------------------------

    def start_operator(self, *extra: str) -> None:
        self.operator = self.spawn_operator(*extra)

    def spawn_operator(self, *extra: str, scope: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        """A `kubetune operator` process as `self.user` (the caller stops it; `start_operator`
        keeps it as `self.operator`). `scope`: instead of `--namespace <the namespace>`.

        Returns once its /metrics answers. A free port can be taken by another process between
        `free_port` and the operator's bind (the other test worker's pods listen on the cluster's
        addresses), so a start that lost its port is retried on a new one."""
        for _ in range(5):
            process = self._spawn_operator_once(extra, scope)
            if self._wait_for_metrics(process):
                return process
            if b"Address already in use" not in self._log_path().read_bytes():
                return process  # it exited for another reason: the test reads the log
        raise AssertionError(f"the operator found no free metrics port:\n{self.operator_log()[-2000:]}")

    def _log_path(self) -> Path:
        return self.log_dir / f"operator-{self.operator_starts}.log"

    def _wait_for_metrics(self, process: subprocess.Popen[bytes], timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            try:
                requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2)
                return True
            except requests.RequestException:
                time.sleep(0.2)
        return process.poll() is None

    def _spawn_operator_once(self, extra: tuple[str, ...], scope: tuple[str, ...]) -> subprocess.Popen[bytes]:
        self.operator_starts += 1
        # The operator binds 0.0.0.0: a port free on every address, not only on loopback.
        self.metrics_port = free_port("0.0.0.0")
        log = open(self._log_path(), "wb")  # noqa: SIM115 - the process keeps it
        env = {
            **os.environ,
            **self.cluster.env(),
            "KUBECONFIG": self.cluster.kubeconfig_for(self.user),
            "KUBETUNE_S3_ENDPOINT": self.cluster.s3_endpoint,
            "KUBETUNE_S3_CREDENTIALS_SECRET": S3_SECRET,
        }
        env.pop("PYTHONPATH", None)
        process = subprocess.Popen(
            operator_command(
                sys.executable,
                scope or ("--namespace", self.namespace),
                self.metrics_port,
                "test",
                "--resync-seconds",
                "1",
                *extra,
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()
        return process

    def stop_operator(self, sig: int = signal.SIGTERM, process: subprocess.Popen[bytes] | None = None) -> None:
        if process is None:
            process, self.operator = self.operator, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def operator_log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.log_dir.glob("operator-*.log")))

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text

    # -- FineTuneJobs ----------------------------------------------------------------------------

    def path(self, kind: str, name: str = "") -> str:
        prefixes = {"finetunejobs": f"/apis/{GROUP}/{VERSION}", "jobs": "/apis/batch/v1"}
        base = f"{prefixes.get(kind, '/api/v1')}/namespaces/{self.namespace}/{kind}"
        return f"{base}/{name}" if name else base

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}/" + "/".join(parts)

    def spec(self, name: str, **overrides: Any) -> dict[str, Any]:
        """A tiny job: the URL list, the tiny model, 2 CPU nodes, a few steps of 32 px."""
        spec: dict[str, Any] = {
            "dataset": {
                "urls": {"uri": self.uri("urls.jsonl")},
                "resolution": 64,
                "minSize": 32,
                "allowPrivateNetwork": True,
            },
            "model": {"base": self.uri("models", "tiny-sd") + "/"},
            "training": tiny_training(
                gradientCheckpointing=False, checkpointsToKeep=5, useEma=False, seed=1, learningRate=1e-4
            ),
            "trainer": {"nodes": 2, "gpusPerNode": 0},
            "collector": {"workers": 4},
            "storage": {"uri": self.uri("jobs", name) + "/"},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        return spec

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
        return self.api.ok(self.api.post(self.path("finetunejobs"), body))  # type: ignore[no-any-return]

    def get(self, name: str) -> dict[str, Any]:
        return self.api.ok(self.api.get(self.path("finetunejobs", name)))  # type: ignore[no-any-return]

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.api.ok(self.api.patch(self.path("finetunejobs", name), {"spec": spec}))

    def wait(self, name: str, predicate: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> dict[str, Any]:
        """Poll the status until `predicate(status)`; on timeout, fail with what was last seen."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status(name)
            if predicate(status):
                return status
            if status.get("phase") in ("Succeeded", "Failed") and not predicate(status):
                break
            if self.operator is not None and self.operator.poll() is not None:
                break  # the operator died: nothing will change, say so now rather than at the timeout
            time.sleep(0.3)
        raise AssertionError(
            f"{name}: {what} not reached; status: {json.dumps(status, indent=1)[-3000:]}\n"
            f"pods:\n{self.pod_summary()}\noperator log tail:\n{self.operator_log()[-3000:]}"
        )

    def wait_phase(self, name: str, phase: str, timeout: float = 240) -> dict[str, Any]:
        return self.wait(name, lambda s: s.get("phase") == phase, timeout, f"phase {phase}")

    # -- children ----------------------------------------------------------------------------------

    def list(self, kind: str, name: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": f"{LABEL_JOB}={name}"} if name else {}
        return self.api.ok(self.api.get(self.path(kind), params=params))["items"]  # type: ignore[no-any-return]

    def names(self, kind: str, name: str | None = None) -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.list(kind, name))

    def running_trainer_pods(self, name: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.list("pods", name)
            if p["metadata"]["labels"].get("app.kubernetes.io/component") == "trainer"
            and (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        ]

    def pod_summary(self) -> str:
        """Each pod's phase and state, and the log tail of every failed one (for failure messages)."""
        lines = []
        for pod in self.list("pods"):
            status = pod.get("status") or {}
            states = [c.get("state") for c in status.get("containerStatuses") or []]
            lines.append(f"  {pod['metadata']['name']} {status.get('phase')} {json.dumps(states)[:300]}")
            if status.get("phase") == "Failed":
                lines += ["    | " + line for line in self.pod_log(pod["metadata"]["name"], tail=25).splitlines()]
        return "\n".join(lines)

    def pod_log(self, pod: str, tail: int = 40) -> str:
        response = self.api.get(self.path("pods", pod) + "/log", params={"tailLines": tail})
        return response.text

    def progress(self, name: str) -> dict[str, Any]:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/jobs/{name}/progress.json")["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return {}
        return json.loads(body)  # type: ignore[no-any-return]

    def keys(self, *parts: str) -> list[str]:
        prefix = f"{self.prefix}/" + "/".join(parts)
        keys: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [item["Key"][len(prefix) :].lstrip("/") for item in page.get("Contents") or []]
        return keys

    def download(self, target: Path, *parts: str) -> Path:
        prefix = f"{self.prefix}/" + "/".join(parts) + "/"
        for key in self.keys(*parts):
            local = target / key
            local.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(self.bucket, prefix + key, str(local))
        return target

    def trainer_process(self, pod: dict[str, Any]) -> int:
        """The pid of the trainer (python -m kubetune.trainer) a pod runs: the kubelet's container
        process is podinit, whose descendants are the launcher, accelerate and the trainer."""
        root = int(pod["status"]["containerStatuses"][0]["containerID"].split("://")[1])
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        stack, found = [root], []
        while stack:
            pid = stack.pop()
            try:
                argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"kubetune.trainer" in argv and b"accelerate" not in b" ".join(argv) and pid != root:
                found.append(pid)
            stack += children.get(pid, [])
        assert len(found) == 1, f"expected one trainer process under {root}, found {found}"
        return found[0]


@pytest.fixture(scope="module")
def e2e(
    local_cluster: ClusterInfo,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[E2E]:
    from kubetune.dev.testing.shapes import generate

    stem = request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")[:30]
    namespace = f"{stem}-{uuid.uuid4().hex[:5]}"
    e2e = E2E(local_cluster, namespace, tmp_path_factory.mktemp("operator-logs"))
    e2e.api.ok(
        e2e.api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    )
    default_secret = e2e.api.ok(e2e.api.get(f"/api/v1/namespaces/default/secrets/{S3_SECRET}"))
    e2e.api.ok(
        e2e.api.post(
            e2e.path("secrets"),
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": S3_SECRET},
                "data": default_secret["data"],
            },
        )
    )
    # the tiny model and the URL list (images on the cluster's image server) in S3
    for path in sorted(p for p in tiny_model_dir.rglob("*") if p.is_file()):
        e2e.s3.upload_file(
            str(path), e2e.bucket, f"{e2e.prefix}/models/tiny-sd/{path.relative_to(tiny_model_dir).as_posix()}"
        )
    folder = Path(local_cluster.state_dir) / "images" / namespace
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for image in generate(IMAGES, size=64):
        (folder / f"{image.name}.jpg").write_bytes(image.jpeg)
        lines.append(
            json.dumps({"url": f"{local_cluster.images_url}/{namespace}/{image.name}.jpg", "caption": image.caption})
        )
    e2e.s3.put_object(Bucket=e2e.bucket, Key=f"{e2e.prefix}/urls.jsonl", Body=("\n".join(lines) + "\n").encode())
    e2e.start_operator()
    try:
        yield e2e
    finally:
        e2e.stop_operator()
        e2e.api.delete(f"/api/v1/namespaces/{namespace}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and e2e.api.get(f"/api/v1/namespaces/{namespace}").status_code == 200:
            time.sleep(0.2)


@pytest.fixture
def bare_e2e(local_cluster_factory: Any, tmp_path: Path) -> Iterator[E2E]:
    """An E2E on a private local cluster whose pods never run (Jobs get pods that stay Pending),
    with a namespace and the S3 credentials Secret but no model or data: for tests of the operator
    process itself (its API requests, several replicas), not of the pods' work. The caller starts
    the operator; it is stopped afterwards."""
    cluster = local_cluster_factory(run_pods=False, images=False)
    assert cluster.info is not None
    e2e = E2E(cluster.info, f"bare-{uuid.uuid4().hex[:5]}", tmp_path)
    e2e.api.ok(
        e2e.api.post(
            "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": e2e.namespace}}
        )
    )
    secret = e2e.api.ok(e2e.api.get(f"/api/v1/namespaces/default/secrets/{S3_SECRET}"))
    e2e.api.ok(
        e2e.api.post(
            e2e.path("secrets"),
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": S3_SECRET}, "data": secret["data"]},
        )
    )
    try:
        yield e2e
    finally:
        e2e.stop_operator()


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def chart_roles() -> Callable[..., list[dict[str, Any]]]:
    """chart_roles(*--set items, namespace="kubetune") -> the Roles and ClusterRoles `helm template`
    renders for a release "kt" in `namespace` (with the helm tests/chart installs in .tools/bin)."""
    import yaml

    helm = REPO / ".tools" / "bin" / "helm"
    if not os.access(helm, os.X_OK):
        subprocess.run([sys.executable, str(REPO / ".ci" / "get-tools.py"), str(helm.parent)], check=True, timeout=300)

    def render(*sets: str, namespace: str = "kubetune") -> list[dict[str, Any]]:
        args = [str(helm), "template", "kt", str(REPO / "charts" / "kubetune"), "--namespace", namespace]
        for item in sets:
            args += ["--set", item]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
        return [o for o in yaml.safe_load_all(done.stdout) if o and o["kind"] in ("Role", "ClusterRole")]

    return render


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
