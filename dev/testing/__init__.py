"""Test helpers for code that runs against the local cluster: a thin HTTP client, a poller,
Job and Pod manifests and condition lookup (used by tests/dev and the operator's end-to-end tests).

Beside them: `pytest_plugin` (the local cluster and S3 as pytest fixtures) and the offline
fixtures for tests, benchmarks and the demo: `shapes` (captioned generated images), `tiny_sd` (a
tiny Stable Diffusion pipeline) and `webapis` (stand-ins for the image search APIs)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import requests


class Api:
    """Raw HTTP against the API server, so each test states the exact request and response."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json", **kwargs: Any
    ) -> requests.Response:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, **kwargs.pop("headers", {})}
        return self.session.request(method, self.base + path, data=data, headers=headers, timeout=30, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, body, **kwargs)

    def put(self, path: str, body: Any, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, body, **kwargs)

    def patch(self, path: str, body: Any, kind: str = "merge", **kwargs: Any) -> requests.Response:
        types = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }
        return self.request("PATCH", path, body, content_type=types[kind], **kwargs)

    def delete(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, body, **kwargs)

    def ok(self, response: requests.Response) -> Any:
        assert response.status_code < 300, response.text
        return response.json()


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last value: {value!r}")
        time.sleep(interval)


def job_manifest(name: str, code: str, **spec: Any) -> dict[str, Any]:
    template_spec = {
        "restartPolicy": spec.pop("restartPolicy", "Never"),
        "containers": [
            {"name": "main", "image": "python:3.11", "command": ["python", "-c", code], **spec.pop("container", {})}
        ],
        **spec.pop("podSpec", {}),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"template": {"spec": template_spec}, **spec},
    }


def pod_manifest(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """A v1 Pod named NAME running CONTAINERS; SPEC adds the pod's other fields (restartPolicy, volumes...)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {**spec, "containers": containers}}


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype and c["status"] == "True"),
        None,
    )


def operator_command(python: str, scope: Sequence[str], metrics_port: int, image_tag: str, *extra: str) -> list[str]:
    """`kubetune operator` as the tests and the operator benchmark start it: `scope` is
    `--namespace NS` or `--all-namespaces`, images `kubetune-collector:<tag>` and
    `kubetune-trainer:<tag>` (never pulled: the local cluster runs kubetune from this checkout);
    `extra` comes last, so it overrides the flags before it."""
    return [python, "-m", "kubetune.cli", "operator", *scope, "--liveness-port", "0"] + [
        *("--metrics-port", str(metrics_port)),
        *("--collector-image", f"kubetune-collector:{image_tag}", "--trainer-image", f"kubetune-trainer:{image_tag}"),
        *extra,
    ]


def kueue_queue(api: Api, namespace: str, name: str, quota: dict[str, Any], *, preemption: str = "Never") -> None:
    """A Kueue ClusterQueue `name` with `quota` (resource -> nominalQuota) in one flavor, and a
    LocalQueue `name` in `namespace` pointing at it (the local cluster's Kueue admits from them).
    `preemption`: the ClusterQueue's withinClusterQueue policy (Never or LowerPriority)."""
    base = "/apis/kueue.x-k8s.io/v1beta1"
    resources = [{"name": resource, "nominalQuota": value} for resource, value in quota.items()]
    cluster_queue = {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {},
            "resourceGroups": [
                {"coveredResources": list(quota), "flavors": [{"name": "default", "resources": resources}]}
            ],
            "preemption": {"withinClusterQueue": preemption},
        },
    }
    api.ok(api.post(f"{base}/clusterqueues", cluster_queue))
    local = {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": name},
    }
    api.ok(api.post(f"{base}/namespaces/{namespace}/localqueues", local))


def kueue_workloads(api: Api, namespace: str) -> list[dict[str, Any]]:
    return api.ok(api.get(f"/apis/kueue.x-k8s.io/v1beta1/namespaces/{namespace}/workloads"))["items"]  # type: ignore[no-any-return]
