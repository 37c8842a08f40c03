"""Several operator replicas (`--leader-elect`, as the chart runs them) against the local cluster:
only the Lease's holder reconciles, so nothing is created twice; when the leader is killed a
standby takes over within the lease, and when it stops normally at once (it hands the Lease back).

The cluster runs no pods (Jobs stay at their collector): the operator's own behaviour is what is
tested. The replicas' requests are also checked against the chart's RBAC (the Lease's Role
included), as the chart would deploy them in this namespace.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import requests

from kubetune.dev.testing import rbac, wait_for
from kubetune.launch import free_port

pytestmark = pytest.mark.slow

LEASE = "kt-kubetune"  # what the chart names it for a release "kt"
LEASE_SECONDS = 3.0


def holder(e2e: Any) -> str:
    response = e2e.api.get(f"/apis/coordination.k8s.io/v1/namespaces/{e2e.namespace}/leases/{LEASE}")
    return str((response.json().get("spec") or {}).get("holderIdentity") or "") if response.ok else ""


def leader_of(e2e: Any, replicas: list[Any]) -> Any:
    def find() -> Any:
        name = holder(e2e)
        return next((p for p in replicas if name.endswith(f"_{p.pid}") and p.poll() is None), None)

    return wait_for(find, timeout=30, interval=0.1)


def collector_events(e2e: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in e2e.api.ok(e2e.api.get(e2e.path("events")))["items"]:
        if event["reason"] == "CollectionStarted":
            counts[event["involvedObject"]["name"]] = counts.get(event["involvedObject"]["name"], 0) + 1
    return counts


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def assert_one_set(e2e: Any, names: list[str]) -> None:
    """Each job has its one collector Job and one CollectionStarted event, nothing twice."""
    assert sorted(o["metadata"]["name"] for o in e2e.list("jobs")) == sorted(f"{n}-collect" for n in names)
    assert collector_events(e2e) == dict.fromkeys(names, 1)
    assert e2e.list("services") == []


def test_two_replicas_one_leader_no_duplicates_and_a_bounded_takeover(bare_e2e: Any, chart_roles: Any) -> None:
    e2e = bare_e2e
    flags = ("--leader-elect", f"--leader-elect-lease={LEASE}", f"--leader-elect-lease-seconds={LEASE_SECONDS}")
    flags += (f"--leader-elect-namespace={e2e.namespace}",)
    replicas = [e2e.spawn_operator(*flags), e2e.spawn_operator(*flags)]
    try:
        first = leader_of(e2e, replicas)
        names = [f"job-{i}" for i in range(3)]
        for name in names:
            e2e.create(name, e2e.spec(name))
        for name in names:
            e2e.wait_phase(name, "Collecting", timeout=60)
        time.sleep(2)  # resyncs: a standby acting would duplicate something by now
        assert_one_set(e2e, names)

        # the leader's node is lost: SIGKILL, no hand-over; the standby takes over within the lease
        e2e.stop_operator(signal.SIGKILL, process=first)
        killed = time.monotonic()
        e2e.create("after-kill", e2e.spec("after-kill"))
        e2e.wait_phase("after-kill", "Collecting", timeout=30)
        took = time.monotonic() - killed
        assert took < LEASE_SECONDS + 6, f"the standby took {took:.1f} s to take over"
        second = leader_of(e2e, replicas)
        assert second is not first
        names.append("after-kill")
        assert_one_set(e2e, names)
        # and the jobs the old leader started go on: a suspension reaches job-0's collector Job
        e2e.patch_spec("job-0", {"suspend": True})
        e2e.wait_phase("job-0", "Suspended", timeout=30)
        job = e2e.api.ok(e2e.api.get(e2e.path("jobs", "job-0-collect")))
        assert job["spec"]["suspend"] is True

        # an upgrade: a new replica starts, the leader stops normally and hands the Lease back
        replicas.append(e2e.spawn_operator(*flags))
        log = e2e.log_dir / f"operator-{e2e.operator_starts}.log"
        wait_for(lambda: "waiting to lead" in log.read_text(errors="replace"), timeout=60, interval=0.1)
        e2e.stop_operator(signal.SIGTERM, process=second)
        stopped = time.monotonic()
        e2e.create("after-stop", e2e.spec("after-stop"))
        e2e.wait_phase("after-stop", "Collecting", timeout=30)
        took = time.monotonic() - stopped
        assert took < LEASE_SECONDS, f"the new replica took {took:.1f} s after a hand-over"
        names.append("after-stop")
        time.sleep(1.5)
        assert_one_set(e2e, names)

        # a standby is alive (/healthz for the chart's probes) and stops at once on SIGTERM
        port = free_port()
        standby = e2e.spawn_operator(*flags, "--liveness-port", str(port))
        replicas.append(standby)
        healthz = f"http://127.0.0.1:{port}/healthz"
        wait_for(lambda: _ok(healthz), timeout=60, interval=0.2)
        standby.send_signal(signal.SIGTERM)
        assert standby.wait(5) == 0
    finally:
        for process in replicas:
            e2e.stop_operator(process=process)

    roles = chart_roles(f"watchNamespaces={{{e2e.namespace}}}", namespace=e2e.namespace)
    requests = e2e.cluster.audit(e2e.user)
    assert any(r.get("resource") == "leases" and r["verb"] == "update" for r in requests)
    assert not rbac.denied(roles, requests), rbac.denied(roles, requests)
