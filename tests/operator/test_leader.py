"""The Lease-based leader election (operator/leader.py) against the local cluster's API server."""

from __future__ import annotations

import threading
import time
from typing import Any

from kubetune.operator.leader import LeaderElection


def elector(local_cluster: Any, namespace: str, identity: str, lost: list[str] | None = None) -> LeaderElection:
    return LeaderElection(
        local_cluster.api_client(),
        namespace,
        "op",
        identity,
        lease=1.5,
        on_lost=(lambda: lost.append(identity)) if lost is not None else None,
    )


def lease_spec(local_cluster: Any, namespace: str) -> dict[str, Any]:
    a = elector(local_cluster, namespace, "reader")
    code, lease = a._call("GET", a.path)
    assert code == 200
    return dict(lease["spec"])


def test_one_leader_then_takeover_after_the_lease_then_hand_over(local_cluster: Any, k8s_namespace: str) -> None:
    a, b = elector(local_cluster, k8s_namespace, "a"), elector(local_cluster, k8s_namespace, "b")
    assert a.acquire()
    assert not b.try_acquire_or_renew()  # a renews: b stays out
    time.sleep(1.0)
    assert not b.try_acquire_or_renew()
    assert lease_spec(local_cluster, k8s_namespace)["holderIdentity"] == "a"

    # a is lost without handing over (its renewals stop): b leads once the lease has run out
    a._stop.set()
    start = time.monotonic()
    assert b.acquire(threading.Event())
    took = time.monotonic() - start
    assert 1.0 < took < 3.5, took
    spec = lease_spec(local_cluster, k8s_namespace)
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1

    # b stops normally: it hands the Lease back, c leads at once
    b.release()
    assert lease_spec(local_cluster, k8s_namespace)["holderIdentity"] == ""
    c = elector(local_cluster, k8s_namespace, "c")
    start = time.monotonic()
    assert c.acquire()
    assert time.monotonic() - start < 0.5
    c.release()


def test_concurrent_candidates_elect_exactly_one(local_cluster: Any, k8s_namespace: str) -> None:
    candidates = [elector(local_cluster, k8s_namespace, f"c{i}") for i in range(4)]
    results: list[bool] = []
    barrier = threading.Barrier(len(candidates))

    def run(candidate: LeaderElection) -> None:
        barrier.wait()
        results.append(candidate.try_acquire_or_renew())

    threads = [threading.Thread(target=run, args=(c,)) for c in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, False, False, True]


def test_a_leader_that_cannot_renew_gives_up_before_the_lease_runs_out(local_cluster: Any, k8s_namespace: str) -> None:
    lost: list[str] = []
    a = elector(local_cluster, k8s_namespace, "a", lost)
    assert a.acquire()
    a.path = a.path + "-unreachable"  # renewals fail from now on (404)
    time.sleep(a.renew_deadline + 2 * a.retry + 0.3)
    assert lost == ["a"] and not a.leading
    a.release()
