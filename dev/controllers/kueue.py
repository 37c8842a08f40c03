"""A small Kueue (https://kueue.sigs.k8s.io) for the local cluster: quota-based admission of
batch/v1 Jobs that carry the `kueue.x-k8s.io/queue-name` label, with Kueue's own objects and
their documented contract, so that the operator is tested against what Kueue does.

Objects (kueue.x-k8s.io/v1beta1, CRDs installed with the cluster: `kueue_crds`):

- ClusterQueue (cluster-scoped): `spec.resourceGroups[].flavors[].resources[]` {name, nominalQuota}
  (a resource's quota is summed over the flavors); `spec.preemption.withinClusterQueue`: Never
  (default) or LowerPriority.
- LocalQueue (namespaced): `spec.clusterQueue`. A Job's queue-name label names a LocalQueue.
- WorkloadPriorityClass (cluster-scoped): `value`; a Job's `kueue.x-k8s.io/priority-class` label
  names one (priority 0 otherwise).
- Workload (namespaced): made by this controller for each queued Job, owned by it (the garbage
  collector deletes it with the Job), labelled `kueue.x-k8s.io/job-uid`, one podSet `main` with
  count = the Job's parallelism (an Indexed Job's pods are admitted together).

What it does, as Kueue does (docs: concepts/workload, concepts/preemption, tasks/run/jobs):

- A queued Job runs only while its Workload is admitted: an admitted Workload's Job is unsuspended
  (also when something else suspends it: Kueue owns `suspend`), any other one's is suspended.
- Admission (BestEffortFIFO): pending Workloads (active, no quota reserved) by priority, then age;
  one is admitted when its requests (containers' requests x count, and `pods`) fit the
  ClusterQueue's nominal quota next to the admitted ones: QuotaReserved and Admitted True,
  `status.admission`. A resource the ClusterQueue does not cover makes it inadmissible.
- Preemption (withinClusterQueue: LowerPriority): a pending Workload that does not fit evicts
  admitted ones of lower priority (lowest first, the most recently admitted first) until it would:
  Evicted True (reason Preempted) and Preempted True (reason InClusterQueue) on each.
- `spec.active: false` on an admitted Workload evicts it (reason Deactivated); it is not queued
  again until `spec.active` is true.
- An evicted Workload's Job is suspended; once none of its pods is left, the quota is released
  (QuotaReserved and Admitted False) and an active Workload is queued again (Requeued True).
  Readmission sets Evicted False (reason QuotaReserved, message "Previously: ...").
- A finished Job's Workload is Finished and holds no quota; a deleted Job's goes with it.

Not modelled: flavors' node labels and tolerations (admission injects none), cohorts and
borrowing, admission checks, partial admission, waitForPodsReady, fair sharing, requeue backoff,
PriorityClass-based priority.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from kubetune.dev.cluster.errors import ApiError
from kubetune.dev.cluster.jsoncopy import clone
from kubetune.dev.cluster.resources import Registry
from kubetune.dev.cluster.status import record_event
from kubetune.dev.cluster.store import Key, Obj, Store, timestamp

log = logging.getLogger("kubetune.dev.controllers.kueue")

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta1"
QUEUE_LABEL = f"{GROUP}/queue-name"
PRIORITY_LABEL = f"{GROUP}/priority-class"
JOB_UID_LABEL = f"{GROUP}/job-uid"
WORKLOADS: Key = (GROUP, "workloads")
CLUSTER_QUEUES: Key = (GROUP, "clusterqueues")
LOCAL_QUEUES: Key = (GROUP, "localqueues")
PRIORITY_CLASSES: Key = (GROUP, "workloadpriorityclasses")
JOBS: Key = ("batch", "jobs")

_SUFFIXES = {
    "m": Decimal("0.001"),
    "k": Decimal(1000),
    "M": Decimal(1000) ** 2,
    "G": Decimal(1000) ** 3,
    "T": Decimal(1000) ** 4,
    "Ki": Decimal(1024),
    "Mi": Decimal(1024) ** 2,
    "Gi": Decimal(1024) ** 3,
    "Ti": Decimal(1024) ** 4,
}


def quantity(value: Any) -> Decimal:
    """A Kubernetes quantity (`500m`, `2`, `16Gi`) as a number."""
    text = str(value).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return Decimal(text)


def kueue_crds() -> list[Obj]:
    """The CRDs of the objects above; their schemas keep every field (Kueue's own are stricter)."""

    def crd(kind: str, plural: str, scope: str, status: bool) -> Obj:
        version: Obj = {
            "name": VERSION,
            "served": True,
            "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        }
        if status:
            version["subresources"] = {"status": {}}
        return {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{GROUP}"},
            "spec": {
                "group": GROUP,
                "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                "scope": scope,
                "versions": [version],
            },
        }

    return [
        crd("Workload", "workloads", "Namespaced", True),
        crd("ClusterQueue", "clusterqueues", "Cluster", True),
        crd("LocalQueue", "localqueues", "Namespaced", True),
        crd("WorkloadPriorityClass", "workloadpriorityclasses", "Cluster", False),
    ]


def condition(obj: Obj, kind: str) -> Obj | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond  # type: ignore[no-any-return]
    return None


def is_true(obj: Obj, kind: str) -> bool:
    cond = condition(obj, kind)
    return cond is not None and cond.get("status") == "True"


def set_condition(workload: Obj, kind: str, status: str, reason: str, message: str) -> None:
    """A metav1.Condition: lastTransitionTime moves when the status does."""
    conditions = workload.setdefault("status", {}).setdefault("conditions", [])
    cond = condition(workload, kind)
    if cond is None:
        conditions.append({"type": kind, "status": status, "reason": reason, "message": message})
        cond = conditions[-1]
        cond["lastTransitionTime"] = timestamp()
    elif cond["status"] != status:
        cond["lastTransitionTime"] = timestamp()
    cond.update(status=status, reason=reason, message=message)


def pod_requests(template: Obj) -> dict[str, Decimal]:
    """What one pod asks for: its containers' requests (limits where a request is missing, as
    the API server defaults them), and one `pods`."""
    total: dict[str, Decimal] = {"pods": Decimal(1)}
    for container in (template.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        for name, value in merged.items():
            total[name] = total.get(name, Decimal(0)) + quantity(value)
    return total


def requests_of(workload: Obj) -> dict[str, Decimal]:
    total: dict[str, Decimal] = {}
    for pod_set in workload["spec"].get("podSets") or []:
        for name, value in pod_requests(pod_set.get("template") or {}).items():
            total[name] = total.get(name, Decimal(0)) + value * int(pod_set.get("count", 1))
    return total


def nominal_quota(cluster_queue: Obj) -> dict[str, Decimal]:
    quota: dict[str, Decimal] = {}
    for group in (cluster_queue.get("spec") or {}).get("resourceGroups") or []:
        for flavor in group.get("flavors") or []:
            for resource in flavor.get("resources") or []:
                name = resource["name"]
                quota[name] = quota.get(name, Decimal(0)) + quantity(resource.get("nominalQuota", 0))
    return quota


def fits(request: dict[str, Decimal], used: dict[str, Decimal], quota: dict[str, Decimal]) -> bool:
    return all(used.get(name, Decimal(0)) + value <= quota.get(name, Decimal(0)) for name, value in request.items())


def add(used: dict[str, Decimal], request: dict[str, Decimal], sign: int = 1) -> None:
    for name, value in request.items():
        used[name] = used.get(name, Decimal(0)) + sign * value


class Kueue:
    """Runs as part of the controllers' pass (`reconcile`), on the API server's loop."""

    def __init__(self, store: Store, registry: Registry) -> None:
        self.store = store
        self.registry = registry

    def reconcile(self, pods_of: Callable[[str], list[Obj]]) -> None:
        """One pass: `pods_of(job uid)` gives a Job's pods."""
        workload_type = self.registry.get(GROUP, VERSION, "workloads")
        if workload_type is None:
            return  # the CRDs are not installed (yet)
        jobs = {
            j["metadata"]["uid"]: j
            for j in self.store.all(JOBS)
            if (j["metadata"].get("labels") or {}).get(QUEUE_LABEL)
        }
        workloads: dict[str, Obj] = {}  # job uid -> its Workload
        for workload in self.store.all(WORKLOADS):
            for ref in workload["metadata"].get("ownerReferences") or []:
                if ref.get("controller") and ref.get("uid") in jobs:
                    workloads[ref["uid"]] = clone(workload)
        for uid, job in jobs.items():
            if uid not in workloads and not _finished(job) and not job["metadata"].get("deletionTimestamp"):
                workloads[uid] = self._create_workload(workload_type, job)
        changed: dict[str, Obj] = {}
        for uid, workload in workloads.items():
            before = clone(workload)
            self._follow(workload, jobs[uid], pods_of(uid))
            if workload != before:
                changed[uid] = workload
        self._admit(workloads, changed)
        for uid, workload in workloads.items():
            self._sync_job(workload, jobs[uid])
        for workload in changed.values():
            self._write(WORKLOADS, workload)

    # -- one Workload --------------------------------------------------------------------------

    def _create_workload(self, rt: Any, job: Obj) -> Obj:
        meta = job["metadata"]
        digest = hashlib.sha256(meta["uid"].encode()).hexdigest()[:5]
        priority_class = (meta.get("labels") or {}).get(PRIORITY_LABEL, "")
        priority = 0
        if priority_class:
            found = self.store.find(PRIORITY_CLASSES, "", priority_class)
            priority = int((found or {}).get("value", 0))
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Workload",
            "metadata": {
                "name": f"job-{meta['name']}-{digest}"[:253],
                "labels": {JOB_UID_LABEL: meta["uid"]},
                "ownerReferences": [controlled_by_job(meta)],
            },
            "spec": {
                "active": True,
                "queueName": meta["labels"][QUEUE_LABEL],
                "priority": priority,
                **(
                    {"priorityClassName": priority_class, "priorityClassSource": f"{GROUP}/workloadpriorityclass"}
                    if priority_class
                    else {}
                ),
                "podSets": [
                    {
                        "name": "main",
                        "count": int(job["spec"].get("parallelism", 1)),
                        "template": clone(job["spec"]["template"]),
                    }
                ],
            },
        }
        created = self.store.create(rt, meta["namespace"], body).obj
        record_event(
            self.store,
            job,
            "CreatedWorkload",
            f"Created Workload: {meta['namespace']}/{created['metadata']['name']}",
            component="kueue",
        )
        return clone(created)

    def _follow(self, workload: Obj, job: Obj, pods: list[Obj]) -> None:
        """Finished, deactivated, and the release of an evicted Workload's quota."""
        if is_true(workload, "Finished"):
            return
        if _finished(job):
            set_condition(workload, "Finished", "True", "JobFinished", "Job finished")
            return
        reserved = is_true(workload, "QuotaReserved")
        active = workload["spec"].get("active", True) is not False
        if reserved and not active and not is_true(workload, "Evicted"):
            set_condition(workload, "Evicted", "True", "Deactivated", "The workload is deactivated")
        if reserved and is_true(workload, "Evicted"):
            running = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
            if job["spec"].get("suspend") and not running:
                reason = (condition(workload, "Evicted") or {}).get("reason", "Evicted")
                set_condition(workload, "QuotaReserved", "False", reason, "The workload has no reservation")
                set_condition(workload, "Admitted", "False", "NoReservation", "The workload has no reservation")
                workload["status"].pop("admission", None)
                if active:
                    set_condition(workload, "Requeued", "True", reason, "The workload is queued again")

    def _sync_job(self, workload: Obj, job: Obj) -> None:
        """The Job runs exactly while its Workload is admitted and not evicted."""
        if _finished(job) or job["metadata"].get("deletionTimestamp"):
            return
        run = is_true(workload, "Admitted") and not is_true(workload, "Evicted")
        if bool(job["spec"].get("suspend")) == (not run):
            return
        job = clone(job)
        job["spec"]["suspend"] = not run
        self._write(JOBS, job)
        record_event(
            self.store,
            job,
            "Started" if run else "Stopped",
            "Admitted by clusterQueue" if run else "Suspended by Kueue",
            component="kueue",
        )

    # -- admission and preemption ------------------------------------------------------------------

    def _cluster_queue_of(self, workload: Obj) -> Obj | None:
        local = self.store.find(LOCAL_QUEUES, workload["metadata"]["namespace"], workload["spec"].get("queueName", ""))
        name = ((local or {}).get("spec") or {}).get("clusterQueue", "")
        return self.store.find(CLUSTER_QUEUES, "", name) if name else None

    def _admit(self, workloads: dict[str, Obj], changed: dict[str, Obj]) -> None:
        queues: dict[str, Obj] = {}
        admitted: dict[str, list[tuple[str, Obj]]] = {}
        pending: dict[str, list[tuple[str, Obj]]] = {}
        for uid, workload in workloads.items():
            queue = self._cluster_queue_of(workload)
            if queue is None or is_true(workload, "Finished"):
                continue
            name = queue["metadata"]["name"]
            queues[name] = queue
            if is_true(workload, "QuotaReserved"):
                admitted.setdefault(name, []).append((uid, workload))
            elif workload["spec"].get("active", True) is not False:
                pending.setdefault(name, []).append((uid, workload))
        for name, queue in queues.items():
            quota = nominal_quota(queue)
            used: dict[str, Decimal] = {}
            for _, workload in admitted.get(name, []):
                add(used, requests_of(workload))
            order = sorted(
                pending.get(name, []),
                key=lambda item: (-int(item[1]["spec"].get("priority", 0)), item[1]["metadata"]["creationTimestamp"]),
            )
            for uid, workload in order:
                request = requests_of(workload)
                uncovered = sorted(set(request) - set(quota))
                if uncovered:
                    message = f"resources {', '.join(uncovered)} are not covered by ClusterQueue {name}"
                    self._pending(workload, changed, uid, message)
                    continue
                if fits(request, used, quota):
                    add(used, request)
                    self._reserve(workload, name, request)
                    changed[uid] = workload
                    admitted.setdefault(name, []).append((uid, workload))
                    continue
                message = f"couldn't assign flavors: insufficient unused quota in ClusterQueue {name}"
                self._pending(workload, changed, uid, message)
                if (queue.get("spec") or {}).get("preemption", {}).get("withinClusterQueue") == "LowerPriority":
                    self._preempt(workload, request, used, quota, admitted.get(name, []), changed, name)

    def _pending(self, workload: Obj, changed: dict[str, Obj], uid: str, message: str) -> None:
        cond = condition(workload, "QuotaReserved")
        if cond is None or cond.get("message") != message:
            set_condition(workload, "QuotaReserved", "False", "Pending", message)
            changed[uid] = workload

    def _reserve(self, workload: Obj, queue: str, request: dict[str, Decimal]) -> None:
        status = workload.setdefault("status", {})
        status["admission"] = {
            "clusterQueue": queue,
            "podSetAssignments": [
                {
                    "name": "main",
                    "count": workload["spec"]["podSets"][0].get("count", 1),
                    "flavors": {resource: "default" for resource in request},
                    "resourceUsage": {resource: str(value) for resource, value in request.items()},
                }
            ],
        }
        message = f"Quota reserved in ClusterQueue {queue}"
        set_condition(workload, "QuotaReserved", "True", "QuotaReserved", message)
        set_condition(workload, "Admitted", "True", "Admitted", "The workload is admitted")
        evicted = condition(workload, "Evicted")
        if evicted is not None and evicted["status"] == "True":
            set_condition(workload, "Evicted", "False", "QuotaReserved", f"Previously: {evicted.get('message', '')}")
        if is_true(workload, "Preempted"):
            preempted = condition(workload, "Preempted") or {}
            set_condition(
                workload, "Preempted", "False", "QuotaReserved", f"Previously: {preempted.get('message', '')}"
            )
        if is_true(workload, "Requeued"):
            set_condition(workload, "Requeued", "False", "QuotaReserved", message)

    def _preempt(
        self,
        preemptor: Obj,
        request: dict[str, Decimal],
        used: dict[str, Decimal],
        quota: dict[str, Decimal],
        admitted: list[tuple[str, Obj]],
        changed: dict[str, Obj],
        queue: str,
    ) -> None:
        """Evict lower-priority Workloads until `preemptor` would fit; those already evicted count
        as freed (their quota is released once their pods are gone)."""
        priority = int(preemptor["spec"].get("priority", 0))
        freed = dict(used)
        for _, workload in admitted:
            if is_true(workload, "Evicted"):
                add(freed, requests_of(workload), -1)
        if fits(request, freed, quota):
            return  # the preemptions already under way make room
        candidates = sorted(
            (
                (uid, w)
                for uid, w in admitted
                if not is_true(w, "Evicted") and int(w["spec"].get("priority", 0)) < priority
            ),
            key=lambda item: (
                int(item[1]["spec"].get("priority", 0)),
                _negated((condition(item[1], "QuotaReserved") or {}).get("lastTransitionTime", "")),
            ),
        )
        victims = []
        for uid, workload in candidates:
            victims.append((uid, workload))
            add(freed, requests_of(workload), -1)
            if fits(request, freed, quota):
                break
        else:
            return  # evicting every candidate would not make room: nobody is evicted
        message = f"Preempted to accommodate a workload (UID: {preemptor['metadata']['uid']}) in the ClusterQueue"
        for uid, workload in victims:
            set_condition(workload, "Evicted", "True", "Preempted", message)
            set_condition(workload, "Preempted", "True", "InClusterQueue", message)
            changed[uid] = workload
            log.info("preempted Workload %s in ClusterQueue %s", workload["metadata"]["name"], queue)

    def _write(self, key: Key, obj: Obj) -> None:
        with contextlib.suppress(ApiError):  # deleted meanwhile: the next pass sees it gone
            self.store.internal_write(key, obj)


def _finished(job: Obj) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


def _negated(text: str) -> tuple[int, ...]:
    """Sorts RFC 3339 timestamps newest first."""
    return tuple(-ord(char) for char in text)


def controlled_by_job(meta: Obj) -> Obj:
    """The ownerReference a Job's pods (and Kueue's Workload) carry: the Job controls them."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
