"""The operator's decisions as one pure function: observed state in, what to do out.

`decide(observed)` reads a FineTuneJob, its child Jobs and pods, its Secrets (present or not),
the dataset manifest and progress.json, and returns the new status, the objects to create, the
patches to apply and the Events to post. It never calls the API, so every rule below is a unit
test away, and a pass can be repeated at any moment: an operator restarted mid-way recomputes
the same answer from the same observations.

Attempts: attempt i of the trainer runs in the Job for restart ordinal
`restart = number of attempts before i that ended Failed or Preempted` (`<name>-train`,
`<name>-train-r1`, ...). Failed attempts use the backoff budget (`status.restarts`); preempted
ones do not (`status.preemptions`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kubetune import storage
from kubetune.api.layout import (
    CHECKPOINTS_DIR,
    DATASET_DIR,
    EXIT_INVALID,
    EXIT_PREEMPTED,
    SAMPLES_DIR,
    dataset_fingerprint,
)
from kubetune.api.layout import checkpoint_step as checkpoint_folder_step
from kubetune.api.models import (
    Attempt,
    Condition,
    DatasetStatus,
    FineTuneJobSpec,
    FineTuneJobStatus,
    TrainingStatus,
)

from . import builders as b

TERMINAL = ("Succeeded", "Failed")
ENDED_NEEDS_NEW_JOB = ("Failed", "Preempted")


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str  # CamelCase
    message: str


@dataclass
class Observed:
    """Everything one pass looks at. `pods` are the FineTuneJob's pods (collector and trainer);
    `missing_secrets` holds one message per Secret or key that does not exist."""

    name: str
    namespace: str
    uid: str
    generation: int | None
    spec: FineTuneJobSpec | None
    status: dict[str, Any]
    now: datetime
    spec_error: str = ""
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    service_exists: bool = False
    secrets: dict[str, set[str] | None] = field(default_factory=dict)  # name -> its keys; None: missing
    dataset_manifest: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    latest_checkpoint: str = ""  # listed in storage when a new attempt is due (progress.json may lag)
    storage_error: str = ""
    images: b.Images = field(default_factory=b.Images)


@dataclass
class Patch:
    kind: str  # "Job"
    name: str
    body: dict[str, Any]  # merge patch


@dataclass
class Decision:
    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    patch: list[Patch] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def phase(self) -> str:
        return str(self.status.get("phase", "Pending"))


# -- reading Kubernetes objects ----------------------------------------------------------------


def job_condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition  # type: ignore[no-any-return]
    return None


def job_finished(job: dict[str, Any]) -> str:
    """"Complete", "Failed" or "" while the Job runs (or is suspended)."""
    if job_condition(job, "Complete") or job_condition(job, "SuccessCriteriaMet"):
        return "Complete"
    if job_condition(job, "Failed") or job_condition(job, "FailureTarget"):
        return "Failed"
    return ""


def job_suspended(job: dict[str, Any]) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


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
    """A pod deleted (or ended) before its Job's latest start: stopped by a suspension, not a
    preemption. Kubernetes resets a Job's status.startTime when it is resumed."""
    started = _parse_time((job.get("status") or {}).get("startTime"))
    stopped = _parse_time((pod.get("metadata") or {}).get("deletionTimestamp")) or _parse_time(
        (terminated_state(pod, b.TRAINER) or {}).get("finishedAt"))
    return started is not None and stopped is not None and stopped <= started


def pod_job_name(pod: dict[str, Any]) -> str:
    pod_labels = (pod.get("metadata") or {}).get("labels") or {}
    return str(pod_labels.get("batch.kubernetes.io/job-name") or pod_labels.get("job-name") or "")


def pod_active(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in (None, "Pending", "Running") or bool(
        (pod.get("metadata") or {}).get("deletionTimestamp") and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    )


def termination_message(pods: list[dict[str, Any]], container: str, limit: int = 400) -> str:
    """The last lines a failed container left (its termination message, or its log tail thanks
    to FallbackToLogsOnError), newest pod first, on one line."""
    failed = [p for p in pods if (pod_exit_code(p, container) or 0) != 0]
    failed.sort(key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""), reverse=True)
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
            return f"container {container} exited with code {terminated['exitCode']}" + (
                f" ({terminated['reason']})" if terminated.get("reason") else "")
    return ""


def recorded_preemptions(job: dict[str, Any]) -> list[str]:
    value = ((job.get("metadata") or {}).get("annotations") or {}).get(b.ANNOTATION_PREEMPTED_PODS, "")
    return [uid for uid in value.split(",") if uid]


# -- status helpers ----------------------------------------------------------------------------


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def set_condition(conditions: list[Condition], kind: str, status: str, reason: str, message: str,
                  now: datetime, generation: int | None) -> None:
    """Set a condition by type; lastTransitionTime moves only when its status changes."""
    for i, old in enumerate(conditions):
        if old.type == kind:
            moved = old.status != status
            conditions[i] = Condition(
                type=kind, status=status, reason=reason, message=message,  # type: ignore[arg-type]
                last_transition_time=now if moved or old.last_transition_time is None else old.last_transition_time,
                observed_generation=generation,
            )
            return
    conditions.append(Condition(type=kind, status=status, reason=reason, message=message,  # type: ignore[arg-type]
                                last_transition_time=now, observed_generation=generation))


def remove_condition(conditions: list[Condition], kind: str) -> None:
    conditions[:] = [c for c in conditions if c.type != kind]


def new_attempt_due(status: dict[str, Any]) -> bool:
    attempts = status.get("attempts") or []
    return bool(attempts) and attempts[-1].get("reason") in ENDED_NEEDS_NEW_JOB


def checkpoint_step(uri: str) -> int:
    """The step of a checkpoint name or URI (`step-N` or `checkpoint-N`); 0 for none."""
    return checkpoint_folder_step((uri or "").rstrip("/").rsplit("/", 1)[-1]) or 0


def percent(step: int, max_steps: int) -> str:
    return f"{min(100, int(100 * step / max_steps))}%" if max_steps > 0 else ""


def training_status(progress: dict[str, Any], now: datetime) -> TrainingStatus:
    step = int(progress.get("step") or 0)
    max_steps = int(progress.get("maxSteps") or 0)
    loss = progress.get("loss")
    rate = progress.get("imagesPerSecond")
    eta = progress.get("etaSeconds")
    return TrainingStatus(
        step=step,
        max_steps=max_steps,
        progress=percent(step, max_steps),
        epoch=int(progress.get("epoch") or 0),
        loss=f"{float(loss):.4g}" if isinstance(loss, (int, float)) else str(loss or ""),
        images_per_second=f"{float(rate):.3g}" if isinstance(rate, (int, float)) else str(rate or ""),
        eta_seconds=int(eta) if isinstance(eta, (int, float)) else None,
        latest_checkpoint=str(progress.get("latestCheckpoint") or ""),
        # the trainer's own timestamp: status only changes when progress does
        updated_at=_parse_time(progress.get("updatedAt")) or now,
    )


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc).replace(microsecond=0)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).replace(microsecond=0)
    return None


def manifest_counts(manifest: dict[str, Any], uri: str) -> DatasetStatus:
    """Counts from the collector's manifest; it may keep them at the top or under `counts`."""
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else manifest
    skipped = counts.get("skipped") or {}
    return DatasetStatus(
        uri=uri,
        requested=int(counts.get("requested") or 0),
        kept=int(counts.get("kept") or counts.get("images") or 0),
        skipped={str(k): int(v) for k, v in skipped.items()} if isinstance(skipped, dict) else {},
    )


def restart_of(attempts: list[Attempt], index: int) -> int:
    """Which trainer Job attempt `index` runs in (see the module docstring)."""
    return sum(1 for a in attempts[:index] if a.reason in ENDED_NEEDS_NEW_JOB)


# -- the decision ------------------------------------------------------------------------------


class _Pass:
    """One pass of decide(): the working state and small steps that update it."""

    def __init__(self, observed: Observed) -> None:
        self.o = observed
        self.old = FineTuneJobStatus.model_validate(observed.status or {}, strict=False)
        self.status = self.old.model_copy(deep=True)
        self.decision = Decision(status={})
        self.owner = b.Owner(observed.name, observed.namespace, observed.uid)

    # small steps

    def event(self, kind: str, reason: str, message: str) -> None:
        self.decision.events.append(Event(kind, reason, message))

    def condition(self, kind: str, status: str, reason: str, message: str = "") -> None:
        set_condition(self.status.conditions, kind, status, reason, message, self.o.now, self.o.generation)

    def suspend_running_jobs(self) -> None:
        for name, job in self.o.jobs.items():
            if not job_finished(job) and not job_suspended(job):
                self.decision.patch.append(Patch("Job", name, {"spec": {"suspend": True}}))

    def fail(self, reason: str, message: str) -> Decision:
        self.status.phase = "Failed"
        self.status.message = message
        self.status.completion_time = self.status.completion_time or self.o.now
        self.condition("Succeeded", "False", reason, message)
        self.condition("Training", "False", reason, message)
        remove_condition(self.status.conditions, "Suspended")
        if self.status.attempts and not self.status.attempts[-1].reason:
            self.end_attempt("Failed")
        self.suspend_running_jobs()  # stop what still runs; the Jobs stay for inspection
        return self.finish()

    def end_attempt(self, reason: str) -> None:
        attempt = self.status.attempts[-1]
        attempt.reason = reason
        attempt.end_step = self.status.training.step if self.status.training else attempt.start_step
        attempt.end_time = self.o.now

    def finish(self) -> Decision:
        status = self.status
        status.observed_generation = self.o.generation
        status.restarts = sum(1 for a in status.attempts if a.reason == "Failed")
        status.preemptions = self.count_preemptions()
        phase = status.phase
        if phase not in TERMINAL:
            self.condition("Succeeded", "Unknown", phase, status.message)
        if phase != self.old.phase:
            kind = "Warning" if phase == "Failed" else "Normal"
            reason = next((c.reason for c in status.conditions if c.type == "Succeeded"), phase) if phase in TERMINAL else phase
            if not self.decision.events:
                self.event(kind, reason, status.message or f"phase {phase}")
        self.decision.status = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        return self.decision

    def count_preemptions(self) -> int:
        attempts = self.status.attempts
        counted = 0
        seen_restarts: set[int] = set()
        for job in self.trainer_jobs().values():
            uids = recorded_preemptions(job)
            counted += len(uids)
            if uids:
                seen_restarts.add(int(((job.get("metadata") or {}).get("labels") or {}).get(b.LABEL_ATTEMPT, "0")))
        for i, attempt in enumerate(attempts):  # preempted attempts known only from progress.json
            if attempt.reason == "Preempted" and restart_of(attempts, i) not in seen_restarts:
                counted += 1
        return counted

    def trainer_jobs(self) -> dict[str, dict[str, Any]]:
        return {n: j for n, j in self.o.jobs.items()
                if ((j.get("metadata") or {}).get("labels") or {}).get(b.LABEL_COMPONENT) == b.TRAINER}

    def pods_of(self, job_name: str) -> list[dict[str, Any]]:
        return [p for p in self.o.pods if pod_job_name(p) == job_name]

    # the flow

    def run(self) -> Decision:
        o, spec = self.o, self.o.spec
        if spec is None:
            return self.fail("InvalidSpec", o.spec_error or "the spec cannot be read")
        if self.status.phase in TERMINAL:
            if self.status.phase == "Failed":
                self.suspend_running_jobs()
            return self.finish()
        self.status.start_time = self.status.start_time or o.now
        deadline = spec.run_policy.active_deadline_seconds
        if deadline and (o.now - self.status.start_time).total_seconds() > deadline:
            return self.fail("DeadlineExceeded", f"the job ran longer than runPolicy.activeDeadlineSeconds={deadline}; "
                                                 "raise it or lower training.maxTrainSteps")
        dataset_uri = self.dataset(spec)
        if dataset_uri is None:
            return self.finish() if self.status.phase != "Failed" else self.decision
        return self.training(spec)

    def dataset(self, spec: FineTuneJobSpec) -> str | None:
        """The dataset URI once it is ready; None while collecting (or failed)."""
        o = self.o
        if spec.dataset.imagefolder:
            uri = spec.dataset.imagefolder.uri
            if not (self.status.dataset and self.status.dataset.uri == uri):
                self.status.dataset = DatasetStatus(uri=uri)
            self.condition("DatasetReady", "True", "ImageFolder", f"training on the existing imagefolder {uri}")
            return uri
        uri = storage.join(spec.storage.uri, DATASET_DIR)
        if self.status.attempts and self.has_condition("DatasetReady", "True") and o.dataset_manifest is None:
            return self.status.dataset.uri if self.status.dataset else uri  # ready before training started
        collect_name = b.collector_job_name(o.name)
        collector = o.jobs.get(collect_name)
        wanted = dataset_fingerprint(spec.dataset)
        started_with = ((collector or {}).get("metadata") or {}).get("annotations", {}).get(b.ANNOTATION_FINGERPRINT, wanted)
        manifest = o.dataset_manifest
        if manifest is not None and manifest.get("fingerprint") in (wanted, started_with):
            counts = manifest_counts(manifest, uri)
            self.status.dataset = counts
            if counts.kept == 0:
                self.fail("EmptyDataset", f"the collector kept 0 images (skipped: {counts.skipped or 'none'}); "
                                          "check the source settings (prompts, URLs, minSize) and recreate the job")
                return None
            if started_with != wanted:
                self.spec_change_ignored("spec.dataset changed after collection started; the dataset already collected is used")
            if not self.has_condition("DatasetReady", "True"):
                found = collector is None
                self.event("Normal", "DatasetFound" if found else "DatasetCollected",
                           f"{counts.kept} images in {uri}" + (" (collected earlier with the same settings)" if found else ""))
            self.condition("DatasetReady", "True", "DatasetFound" if collector is None else "Collected",
                           f"{counts.kept} images in {uri}")
            return uri
        if o.storage_error:
            self.status.message = f"cannot read storage: {o.storage_error}"
            self.condition("DatasetReady", "Unknown", "StorageUnreachable", self.status.message)
            return None
        if self.secrets_missing(spec, b.COLLECTOR):
            return None
        if collector is None:
            self.decision.create.append(b.collector_job(spec, self.owner, o.images))
            self.status.phase = "Collecting"
            self.status.message = f"collecting the dataset ({spec.dataset.source_name}) into {uri}"
            self.condition("DatasetReady", "False", "Collecting", self.status.message)
            if not spec.suspend and not spec.run_policy.queue_name:
                # what the next pass would add once the Job exists: one status write, not two
                self.condition("Suspended", "False", "NotSuspended")
            self.event("Normal", "CollectionStarted", f"created Job {collect_name}")
            return None
        finished = job_finished(collector)
        pods = self.pods_of(collect_name)
        if finished == "Failed":
            detail = termination_message(pods, b.COLLECTOR)
            invalid = any(pod_exit_code(p, b.COLLECTOR) == EXIT_INVALID for p in pods)
            reason = "CollectorInvalidInput" if invalid else "CollectionFailed"
            if invalid and "0 images kept" in detail:  # the collector's own words for an empty result
                reason = "EmptyDataset"
            message = ("the collector rejected its input" if invalid else "the collector failed") + (f": {detail}" if detail else
                       f": {(job_condition(collector, 'Failed') or {}).get('message', 'Job failed')}")
            self.condition("DatasetReady", "False", reason, message)
            self.fail(reason, message)
            return None
        if finished == "Complete":
            message = f"the collector finished but {uri}/manifest.json is missing or for other settings"
            self.condition("DatasetReady", "False", "DatasetIncomplete", message)
            self.fail("DatasetIncomplete", message)
            return None
        if started_with != wanted:
            self.spec_change_ignored("spec.dataset changed after collection started; the collection continues with the old settings")
        self.suspension(collector, collect_name, "Collecting", f"collecting the dataset ({spec.dataset.source_name}) into {uri}")
        self.condition("DatasetReady", "False", "Collecting", self.status.message)
        return None

    def has_condition(self, kind: str, status: str) -> bool:
        return any(c.type == kind and c.status == status for c in self.old.conditions)

    def spec_change_ignored(self, message: str) -> None:
        if not self.has_condition("SpecChangeIgnored", "True"):
            self.event("Warning", "SpecChangeIgnored", message)
        self.condition("SpecChangeIgnored", "True", "ImmutableFieldChanged", message)

    def suspension(self, job: dict[str, Any], job_name: str, running_phase: str, running_message: str) -> None:
        """Follow spec.suspend on a running child Job, and tell queued from running."""
        spec = self.o.spec
        assert spec is not None
        queued = bool(spec.run_policy.queue_name)
        if spec.suspend:
            if not job_suspended(job):
                self.decision.patch.append(Patch("Job", job_name, {"spec": {"suspend": True}}))
            if self.status.phase != "Suspended":
                self.event("Normal", "Suspended", f"suspended Job {job_name}; it continues from its checkpoint when resumed")
            self.status.phase = "Suspended"
            self.status.message = f"suspended (spec.suspend); Job {job_name} keeps its progress"
            self.condition("Suspended", "True", "SpecSuspend", self.status.message)
            return
        if job_suspended(job) and not queued:
            self.decision.patch.append(Patch("Job", job_name, {"spec": {"suspend": False}}))
            if self.old.phase == "Suspended":
                self.event("Normal", "Resumed", f"resumed Job {job_name}")
        self.condition("Suspended", "False", "NotSuspended")
        self.status.phase = running_phase
        if job_suspended(job) and queued:
            self.status.message = f"waiting for Kueue to admit Job {job_name} (queue {spec.run_policy.queue_name})"
        else:
            self.status.message = running_message

    def secrets_missing(self, spec: FineTuneJobSpec, component: str) -> bool:
        """Fail, naming the Secret and the field, when a Secret or key a component needs is missing.
        Checked before every pass that runs the component: a pod with a missing Secret would
        otherwise wait forever in CreateContainerConfigError."""
        problems = []
        for path, ref in b.secret_ref_paths(spec, component):
            keys = self.o.secrets.get(ref.name)
            if keys is None:
                problems.append(f"Secret '{ref.name}' not found (referenced by {path})")
            elif ref.key not in keys:
                problems.append(f"Secret '{ref.name}' has no key '{ref.key}' (referenced by {path})")
        if problems:
            unique = list(dict.fromkeys(problems))
            self.fail("SecretNotFound", "; ".join(unique) + f" in namespace {self.o.namespace}: create it, then recreate the FineTuneJob")
        return bool(problems)

    def training(self, spec: FineTuneJobSpec) -> Decision:
        o = self.o
        if self.secrets_missing(spec, b.TRAINER):
            return self.decision
        if o.progress is not None:
            self.status.training = training_status(o.progress, o.now)
        if not o.service_exists:
            self.decision.create.append(b.trainer_service(spec, self.owner))
        attempts = self.status.attempts
        if not attempts or attempts[-1].reason in ENDED_NEEDS_NEW_JOB:
            return self.start_attempt(spec)
        restart = restart_of(attempts, len(attempts) - 1)
        name = b.trainer_job_name(o.name, restart)
        job = o.jobs.get(name)
        if job is None:  # recorded in status but not created yet (or deleted by hand): create it
            self.decision.create.append(b.trainer_job(spec, self.owner, restart, o.images))
            self.status.phase = "Training"
            self.status.message = f"starting attempt {len(attempts) - 1} (Job {name})"
            self.condition("Training", "False", "Starting", self.status.message)
            return self.finish()
        started_with = ((job.get("metadata") or {}).get("annotations") or {}).get(b.ANNOTATION_TRAINING_HASH)
        if started_with and started_with != b.training_hash(spec):
            self.spec_change_ignored("spec.model, spec.training or the trainer layout changed after training started; "
                                     "the running training keeps its settings (create a new FineTuneJob to apply them)")
        finished = job_finished(job)
        pods = self.pods_of(name)
        self.record_preempted_pods(job, name, pods)
        if finished == "Complete":
            return self.succeed(spec, name)
        if finished == "Failed":
            return self.attempt_failed(spec, job, name, pods)
        if spec.trainer.nodes > 1 and (recorded_preemptions(job) or self.pending_preemption_patch(name)) and not job_suspended(job):
            # One rank preempted breaks the whole gang: stop the rest, start a new attempt.
            self.decision.patch.append(Patch("Job", name, {"spec": {"suspend": True}}))
            self.end_attempt("Preempted")
            self.event("Warning", "Preempted", f"a pod of Job {name} was preempted; restarting all "
                                               f"{spec.trainer.nodes} nodes from the latest checkpoint")
            self.status.message = "preempted; a new attempt resumes from the latest checkpoint"
            self.condition("Training", "False", "Preempted", self.status.message)
            self.status.phase = "Training"
            return self.finish()
        step = self.status.training.step if self.status.training else 0
        self.suspension(job, name, "Training", f"training attempt {len(attempts) - 1} (Job {name}) at step {step}")
        if self.status.phase == "Training":
            self.condition("Training", "True" if not job_suspended(job) else "False",
                           "Running" if not job_suspended(job) else "Queued", self.status.message)
        else:
            self.condition("Training", "False", "Suspended", self.status.message)
        return self.finish()

    def pending_preemption_patch(self, name: str) -> bool:
        return any(p.name == name and b.ANNOTATION_PREEMPTED_PODS in (p.body.get("metadata") or {}).get("annotations", {})
                   for p in self.decision.patch)

    def record_preempted_pods(self, job: dict[str, Any], name: str, pods: list[dict[str, Any]]) -> None:
        """Remember preempted pods on their Job: they vanish from the API soon after (evicted
        pods are deleted), and the Job controller does not count ignored failures."""
        if job_suspended(job) or job_finished(job) == "Complete":
            return  # pods stopped by a suspension are not preemptions
        known = recorded_preemptions(job)
        new = [str(p["metadata"]["uid"]) for p in pods
               if pod_preempted(p, b.TRAINER) and p["metadata"].get("uid") and p["metadata"]["uid"] not in known
               and not stopped_before_job_started(p, job)]
        if new:
            uids = known + new
            self.decision.patch.append(Patch("Job", name, {"metadata": {"annotations": {b.ANNOTATION_PREEMPTED_PODS: ",".join(uids)}}}))
            job.setdefault("metadata", {}).setdefault("annotations", {})[b.ANNOTATION_PREEMPTED_PODS] = ",".join(uids)
            self.event("Warning", "PodPreempted", f"{len(new)} trainer pod(s) of Job {name} preempted; "
                                                  "they resume from the latest checkpoint (not counted against backoffLimit)")

    def start_attempt(self, spec: FineTuneJobSpec) -> Decision:
        o = self.o
        attempts = self.status.attempts
        still_running = [p["metadata"]["name"] for p in o.pods if pod_active(p)
                         and ((p.get("metadata") or {}).get("labels") or {}).get(b.LABEL_COMPONENT) == b.TRAINER]
        self.status.phase = "Training"
        if still_running:  # never two trainer gangs writing the same checkpoints
            self.status.message = f"waiting for the previous attempt's pods to stop: {', '.join(sorted(still_running)[:3])}"
            self.condition("Training", "False", "WaitingForPreviousAttempt", self.status.message)
            return self.finish()
        index = len(attempts)
        restart = restart_of(attempts, index)
        resume_from = self.status.training.latest_checkpoint if self.status.training else ""
        if checkpoint_step(o.latest_checkpoint) > checkpoint_step(resume_from):
            resume_from = o.latest_checkpoint  # a checkpoint completed after the last progress.json
        attempts.append(Attempt(index=index, start_step=checkpoint_step(resume_from), start_time=o.now))
        name = b.trainer_job_name(o.name, restart)
        if name not in o.jobs:
            self.decision.create.append(b.trainer_job(spec, self.owner, restart, o.images))
        self.status.message = f"starting attempt {index} (Job {name})" + (f", resuming from {resume_from}" if resume_from else "")
        self.condition("Training", "False", "Starting", self.status.message)
        self.event("Normal", "TrainingStarted" if index == 0 else "AttemptStarted", self.status.message)
        return self.finish()

    def succeed(self, spec: FineTuneJobSpec, name: str) -> Decision:
        status = self.status
        uri = spec.storage.uri
        if status.training and status.training.max_steps:
            status.training.step = max(status.training.step, status.training.max_steps)
            status.training.progress = "100%"
            status.training.eta_seconds = 0
        self.end_attempt("Succeeded")
        status.phase = "Succeeded"
        status.model_uri = uri
        status.samples_uri = storage.join(uri, SAMPLES_DIR) + "/"
        status.checkpoints_uri = storage.join(uri, CHECKPOINTS_DIR) + "/"
        status.completion_time = self.o.now
        status.message = f"model published to {uri}"
        self.condition("Training", "False", "Succeeded", f"Job {name} completed")
        self.condition("Succeeded", "True", "Succeeded", status.message)
        return self.finish()

    def attempt_failed(self, spec: FineTuneJobSpec, job: dict[str, Any], name: str, pods: list[dict[str, Any]]) -> Decision:
        detail = termination_message(pods, b.TRAINER) or (job_condition(job, "Failed") or {}).get("message", "") or "Job failed"
        if any(pod_exit_code(p, b.TRAINER) == EXIT_INVALID for p in pods):
            return self.fail("TrainerInvalidInput", f"the trainer rejected its input (retrying cannot help): {detail}")
        progress_preempted = (self.o.progress or {}).get("state") == "preempted"
        preempted = bool(recorded_preemptions(job)) or any(pod_preempted(p, b.TRAINER) for p in pods) or progress_preempted
        if preempted:
            self.end_attempt("Preempted")
            self.status.message = f"attempt {len(self.status.attempts) - 1} was preempted; resuming from the latest checkpoint"
            self.event("Warning", "Preempted", self.status.message)
        else:
            self.end_attempt("Failed")
            failures = sum(1 for a in self.status.attempts if a.reason == "Failed")
            limit = spec.run_policy.backoff_limit
            if failures > limit:
                return self.fail("BackoffLimitExceeded", f"the trainer failed {failures} time(s), more than "
                                                         f"runPolicy.backoffLimit={limit}; last failure: {detail}")
            self.status.message = f"attempt {len(self.status.attempts) - 1} failed ({failures} of {limit} retries used): {detail}"
            self.event("Warning", "AttemptFailed", self.status.message)
        self.status.phase = "Training"
        self.condition("Training", "False", "Restarting", self.status.message)
        return self.finish()


def decide(observed: Observed) -> Decision:
    """observe -> decide: the new status, children to create, patches and events."""
    return _Pass(copy.deepcopy(observed)).run()
