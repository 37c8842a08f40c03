"""The local cluster's audit log (RBAC attributes of each request of a non-admin user) and the RBAC
rule matcher the operator's RBAC tests use."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from kubetune.dev.cluster.apiserver import request_attributes
from kubetune.dev.testing import rbac


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/a/pods/p", {}, ("get", "", "pods", "", "a", "p")),
        ("GET", "/api/v1/namespaces/a/pods", {}, ("list", "", "pods", "", "a", "")),
        ("GET", "/api/v1/pods", {"watch": "true"}, ("watch", "", "pods", "", "", "")),
        ("GET", "/api/v1/namespaces/a/pods/p/log", {}, ("get", "", "pods", "log", "a", "p")),
        ("POST", "/apis/batch/v1/namespaces/a/jobs", {}, ("create", "batch", "jobs", "", "a", "")),
        ("PATCH", "/apis/k.dev/v1/namespaces/a/ftjs/x/status", {}, ("patch", "k.dev", "ftjs", "status", "a", "x")),
        (
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/a/leases/l",
            {},
            ("update", "coordination.k8s.io", "leases", "", "a", "l"),
        ),
        ("DELETE", "/apis/batch/v1/namespaces/a/jobs/j", {}, ("delete", "batch", "jobs", "", "a", "j")),
        ("DELETE", "/apis/batch/v1/namespaces/a/jobs", {}, ("deletecollection", "batch", "jobs", "", "a", "")),
        ("GET", "/api/v1/namespaces/a", {}, ("get", "", "namespaces", "", "a", "a")),
    ],
)
def test_request_attributes_follow_kubernetes(
    method: str, path: str, query: dict[str, str], expected: tuple[str, ...]
) -> None:
    attributes = request_attributes(method, path, query)
    keys = ("verb", "apiGroup", "resource", "subresource", "namespace", "name")
    assert tuple(attributes[k] for k in keys) == expected


def test_discovery_is_a_non_resource_url() -> None:
    for path in ("/api", "/apis", "/apis/batch/v1", "/api/v1", "/version", "/openapi/v3"):
        assert request_attributes("GET", path, {}) == {"verb": "get", "nonResourceURL": path}


ROLE: dict[str, Any] = {
    "kind": "Role",
    "metadata": {"name": "r", "namespace": "a"},
    "rules": [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["l"], "verbs": ["get"]},
    ],
}


def test_a_role_allows_its_rules_in_its_namespace_only() -> None:
    job = request_attributes("POST", "/apis/batch/v1/namespaces/a/jobs", {})
    assert rbac.allows([ROLE], job)
    assert not rbac.allows([ROLE], {**job, "namespace": "b"})
    assert not rbac.allows([ROLE], request_attributes("GET", "/apis/batch/v1/jobs", {}))  # all namespaces
    assert rbac.allows([{**ROLE, "kind": "ClusterRole"}], request_attributes("GET", "/apis/batch/v1/jobs", {}))
    assert not rbac.allows([ROLE], request_attributes("DELETE", "/apis/batch/v1/namespaces/a/jobs/j", {}))
    # a subresource needs its own grant; the resource's does not cover it, nor the reverse
    assert rbac.allows([ROLE], request_attributes("GET", "/api/v1/namespaces/a/pods/p/log", {}))
    assert not rbac.allows([ROLE], request_attributes("GET", "/api/v1/namespaces/a/pods/p", {}))
    # resourceNames
    assert rbac.allows([ROLE], request_attributes("GET", "/apis/coordination.k8s.io/v1/namespaces/a/leases/l", {}))
    assert not rbac.allows([ROLE], request_attributes("GET", "/apis/coordination.k8s.io/v1/namespaces/a/leases/m", {}))
    # discovery: everyone's
    assert rbac.allows([], request_attributes("GET", "/apis/batch/v1", {}))
    assert rbac.denied([ROLE], [job, {**job, "verb": "patch"}]) == ["patch batch jobs in a"]


def test_only_requests_with_a_non_admin_token_are_recorded(local_cluster: Any) -> None:
    url = f"{local_cluster.api_url}/api/v1/namespaces/default/secrets"
    requests.get(url, timeout=10)  # no token
    requests.get(url, headers={"Authorization": "Bearer kubetune-dev"}, timeout=10)  # the admin
    requests.get(
        url,
        headers={"Authorization": "Bearer audited-user"},
        params={"watch": "true", "timeoutSeconds": "1"},
        timeout=10,
    )
    requests.get(url + "/missing", headers={"Authorization": "Bearer audited-user"}, timeout=10)
    records = local_cluster.audit("audited-user")
    assert [(r["verb"], r["resource"], r["namespace"], r["code"]) for r in records] == [
        ("watch", "secrets", "default", 200),
        ("get", "secrets", "default", 404),
    ]
    assert all(r["user"] == "audited-user" for r in records)
    assert local_cluster.audit("kubetune-dev") == [] and local_cluster.audit("system:anonymous") == []
