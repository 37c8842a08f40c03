"""The operator's decisions as one pure function: observed state in, what to do out.

`decide(observed)` reads a FineTuneJob, its child Jobs and pods, its Secrets (present or not),
the dataset manifest and progress.json, and returns the new status, the objects to create, the
patches to apply and the Events to post. It never calls the API, so every rule below is a unit
test away, and a pass can be repeated at any moment: an operator restarted mid-way recomputes
the same answer from the same observations.

A pass is a sequence of steps (`_Pass.run`): stay finished, check the deadline, prepare the
dataset, train. Each step returns the Decision that ends the pass, or None to go on to the next.
The files the other components write are read through their models in kubetune.api.contracts.

Attempts: attempt i of the trainer runs in the Job for restart ordinal
`restart = number of attempts before i that ended Failed or Preempted` (`<name>-train`,
`<name>-train-r1`, ...). Failed attempts use the backoff budget (`status.restarts`); preempted
ones do not (`status.preemptions`).

Kueue: a Job with the queue label (spec.runPolicy.queueName) is Kueue's to suspend and unsuspend.
The operator never patches its `suspend`; it stops it (spec.suspend, a failed FineTuneJob) by
setting its Workload's `spec.active: false`, which Kueue documents as the way to stop a workload
and which keeps the Job (and so the attempt) to resume later; it deletes the Job of an attempt
that ended, so that it holds no quota; and it reports a Kueue eviction (preemption) as queued
again, neither an attempt nor a failure: Kueue readmits the same Job and the trainer resumes from
its checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kubetune import storage
from kubetune.api.contracts import DatasetManifest, StorageOwner, TrainingProgress, problem
from kubetune.api.layout import (
    CHECKPOINTS_DIR,
    DATASET_DIR,
    EXIT_DIVERGED,
    EXIT_EMPTY_DATASET,
    EXIT_INVALID,
    EXIT_STORAGE_OWNED,
    SAMPLES_DIR,
    dataset_fingerprint,
    step_of_checkpoint_uri,
)
from kubetune.api.models import (
    Attempt,
    Condition,
    DatasetStatus,
    FineTuneJobSpec,
    FineTuneJobStatus,
    TrainingStatus,
)
from kubetune.ownership import owned_message

from . import builders as b
from .objects import (
    ANNOTATION_KUEUE_EVICTIONS,
    ENDED_NEEDS_NEW_JOB,
    KUEUE_DEACTIVATED,
    annotations,
    component,
    job_attempt,
    job_failure_message,
    job_finished,
    job_suspended,
    kueue_eviction,
    labels,
    meta,
    pod_active,
    pod_exit_code,
    pod_job_name,
    pod_preempted,
    queued,
    recorded_kueue_evictions,
    recorded_preemptions,
    stopped_before_job_started,
    termination_message,
    workload_active,
    workload_of,
)

TERMINAL = ("Succeeded", "Failed")
CHECK_SOURCE = "check the source settings (prompts, URLs, minSize) and recreate the job"


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str  # CamelCase
    message: str


@dataclass
class Observed:
    """Everything one pass looks at. `pods` are the FineTuneJob's pods (collector and trainer);
    `secrets` maps each Secret named by the spec to its keys (None: it does not exist).
    `dataset_manifest` and `progress` are those files' JSON as read, None when absent; decide
    reads them as contracts.DatasetManifest and contracts.TrainingProgress."""

    name: str
    namespace: str
    uid: str
    generation: int | None
    spec: FineTuneJobSpec | None
    status: dict[str, Any]
    now: datetime
    spec_error: str = ""
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    workloads: list[dict[str, Any]] = field(default_factory=list)  # Kueue's Workloads of the queued Jobs
    pods: list[dict[str, Any]] = field(default_factory=list)
    service_exists: bool = False
    secrets: dict[str, set[str] | None] = field(default_factory=dict)  # name -> its keys; None: missing
    forbidden_secrets: set[str] = field(default_factory=set)  # named by the spec; the API answered 403
    dataset_manifest: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    storage_owner: dict[str, Any] | None = None  # owner.json as read before pods are made; None: absent/not read
    latest_checkpoint: str = ""  # listed in storage when a new attempt is due (progress.json may lag)
    storage_error: str = ""
    storage_unreadable: str = ""  # why the operator reads nothing from storage (progress comes from pods only)
    storage_refused: str = ""  # spec.storage.endpoint is not allowed: the job fails
    images: b.Images = field(default_factory=b.Images)


@dataclass
class Patch:
    kind: str  # "Job" or "Workload" (Kueue's)
    name: str
    body: dict[str, Any]  # merge patch


@dataclass
class Decision:
    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    patch: list[Patch] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)  # Jobs (with their pods)
    events: list[Event] = field(default_factory=list)

    @property
    def phase(self) -> str:
        return str(self.status.get("phase", "Pending"))


# -- reading what the collector and the trainer wrote ------------------------------------------

Contract = TypeVar("Contract", bound=BaseModel)


def read_contract(model: type[Contract], raw: dict[str, Any] | None) -> tuple[Contract | None, str]:
    """A file's JSON as its contract model; (None, "") when absent, (None, why) when it is not
    one (a key of the wrong type, a missing key)."""
    if raw is None:
        return None, ""
    try:
        return model.model_validate(raw), ""
    except ValidationError as error:
        return None, problem(error)


def dataset_status(manifest: DatasetManifest, uri: str) -> DatasetStatus:
    counts = manifest.counts
    return DatasetStatus(uri=uri, requested=counts.requested, kept=counts.kept, skipped=dict(counts.skipped))


def percent(step: int, max_steps: int) -> str:
    return f"{min(100, int(100 * step / max_steps))}%" if max_steps > 0 else ""


def duration(seconds: float) -> str:
    """Seconds as a short duration the way kubectl writes ages: `45s`, `2m30s`, `12m`, `1h5m`,
    `2d3h`."""
    total = max(0, round(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs and minutes < 10 else f"{minutes}m"
    return f"{secs}s"


def images_per_step(spec: FineTuneJobSpec) -> int:
    """Images one optimizer step trains (as the trainer counts its images/s): the batch per
    process, accumulated, on every process (one per GPU, or one per node on CPU); twice that with
    DreamBooth's prior preservation (a class image beside each instance image)."""
    processes = spec.trainer.nodes * max(spec.trainer.gpus_per_node, 1)
    dreambooth = spec.training.dreambooth
    pairs = 2 if dreambooth is not None and dreambooth.prior_preservation else 1
    return spec.training.batch_size * spec.training.gradient_accumulation_steps * processes * pairs


def eta_seconds(progress: TrainingProgress, step_images: int = 0) -> float | None:
    """Seconds left: the trainer's own estimate (from its recent step rate), else the steps left
    at its recent image throughput; None when neither is known."""
    if progress.eta_seconds is not None:
        return max(0.0, progress.eta_seconds)
    left = progress.max_steps - progress.step
    if progress.images_per_second and progress.images_per_second > 0 and step_images > 0 and left >= 0:
        return left * step_images / progress.images_per_second
    return None


def training_status(progress: TrainingProgress, now: datetime, step_images: int = 0) -> TrainingStatus:
    def number(value: float | None, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}g}"

    left = eta_seconds(progress, step_images)

    updated = progress.updated_at
    if updated is not None:
        updated = updated.replace(microsecond=0)
        updated = updated if updated.tzinfo else updated.replace(tzinfo=timezone.utc)
    return TrainingStatus(
        step=progress.step,
        max_steps=progress.max_steps,
        progress=percent(progress.step, progress.max_steps),
        epoch=progress.epoch,
        loss=number(progress.loss, 4),
        images_per_second=number(progress.images_per_second, 3),
        eta_seconds=None if left is None else int(left),
        eta="" if left is None else duration(left),
        latest_checkpoint=progress.latest_checkpoint or "",
        # the trainer's own timestamp: status only changes when progress does
        updated_at=updated or now,
    )


def missing_secrets(
    spec: FineTuneJobSpec,
    component_name: str,
    secrets: dict[str, set[str] | None],
    forbidden: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """One line per Secret or key a component needs that does not exist (or that the operator may
    not read), naming the field that refers to it. A pod with a missing Secret would wait forever
    in CreateContainerConfigError."""
    problems = []
    for path, ref in b.secret_ref_paths(spec, component_name):
        keys = secrets.get(ref.name)
        if ref.name in forbidden:
            problems.append(f"the operator may not read Secret '{ref.name}' (referenced by {path})")
        elif keys is None:
            problems.append(f"Secret '{ref.name}' not found (referenced by {path})")
        elif ref.key not in keys:
            problems.append(f"Secret '{ref.name}' has no key '{ref.key}' (referenced by {path})")
    return list(dict.fromkeys(problems))


# -- status helpers ----------------------------------------------------------------------------


def set_condition(
    conditions: list[Condition],
    kind: str,
    status: str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> None:
    """Set a condition by type; lastTransitionTime moves only when its status changes."""
    for i, old in enumerate(conditions):
        if old.type == kind:
            moved = old.status != status
            conditions[i] = Condition(
                type=kind,
                status=status,
                reason=reason,
                message=message,  # type: ignore[arg-type]
                last_transition_time=now if moved or old.last_transition_time is None else old.last_transition_time,
                observed_generation=generation,
            )
            return
    conditions.append(
        Condition(
            type=kind,
            status=status,
            reason=reason,
            message=message,  # type: ignore[arg-type]
            last_transition_time=now,
            observed_generation=generation,
        )
    )


def remove_condition(conditions: list[Condition], kind: str) -> None:
    conditions[:] = [c for c in conditions if c.type != kind]


def restart_of(attempts: list[Attempt], index: int) -> int:
    """Which trainer Job attempt `index` runs in (see the module docstring)."""
    return sum(1 for a in attempts[:index] if a.reason in ENDED_NEEDS_NEW_JOB)


# -- the decision ------------------------------------------------------------------------------


class _Pass:
    """One pass of decide(). Its steps update the working status (`self.status`) and collect
    what to create, patch and post (`self.decision`); a step returns the Decision that ends the
    pass (through `finish` or `fail`), or None when the next step should run."""

    def __init__(self, observed: Observed) -> None:
        self.o = observed
        self.old = FineTuneJobStatus.model_validate(observed.status or {}, strict=False)
        self.status = self.old.model_copy(deep=True)
        self.decision = Decision(status={})
        self.owner = b.Owner(observed.name, observed.namespace, observed.uid)
        self.manifest, self.manifest_problem = read_contract(DatasetManifest, observed.dataset_manifest)
        # an unreadable progress.json is as if absent: the status keeps the last good one
        self.progress, _ = read_contract(TrainingProgress, observed.progress)
        self.kueue_evicted = ""  # the Training condition's reason while Kueue has evicted the Job

    # the flow

    def run(self) -> Decision:
        spec = self.o.spec
        if spec is None:
            return self.fail("InvalidSpec", self.o.spec_error or "the spec cannot be read")
        if self.status.phase not in TERMINAL:
            self.status.start_time = self.status.start_time or self.o.now
        steps = (
            self.stay_finished,
            self.check_storage_endpoint,
            self.check_storage_owner,
            self.check_deadline,
            self.prepare_dataset,
        )
        for step in steps:
            ended = step(spec)
            if ended is not None:
                return ended
        return self.train(spec)

    def stay_finished(self, spec: FineTuneJobSpec) -> Decision | None:
        """A finished job stays as it is; a failed one keeps its Jobs stopped."""
        if self.status.phase not in TERMINAL:
            return None
        if self.status.phase == "Failed":
            self.suspend_running_jobs()
        return self.finish()

    def check_storage_endpoint(self, spec: FineTuneJobSpec) -> Decision | None:
        """A job whose spec.storage.endpoint the operator's allowlist does not admit fails."""
        if not self.o.storage_refused:
            return None
        return self.fail("StorageEndpointNotAllowed", self.o.storage_refused)

    def check_storage_owner(self, spec: FineTuneJobSpec) -> Decision | None:
        """A job whose storage.uri another FineTuneJob owns (its owner.json names another uid)
        fails before any pod is made: its pods would refuse the prefix anyway. Not retried."""
        if self.o.storage_owner is None:
            return None
        owner, why = read_contract(StorageOwner, self.o.storage_owner)
        if owner is None:
            message = f"storage.uri {spec.storage.uri}: owner.json is not an owner marker ({why}); delete it to reuse"
            return self.fail("StorageOwned", message)
        assert isinstance(owner, StorageOwner)
        if owner.uid == self.o.uid:
            return None
        return self.fail("StorageOwned", owned_message(spec.storage.uri, owner))

    def check_deadline(self, spec: FineTuneJobSpec) -> Decision | None:
        deadline = spec.run_policy.active_deadline_seconds
        assert self.status.start_time is not None
        if deadline and (self.o.now - self.status.start_time).total_seconds() > deadline:
            return self.fail(
                "DeadlineExceeded",
                f"the job ran longer than runPolicy.activeDeadlineSeconds={deadline}; "
                "raise it or lower training.maxTrainSteps",
            )
        return None

    # dataset

    def prepare_dataset(self, spec: FineTuneJobSpec) -> Decision | None:
        """None once the dataset is ready; else the pass ends collecting (or failed)."""
        o = self.o
        if spec.dataset.imagefolder:
            self.use_imagefolder(spec.dataset.imagefolder.uri)
            return None
        uri = storage.join(spec.storage.uri, DATASET_DIR)
        ready = self.has_condition("DatasetReady", "True")
        if self.status.attempts and ready and o.dataset_manifest is None:
            return None  # ready before training started (the manifest is not read again)
        collect_name = b.collector_job_name(o.name)
        collector = o.jobs.get(collect_name)
        wanted = dataset_fingerprint(spec.dataset)
        started_with = annotations(collector).get(b.ANNOTATION_FINGERPRINT, wanted)
        manifest = self.manifest
        if manifest is not None and manifest.fingerprint not in (wanted, started_with):
            manifest = None  # of other settings: collected again
        if manifest is not None and manifest.empty and collector is None:
            manifest = None  # an earlier job's empty result: collected again (the collector retries)
        if manifest is not None:
            return self.use_collected_dataset(manifest, uri, collector, started_with != wanted)
        if o.storage_error:
            return self.storage_unreachable()
        secrets_missing = self.secrets_missing(spec, b.COLLECTOR)
        if collector is None:
            if secrets_missing:
                return self.finish()  # nothing runs that would wait on the Secret; checked again every resync
            return self.start_collector(spec, uri, collect_name)
        return self.follow_collector(spec, uri, collect_name, collector, started_with != wanted)

    def use_imagefolder(self, uri: str) -> None:
        if not (self.status.dataset and self.status.dataset.uri == uri):
            self.status.dataset = DatasetStatus(uri=uri)
        self.condition("DatasetReady", "True", "ImageFolder", f"training on the existing imagefolder {uri}")

    def use_collected_dataset(
        self, manifest: DatasetManifest, uri: str, collector: dict[str, Any] | None, spec_changed: bool
    ) -> Decision | None:
        """The manifest's counts into status; fails an empty dataset, else None (ready)."""
        counts = self.status.dataset = dataset_status(manifest, uri)
        if manifest.empty:
            skipped = ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.skipped.items())) or "none"
            return self.fail(
                "EmptyDataset",
                f"the collector kept 0 of {counts.requested} requested images (skipped: {skipped}); {CHECK_SOURCE}",
            )
        if spec_changed:
            self.spec_change_ignored(
                "spec.dataset changed after collection started; the dataset already collected is used"
            )
        found = collector is None
        if not self.has_condition("DatasetReady", "True"):
            self.event(
                "Normal",
                "DatasetFound" if found else "DatasetCollected",
                f"{counts.kept} images in {uri}" + (" (collected earlier with the same settings)" if found else ""),
            )
        self.condition(
            "DatasetReady", "True", "DatasetFound" if found else "Collected", f"{counts.kept} images in {uri}"
        )
        return None

    def storage_unreachable(self) -> Decision:
        self.status.message = f"cannot read storage: {self.o.storage_error}"
        self.condition("DatasetReady", "Unknown", "StorageUnreachable", self.status.message)
        return self.finish()

    def held_out_of_the_queue(self, spec: FineTuneJobSpec, what: str) -> Decision | None:
        """A suspended FineTuneJob with a Kueue queue creates no Job: Kueue admits a queued Job
        whose Workload is active, so a Job created suspended could run before the operator
        deactivates its Workload. The Job is created once spec.suspend is false."""
        if not (spec.suspend and spec.run_policy.queue_name):
            return None
        self.status.phase = "Suspended"
        self.status.message = f"suspended (spec.suspend); its {what} Job is created when it is resumed"
        self.condition("Suspended", "True", "SpecSuspend", self.status.message)
        if self.old.phase != "Suspended":
            self.event("Normal", "Suspended", self.status.message)
        return self.finish()

    def start_collector(self, spec: FineTuneJobSpec, uri: str, collect_name: str) -> Decision:
        if (held := self.held_out_of_the_queue(spec, "collector")) is not None:
            return held
        self.decision.create.append(b.collector_job(spec, self.owner, self.o.images))
        self.status.phase = "Collecting"
        self.status.message = f"collecting the dataset ({spec.dataset.source_name}) into {uri}"
        self.condition("DatasetReady", "False", "Collecting", self.status.message)
        if not spec.suspend and not spec.run_policy.queue_name:
            # what the next pass would add once the Job exists: one status write, not two
            self.condition("Suspended", "False", "NotSuspended")
        self.event("Normal", "CollectionStarted", f"created Job {collect_name}")
        return self.finish()

    def follow_collector(
        self, spec: FineTuneJobSpec, uri: str, collect_name: str, collector: dict[str, Any], spec_changed: bool
    ) -> Decision | None:
        finished = job_finished(collector)
        if finished == "Failed":
            return self.collector_failed(collector, collect_name)
        if finished == "Complete" and self.o.storage_unreadable:
            # the collector exits 0 only with a complete dataset; its counts cannot be read
            message = f"collected into {uri} (counts unavailable: the operator does not read this job's storage)"
            if not self.has_condition("DatasetReady", "True"):
                self.event("Normal", "DatasetCollected", message)
            self.condition("DatasetReady", "True", "Collected", message)
            return None
        if finished == "Complete":
            what = "is missing or for other settings"
            if self.manifest_problem:
                what = f"is not a dataset manifest: {self.manifest_problem}"
            message = f"the collector finished but {uri}/manifest.json {what}"
            self.condition("DatasetReady", "False", "DatasetIncomplete", message)
            return self.fail("DatasetIncomplete", message)
        if spec_changed:
            self.spec_change_ignored(
                "spec.dataset changed after collection started; the collection continues with the old settings"
            )
        self.suspension(
            collector, collect_name, "Collecting", f"collecting the dataset ({spec.dataset.source_name}) into {uri}"
        )
        self.condition("DatasetReady", "False", "Collecting", self.status.message)
        return self.finish()

    def collector_failed(self, collector: dict[str, Any], collect_name: str) -> Decision:
        """Fail with the collector's reason, told by its exit code, and its last words."""
        pods = self.pods_of(collect_name)
        codes = {pod_exit_code(p, b.COLLECTOR) for p in pods}
        detail = termination_message(pods, b.COLLECTOR) or job_failure_message(collector) or "Job failed"
        if EXIT_STORAGE_OWNED in codes:  # another job claimed the prefix after this pass looked
            reason, message = "StorageOwned", detail
        elif EXIT_EMPTY_DATASET in codes:  # and its manifest (kept 0) could not be read
            reason = "EmptyDataset"
            message = f"the collector kept no images: {detail}; {CHECK_SOURCE}"
        elif EXIT_INVALID in codes:
            reason, message = "CollectorInvalidInput", f"the collector rejected its input: {detail}"
        else:
            reason, message = "CollectionFailed", f"the collector failed: {detail}"
        self.condition("DatasetReady", "False", reason, message)
        return self.fail(reason, message)

    # training

    def train(self, spec: FineTuneJobSpec) -> Decision:
        o = self.o
        attempts = self.status.attempts
        creates_job = (
            not attempts
            or attempts[-1].reason in ENDED_NEEDS_NEW_JOB
            or b.trainer_job_name(o.name, restart_of(attempts, len(attempts) - 1)) not in o.jobs
        )
        if self.secrets_missing(spec, b.TRAINER) and creates_job:
            self.condition("Training", "False", self.secrets_reason(), self.status.message)
            return self.finish()  # nothing runs that would wait on the Secret; checked again every resync
        if self.progress is not None:
            self.status.training = training_status(self.progress, o.now, images_per_step(spec))
        if o.storage_unreadable:
            self.condition(
                "ProgressAvailable",
                "False",
                "StorageNotRead",
                f"the operator does not read this job's storage ({o.storage_unreadable}); status follows the pods only",
            )
        else:
            remove_condition(self.status.conditions, "ProgressAvailable")
        if not o.service_exists:
            self.decision.create.append(b.trainer_service(spec, self.owner))
        if not attempts or attempts[-1].reason in ENDED_NEEDS_NEW_JOB:
            return self.start_attempt(spec)
        restart = restart_of(attempts, len(attempts) - 1)
        name = b.trainer_job_name(o.name, restart)
        job = o.jobs.get(name)
        if job is None:  # recorded in status but not created yet (or deleted by hand): create it
            if (held := self.held_out_of_the_queue(spec, "trainer")) is not None:
                return held
            self.decision.create.append(b.trainer_job(spec, self.owner, restart, o.images))
            self.status.phase = "Training"
            self.status.message = f"starting attempt {len(attempts) - 1} (Job {name})"
            self.condition("Training", "False", "Starting", self.status.message)
            return self.finish()
        started_with = annotations(job).get(b.ANNOTATION_TRAINING_HASH)
        if started_with and started_with != b.training_hash(spec):
            self.spec_change_ignored(
                "spec.model, spec.training or the trainer layout changed after training started; "
                "the running training keeps its settings (create a new FineTuneJob to apply them)"
            )
        finished = job_finished(job)
        pods = self.pods_of(name)
        self.record_preempted_pods(job, name, pods)
        if finished == "Complete":
            return self.succeed(spec, name)
        if finished == "Failed":
            return self.attempt_failed(spec, job, name, pods)
        if (
            spec.trainer.nodes > 1
            and (recorded_preemptions(job) or self.pending_preemption_patch(name))
            and not job_suspended(job)
        ):
            return self.restart_preempted_gang(spec, name)
        return self.follow_training(job, name)

    def follow_training(self, job: dict[str, Any], name: str) -> Decision:
        step = self.status.training.step if self.status.training else 0
        attempt = len(self.status.attempts) - 1
        self.suspension(job, name, "Training", f"training attempt {attempt} (Job {name}) at step {step}")
        if self.status.phase == "Training" and self.kueue_evicted:
            self.condition("Training", "False", self.kueue_evicted, self.status.message)
        elif self.status.phase == "Training":
            self.condition(
                "Training",
                "True" if not job_suspended(job) else "False",
                "Running" if not job_suspended(job) else "Queued",
                self.status.message,
            )
        else:
            self.condition("Training", "False", "Suspended", self.status.message)
        return self.finish()

    def restart_preempted_gang(self, spec: FineTuneJobSpec, name: str) -> Decision:
        """One rank preempted breaks the whole gang: stop the rest, start a new attempt."""
        job = self.o.jobs[name]
        if queued(job):
            self.delete_job(name, job)  # the new attempt gets a fresh Job; this one must not hold quota
        else:
            self.decision.patch.append(Patch("Job", name, {"spec": {"suspend": True}}))
        self.end_attempt("Preempted")
        self.event(
            "Warning",
            "Preempted",
            f"a pod of Job {name} was preempted; restarting all {spec.trainer.nodes} nodes from the latest checkpoint",
        )
        self.status.message = "preempted; a new attempt resumes from the latest checkpoint"
        self.condition("Training", "False", "Preempted", self.status.message)
        self.status.phase = "Training"
        return self.finish()

    def pending_preemption_patch(self, name: str) -> bool:
        return any(p.name == name and b.ANNOTATION_PREEMPTED_PODS in annotations(p.body) for p in self.decision.patch)

    def record_preempted_pods(self, job: dict[str, Any], name: str, pods: list[dict[str, Any]]) -> None:
        """Remember preempted pods on their Job: they vanish from the API soon after (evicted
        pods are deleted), and the Job controller does not count ignored failures."""
        if job_suspended(job) or job_finished(job) == "Complete":
            return  # pods stopped by a suspension are not preemptions
        if queued(job) and kueue_eviction(workload_of(job, self.o.workloads)):
            return  # Kueue is stopping the Job: its pods are stopped by Kueue, reported as such
        known = recorded_preemptions(job)
        new = [
            str(meta(p)["uid"])
            for p in pods
            if pod_preempted(p, b.TRAINER)
            and meta(p).get("uid")
            and meta(p)["uid"] not in known
            and not stopped_before_job_started(p, job)
        ]
        if new:
            uids = ",".join(known + new)
            recorded = {b.ANNOTATION_PREEMPTED_PODS: uids}
            self.decision.patch.append(Patch("Job", name, {"metadata": {"annotations": recorded}}))
            job.setdefault("metadata", {}).setdefault("annotations", {}).update(recorded)
            self.event(
                "Warning",
                "PodPreempted",
                f"{len(new)} trainer pod(s) of Job {name} preempted; "
                "they resume from the latest checkpoint (not counted against backoffLimit)",
            )

    def start_attempt(self, spec: FineTuneJobSpec) -> Decision:
        o = self.o
        attempts = self.status.attempts
        index = len(attempts)
        restart = restart_of(attempts, index)
        name = b.trainer_job_name(o.name, restart)
        if name not in o.jobs and (held := self.held_out_of_the_queue(spec, "trainer")) is not None:
            return held
        for old_name, old in self.trainer_jobs().items():
            if old_name != name and queued(old):
                self.delete_job(old_name, old)  # an ended attempt's Job must not hold Kueue quota
        still_running = [meta(p)["name"] for p in o.pods if pod_active(p) and component(p) == b.TRAINER]
        self.status.phase = "Training"
        if still_running:  # never two trainer gangs writing the same checkpoints
            self.status.message = (
                f"waiting for the previous attempt's pods to stop: {', '.join(sorted(still_running)[:3])}"
            )
            self.condition("Training", "False", "WaitingForPreviousAttempt", self.status.message)
            return self.finish()
        resume_from = self.status.training.latest_checkpoint if self.status.training else ""
        if step_of_checkpoint_uri(o.latest_checkpoint) > step_of_checkpoint_uri(resume_from):
            resume_from = o.latest_checkpoint  # a checkpoint completed after the last progress.json
        attempts.append(Attempt(index=index, start_step=step_of_checkpoint_uri(resume_from), start_time=o.now))
        if name not in o.jobs:
            self.decision.create.append(b.trainer_job(spec, self.owner, restart, o.images))
        self.status.message = f"starting attempt {index} (Job {name})" + (
            f", resuming from {resume_from}" if resume_from else ""
        )
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
            status.training.eta = duration(0)
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

    def attempt_failed(
        self, spec: FineTuneJobSpec, job: dict[str, Any], name: str, pods: list[dict[str, Any]]
    ) -> Decision:
        detail = termination_message(pods, b.TRAINER) or job_failure_message(job) or "Job failed"
        if any(pod_exit_code(p, b.TRAINER) == EXIT_STORAGE_OWNED for p in pods):
            return self.fail("StorageOwned", detail)
        if any(pod_exit_code(p, b.TRAINER) == EXIT_INVALID for p in pods):
            return self.fail("TrainerInvalidInput", f"the trainer rejected its input (retrying cannot help): {detail}")
        if any(pod_exit_code(p, b.TRAINER) == EXIT_DIVERGED for p in pods):
            return self.fail(
                "TrainingDiverged",
                f"the loss became NaN or inf (retrying the same settings cannot "
                f"help; the checkpoints before it are kept): {detail}",
            )
        progress_preempted = self.progress is not None and self.progress.state == "preempted"
        preempted = (
            bool(recorded_preemptions(job)) or any(pod_preempted(p, b.TRAINER) for p in pods) or progress_preempted
        )
        if preempted:
            self.end_attempt("Preempted")
            self.status.message = (
                f"attempt {len(self.status.attempts) - 1} was preempted; resuming from the latest checkpoint"
            )
            self.event("Warning", "Preempted", self.status.message)
        else:
            self.end_attempt("Failed")
            failures = sum(1 for a in self.status.attempts if a.reason == "Failed")
            limit = spec.run_policy.backoff_limit
            if failures > limit:
                return self.fail(
                    "BackoffLimitExceeded",
                    f"the trainer failed {failures} time(s), more than "
                    f"runPolicy.backoffLimit={limit}; last failure: {detail}",
                )
            self.status.message = (
                f"attempt {len(self.status.attempts) - 1} failed ({failures} of {limit} retries used): {detail}"
            )
            self.event("Warning", "AttemptFailed", self.status.message)
        self.status.phase = "Training"
        self.condition("Training", "False", "Restarting", self.status.message)
        return self.finish()

    # shared by the steps

    def fail(self, reason: str, message: str) -> Decision:
        """End the pass Failed: the reason in conditions; running Jobs stop (kept for inspection)."""
        self.status.phase = "Failed"
        self.status.message = message
        self.status.completion_time = self.status.completion_time or self.o.now
        self.condition("Succeeded", "False", reason, message)
        self.condition("Training", "False", reason, message)
        remove_condition(self.status.conditions, "Suspended")
        if self.status.attempts and not self.status.attempts[-1].reason:
            self.end_attempt("Failed")
        self.suspend_running_jobs()
        return self.finish()

    def secrets_missing(self, spec: FineTuneJobSpec, component_name: str) -> bool:
        """Whether a Secret key `component_name` needs is missing (or unreadable). The job does not
        fail for it: a GitOps apply may land the FineTuneJob before its Secret. Condition
        `SecretsReady` says what is missing (an Event when that changes); the caller decides
        whether to wait (before creating pods that would need it) or go on (pods already run)."""
        o = self.o
        problems = missing_secrets(spec, component_name, o.secrets, o.forbidden_secrets)
        if not problems:
            if any(c.type == "SecretsReady" for c in self.status.conditions):
                self.condition("SecretsReady", "True", "SecretsFound", "every Secret the job needs exists")
            return False
        forbidden = any(p.startswith("the operator may not read") for p in problems)
        reason = "SecretForbidden" if forbidden else "SecretNotFound"
        if forbidden:
            action = (
                f"the operator's RBAC role cannot get Secrets in namespace {o.namespace}: grant it "
                "(the chart's operator ClusterRole, or a Role in this namespace); the job continues once it can"
            )
        else:
            action = f"waiting for it in namespace {o.namespace}; the job continues once it exists"
        message = "; ".join(problems) + f": {action}"
        old = next((c for c in self.old.conditions if c.type == "SecretsReady"), None)
        if old is None or old.status != "False" or old.reason != reason or old.message != message:
            self.event("Warning", reason, message)
        self.condition("SecretsReady", "False", reason, message)
        self.status.message = message
        return True

    def secrets_reason(self) -> str:
        return next((c.reason for c in self.status.conditions if c.type == "SecretsReady"), "SecretNotFound")

    def finish(self) -> Decision:
        """End the pass: the counters and the summary condition, one event for a new phase."""
        status = self.status
        status.observed_generation = self.o.generation
        status.restarts = sum(1 for a in status.attempts if a.reason == "Failed")
        # never lower: the Job of an ended attempt of a queued job is deleted with what it recorded
        status.preemptions = max(self.count_preemptions(), self.old.preemptions or 0)
        phase = status.phase
        if phase not in TERMINAL:
            self.condition("Succeeded", "Unknown", phase, status.message)
        self.ready_condition()
        if phase != self.old.phase:
            kind = "Warning" if phase == "Failed" else "Normal"
            reason = (
                next((c.reason for c in status.conditions if c.type == "Succeeded"), phase)
                if phase in TERMINAL
                else phase
            )
            if not self.decision.events:
                self.event(kind, reason, status.message or f"phase {phase}")
        self.decision.status = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        return self.decision

    def ready_condition(self) -> None:
        """`Ready`, the summary health tools read (kstatus, Argo CD, Flux): True once Succeeded;
        False with the phase as reason while in progress (Pending, Collecting, Training,
        Suspended), and with the failure reason once Failed."""
        status = self.status
        if status.phase == "Succeeded":
            self.condition("Ready", "True", "Succeeded", status.message)
            return
        reason = status.phase
        if status.phase == "Failed":
            reason = next((c.reason for c in status.conditions if c.type == "Succeeded"), "Failed") or "Failed"
        self.condition("Ready", "False", reason, status.message)

    def event(self, kind: str, reason: str, message: str) -> None:
        self.decision.events.append(Event(kind, reason, message))

    def condition(self, kind: str, status: str, reason: str, message: str = "") -> None:
        set_condition(self.status.conditions, kind, status, reason, message, self.o.now, self.o.generation)

    def has_condition(self, kind: str, status: str) -> bool:
        return any(c.type == kind and c.status == status for c in self.old.conditions)

    def suspend_running_jobs(self) -> None:
        for name, job in self.o.jobs.items():
            if job_finished(job):
                continue
            if queued(job):
                self.set_workload_active(job, False)  # Kueue suspends it, and releases its quota
            elif not job_suspended(job):
                self.decision.patch.append(Patch("Job", name, {"spec": {"suspend": True}}))

    def set_workload_active(self, job: dict[str, Any], active: bool) -> bool:
        """Set `spec.active` of the queued Job's Kueue Workload: false evicts it (Kueue suspends
        the Job, keeps it out of the queue and releases its quota), true queues it again. False
        when Kueue has not made the Workload yet (a later pass does it)."""
        workload = workload_of(job, self.o.workloads)
        if workload is None:
            return False
        if workload_active(workload) != active:
            self.decision.patch.append(Patch("Workload", str(meta(workload)["name"]), {"spec": {"active": active}}))
        return True

    def delete_job(self, name: str, job: dict[str, Any]) -> None:
        if not meta(job).get("deletionTimestamp") and name not in self.decision.delete:
            self.decision.delete.append(name)

    def end_attempt(self, reason: str) -> None:
        attempt = self.status.attempts[-1]
        attempt.reason = reason
        attempt.end_step = self.status.training.step if self.status.training else attempt.start_step
        attempt.end_time = self.o.now

    def count_preemptions(self) -> int:
        attempts = self.status.attempts
        counted = 0
        seen_restarts: set[int] = set()
        for job in self.trainer_jobs().values():
            counted += len(recorded_kueue_evictions(job))
            uids = recorded_preemptions(job)
            counted += len(uids)
            if uids:
                seen_restarts.add(job_attempt(job))
        for i, attempt in enumerate(attempts):  # preempted attempts known only from progress.json
            if attempt.reason == "Preempted" and restart_of(attempts, i) not in seen_restarts:
                counted += 1
        return counted

    def trainer_jobs(self) -> dict[str, dict[str, Any]]:
        return {n: j for n, j in self.o.jobs.items() if component(j) == b.TRAINER}

    def pods_of(self, job_name: str) -> list[dict[str, Any]]:
        return [p for p in self.o.pods if pod_job_name(p) == job_name]

    def spec_change_ignored(self, message: str) -> None:
        if not self.has_condition("SpecChangeIgnored", "True"):
            self.event("Warning", "SpecChangeIgnored", message)
        self.condition("SpecChangeIgnored", "True", "ImmutableFieldChanged", message)

    def suspension(self, job: dict[str, Any], job_name: str, running_phase: str, running_message: str) -> None:
        """Follow spec.suspend on a running child Job, and tell queued from running. A Job of
        Kueue's is stopped and resumed through its Workload, never by patching `suspend`."""
        spec = self.o.spec
        assert spec is not None
        kueue = queued(job)
        workload = workload_of(job, self.o.workloads) if kueue else None
        if spec.suspend:
            how = ""
            if kueue:
                found = self.set_workload_active(job, False)
                how = (
                    " (its Kueue Workload is deactivated)"
                    if found
                    else " (once Kueue made its Workload, to deactivate)"
                )
            elif not job_suspended(job):
                self.decision.patch.append(Patch("Job", job_name, {"spec": {"suspend": True}}))
            if self.status.phase != "Suspended":
                self.event(
                    "Normal", "Suspended", f"suspended Job {job_name}; it continues from its checkpoint when resumed"
                )
            self.status.phase = "Suspended"
            self.status.message = f"suspended (spec.suspend); Job {job_name} keeps its progress{how}"
            self.condition("Suspended", "True", "SpecSuspend", self.status.message)
            return
        deactivated = workload is not None and not workload_active(workload)
        if deactivated and self.has_condition("Suspended", "True"):
            # the operator deactivated it for spec.suspend: queued again, Kueue readmits it
            assert workload is not None
            self.decision.patch.append(Patch("Workload", str(meta(workload)["name"]), {"spec": {"active": True}}))
            self.event("Normal", "Resumed", f"resumed Job {job_name}: its Kueue Workload is queued again")
            deactivated = False
        elif not kueue and job_suspended(job):
            self.decision.patch.append(Patch("Job", job_name, {"spec": {"suspend": False}}))
            if self.old.phase == "Suspended":
                self.event("Normal", "Resumed", f"resumed Job {job_name}")
        self.condition("Suspended", "False", "NotSuspended")
        self.status.phase = running_phase
        eviction = kueue_eviction(workload)
        if eviction is not None and eviction.get("reason") not in KUEUE_DEACTIVATED:
            self.evicted_by_kueue(job, job_name, eviction)
        elif deactivated:
            # not by this operator (an administrator, or Kueue's requeuing limit): not fought
            self.status.message = (
                f"Job {job_name} is stopped: its Kueue Workload {meta(workload)['name']} was deactivated "
                "(spec.active: false); it continues from its checkpoint once reactivated"
            )
        elif kueue and job_suspended(job):
            self.status.message = (
                f"waiting for Kueue to admit Job {job_name} (queue {labels(job)[b.KUEUE_QUEUE_LABEL]})"
            )
        else:
            self.status.message = running_message

    def evicted_by_kueue(self, job: dict[str, Any], job_name: str, eviction: dict[str, Any]) -> None:
        """Kueue evicted the Job (preempted it for another workload, mostly): it suspends the Job,
        the pods checkpoint and stop, and the same Job runs on when readmitted. Neither an attempt
        nor a failure; counted once as a preemption (the eviction's time is kept on the Job)."""
        reason = str(eviction.get("reason") or "Evicted")
        what = "preemption" if reason == "Preempted" else f"eviction ({reason})"
        detail = str(eviction.get("message") or "").strip()
        self.kueue_evicted = "PreemptedByKueue" if reason == "Preempted" else "EvictedByKueue"
        self.status.message = (
            f"queued again after {what} by Kueue" + (f" ({detail})" if detail else "") + f"; Job {job_name} "
            "resumes from the latest checkpoint when Kueue admits it again"
        )
        when = str(eviction.get("lastTransitionTime") or "unknown")
        known = recorded_kueue_evictions(job)
        if when not in known:
            recorded = {ANNOTATION_KUEUE_EVICTIONS: ",".join([*known, when])}
            self.decision.patch.append(Patch("Job", job_name, {"metadata": {"annotations": recorded}}))
            job.setdefault("metadata", {}).setdefault("annotations", {}).update(recorded)
            self.event("Warning", self.kueue_evicted, self.status.message)


def decide(observed: Observed) -> Decision:
    """observe -> decide: the new status, children to create, patches and events."""
    return _Pass(copy.deepcopy(observed)).run()


def child_rejected(observed: Observed, kind: str, name: str, detail: str) -> Decision:
    """The pass that follows the API server refusing (HTTP 400/422) a child the spec made: the
    same spec makes the same object again, so the job fails with reason InvalidChildObject and
    the fields the API server named (a Warning Event says the same)."""
    return _Pass(copy.deepcopy(observed)).fail(
        "InvalidChildObject",
        f"the API server rejected {kind} {name} built from this spec (retrying cannot help; fix the spec "
        f"and recreate the FineTuneJob): {detail}",
    )
