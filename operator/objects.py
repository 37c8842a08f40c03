"""Reading Kubernetes objects as the API returns them (plain dicts): a Job's conditions, a pod's
containers' exit codes, the labels and annotations kubetune puts on its children.

Every reader tolerates missing fields: an object just created has no status yet, and a field
the API server leaves out is None or absent alike.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from kubetune.api.layout import EXIT_PREEMPTED

from . import builders as b

# A FineTuneJob's last attempt ended in one of these: the next one needs a new trainer Job.
ENDED_NEEDS_NEW_JOB = ("Failed", "Preempted")


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def parse_time(value: Any) -> datetime | None:
    """An API timestamp (or epoch seconds) as an aware datetime to the second; None if absent."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, (int, float)):
        parsed = datetime.fromtimestamp(value, timezone.utc)
    elif isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).replace(microsecond=0)


# -- any object --------------------------------------------------------------------------------


def meta(obj: dict[str, Any] | None) -> dict[str, Any]:
    return (obj or {}).get("metadata") or {}


def labels(obj: dict[str, Any] | None) -> dict[str, str]:
    return meta(obj).get("labels") or {}


def annotations(obj: dict[str, Any] | None) -> dict[str, str]:
    return meta(obj).get("annotations") or {}


def component(obj: dict[str, Any]) -> str:
    """b.COLLECTOR or b.TRAINER for kubetune's Jobs and pods."""
    return str(labels(obj).get(b.LABEL_COMPONENT) or "")


# -- Jobs --------------------------------------------------------------------------------------


def job_condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition  # type: ignore[no-any-return]
    return None


def job_failure_message(job: dict[str, Any]) -> str:
    return str((job_condition(job, "Failed") or {}).get("message") or "")


def job_finished(job: dict[str, Any]) -> str:
    """ "Complete", "Failed" or "" while the Job runs (or is suspended)."""
    if job_condition(job, "Complete") or job_condition(job, "SuccessCriteriaMet"):
        return "Complete"
    if job_condition(job, "Failed") or job_condition(job, "FailureTarget"):
        return "Failed"
    return ""


def job_suspended(job: dict[str, Any]) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


def job_attempt(job: dict[str, Any]) -> int:
    """The restart ordinal of a trainer Job (its b.LABEL_ATTEMPT label)."""
    return int(labels(job).get(b.LABEL_ATTEMPT, "0"))


def recorded_preemptions(job: dict[str, Any]) -> list[str]:
    """Uids of the Job's pods the operator saw preempted (kept on the Job: the pods go away)."""
    value = annotations(job).get(b.ANNOTATION_PREEMPTED_PODS, "")
    return [uid for uid in value.split(",") if uid]


# -- Kueue ------------------------------------------------------------------------------------
# Kueue (https://kueue.sigs.k8s.io) admits a Job that carries its queue label by unsuspending it,
# and evicts it by suspending it again; it keeps its decisions on a Workload
# (kueue.x-k8s.io/v1beta1) that the Job owns. The operator never touches `suspend` on such a
# Job: it reads the Workload, and stops or resumes it through the Workload's `spec.active`.

KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # on each Workload: the uid of the Job it admits
KUEUE_DEACTIVATED = ("Deactivated", "InactiveWorkload")  # Evicted reasons of `spec.active: false` (new, old)
# Kueue evictions the operator saw on a Job (their Evicted condition's lastTransitionTime, comma
# separated): counted as preemptions, once each, across passes.
ANNOTATION_KUEUE_EVICTIONS = "kubetune.dev/kueue-evictions"


def queued(job: dict[str, Any]) -> bool:
    """Whether Kueue manages the Job (it carries the queue label): Kueue alone suspends it."""
    return bool(labels(job).get(b.KUEUE_QUEUE_LABEL))


def workload_of(job: dict[str, Any], workloads: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Workload Kueue made for `job` (it owns it), None before Kueue made one."""
    uid = meta(job).get("uid")
    for workload in workloads:
        if uid and any(r.get("uid") == uid for r in meta(workload).get("ownerReferences") or []):
            return workload
    return None


def workload_active(workload: dict[str, Any]) -> bool:
    return (workload.get("spec") or {}).get("active", True) is not False


def kueue_eviction(workload: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Workload's Evicted condition while it is evicted (status True), else None."""
    for condition in ((workload or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Evicted" and condition.get("status") == "True":
            return condition  # type: ignore[no-any-return]
    return None


def recorded_kueue_evictions(job: dict[str, Any]) -> list[str]:
    return [t for t in annotations(job).get(ANNOTATION_KUEUE_EVICTIONS, "").split(",") if t]


# -- pods --------------------------------------------------------------------------------------


def terminated_state(pod: dict[str, Any], container: str) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != container:
            continue
        for key in ("state", "lastState"):
            terminated = (status.get(key) or {}).get("terminated")
            if terminated:
                return terminated  # type: ignore[no-any-return]
    return None


def pod_exit_code(pod: dict[str, Any], container: str) -> int | None:
    terminated = terminated_state(pod, container)
    return None if terminated is None else terminated.get("exitCode")


def pod_preempted(pod: dict[str, Any], container: str) -> bool:
    """Evicted or disrupted (DisruptionTarget), or the program stopped itself after SIGTERM
    having saved a checkpoint (exit code 75)."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            return True
    return pod_exit_code(pod, container) == EXIT_PREEMPTED


def stopped_before_job_started(pod: dict[str, Any], job: dict[str, Any]) -> bool:
    """A trainer pod deleted (or ended) before its Job's latest start: stopped by a suspension,
    not a preemption. Kubernetes resets a Job's status.startTime when it is resumed (a moment
    after `suspend` turns false: until then its Suspended condition stays True)."""
    if job_condition(job, "Suspended"):
        return True  # resumed in spec, but the Job controller has not started it again yet
    started = parse_time((job.get("status") or {}).get("startTime"))
    # a graceful deletion's deletionTimestamp is when the grace period ends: it was asked for before
    deleted = parse_time(meta(pod).get("deletionTimestamp"))
    if deleted is not None:
        deleted -= timedelta(seconds=int(meta(pod).get("deletionGracePeriodSeconds") or 0))
    finished = parse_time((terminated_state(pod, b.TRAINER) or {}).get("finishedAt"))
    stops = [t for t in (deleted, finished) if t is not None]
    return started is not None and bool(stops) and min(stops) <= started


def pod_job_name(pod: dict[str, Any]) -> str:
    pod_labels = labels(pod)
    return str(pod_labels.get("batch.kubernetes.io/job-name") or pod_labels.get("job-name") or "")


def pod_active(pod: dict[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    deleting = bool(meta(pod).get("deletionTimestamp"))
    ended = phase in ("Succeeded", "Failed")
    return phase in (None, "Pending", "Running") or (deleting and not ended)


def termination_message(pods: list[dict[str, Any]], container: str, limit: int = 400) -> str:
    """The last lines a failed container left (its termination message, or its log tail thanks
    to FallbackToLogsOnError), newest pod first, on one line."""
    failed = [p for p in pods if (pod_exit_code(p, container) or 0) != 0]
    failed.sort(key=lambda p: str(meta(p).get("creationTimestamp") or ""), reverse=True)
    for pod in failed:
        terminated = terminated_state(pod, container) or {}
        text = (terminated.get("message") or "").strip()
        if text:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            # kubetune's one-line errors ("kubetune train: error: ...") say it best
            own = [line for line in lines if line.startswith("kubetune ") and ": error: " in line]
            one = own[-1] if own else " | ".join(lines[-3:])
            return one if len(one) <= limit else "..." + one[-limit:]
        if terminated.get("exitCode") is not None:
            why = f" ({terminated['reason']})" if terminated.get("reason") else ""
            return f"container {container} exited with code {terminated['exitCode']}{why}"
    return ""


# -- the FineTuneJob's status --------------------------------------------------------------------


def new_attempt_due(status: dict[str, Any]) -> bool:
    """The last training attempt ended Failed or Preempted: the next pass starts another."""
    attempts = status.get("attempts") or []
    return bool(attempts) and attempts[-1].get("reason") in ENDED_NEEDS_NEW_JOB
