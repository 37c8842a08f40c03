"""The control plane's controllers: Job, garbage collector, namespace lifecycle, CRD lifecycle,
TTL-after-finished (the conditions and events they write: kubetune.dev.cluster.status), and a
small Kueue (kueue.py) for Jobs with its queue label.

They run on the API server's loop and act on the store the way kube-controller-manager acts
through the API: every change is a normal write (watchers see it, resourceVersions move). Each
pass is idempotent, and a pass runs after every write and on a short tick (for timers such as
activeDeadlineSeconds, pod-creation backoff and ttlSecondsAfterFinished).

Job semantics follow https://kubernetes.io/docs/concepts/workloads/controllers/job/: pods carry
the `batch.kubernetes.io/job-tracking` finalizer until counted; terminal conditions come after
the interim `SuccessCriteriaMet` / `FailureTarget` ones once no pod is left running (1.31+);
failed pods are replaced after an exponential backoff (base 10 s, doubling, capped at 6 min;
`job_backoff_base` scales it for tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from kubetune.dev.cluster.builtins import CRD_CLEANUP_FINALIZER, JOB_TRACKING_FINALIZER
from kubetune.dev.cluster.errors import ApiError
from kubetune.dev.cluster.jsoncopy import clone
from kubetune.dev.cluster.resources import Registry, ResourceType
from kubetune.dev.cluster.status import PODS, has_condition, record_event, set_condition
from kubetune.dev.cluster.store import Key, Obj, Store, parse_time, timestamp
from kubetune.dev.controllers.kueue import Kueue, controlled_by_job

log = logging.getLogger("kubetune.dev.controllers.manager")

JOBS: Key = ("batch", "jobs")
NAMESPACES: Key = ("", "namespaces")
CRDS: Key = ("apiextensions.k8s.io", "customresourcedefinitions")
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


class Controllers:
    def __init__(self, store: Store, registry: Registry, job_backoff_base: float = 10.0, tick: float = 0.25) -> None:
        self.store = store
        self.registry = registry
        self.job_backoff_base = job_backoff_base
        self.tick = tick
        self.wake = asyncio.Event()
        self.next_pod_creation: dict[str, float] = {}  # job uid -> monotonic time
        self._settled: dict[
            str, tuple[str, ...]
        ] = {}  # job uid -> (its and its pods' resourceVersions) a pass left alone
        self._gc_due = True
        self._gc_last = 0.0
        self.kueue = Kueue(store, registry)  # admits queued Jobs once Kueue's CRDs are installed
        store.listeners.append(self._on_change)

    def _on_change(self, etype: str, key: Key, obj: Obj) -> None:
        if etype == "DELETED" or obj["metadata"].get("deletionTimestamp"):
            self._gc_due = True  # owners gone or going: collect their dependents on the next pass
        if key == CRDS:
            self.registry.remove_crd(obj["metadata"]["name"])
            if etype != "DELETED":
                for rt in self.registry.types_of_crd(obj):
                    self.registry.add(rt)
        self.wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.tick)
            self.wake.clear()
            started = time.monotonic()
            try:
                self.reconcile()
            except Exception:  # a controller bug must not stop the control plane
                log.exception("controller pass failed")
            # Passes run on every change; with many objects, leave the loop to the API at least as
            # long as a pass took (changes meanwhile are batched into the next pass).
            await asyncio.sleep(max(0.01, time.monotonic() - started))

    def reconcile(self) -> None:
        owned: dict[str, list[Obj]] = {}  # one scan of the pods, not one per Job
        for pod in self.store.objects.get(PODS, {}).values():
            for ref in pod["metadata"].get("ownerReferences") or []:
                if ref.get("controller"):
                    owned.setdefault(ref.get("uid", ""), []).append(pod)
        settled: dict[str, tuple[str, ...]] = {}
        for job in self.store.all(JOBS):
            uid = job["metadata"]["uid"]
            pods = owned.get(uid, [])
            # A pass that changed nothing changes nothing again on the same Job and pods, unless time
            # matters to it (deadline, TTL, pod-creation backoff): such Jobs are skipped, not re-read.
            inputs = (job["metadata"]["resourceVersion"], *sorted(p["metadata"]["resourceVersion"] for p in pods))
            timed = (
                job["spec"].get("activeDeadlineSeconds") is not None
                or job["spec"].get("ttlSecondsAfterFinished") is not None
                or uid in self.next_pod_creation
            )
            if not timed and self._settled.get(uid) == inputs:
                settled[uid] = inputs
                continue
            revision = self.store.revision
            # A pass writes only the Job's status (and pods through _drop_tracking/_delete_pod, which
            # copy them): copying every Job and pod in full on every pass is what made 500 Jobs slow.
            self.reconcile_job({**job, "status": clone(job.get("status") or {})}, pods)
            if self.store.revision == revision:
                settled[uid] = inputs
        self._settled = settled
        self.kueue.reconcile(lambda uid: owned.get(uid, []))
        self.release_orphans()
        # The collector scans every object: on deletions right away, otherwise (dependents of owners
        # that never existed) once per tick, not on every change of a busy cluster.
        if self._gc_due or time.monotonic() - self._gc_last >= self.tick:
            self._gc_due, self._gc_last = False, time.monotonic()
            self.collect_garbage()
        self.finish_namespaces()
        self.finish_crds()

    # -- Job -------------------------------------------------------------------------------------------

    def _rt(self, key: Key) -> ResourceType:
        for rt in self.registry.types.values():
            if rt.key == key and (not rt.is_custom or rt.version == rt.storage_version):
                return rt
        raise KeyError(key)

    def release_orphans(self) -> None:
        """Pods whose Job is gone keep no tracking finalizer (else they could never be deleted)."""
        jobs = {j["metadata"]["uid"] for j in self.store.objects.get(JOBS, {}).values()}
        for pod in list(self.store.objects.get(PODS, {}).values()):
            if JOB_TRACKING_FINALIZER not in (pod["metadata"].get("finalizers") or []):
                continue
            owners = [
                r
                for r in pod["metadata"].get("ownerReferences") or []
                if r.get("kind") == "Job" and r.get("controller")
            ]
            if not any(r.get("uid") in jobs for r in owners):
                self._drop_tracking(pod)

    def _drop_tracking(self, pod: Obj) -> None:
        finalizers = pod["metadata"].get("finalizers") or []
        if JOB_TRACKING_FINALIZER in finalizers:
            pod = {
                **pod,
                "metadata": {**pod["metadata"], "finalizers": [f for f in finalizers if f != JOB_TRACKING_FINALIZER]},
            }
            self.store.internal_write(PODS, pod)  # which copies it

    def _delete_pod(self, pod: Obj) -> None:
        """Pods the controller removes itself (suspension, a finished job) are not failures."""
        self._drop_tracking(pod)
        with contextlib.suppress(ApiError):
            self.store.delete(self._rt(PODS), pod["metadata"]["namespace"], pod["metadata"]["name"], {})

    def reconcile_job(self, job: Obj, pods: list[Obj]) -> None:
        """One pass over a Job (its status a copy) and its pods (read only)."""
        meta, spec = job["metadata"], job["spec"]
        status = job.setdefault("status", {})
        before = clone(status)
        finished = has_condition(job, "Complete") or has_condition(job, "Failed")
        replace_only_failed = spec.get("podReplacementPolicy") == "Failed"

        def is_failed(pod: Obj) -> bool:
            phase = (pod.get("status") or {}).get("phase")
            if phase == "Failed":
                return True
            return not replace_only_failed and bool(pod["metadata"].get("deletionTimestamp")) and phase != "Succeeded"

        if finished:
            for pod in pods:
                self._drop_tracking(pod)
            self._ttl(job)
            return
        if meta.get("deletionTimestamp"):  # a Job being deleted no longer tracks its pods (KEP-2307)
            for pod in pods:
                self._drop_tracking(pod)
            return
        # Count finished pods exactly once (the tracking finalizer marks "not yet counted").
        failure: tuple[str, str] | None = None
        new_failures = 0
        completed = set(_parse_indexes(status.get("completedIndexes", "")))
        indexed = spec.get("completionMode") == "Indexed"
        for pod in pods:
            if JOB_TRACKING_FINALIZER not in (pod["metadata"].get("finalizers") or []):
                continue
            phase = (pod.get("status") or {}).get("phase")
            if phase == "Succeeded":
                index = _pod_index(pod)
                if indexed and index is not None:
                    if index not in completed:
                        completed.add(index)
                        status["succeeded"] = status.get("succeeded", 0) + 1
                else:
                    status["succeeded"] = status.get("succeeded", 0) + 1
            elif is_failed(pod):
                action, message = self._pod_failure_action(spec, pod)
                if action == "FailJob":
                    failure = failure or ("PodFailurePolicy", message)
                    status["failed"] = status.get("failed", 0) + 1
                elif action != "Ignore":
                    status["failed"] = status.get("failed", 0) + 1
                    new_failures += 1
            else:
                continue
            self._drop_tracking(pod)
        if indexed:
            status["completedIndexes"] = _format_indexes(completed)
        if new_failures:
            failed = status.get("failed", 0)
            delay = min(self.job_backoff_base * 2 ** max(0, failed - 1), self.job_backoff_base * 36)
            self.next_pod_creation[meta["uid"]] = time.monotonic() + delay
        active = [
            p
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]
        terminating = [
            p
            for p in pods
            if p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]
        # Suspension.
        if spec.get("suspend"):
            for pod in active:
                self._delete_pod(pod)
            active = []
            if set_condition(status, "Suspended", "True", "JobSuspended", "Job suspended"):
                record_event(self.store, job, "Suspended", "Job suspended")
        else:
            if has_condition(job, "Suspended"):
                set_condition(status, "Suspended", "False", "JobResumed", "Job resumed")
                record_event(self.store, job, "Resumed", "Job resumed")
                status["startTime"] = timestamp()
            if "startTime" not in status:
                status["startTime"] = timestamp()
        # Failure: pod failure policy, backoff limit, deadline.
        restarts = sum(
            int(c.get("restartCount", 0)) for p in pods for c in (p.get("status") or {}).get("containerStatuses") or []
        )
        backoff_limit = spec.get("backoffLimit")
        if failure is None and backoff_limit is not None and status.get("failed", 0) + restarts > backoff_limit:
            failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        deadline = spec.get("activeDeadlineSeconds")
        if (
            failure is None
            and deadline is not None
            and status.get("startTime")
            and not spec.get("suspend")
            and time.time() - parse_time(status["startTime"]).timestamp() >= deadline
        ):
            failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
        if failure is None and has_condition(job, "FailureTarget"):
            target = next(c for c in status["conditions"] if c["type"] == "FailureTarget")
            failure = (target["reason"], target["message"])
        succeeded = status.get("succeeded", 0)
        completions = spec.get("completions")
        if indexed:
            success = len(completed) >= int(completions)
        elif completions is not None:
            success = succeeded >= int(completions)
        else:
            success = succeeded >= 1 and not active
        if failure is not None:
            set_condition(status, "FailureTarget", "True", failure[0], failure[1])
            stopping = terminating + active
            for pod in active:
                self._delete_pod(pod)
            active = []
            if not stopping:
                set_condition(status, "Failed", "True", failure[0], failure[1])
                record_event(self.store, job, failure[0], failure[1], "Warning")
        elif success:
            set_condition(
                status, "SuccessCriteriaMet", "True", "CompletionsReached", "Reached expected number of succeeded pods"
            )
            stopping = terminating + active
            for pod in active:
                self._delete_pod(pod)
            active = []
            if not stopping:
                set_condition(
                    status, "Complete", "True", "CompletionsReached", "Reached expected number of succeeded pods"
                )
                status["completionTime"] = timestamp()
                record_event(self.store, job, "Completed", "Job completed")
        elif not spec.get("suspend") and time.monotonic() >= self.next_pod_creation.get(meta["uid"], 0):
            waiting_on = terminating if replace_only_failed else []
            active += self._create_pods(job, active + waiting_on, completed, succeeded)
        status["active"] = len(active)
        status["ready"] = sum(1 for p in active if has_condition(p, "Ready"))
        status["terminating"] = len(terminating)
        for counter in ("succeeded", "failed"):  # zero counters are omitted, as on a real server
            if not status.get(counter):
                status.pop(counter, None)
        if status != before:
            self.store.internal_write(JOBS, job)

    def _pod_failure_action(self, spec: Obj, pod: Obj) -> tuple[str, str]:
        """The first matching podFailurePolicy rule's action, or Count."""
        pod_status = pod.get("status") or {}
        name = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        for index, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules") or []):
            on_codes = rule.get("onExitCodes")
            if on_codes:
                for cs in pod_status.get("containerStatuses") or []:
                    if on_codes.get("containerName") and cs["name"] != on_codes["containerName"]:
                        continue
                    code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
                    if code is None or code == 0:
                        continue
                    values = set(on_codes.get("values") or [])
                    if (on_codes.get("operator") == "In") == (code in values):
                        return rule["action"], (
                            f"Container {cs['name']} for pod {name} failed with exit code {code} "
                            f"matching {rule['action']} rule at index {index}"
                        )
            for pattern in rule.get("onPodConditions") or []:
                for condition in pod_status.get("conditions") or []:
                    if condition["type"] == pattern["type"] and condition["status"] == pattern.get("status", "True"):
                        return rule["action"], (
                            f"Pod {name} has condition {pattern['type']} matching {rule['action']} "
                            f"rule at index {index}"
                        )
        return "Count", ""

    def _create_pods(self, job: Obj, active: list[Obj], completed: set[int], succeeded: int) -> list[Obj]:
        spec = job["spec"]
        parallelism = int(spec.get("parallelism", 1))
        completions = spec.get("completions")
        wanted: list[int | None] = []
        if spec.get("completionMode") == "Indexed":
            busy = {_pod_index(p) for p in active}
            free = [i for i in range(int(completions)) if i not in completed and i not in busy]
            wanted = list(free[: max(0, parallelism - len(active))])
        else:
            target = (
                min(parallelism, int(completions) - succeeded)
                if completions is not None
                else (parallelism if not succeeded else 0)
            )
            wanted = [None] * max(0, target - len(active))
        created = []
        for index in wanted:
            pod = self._pod_for(job, index)
            try:
                result = self.store.create(self._rt(PODS), job["metadata"]["namespace"], pod)
            except ApiError as error:
                record_event(self.store, job, "FailedCreate", f"Error creating: {error.message}", "Warning")
                break
            record_event(self.store, job, "SuccessfulCreate", f"Created pod: {result.obj['metadata']['name']}")
            created.append(result.obj)
        return created

    def _pod_for(self, job: Obj, index: int | None) -> Obj:
        meta = job["metadata"]
        template = clone(job["spec"]["template"])
        pod_meta = template.get("metadata") or {}
        labels = dict(pod_meta.get("labels") or {})
        annotations = dict(pod_meta.get("annotations") or {})
        spec = template["spec"]
        generate_name = f"{meta['name']}-"
        if index is not None:
            labels[COMPLETION_INDEX] = str(index)
            annotations[COMPLETION_INDEX] = str(index)
            generate_name = f"{meta['name']}-{index}-"
            spec.setdefault("hostname", f"{meta['name']}-{index}")
            for container in list(spec.get("initContainers") or []) + spec["containers"]:
                env = container.setdefault("env", [])
                if not any(e.get("name") == "JOB_COMPLETION_INDEX" for e in env):
                    env.append(
                        {
                            "name": "JOB_COMPLETION_INDEX",
                            "valueFrom": {
                                "fieldRef": {
                                    "apiVersion": "v1",
                                    "fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']",
                                }
                            },
                        }
                    )
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": generate_name,
                "labels": labels,
                "annotations": annotations,
                "finalizers": [JOB_TRACKING_FINALIZER],
                "ownerReferences": [controlled_by_job(meta)],
            },
            "spec": spec,
        }

    def _ttl(self, job: Obj) -> None:
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        if ttl is None or job["metadata"].get("deletionTimestamp"):
            return
        finished = next(
            (
                c["lastTransitionTime"]
                for c in job["status"].get("conditions") or []
                if c["type"] in ("Complete", "Failed") and c["status"] == "True"
            ),
            None,
        )
        if finished and time.time() >= parse_time(finished).timestamp() + ttl:
            with contextlib.suppress(ApiError):
                self.store.delete(
                    self._rt(JOBS),
                    job["metadata"]["namespace"],
                    job["metadata"]["name"],
                    {"propagationPolicy": "Foreground"},
                )

    # -- garbage collector -------------------------------------------------------------------------------

    def collect_garbage(self) -> None:
        """Owner references: dependents of a deleted owner go (background), foreground deletion waits
        for blocking dependents, orphaning strips the references
        (https://kubernetes.io/docs/concepts/architecture/garbage-collection/)."""
        by_uid: dict[str, Obj] = {}
        dependents: dict[str, list[tuple[Key, Obj]]] = {}
        for key, bucket in list(self.store.objects.items()):
            for obj in bucket.values():
                by_uid[obj["metadata"]["uid"]] = obj
                for ref in obj["metadata"].get("ownerReferences") or []:
                    dependents.setdefault(ref.get("uid", ""), []).append((key, obj))
        for owner_uid, deps in dependents.items():
            owner = by_uid.get(owner_uid)
            finalizers = (owner or {}).get("metadata", {}).get("finalizers") or []
            if owner is not None and owner["metadata"].get("deletionTimestamp") and "orphan" in finalizers:
                for key, dep in deps:
                    dep = clone(dep)
                    dep["metadata"]["ownerReferences"] = [
                        r for r in dep["metadata"]["ownerReferences"] if r.get("uid") != owner_uid
                    ]
                    self.store.internal_write(key, dep)
                continue
            if owner is not None and owner["metadata"].get("deletionTimestamp") and "foregroundDeletion" in finalizers:
                for key, dep in deps:
                    if not dep["metadata"].get("deletionTimestamp"):
                        self._delete(key, dep, "Foreground")
                continue
            if owner is None:
                for key, dep in deps:
                    refs = dep["metadata"].get("ownerReferences") or []
                    if all(r.get("uid") not in by_uid for r in refs):
                        if not dep["metadata"].get("deletionTimestamp"):
                            self._delete(key, dep, "Background")
                    else:
                        dep = clone(dep)
                        dep["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") in by_uid]
                        self.store.internal_write(key, dep)
        # Owners waiting in foreground deletion: done once no blocking dependent remains.
        for key, bucket in list(self.store.objects.items()):
            for obj in list(bucket.values()):
                meta = obj["metadata"]
                finalizers = meta.get("finalizers") or []
                if not meta.get("deletionTimestamp"):
                    continue
                uid = meta["uid"]
                if "foregroundDeletion" in finalizers:
                    blocking = [
                        d
                        for _, d in dependents.get(uid, [])
                        if any(
                            r.get("uid") == uid and r.get("blockOwnerDeletion")
                            for r in d["metadata"].get("ownerReferences") or []
                        )
                    ]
                    if not blocking:
                        self._drop_finalizer(key, obj, "foregroundDeletion")
                if "orphan" in finalizers and not dependents.get(uid):
                    self._drop_finalizer(key, obj, "orphan")

    def _drop_finalizer(self, key: Key, obj: Obj, name: str) -> None:
        obj = clone(obj)
        obj["metadata"]["finalizers"] = [f for f in obj["metadata"]["finalizers"] if f != name]
        self.store.internal_write(key, obj)

    def _delete(self, key: Key, obj: Obj, policy: str) -> None:
        with contextlib.suppress(ApiError, KeyError):
            self.store.delete(
                self._rt(key),
                obj["metadata"].get("namespace", ""),
                obj["metadata"]["name"],
                {"propagationPolicy": policy},
            )

    # -- namespaces and CRDs -----------------------------------------------------------------------------

    def finish_namespaces(self) -> None:
        for ns in self.store.all(NAMESPACES):
            if not ns["metadata"].get("deletionTimestamp"):
                self._ensure_service_account(ns["metadata"]["name"])
                continue
            name = ns["metadata"]["name"]
            remaining = 0
            for key, bucket in list(self.store.objects.items()):
                for obj in list(bucket.values()):
                    if obj["metadata"].get("namespace") == name:
                        remaining += 1
                        if not obj["metadata"].get("deletionTimestamp"):
                            self._delete(key, obj, "Background")
            if remaining == 0:
                ns = clone(ns)
                ns["spec"]["finalizers"] = []
                self.store._commit("DELETED", NAMESPACES, ns, self.store.find(NAMESPACES, "", name))

    def _ensure_service_account(self, namespace: str) -> None:
        if self.store.find(("", "serviceaccounts"), namespace, "default") is None:
            with contextlib.suppress(ApiError):
                self.store.create(self._rt(("", "serviceaccounts")), namespace, {"metadata": {"name": "default"}})

    def finish_crds(self) -> None:
        for crd in self.store.all(CRDS):
            if not crd["metadata"].get("deletionTimestamp"):
                continue
            key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
            instances = self.store.all(key)
            for obj in instances:
                if not obj["metadata"].get("deletionTimestamp"):
                    self._delete(key, obj, "Background")
            if not instances and CRD_CLEANUP_FINALIZER in (crd["metadata"].get("finalizers") or []):
                self._drop_finalizer(CRDS, crd, CRD_CLEANUP_FINALIZER)


def _pod_index(pod: Obj) -> int | None:
    value = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
    return int(value) if value is not None and str(value).isdigit() else None


def _parse_indexes(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (text or "").split(",")):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def _format_indexes(indexes: set[int]) -> str:
    """status.completedIndexes: sorted, consecutive runs as ranges ("0-2,5")."""
    ranges: list[str] = []
    for index in sorted(indexes):
        if ranges and "-" in ranges[-1] and int(ranges[-1].split("-")[1]) == index - 1:
            ranges[-1] = f"{ranges[-1].split('-')[0]}-{index}"
        elif ranges and "-" not in ranges[-1] and int(ranges[-1]) == index - 1:
            ranges[-1] = f"{ranges[-1]}-{index}"
        else:
            ranges.append(str(index))
    return ",".join(ranges)
