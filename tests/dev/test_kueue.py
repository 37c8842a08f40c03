"""The local cluster's Kueue against Kueue's documented contract (kueue.sigs.k8s.io: concepts/
workload, concepts/preemption, tasks/run/jobs): a Workload per queued Job, admission within a
ClusterQueue's quota by unsuspending the Job, eviction by suspending it (preemption, or
`spec.active: false`), and the quota released once its pods are gone."""

from __future__ import annotations

import uuid
from typing import Any

from kubetune.dev.testing import Api, condition, job_manifest, kueue_queue, kueue_workloads, wait_for

SLEEP = "import time, signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); time.sleep({})"


def jobs(ns: str) -> str:
    return f"/apis/batch/v1/namespaces/{ns}/jobs"


def queued_job(name: str, queue: str, seconds: float, pods: int = 1, **labels: str) -> dict[str, Any]:
    manifest = job_manifest(
        name, SLEEP.format(seconds), parallelism=pods, completions=pods, completionMode="Indexed", suspend=True
    )
    manifest["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": queue, **labels}
    return manifest


def job(api: Api, ns: str, name: str) -> dict[str, Any]:
    return api.ok(api.get(f"{jobs(ns)}/{name}"))  # type: ignore[no-any-return]


def workload(api: Api, ns: str, job_name: str) -> dict[str, Any]:
    uid = job(api, ns, job_name)["metadata"]["uid"]
    found = [w for w in kueue_workloads(api, ns) if w["metadata"]["labels"]["kueue.x-k8s.io/job-uid"] == uid]
    return found[0] if found else {}  # {} until Kueue made it


def cond(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def running(api: Api, ns: str, name: str) -> bool:
    return not job(api, ns, name)["spec"]["suspend"] and bool(job(api, ns, name).get("status", {}).get("active"))


def test_a_queued_job_gets_one_workload_and_runs_when_it_fits_the_quota(api: Api, k8s_namespace: str) -> None:
    ns, queue = k8s_namespace, f"q-{uuid.uuid4().hex[:6]}"
    kueue_queue(api, ns, queue, {"cpu": "1", "pods": 2})
    first, second = queued_job("first", queue, 1.5, pods=2), queued_job("second", queue, 0.2, pods=2)
    first["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "500m"}}
    api.ok(api.post(jobs(ns), first))
    api.ok(api.post(jobs(ns), second))
    wait_for(lambda: running(api, ns, "first"), timeout=30)
    owned = workload(api, ns, "first")
    assert owned["metadata"]["ownerReferences"][0]["name"] == "first"
    assert owned["spec"]["podSets"][0]["count"] == 2 and owned["spec"]["active"] is True
    assert cond(owned, "Admitted")["status"] == "True"
    assert owned["status"]["admission"]["podSetAssignments"][0]["resourceUsage"] == {"cpu": "1.000", "pods": "2"}
    # the second does not fit next to the first: it waits, suspended, until the first finishes
    waiting = wait_for(lambda: cond(workload(api, ns, "second"), "QuotaReserved").get("status") == "False", 10)
    assert waiting and job(api, ns, "second")["spec"]["suspend"] is True
    assert "insufficient unused quota" in cond(workload(api, ns, "second"), "QuotaReserved")["message"]
    wait_for(lambda: condition(job(api, ns, "second"), "Complete"), timeout=60)
    assert cond(workload(api, ns, "first"), "Finished")["status"] == "True"
    # a resource the ClusterQueue does not cover: never admitted
    gpu = queued_job("gpu", queue, 0.1)
    gpu["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    api.ok(api.post(jobs(ns), gpu))
    wait_for(lambda: "not covered" in cond(workload(api, ns, "gpu"), "QuotaReserved").get("message", ""), 10)
    assert job(api, ns, "gpu")["spec"]["suspend"] is True


def test_a_higher_priority_workload_preempts_and_the_preempted_job_is_readmitted(api: Api, k8s_namespace: str) -> None:
    ns, queue = k8s_namespace, f"q-{uuid.uuid4().hex[:6]}"
    kueue_queue(api, ns, queue, {"pods": 2}, preemption="LowerPriority")
    high = f"high-{uuid.uuid4().hex[:6]}"
    priority = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "WorkloadPriorityClass", "metadata": {"name": high}}
    api.ok(api.post("/apis/kueue.x-k8s.io/v1beta1/workloadpriorityclasses", {**priority, "value": 1000}))
    api.ok(api.post(jobs(ns), queued_job("low", queue, 8, pods=2)))
    wait_for(lambda: running(api, ns, "low"), timeout=30)
    api.ok(api.post(jobs(ns), queued_job("urgent", queue, 0.5, **{"kueue.x-k8s.io/priority-class": high})))
    evicted = wait_for(
        lambda: (lambda w: w if cond(w, "Evicted").get("status") == "True" else None)(workload(api, ns, "low")), 15
    )
    assert (
        cond(evicted, "Evicted")["reason"] == "Preempted" and cond(evicted, "Preempted")["reason"] == "InClusterQueue"
    )
    assert job(api, ns, "low")["spec"]["suspend"] is True  # Kueue suspends it; its pods are stopped
    wait_for(lambda: condition(job(api, ns, "urgent"), "Complete"), timeout=60)
    readmitted = wait_for(
        lambda: (lambda w: w if cond(w, "Admitted").get("status") == "True" else None)(workload(api, ns, "low")), 30
    )
    assert cond(readmitted, "Evicted")["status"] == "False"
    assert cond(readmitted, "Evicted")["message"].startswith("Previously: Preempted to accommodate")
    assert not job(api, ns, "low")["spec"]["suspend"]
    reasons = [e["reason"] for e in api.ok(api.get(f"/api/v1/namespaces/{ns}/events"))["items"]]
    assert {"CreatedWorkload", "Started", "Stopped"} <= set(reasons)


def test_deactivating_a_workload_stops_its_job_and_kueue_owns_suspend(api: Api, k8s_namespace: str) -> None:
    ns, queue = k8s_namespace, f"q-{uuid.uuid4().hex[:6]}"
    kueue_queue(api, ns, queue, {"pods": 1})
    api.ok(api.post(jobs(ns), queued_job("long", queue, 30)))
    wait_for(lambda: running(api, ns, "long"), timeout=30)
    # someone else suspending an admitted Job: Kueue starts it again
    api.ok(api.patch(f"{jobs(ns)}/long", {"spec": {"suspend": True}}))
    wait_for(lambda: running(api, ns, "long"), timeout=15)
    name = workload(api, ns, "long")["metadata"]["name"]
    path = f"/apis/kueue.x-k8s.io/v1beta1/namespaces/{ns}/workloads/{name}"
    api.ok(api.patch(path, {"spec": {"active": False}}))
    released = wait_for(
        lambda: (lambda w: w if cond(w, "QuotaReserved").get("status") == "False" else None)(workload(api, ns, "long")),
        30,
    )
    assert cond(released, "Evicted")["reason"] == "Deactivated" and "admission" not in released["status"]
    assert job(api, ns, "long")["spec"]["suspend"] is True and not job(api, ns, "long")["status"].get("active")
    api.ok(api.patch(path, {"spec": {"active": True}}))
    wait_for(lambda: running(api, ns, "long"), timeout=30)
    api.ok(api.delete(f"{jobs(ns)}/long", {"propagationPolicy": "Background"}))
    wait_for(lambda: not kueue_workloads(api, ns), timeout=30)  # the Workload goes with its Job
