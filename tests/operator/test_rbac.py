"""The chart's RBAC rules against the requests the operator process really makes.

The local cluster's API server records every request of a non-admin user in its audit log with
its RBAC attributes (verb, apiGroup, resource, subresource, namespace); the operator runs with a
kubeconfig of its own user. Each recorded request must be allowed by the Role (watchNamespaces
set) or ClusterRole (the default) that `helm template` renders, and every verb the chart grants
must have been used: the rules are exactly what the code calls. test_e2e.py ends with the same
check on the whole e2e run's recording.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from kubetune.dev.testing import kueue_queue, kueue_workloads, rbac, wait_for

pytestmark = pytest.mark.slow


def run_jobs(e2e: Any) -> None:
    """One job that waits for a missing Secret, one that starts collecting (its pods never run on
    this cluster), and one queued in Kueue that is suspended (through its Workload), then a few
    resyncs, then the operator's shutdown."""
    bad = e2e.spec("bad", storage={"uri": e2e.uri("jobs", "bad") + "/", "credentialsSecretRef": {"name": "nope"}})
    e2e.create("bad", bad)
    e2e.create("good", e2e.spec("good"))
    kueue_queue(e2e.api, e2e.namespace, "team", {"cpu": "8", "memory": "32Gi", "pods": 8})
    e2e.create("queued", e2e.spec("queued", runPolicy={"queueName": "team"}))
    e2e.wait_phase("queued", "Collecting", timeout=60)
    wait_for(lambda: kueue_workloads(e2e.api, e2e.namespace), timeout=30)
    e2e.patch_spec("queued", {"suspend": True})
    e2e.wait_phase("queued", "Suspended", timeout=60)
    wait_for(lambda: kueue_workloads(e2e.api, e2e.namespace)[0]["spec"]["active"] is False, timeout=30)
    e2e.wait(
        "bad",
        lambda s: any(c["type"] == "SecretsReady" and c["status"] == "False" for c in s.get("conditions") or []),
        timeout=60,
        what="SecretsReady=False",
    )
    e2e.wait_phase("good", "Collecting", timeout=60)
    time.sleep(2.5)  # resyncs of the unfinished job (resync-seconds 1)
    e2e.stop_operator()


def check(roles: list[dict[str, Any]], requests: list[dict[str, Any]], mode: str) -> None:
    assert requests, f"{mode}: nothing recorded for the operator's user"
    assert not rbac.denied(roles, requests), f"{mode}: requests the chart's rules deny: {rbac.denied(roles, requests)}"
    failed = [f"{rbac.describe(r)} -> {r['code']}" for r in requests if r["code"] in (401, 403)]
    assert not failed
    # Kueue's Workloads: read by label and deactivated, nothing else
    kueue = {(r["verb"], r["resource"]) for r in requests if r.get("apiGroup") == "kueue.x-k8s.io"}
    assert kueue == {("list", "workloads"), ("patch", "workloads")}, kueue


def test_the_namespaced_role_allows_every_request_of_the_operator(bare_e2e: Any, chart_roles: Any) -> None:
    e2e = bare_e2e
    e2e.start_operator()
    run_jobs(e2e)
    roles = chart_roles(f"watchNamespaces={{{e2e.namespace}}}")
    assert {r["kind"] for r in roles} >= {"Role"} and "ClusterRole" not in {r["kind"] for r in roles}
    check(roles, e2e.cluster.audit(e2e.user), "namespaced")


def test_the_cluster_role_allows_every_request_of_an_all_namespaces_operator(bare_e2e: Any, chart_roles: Any) -> None:
    e2e = bare_e2e
    e2e.operator = e2e.spawn_operator(scope=("--all-namespaces",))
    run_jobs(e2e)
    roles = [r for r in chart_roles() if r["kind"] == "ClusterRole"]
    requests = e2e.cluster.audit(e2e.user)
    check(roles, requests, "cluster-wide")
    # all-namespaces watches: list and watch with no namespace
    assert any(r["verb"] == "watch" and r["resource"] == "finetunejobs" and not r["namespace"] for r in requests)
