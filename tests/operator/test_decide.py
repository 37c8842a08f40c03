"""The operator's decisions, pass by pass, without a cluster: what a user sees in status and events."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from kubetune.api.contracts import DatasetCounts, DatasetManifest, StorageOwner
from kubetune.api.layout import EXIT_EMPTY_DATASET, dataset_fingerprint
from kubetune.api.load import parse_spec
from kubetune.operator import builders as b
from kubetune.operator.decide import Decision, Observed, decide
from kubetune.operator.objects import new_attempt_due

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
NAME = "shapes"

UNSPLASH = {"unsplash": {"prompts": ["a circle"], "accessKeySecretRef": {"name": "unsplash", "key": "access-key"}}}


def spec_dict(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "dataset": UNSPLASH,
        "model": {"base": "s3://kubetune-dev/models/tiny-sd/"},
        "storage": {"uri": "s3://bucket/shapes/"},
        "runPolicy": {"backoffLimit": 2},
    }
    spec.update(overrides)
    return spec


class World:
    """A FineTuneJob's observed state that passes of decide() update the way the API would:
    created children appear, patches apply, status is written back."""

    def __init__(self, **spec_overrides: Any) -> None:
        self.spec = spec_dict(**spec_overrides)
        self.status: dict[str, Any] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.workloads: dict[str, dict[str, Any]] = {}  # Kueue's, by the name of the Job that owns it
        self.deleted: list[str] = []  # Jobs the operator deleted
        self.pods: list[dict[str, Any]] = []
        self.service = False
        self.secrets: dict[str, set[str] | None] = {"unsplash": {"access-key"}}
        self.manifest: dict[str, Any] | None = None
        self.progress: dict[str, Any] | None = None
        self.checkpoints: list[str] = []  # complete checkpoints in storage, e.g. "step-00000020"
        self.owner: dict[str, Any] | None = None  # owner.json at storage.uri
        self.now = T0
        self.generation = 1
        self.created: list[dict[str, Any]] = []

    def observed(self) -> Observed:
        return Observed(
            name=NAME,
            namespace="default",
            uid="uid-1",
            generation=self.generation,
            spec=parse_spec(self.spec),
            status=copy.deepcopy(self.status),
            now=self.now,
            jobs=copy.deepcopy(self.jobs),
            workloads=copy.deepcopy(list(self.workloads.values())),
            pods=copy.deepcopy(self.pods),
            service_exists=self.service,
            secrets=copy.deepcopy(self.secrets),
            dataset_manifest=self.manifest,
            progress=self.progress,
            latest_checkpoint=max(self.checkpoints, default="") if new_attempt_due(self.status) else "",
            storage_owner=self.owner,
        )

    def step(self, seconds: float = 5) -> Decision:
        self.now += timedelta(seconds=seconds)
        decision = decide(self.observed())
        self.status = decision.status
        for obj in decision.create:
            self.created.append(obj)
            if obj["kind"] == "Job":
                assert obj["metadata"]["name"] not in self.jobs, "a Job was created twice"
                self.jobs[obj["metadata"]["name"]] = copy.deepcopy(obj)
                self.jobs[obj["metadata"]["name"]]["metadata"]["uid"] = f"uid-{obj['metadata']['name']}"
            elif obj["kind"] == "Service":
                self.service = True
        for patch in decision.patch:
            if patch.kind == "Workload":
                workload = next(w for w in self.workloads.values() if w["metadata"]["name"] == patch.name)
                workload["spec"].update(patch.body["spec"])
                continue
            job = self.jobs[patch.name]
            job["spec"].update(patch.body.get("spec", {}))
            job["metadata"].setdefault("annotations", {}).update(
                (patch.body.get("metadata") or {}).get("annotations", {})
            )
        for name in decision.delete:
            self.deleted.append(name)
            self.jobs.pop(name)
            self.workloads.pop(name, None)  # the garbage collector deletes what the Job owned
        return decision

    # what the cluster does

    def kueue_workload(self, job: str) -> dict[str, Any]:
        """Kueue makes the Workload of a queued Job (it owns it)."""
        self.workloads[job] = {
            "metadata": {"name": f"job-{job}-abcde", "ownerReferences": [{"uid": f"uid-{job}", "controller": True}]},
            "spec": {"active": True, "queueName": "gpu-team"},
            "status": {},
        }
        return self.workloads[job]

    def kueue_admits(self, job: str) -> None:
        workload = self.workloads.get(job) or self.kueue_workload(job)
        workload["status"]["conditions"] = [
            {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved"},
            {"type": "Admitted", "status": "True", "reason": "Admitted"},
            *[
                {**c, "status": "False", "reason": "QuotaReserved", "message": f"Previously: {c['message']}"}
                for c in workload["status"].get("conditions", [])
                if c["type"] == "Evicted"
            ],
        ]
        self.jobs[job]["spec"]["suspend"] = False
        # the Job controller resets startTime when a Job is resumed
        started = (self.now + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
        self.jobs[job].setdefault("status", {})["startTime"] = started

    def kueue_evicts(self, job: str, reason: str, message: str, at: str = "2026-01-01T12:10:00Z") -> None:
        """Kueue evicts the Workload and suspends its Job (its pods are stopped)."""
        workload = self.workloads[job]
        evicted = {"type": "Evicted", "status": "True", "reason": reason, "message": message, "lastTransitionTime": at}
        conditions = [c for c in workload["status"].get("conditions", []) if c["type"] != "Evicted"]
        workload["status"]["conditions"] = [*conditions, evicted]
        self.jobs[job]["spec"]["suspend"] = True

    def finish_job(self, name: str, kind: str, message: str = "") -> None:
        self.jobs[name]["status"] = {"conditions": [{"type": kind, "status": "True", "message": message}]}

    def add_pod(
        self,
        job: str,
        exit_code: int | None = None,
        message: str = "",
        disrupted: bool = False,
        phase: str | None = None,
        component: str = "trainer",
    ) -> None:
        uid = f"pod-{len(self.pods)}"
        status: dict[str, Any] = {
            "phase": phase or ("Running" if exit_code is None else "Failed" if exit_code else "Succeeded")
        }
        if exit_code is not None:
            status["containerStatuses"] = [
                {"name": component, "state": {"terminated": {"exitCode": exit_code, "message": message}}}
            ]
        if disrupted:
            status["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]
        self.pods.append(
            {
                "metadata": {
                    "name": f"{job}-0-{uid}",
                    "uid": uid,
                    "creationTimestamp": f"2026-01-01T12:00:{len(self.pods):02d}Z",
                    "labels": {"batch.kubernetes.io/job-name": job, b.LABEL_COMPONENT: component},
                },
                "status": status,
            }
        )

    def condition(self, kind: str) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == kind)


def reasons(decision: Decision) -> list[str]:
    return [e.reason for e in decision.events]


def good_manifest(spec: dict[str, Any], kept: int = 12) -> dict[str, Any]:
    counts = DatasetCounts(requested=20, kept=kept, skipped={"too_small": 8 if kept else 20})
    manifest = DatasetManifest(fingerprint=dataset_fingerprint(parse_spec(spec).dataset), counts=counts)
    return manifest.model_dump(mode="json", by_alias=True)


def to_training(world: World) -> None:
    """Collect, then start training (attempt 0)."""
    world.step()
    world.finish_job(f"{NAME}-collect", "Complete")
    world.manifest = good_manifest(world.spec)
    world.step()
    assert world.status["phase"] == "Training"


# -- collection --------------------------------------------------------------------------------


def test_a_new_job_starts_collecting_with_a_collector_job() -> None:
    world = World()
    decision = world.step()
    assert [o["metadata"]["name"] for o in decision.create] == ["shapes-collect"]
    assert world.status["phase"] == "Collecting"
    assert world.status["observedGeneration"] == 1 and world.status["startTime"]
    assert world.condition("DatasetReady")["status"] == "False"
    summary = world.condition("Succeeded")
    assert summary["status"] == "Unknown" and summary["reason"] == "Collecting" and summary["observedGeneration"] == 1
    assert reasons(decision) == ["CollectionStarted"]


def test_a_second_pass_creates_nothing_and_posts_no_event() -> None:
    world = World()
    world.step()
    first = world.condition("DatasetReady")["lastTransitionTime"]
    status = copy.deepcopy(world.status)
    again = world.step()
    assert again.create == [] and again.patch == [] and again.events == []
    assert world.condition("DatasetReady")["lastTransitionTime"] == first
    assert again.status == status  # the first pass wrote the whole status: one write per new job, not two


def test_collector_success_puts_the_manifest_counts_in_status_and_starts_training() -> None:
    world = World()
    to_training(world)
    assert world.status["dataset"] == {
        "uri": "s3://bucket/shapes/dataset",
        "requested": 20,
        "kept": 12,
        "skipped": {"too_small": 8},
    }
    assert world.condition("DatasetReady")["reason"] == "Collected"
    assert set(world.jobs) == {"shapes-collect", "shapes-train"} and world.service
    (attempt,) = world.status["attempts"]
    assert attempt["index"] == 0 and attempt["startStep"] == 0 and attempt["reason"] == ""


def test_imagefolder_skips_collection() -> None:
    world = World(dataset={"imagefolder": {"uri": "s3://bucket/mine/"}})
    decision = world.step()
    assert {o["kind"] for o in decision.create} == {"Service", "Job"}
    assert "shapes-collect" not in world.jobs and "shapes-train" in world.jobs
    assert world.condition("DatasetReady")["reason"] == "ImageFolder"


def test_an_existing_dataset_with_the_same_fingerprint_skips_collection() -> None:
    world = World()
    world.manifest = good_manifest(world.spec)
    decision = world.step()
    assert "shapes-collect" not in world.jobs and "shapes-train" in world.jobs
    assert "DatasetFound" in reasons(decision)


def test_a_dataset_from_other_settings_is_collected_again() -> None:
    world = World()
    world.manifest = {**good_manifest(world.spec), "fingerprint": "0123456789abcdef"}
    world.step()
    assert "shapes-collect" in world.jobs and "shapes-train" not in world.jobs


def test_zero_images_kept_fails_with_an_actionable_message() -> None:
    world = World()
    world.step()
    world.finish_job("shapes-collect", "Complete")
    world.manifest = good_manifest(world.spec, kept=0)
    decision = world.step()
    assert world.status["phase"] == "Failed"
    assert world.condition("Succeeded")["reason"] == "EmptyDataset"
    assert "kept 0 of 20 requested images (skipped: too_small: 20)" in world.status["message"]
    assert "shapes-train" not in world.jobs
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "EmptyDataset")]


def test_collector_invalid_input_fails_with_its_last_log_lines() -> None:
    world = World()
    world.step()
    world.add_pod(
        "shapes-collect",
        exit_code=2,
        component="collector",
        message="loading list\nspec.dataset.urls.uri: s3://lists/missing.jsonl does not exist",
    )
    world.finish_job("shapes-collect", "Failed", "Container collector failed with exit code 2 matching FailJob rule")
    world.step()
    assert world.status["phase"] == "Failed"
    assert world.condition("Succeeded")["reason"] == "CollectorInvalidInput"
    assert "s3://lists/missing.jsonl does not exist" in world.status["message"]


def test_a_missing_secret_waits_naming_it_and_the_job_continues_once_it_exists() -> None:
    """A GitOps apply may land the FineTuneJob before its Secret: nothing runs (a pod would hang in
    CreateContainerConfigError), the job waits with a condition and one Warning Event, and starts
    collecting on the pass after the Secret appears."""
    world = World()
    world.secrets = {"unsplash": None}
    decision = world.step()
    assert decision.create == []
    assert world.status["phase"] == "Pending"
    message = (
        "Secret 'unsplash' not found (referenced by spec.dataset.unsplash.accessKeySecretRef): "
        "waiting for it in namespace default; the job continues once it exists"
    )
    assert world.status["message"] == message
    ready = world.condition("SecretsReady")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "SecretNotFound", message)
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "SecretNotFound")]
    for _ in range(3):  # re-checked every resync; the Event is not posted again
        decision = world.step()
        assert decision.create == [] and decision.events == []
        assert world.status["phase"] == "Pending"
    world.secrets = {"unsplash": {"access-key"}}
    decision = world.step()
    assert [o["metadata"]["name"] for o in decision.create] == ["shapes-collect"]
    assert world.status["phase"] == "Collecting"
    assert world.condition("SecretsReady")["status"] == "True"


def test_a_secret_the_operator_may_not_read_is_a_permission_problem_not_a_missing_secret() -> None:
    world = World()
    world.secrets = {"unsplash": None}
    observed = world.observed()
    observed.forbidden_secrets = {"unsplash"}
    decision = decide(observed)
    assert decision.create == [] and decision.phase == "Pending"
    ready = next(c for c in decision.status["conditions"] if c["type"] == "SecretsReady")
    assert ready["reason"] == "SecretForbidden"
    assert "the operator may not read Secret 'unsplash'" in ready["message"]
    assert "RBAC" in ready["message"] and "not found" not in ready["message"]
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "SecretForbidden")]


def test_a_missing_key_or_trainer_secret_is_named_before_training_which_waits_for_them() -> None:
    world = World(
        model={"base": "m", "tokenSecretRef": {"name": "hf", "key": "token"}},
        storage={"uri": "s3://bucket/shapes/", "credentialsSecretRef": {"name": "s3"}},
    )
    world.secrets = {"unsplash": {"access-key"}, "s3": {"AWS_ACCESS_KEY_ID"}, "hf": None}
    world.manifest = good_manifest(world.spec)
    decision = world.step()
    assert world.status["phase"] != "Failed" and "shapes-train" not in world.jobs
    message = world.status["message"]
    assert "Secret 'hf' not found (referenced by spec.model.tokenSecretRef)" in message
    assert "Secret 's3' has no key 'AWS_SECRET_ACCESS_KEY' (referenced by spec.storage.credentialsSecretRef)" in message
    assert world.condition("SecretsReady")["reason"] == "SecretNotFound"
    assert world.condition("Training")["reason"] == "SecretNotFound"
    assert "SecretNotFound" in [e.reason for e in decision.events]
    world.secrets = {"unsplash": {"access-key"}, "s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, "hf": {"token"}}
    world.step()
    assert "shapes-train" in world.jobs and world.status["phase"] == "Training"
    assert world.condition("SecretsReady")["status"] == "True"


def test_a_secret_deleted_while_training_runs_is_reported_but_the_running_attempt_is_followed() -> None:
    world = World(storage={"uri": "s3://bucket/shapes/", "credentialsSecretRef": {"name": "s3"}})
    world.secrets = {"unsplash": {"access-key"}, "s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}}
    to_training(world)
    world.secrets["s3"] = None
    decision = world.step()
    assert world.status["phase"] == "Training"
    assert world.condition("SecretsReady")["reason"] == "SecretNotFound"
    assert "SecretNotFound" in [e.reason for e in decision.events]
    world.finish_job("shapes-train", "Complete")
    world.step()
    assert world.status["phase"] == "Succeeded"


def test_an_invalid_spec_fails_with_the_field_named() -> None:
    observed = World().observed()
    observed.spec, observed.spec_error = None, "spec.training.resolution: must be a multiple of 8"
    decision = decide(observed)
    assert decision.phase == "Failed" and decision.create == []
    assert "spec.training.resolution" in decision.status["message"]


# -- training ----------------------------------------------------------------------------------


def world_in_training(**progress: Any) -> World:
    """A job whose trainer Job runs, with progress.json holding `progress` (state training)."""
    world = World()
    to_training(world)
    world.progress = {"state": "training", **progress}
    return world


def test_progress_json_becomes_live_training_status() -> None:
    world = world_in_training(
        step=45,
        maxSteps=100,
        epoch=2,
        loss=0.123456,
        imagesPerSecond=18.25,
        etaSeconds=61.7,
        latestCheckpoint="s3://bucket/shapes/checkpoints/step-00000040",
    )
    world.step()
    training = world.status["training"]
    assert training["step"] == 45 and training["maxSteps"] == 100 and training["progress"] == "45%"
    assert training["loss"] == "0.1235" and training["imagesPerSecond"] == "18.2" and training["etaSeconds"] == 61
    assert training["latestCheckpoint"].endswith("step-00000040")
    assert world.condition("Training")["status"] == "True"
    assert "step 45" in world.status["message"]


def test_success_publishes_the_uris() -> None:
    world = World()
    to_training(world)
    world.progress = {"state": "succeeded", "step": 100, "maxSteps": 100}
    world.finish_job("shapes-train", "Complete")
    decision = world.step()
    status = world.status
    assert status["phase"] == "Succeeded"
    assert status["modelUri"] == "s3://bucket/shapes/"
    assert status["samplesUri"] == "s3://bucket/shapes/samples/"
    assert status["checkpointsUri"] == "s3://bucket/shapes/"  # checkpoint-N/ at the root
    assert status["completionTime"] and status["training"]["progress"] == "100%"
    assert world.condition("Succeeded")["status"] == "True"
    assert status["attempts"][-1]["reason"] == "Succeeded" and status["attempts"][-1]["endStep"] == 100
    assert reasons(decision) == ["Succeeded"]
    assert world.step().events == []  # terminal: nothing more happens


def test_a_failed_attempt_reports_the_trainers_own_error_line_not_the_launchers_banner() -> None:
    world = World()
    to_training(world)
    log = (
        "kubetune train: error: (rank 0) SafetensorError: device cpu:0 is invalid\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n===========\nkubetune.trainer FAILED\n"
        "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html\n==========="
    )
    world.add_pod("shapes-train", exit_code=1, message=log)
    world.finish_job("shapes-train", "Failed", "Job has reached the specified backoff limit")
    world.step()
    assert world.status["message"].endswith("kubetune train: error: (rank 0) SafetensorError: device cpu:0 is invalid")


def test_a_failed_attempt_is_replaced_by_one_that_resumes_and_uses_the_budget() -> None:
    world = world_in_training(step=30, maxSteps=100, latestCheckpoint="s3://bucket/shapes/checkpoints/step-00000020")
    world.add_pod("shapes-train", exit_code=1, message="Traceback...\nRuntimeError: NCCL timeout")
    world.finish_job("shapes-train", "Failed", "Job has reached the specified backoff limit")
    decision = world.step()
    assert "AttemptFailed" in reasons(decision) and "NCCL timeout" in world.status["message"]
    assert world.status["restarts"] == 1 and world.status["preemptions"] == 0
    assert world.status["attempts"][0]["reason"] == "Failed" and world.status["attempts"][0]["endStep"] == 30
    # the old attempt's pod is done, so the next pass starts attempt 1 in a new Job
    decision = world.step()
    assert [o["metadata"]["name"] for o in decision.create] == ["shapes-train-r1"]
    assert world.status["attempts"][1]["startStep"] == 20 and world.status["phase"] == "Training"
    assert "step-00000020" in world.status["message"]


def test_a_new_attempt_resumes_from_a_checkpoint_completed_after_the_last_progress_report() -> None:
    # the trainer died right after writing checkpoint step 8, before progress.json said so
    world = World()
    to_training(world)
    world.progress = {"state": "training", "step": 7, "maxSteps": 100, "latestCheckpoint": "step-00000004"}
    world.step()
    world.checkpoints = ["step-00000004", "step-00000008"]
    world.add_pod("shapes-train", exit_code=137, message="Killed")
    world.finish_job("shapes-train", "Failed", "Job has reached the specified backoff limit")
    world.step()
    world.step()
    assert world.status["attempts"][1]["startStep"] == 8
    assert "resuming from step-00000008" in world.status["message"]


def test_backoff_exhausted_fails_the_job() -> None:
    world = World()
    to_training(world)
    for restart in range(3):  # backoffLimit 2: the third failure is one too many
        name = b.trainer_job_name(NAME, restart)
        world.add_pod(name, exit_code=1, message=f"boom {restart}")
        world.finish_job(name, "Failed")
        world.step()
        world.step()
    assert world.status["phase"] == "Failed" and world.condition("Succeeded")["reason"] == "BackoffLimitExceeded"
    assert (
        "failed 3 time(s)" in world.status["message"]
        and "backoffLimit=2" in world.status["message"]
        and "boom 2" in world.status["message"]
    )
    assert world.status["restarts"] == 3
    assert "shapes-train-r3" not in world.jobs


@pytest.mark.parametrize(
    ("exit_code", "message", "reason"),
    [
        (2, "training.resolution: the dataset has no caption column 'text'", "TrainerInvalidInput"),
        (
            2,
            "--pretrained_model_name_or_path org/kandinsky: pipeline class KandinskyPipeline is not supported; "
            "supported families: sd (StableDiffusionPipeline), sdxl (StableDiffusionXLPipeline)",
            "TrainerInvalidInput",
        ),
        (3, "training diverged: NaN or inf (loss) by step 40", "TrainingDiverged"),
    ],
)
def test_a_trainer_failure_retrying_cannot_fix_fails_at_once(exit_code: int, message: str, reason: str) -> None:
    """Invalid input (2) and a diverged run (3): the same settings would fail again."""
    world = World()
    to_training(world)
    world.add_pod("shapes-train", exit_code=exit_code, message=message)
    world.finish_job("shapes-train", "Failed")
    world.step()
    world.step()
    assert world.status["phase"] == "Failed" and world.condition("Succeeded")["reason"] == reason
    assert message in world.status["message"] and world.status["restarts"] == 1
    assert "shapes-train-r1" not in world.jobs, "no new attempt"


def owner_marker(uid: str, namespace: str = "team-a", name: str = "first") -> dict[str, Any]:
    return StorageOwner(namespace=namespace, name=name, uid=uid).model_dump(mode="json", by_alias=True)


def test_a_storage_prefix_another_job_owns_fails_before_any_pod_and_names_the_owner() -> None:
    world = World()
    world.owner = owner_marker("uid-0")
    decision = world.step()
    assert decision.create == [] and world.jobs == {}
    assert world.status["phase"] == "Failed" and world.condition("Succeeded")["reason"] == "StorageOwned"
    message = world.status["message"]
    assert "storage.uri s3://bucket/shapes/ belongs to FineTuneJob team-a/first (uid uid-0)" in message
    assert "delete s3://bucket/shapes/owner.json" in message
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "StorageOwned")]
    again = world.step()  # not retried
    assert again.create == [] and again.events == [] and world.status["phase"] == "Failed"


def test_a_storage_prefix_the_job_owns_itself_is_used() -> None:
    world = World()
    world.owner = owner_marker("uid-1", "default", NAME)
    decision = world.step()
    assert [o["metadata"]["name"] for o in decision.create] == ["shapes-collect"]


def test_an_unreadable_owner_marker_fails_the_job_rather_than_taking_the_prefix_over() -> None:
    world = World()
    world.owner = {"uid": 7}
    world.step()
    assert world.condition("Succeeded")["reason"] == "StorageOwned" and "not an owner marker" in world.status["message"]


@pytest.mark.parametrize("component", ["collector", "trainer"])
def test_a_pod_that_finds_the_prefix_owned_fails_the_job_at_once(component: str) -> None:
    """Another job claimed the prefix after the operator looked: the pod exits STORAGE_OWNED."""
    world = World()
    message = "storage.uri s3://bucket/shapes/ belongs to FineTuneJob team-a/first (uid uid-0); use another"
    if component == "collector":
        world.step()
        world.add_pod("shapes-collect", exit_code=4, message=message, component="collector")
        world.finish_job("shapes-collect", "Failed")
    else:
        to_training(world)
        world.add_pod("shapes-train", exit_code=4, message=message)
        world.finish_job("shapes-train", "Failed")
    world.step()
    assert world.status["phase"] == "Failed" and world.condition("Succeeded")["reason"] == "StorageOwned"
    assert "team-a/first" in world.status["message"] and "shapes-train-r1" not in world.jobs


@pytest.mark.parametrize("how", ["exit75", "disruption", "progress"])
def test_a_preempted_gang_restarts_without_using_the_budget(how: str) -> None:
    world = World(trainer={"nodes": 2, "gpusPerNode": 0})
    to_training(world)
    world.progress = {
        "state": "preempted" if how == "progress" else "training",
        "step": 60,
        "maxSteps": 100,
        "latestCheckpoint": "s3://bucket/shapes/checkpoints/step-00000060",
    }
    world.add_pod("shapes-train", exit_code=1, message="peer closed connection")  # rank 1 lost its peer
    if how != "progress":
        world.add_pod("shapes-train", exit_code=75 if how == "exit75" else 137, disrupted=how == "disruption")
    world.finish_job("shapes-train", "Failed")
    world.step()
    world.step()
    assert world.status["restarts"] == 0 and world.status["preemptions"] == 1
    assert world.status["attempts"][0]["reason"] == "Preempted"
    assert "shapes-train-r1" in world.jobs and world.status["attempts"][1]["startStep"] == 60


def test_a_preempted_pod_of_a_running_multinode_attempt_stops_the_gang_and_restarts_it() -> None:
    world = World(trainer={"nodes": 2, "gpusPerNode": 0})
    to_training(world)
    world.add_pod("shapes-train", phase="Running")
    world.add_pod("shapes-train", exit_code=75)  # the Job ignores it and would replace only this rank
    decision = world.step()
    assert world.jobs["shapes-train"]["spec"]["suspend"] is True
    assert world.status["attempts"][0]["reason"] == "Preempted" and world.status["preemptions"] == 1
    assert "PodPreempted" in reasons(decision) and "Preempted" in reasons(decision)
    # the running rank has not stopped yet: no second gang
    assert world.step().create == []
    assert "waiting for the previous attempt" in world.status["message"]
    world.pods[0]["status"]["phase"] = "Failed"
    assert [o["metadata"]["name"] for o in world.step().create] == ["shapes-train-r1"]
    assert world.status["preemptions"] == 1 and world.status["restarts"] == 0


def test_a_preempted_single_node_pod_is_replaced_in_place_and_counted_once() -> None:
    world = World(trainer={"nodes": 1, "gpusPerNode": 1})
    to_training(world)
    world.add_pod("shapes-train", exit_code=75)
    world.step()
    world.add_pod("shapes-train", phase="Running")  # the Job's replacement
    world.step()
    world.step()
    assert world.status["preemptions"] == 1 and world.status["restarts"] == 0
    assert world.jobs["shapes-train"]["metadata"]["annotations"][b.ANNOTATION_PREEMPTED_PODS] == "pod-0"
    assert world.status["phase"] == "Training" and len(world.status["attempts"]) == 1


# -- suspend, queues, deadlines, changes -------------------------------------------------------


def test_suspend_and_resume_a_training() -> None:
    world = World()
    to_training(world)
    world.spec["suspend"] = True
    world.generation = 2
    decision = world.step()
    assert world.jobs["shapes-train"]["spec"]["suspend"] is True and world.status["phase"] == "Suspended"
    assert "Suspended" in reasons(decision) and world.condition("Suspended")["status"] == "True"
    assert world.status["observedGeneration"] == 2
    world.add_pod("shapes-train", exit_code=75)  # the pod stopped by the suspension is no preemption
    world.step()
    assert world.status["preemptions"] == 0
    world.spec["suspend"] = False
    decision = world.step()
    assert world.jobs["shapes-train"]["spec"]["suspend"] is False and world.status["phase"] == "Training"
    assert "Resumed" in reasons(decision) and world.condition("Suspended")["status"] == "False"
    assert len(world.status["attempts"]) == 1
    # the Job controller restarts the Job (resetting startTime) while the stopped pod is still listed
    world.pods[-1]["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:30Z"
    world.pods[-1]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = "2026-01-01T12:00:50Z"
    world.jobs["shapes-train"]["status"] = {"startTime": "2026-01-01T12:00:40Z"}
    world.step()
    world.step()
    assert world.status["preemptions"] == 0 and len(world.status["attempts"]) == 1
    assert world.status["phase"] == "Training" and not world.jobs["shapes-train"]["spec"]["suspend"]


# -- Kueue: it owns `suspend` on the Jobs it queues ---------------------------------------------

PREEMPTED = "Preempted to accommodate a workload (UID: 5515f7da) in the ClusterQueue"


def suspend_patches(decision: Decision) -> list[Any]:
    return [p for p in decision.patch if p.kind == "Job" and "suspend" in p.body.get("spec", {})]


def queued_training(**spec: Any) -> World:
    """A queued job admitted by Kueue for collection, then for training (attempt 0 running)."""
    world = World(**{"runPolicy": {"queueName": "gpu-team"}, **spec})
    world.step()
    world.kueue_admits("shapes-collect")
    world.step()
    world.finish_job("shapes-collect", "Complete")
    world.manifest = good_manifest(world.spec)
    world.step()
    world.kueue_admits("shapes-train")
    world.add_pod("shapes-train", phase="Running")
    world.step()
    assert world.status["phase"] == "Training" and world.condition("Training")["reason"] == "Running"
    return world


def test_pods_stopped_by_a_suspension_are_no_preemption_while_the_job_controller_catches_up() -> None:
    world = World(trainer={"nodes": 2, "gpusPerNode": 0})
    to_training(world)
    # resumed (by Kueue or the operator), but the Job controller has not started it again yet
    suspended = {"type": "Suspended", "status": "True", "reason": "JobSuspended"}
    world.jobs["shapes-train"]["status"] = {"startTime": "2026-01-01T12:00:00Z", "conditions": [suspended]}
    world.add_pod("shapes-train", exit_code=75)  # stopped by the suspension, still listed
    world.pods[-1]["metadata"].update(deletionTimestamp="2026-01-01T12:05:30Z", deletionGracePeriodSeconds=300)
    decision = world.step()
    assert world.status["preemptions"] == 0 and decision.patch == []
    # started again before the stopped pod's grace period ended: it was deleted (12:00:30) before
    world.jobs["shapes-train"]["status"] = {"startTime": "2026-01-01T12:01:00Z"}
    world.step()
    assert world.status["preemptions"] == 0 and len(world.status["attempts"]) == 1


def test_kueue_jobs_wait_for_admission_and_are_not_unsuspended_by_the_operator() -> None:
    world = World(runPolicy={"queueName": "gpu-team"})
    world.step()
    job = world.jobs["shapes-collect"]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][b.KUEUE_QUEUE_LABEL] == "gpu-team"
    decision = world.step()
    assert decision.patch == []
    assert world.status["message"] == "waiting for Kueue to admit Job shapes-collect (queue gpu-team)"
    world.kueue_workload("shapes-collect")
    assert world.step().patch == []
    world.kueue_admits("shapes-collect")
    world.step()
    assert world.status["message"].startswith("collecting the dataset")


def test_a_suspended_queued_job_creates_no_job_until_it_is_resumed() -> None:
    """Kueue admits any queued Job whose Workload is active: a FineTuneJob created suspended must
    not give it one to admit, nor must its next attempt while suspended."""
    world = World(runPolicy={"queueName": "gpu-team"}, suspend=True)
    decision = world.step()
    assert world.jobs == {} and world.status["phase"] == "Suspended"
    assert world.condition("Suspended")["status"] == "True" and "Suspended" in reasons(decision)
    assert "collector Job is created when it is resumed" in world.status["message"]
    assert world.step().create == [] and world.jobs == {}
    world.spec["suspend"] = False
    world.generation = 2
    world.step()
    assert world.jobs["shapes-collect"]["spec"]["suspend"] is True  # queued: Kueue's to admit
    world.kueue_admits("shapes-collect")
    world.step()
    world.finish_job("shapes-collect", "Complete")
    world.manifest = good_manifest(world.spec)
    world.spec["suspend"] = True  # suspended between collection and training
    world.generation = 3
    world.step()
    assert "shapes-train" not in world.jobs and world.status["phase"] == "Suspended"
    assert "trainer Job is created when it is resumed" in world.status["message"]
    world.spec["suspend"] = False
    world.generation = 4
    world.step()
    assert world.jobs["shapes-train"]["metadata"]["labels"][b.KUEUE_QUEUE_LABEL] == "gpu-team"


def test_the_trainer_gang_is_one_queued_job_with_a_pod_per_node() -> None:
    world = World(runPolicy={"queueName": "gpu-team"}, trainer={"nodes": 4, "gpusPerNode": 8})
    to_training(world)
    job = world.jobs["shapes-train"]
    # one Job, so one Kueue Workload with one podSet of 4 pods: the nodes are admitted together
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 4
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][b.KUEUE_QUEUE_LABEL] == "gpu-team"


def test_suspending_a_queued_job_deactivates_its_workload_and_never_patches_suspend() -> None:
    world = queued_training()
    world.spec["suspend"] = True
    decision = world.step()
    assert [(p.kind, p.name, p.body) for p in decision.patch] == [
        ("Workload", "job-shapes-train-abcde", {"spec": {"active": False}})
    ]
    assert world.status["phase"] == "Suspended" and world.condition("Suspended")["status"] == "True"
    assert "its Kueue Workload is deactivated" in world.status["message"] and "Suspended" in reasons(decision)
    world.kueue_evicts("shapes-train", "Deactivated", "The workload is deactivated")  # Kueue stops the Job
    world.add_pod("shapes-train", exit_code=75)
    world.pods[-1]["metadata"]["deletionTimestamp"] = world.now.isoformat().replace("+00:00", "Z")
    decision = world.step()
    assert decision.patch == [] and world.status["phase"] == "Suspended" and world.status["preemptions"] == 0
    world.spec["suspend"] = False
    decision = world.step()
    assert [(p.kind, p.body) for p in decision.patch] == [("Workload", {"spec": {"active": True}})]
    assert "Resumed" in reasons(decision) and world.condition("Suspended")["status"] == "False"
    assert world.status["message"] == "waiting for Kueue to admit Job shapes-train (queue gpu-team)"
    world.kueue_admits("shapes-train")
    decision = world.step()
    assert decision.patch == [] and world.condition("Training")["reason"] == "Running"
    assert len(world.status["attempts"]) == 1 and world.status["preemptions"] == 0
    assert world.deleted == []


def test_suspending_before_kueue_made_the_workload_waits_for_it() -> None:
    world = World(runPolicy={"queueName": "gpu-team"})
    world.step()
    world.spec["suspend"] = True
    decision = world.step()
    assert decision.patch == [] and world.status["phase"] == "Suspended"
    assert "once Kueue made its Workload" in world.status["message"]
    world.kueue_workload("shapes-collect")
    assert [p.kind for p in world.step().patch] == ["Workload"]


def test_a_workload_deactivated_by_someone_else_is_reported_not_reactivated() -> None:
    world = queued_training()
    world.workloads["shapes-train"]["spec"]["active"] = False
    world.kueue_evicts("shapes-train", "Deactivated", "The workload is deactivated")
    decision = world.step()
    assert decision.patch == [] and world.status["phase"] == "Training"
    assert "was deactivated (spec.active: false)" in world.status["message"]


def test_a_preemption_by_kueue_is_queued_again_not_a_failed_attempt() -> None:
    world = queued_training(runPolicy={"queueName": "gpu-team", "backoffLimit": 0})
    world.kueue_evicts("shapes-train", "Preempted", PREEMPTED)
    world.pods[-1]["status"] = {  # SIGTERM: the trainer saved a checkpoint and exited 75
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 75}}}],
    }
    decision = world.step()
    assert suspend_patches(decision) == [] and decision.create == [] and decision.delete == []
    assert world.status["phase"] == "Training"
    assert world.condition("Training")["reason"] == "PreemptedByKueue"
    assert world.status["message"].startswith(f"queued again after preemption by Kueue ({PREEMPTED})")
    assert "resumes from the latest checkpoint" in world.status["message"]
    assert reasons(decision) == ["PreemptedByKueue"]
    assert world.status["preemptions"] == 1 and world.status["restarts"] == 0
    assert len(world.status["attempts"]) == 1 and not world.status["attempts"][0]["reason"]  # still running
    assert world.step().events == [] and world.status["preemptions"] == 1  # reported and counted once
    # Kueue admits it again: the same Job's pods restart and resume from the checkpoint
    world.pods[-1]["metadata"]["deletionTimestamp"] = world.now.isoformat().replace("+00:00", "Z")
    world.kueue_admits("shapes-train")
    world.add_pod("shapes-train", phase="Running")
    decision = world.step()
    assert decision.patch == [] and world.condition("Training")["reason"] == "Running"
    assert world.status["preemptions"] == 1
    world.finish_job("shapes-train", "Complete")
    world.step()
    assert world.status["phase"] == "Succeeded"
    assert [a["reason"] for a in world.status["attempts"]] == ["Succeeded"] and world.status["preemptions"] == 1
    # a second preemption of the same Job is a second one
    world2 = queued_training()
    world2.kueue_evicts("shapes-train", "Preempted", PREEMPTED)
    world2.step()
    world2.kueue_admits("shapes-train")
    world2.step()
    world2.kueue_evicts("shapes-train", "Preempted", PREEMPTED, at="2026-01-01T12:30:00Z")
    assert reasons(world2.step()) == ["PreemptedByKueue"] and world2.status["preemptions"] == 2


def test_a_new_attempt_of_a_queued_job_gets_a_fresh_job_and_the_old_one_is_deleted() -> None:
    world = queued_training(trainer={"nodes": 2, "gpusPerNode": 0})
    world.add_pod("shapes-train", exit_code=75)  # a node lost (not Kueue): the gang restarts
    decision = world.step()
    assert decision.delete == ["shapes-train"] and suspend_patches(decision) == []
    assert world.status["attempts"][0]["reason"] == "Preempted"
    decision = world.step()
    assert "waiting for the previous attempt" in world.status["message"]  # its pods are still stopping
    world.pods[0]["status"]["phase"] = "Failed"
    decision = world.step()
    (job,) = decision.create
    assert job["metadata"]["name"] == "shapes-train-r1"
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][b.KUEUE_QUEUE_LABEL] == "gpu-team"
    assert sorted(world.jobs) == ["shapes-collect", "shapes-train-r1"]
    # a failed attempt: its Job (finished, holding no quota) is deleted when the next one starts
    world.kueue_admits("shapes-train-r1")
    world.add_pod("shapes-train-r1", exit_code=1, message="kubetune train: error: boom")
    world.finish_job("shapes-train-r1", "Failed")
    world.step()
    decision = world.step()
    assert decision.delete == ["shapes-train-r1"] and [o["metadata"]["name"] for o in decision.create] == [
        "shapes-train-r2"
    ]
    assert world.status["restarts"] == 1 and world.status["preemptions"] == 1


def test_a_failed_queued_job_stops_its_jobs_through_kueue() -> None:
    world = queued_training(runPolicy={"queueName": "gpu-team", "activeDeadlineSeconds": 60})
    decision = world.step(seconds=120)
    assert world.status["phase"] == "Failed" and world.condition("Succeeded")["reason"] == "DeadlineExceeded"
    assert [(p.kind, p.body) for p in decision.patch] == [("Workload", {"spec": {"active": False}})]
    assert world.step().patch == []  # deactivated once


def test_the_deadline_fails_the_job_and_stops_its_pods() -> None:
    world = World(runPolicy={"activeDeadlineSeconds": 60})
    to_training(world)
    world.step(seconds=120)
    assert world.status["phase"] == "Failed" and world.condition("Succeeded")["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=60" in world.status["message"]
    assert world.jobs["shapes-train"]["spec"]["suspend"] is True


def test_a_training_change_after_start_is_reported_not_applied() -> None:
    world = World()
    to_training(world)
    world.spec["training"] = {"maxTrainSteps": 5000}
    world.generation = 2
    decision = world.step()
    assert "SpecChangeIgnored" in reasons(decision)
    assert "training" in world.condition("SpecChangeIgnored")["message"]
    assert decision.create == []
    assert world.step().events == []


def test_the_trainer_job_is_recreated_if_deleted_by_hand() -> None:
    world = World()
    to_training(world)
    del world.jobs["shapes-train"]
    decision = world.step()
    assert [o["metadata"]["name"] for o in decision.create] == ["shapes-train"]
    assert len(world.status["attempts"]) == 1


def test_a_collector_that_kept_nothing_fails_as_an_empty_dataset() -> None:
    world = World()
    world.step()
    world.add_pod(
        "shapes-collect",
        exit_code=EXIT_EMPTY_DATASET,
        component="collector",
        message="kubetune collect: error: nothing could be collected: 0 images kept of 20 requested; 20 too small",
    )
    world.finish_job("shapes-collect", "Failed")
    world.step()
    assert world.condition("Succeeded")["reason"] == "EmptyDataset"
    assert "0 images kept of 20 requested" in world.status["message"]


def test_a_job_whose_storage_the_operator_does_not_read_trains_on_the_collectors_word() -> None:
    """No manifest or progress.json can be read (no credentials the operator may use): the
    collector's success makes the dataset ready, and status says progress is not read."""
    world = World()
    world.step()
    world.finish_job("shapes-collect", "Complete")
    observed = world.observed()
    observed.storage_unreadable = "no credentials"
    decision = decide(observed)
    world.status = decision.status
    assert decision.phase == "Training"
    assert {(o["kind"], o["metadata"]["name"]) for o in decision.create} == {
        ("Service", "shapes-train"),
        ("Job", "shapes-train"),
    }
    ready = next(c for c in decision.status["conditions"] if c["type"] == "DatasetReady")
    assert ready["status"] == "True" and "counts unavailable" in ready["message"]
    progress = next(c for c in decision.status["conditions"] if c["type"] == "ProgressAvailable")
    assert progress["status"] == "False" and "no credentials" in progress["message"]


# -- the Ready summary condition (kstatus, Argo CD, Flux) -------------------------------------------


def ready(world: World) -> tuple[str, str, int | None]:
    condition = world.condition("Ready")
    assert condition["lastTransitionTime"] and condition["message"] == world.status["message"]
    return condition["status"], condition["reason"], condition.get("observedGeneration")


def test_ready_is_false_with_the_phase_while_waiting_for_a_secret() -> None:
    world = World()
    world.secrets = {"unsplash": None}
    world.step()
    assert world.status["phase"] == "Pending" and ready(world) == ("False", "Pending", 1)


def test_ready_is_false_with_the_phase_while_collecting_and_training() -> None:
    world = World()
    world.step()
    assert ready(world) == ("False", "Collecting", 1)
    world.finish_job(f"{NAME}-collect", "Complete")
    world.manifest = good_manifest(world.spec)
    world.generation = 2
    world.step()
    assert ready(world) == ("False", "Training", 2)
    world.progress = {"state": "training", "step": 10, "maxSteps": 100}
    world.step()
    assert ready(world) == ("False", "Training", 2)
    assert world.condition("Succeeded")["status"] == "Unknown"  # today's summary stays beside it


def test_ready_is_false_while_suspended() -> None:
    world = World()
    to_training(world)
    world.spec["suspend"] = True
    world.generation = 2
    world.step()
    assert world.status["phase"] == "Suspended" and ready(world) == ("False", "Suspended", 2)


def test_ready_is_true_once_succeeded() -> None:
    world = World()
    to_training(world)
    was = world.condition("Ready")["lastTransitionTime"]
    world.progress = {"state": "succeeded", "step": 100, "maxSteps": 100}
    world.finish_job("shapes-train", "Complete")
    world.step()
    assert ready(world) == ("True", "Succeeded", 1)
    assert world.condition("Ready")["lastTransitionTime"] != was
    assert world.condition("Succeeded")["status"] == "True"


@pytest.mark.parametrize("how", ["deadline", "invalid spec"])
def test_ready_is_false_with_the_failure_reason_once_failed(how: str) -> None:
    if how == "deadline":
        world = World(runPolicy={"activeDeadlineSeconds": 60})
        to_training(world)
        world.step(seconds=120)
        reason = "DeadlineExceeded"
    else:
        world = World(training={"mixedPrecision": "fp16"})
        observed = world.observed()
        observed.spec, observed.spec_error = None, "spec.training.mixedPrecision: must be one of ..."
        world.status = decide(observed).status
        reason = "InvalidSpec"
    assert world.status["phase"] == "Failed" and ready(world) == ("False", reason, 1)


# -- the ETA as a duration (kubectl get ftj -o wide) ----------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45.4, "45s"), (150, "2m30s"), (720, "12m"), (3900, "1h5m"), (7200, "2h"), (183_600, "2d3h")],
)
def test_duration_is_written_as_kubectl_writes_ages(seconds: float, text: str) -> None:
    from kubetune.operator.decide import duration

    assert duration(seconds) == text


def test_the_eta_is_the_trainers_estimate_as_a_duration() -> None:
    world = world_in_training(step=45, maxSteps=100, imagesPerSecond=18.25, etaSeconds=725.2)
    world.step()
    assert world.status["training"]["eta"] == "12m" and world.status["training"]["etaSeconds"] == 725


def test_without_the_trainers_estimate_the_eta_comes_from_images_per_second_and_steps_left() -> None:
    # 1 node x 2 GPUs, batch 2, accumulation 4: 16 images a step; 60 steps left at 8 images/s
    world = World(trainer={"nodes": 1, "gpusPerNode": 2}, training={"batchSize": 2, "gradientAccumulationSteps": 4})
    to_training(world)
    world.progress = {"state": "training", "step": 40, "maxSteps": 100, "imagesPerSecond": 8.0}
    world.step()
    assert world.status["training"]["etaSeconds"] == 120 and world.status["training"]["eta"] == "2m"
    world.progress = {"state": "training", "step": 40, "maxSteps": 100}  # no rate yet: no ETA
    world.step()
    assert "eta" not in world.status["training"] or world.status["training"]["eta"] == ""


def test_with_prior_preservation_a_step_trains_a_class_image_beside_each_instance_image() -> None:
    # batch 2 on 1 node x 2 GPUs: 4 instance + 4 class images a step; 60 steps left at 8 images/s
    dreambooth = {"instancePrompt": "a photo of sks dog", "classPrompt": "a dog", "priorPreservation": True}
    training = {"batchSize": 2, "gradientAccumulationSteps": 1, "dreambooth": dreambooth}
    world = World(trainer={"nodes": 1, "gpusPerNode": 2}, training=training)
    to_training(world)
    world.progress = {"state": "training", "step": 40, "maxSteps": 100, "imagesPerSecond": 8.0}
    world.step()
    assert world.status["training"]["etaSeconds"] == 60


def test_a_succeeded_job_has_no_time_left() -> None:
    world = world_in_training(step=90, maxSteps=100, etaSeconds=30)
    world.step()
    world.finish_job("shapes-train", "Complete")
    world.step()
    assert world.status["training"]["eta"] == "0s" and world.status["training"]["etaSeconds"] == 0
