"""The operator end to end on the local cluster: `kubetune operator` watching a namespace, the real
collector (a URL list of shape images on the cluster's image server) and the real trainer (a tiny
Stable Diffusion model, 2 CPU nodes, accelerate over gloo) running as pods, S3 on moto's server.

Each test reads what a user would: the FineTuneJob's status and events, its Jobs, Services and
pods, the pods' logs, and the files in S3.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.dev.testing import condition as true_condition
from kubetune.dev.testing import job_manifest, kueue_queue, kueue_workloads, rbac, wait_for

MAX_STEPS = 40  # room for three interruptions (each runs on a few steps before it lands), yet quick
EVERY = 4


def events_of(e2e: Any, name: str) -> list[dict[str, Any]]:
    items = e2e.api.ok(e2e.api.get(e2e.path("events")))["items"]
    return [
        e for e in items if e["involvedObject"].get("name") == name and e["involvedObject"].get("kind") == "FineTuneJob"
    ]


def reasons(e2e: Any, name: str) -> list[str]:
    return [e["reason"] for e in events_of(e2e, name)]


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == kind)


def checkpoint_steps(e2e: Any, name: str) -> list[int]:
    """Complete checkpoints in S3 (their manifest is written last)."""
    # keys under the prefix `.../checkpoint-`: `N/manifest.json`
    return sorted(int(k.split("/")[0]) for k in e2e.keys("jobs", name, "checkpoint-") if k.endswith("/manifest.json"))


def trainer_pods(e2e: Any, name: str, job: str) -> list[dict[str, Any]]:
    pods = [p for p in e2e.list("pods", name) if p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == job]
    return sorted(pods, key=lambda p: p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index", ""))


# -- rejected before anything runs -------------------------------------------------------------


def test_an_invalid_spec_is_rejected_by_the_api_naming_the_field(e2e: Any) -> None:
    for field, spec in (
        ("spec.trainer.nodes", e2e.spec("bad", trainer={"nodes": 0})),
        ("spec.training.mixedPrecision", e2e.spec("bad", training={"mixedPrecision": False})),
    ):
        response = e2e.api.post(
            e2e.path("finetunejobs"),
            {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bad"}, "spec": spec},
        )
        assert response.status_code == 422, response.text
        assert field in response.json()["message"]
    assert e2e.api.get(e2e.path("finetunejobs", "bad")).status_code == 404


def test_a_missing_secret_holds_the_job_until_it_is_created(e2e: Any) -> None:
    """A GitOps apply may land the FineTuneJob before its Secret: the job waits, naming the Secret,
    and continues by itself once the Secret exists."""
    from kubetune.dev.cluster.local import S3_SECRET

    spec = e2e.spec(
        "nosecret", storage={"uri": e2e.uri("jobs", "nosecret") + "/", "credentialsSecretRef": {"name": "team-s3"}}
    )
    e2e.create("nosecret", spec)
    status = e2e.wait(
        "nosecret",
        lambda s: any(c["type"] == "SecretsReady" and c["status"] == "False" for c in s.get("conditions") or []),
        60,
        "SecretsReady=False",
    )
    assert status["phase"] == "Pending"
    assert condition(status, "SecretsReady")["reason"] == "SecretNotFound"
    assert "Secret 'team-s3' not found (referenced by spec.storage.credentialsSecretRef)" in status["message"]
    time.sleep(2)  # a few resyncs: still waiting, one Event, nothing created
    assert e2e.status("nosecret")["phase"] == "Pending"
    assert reasons(e2e, "nosecret").count("SecretNotFound") == 1
    assert e2e.names("jobs", "nosecret") == []  # nothing ran that would wait forever on the Secret
    data = e2e.api.ok(e2e.api.get(e2e.path("secrets", S3_SECRET)))["data"]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-s3"}, "data": data}
    e2e.api.ok(e2e.api.post(e2e.path("secrets"), secret))
    status = e2e.wait_phase("nosecret", "Collecting", timeout=60)
    assert condition(status, "SecretsReady")["status"] == "True"
    assert e2e.names("jobs", "nosecret") == ["nosecret-collect"]
    e2e.api.ok(e2e.api.delete(e2e.path("finetunejobs", "nosecret")))  # its collection is not what this tests


def test_an_empty_dataset_fails_the_job_with_the_counts(e2e: Any) -> None:
    missing = "".join(
        f'{{"url": "{e2e.cluster.images_url}/{e2e.namespace}/gone-{i}.jpg", "caption": "gone"}}\n' for i in range(3)
    )
    e2e.s3.put_object(Bucket=e2e.bucket, Key=f"{e2e.prefix}/gone.jsonl", Body=missing.encode())
    e2e.create("empty", e2e.spec("empty", dataset={"urls": {"uri": e2e.uri("gone.jsonl")}}))
    status = e2e.wait_phase("empty", "Failed", timeout=120)
    assert condition(status, "Succeeded")["reason"] == "EmptyDataset"
    assert condition(status, "DatasetReady")["status"] == "False"
    assert "kept 0 of 3 requested images (skipped: http-404: 3)" in status["message"], status["message"]
    assert e2e.names("jobs", "empty") == ["empty-collect"]  # no trainer was started


# -- one job trained to the end, with the operator restarted mid-training ----------------------


@pytest.fixture(scope="module")
def trained(e2e: Any) -> dict[str, Any]:
    """`happy`: collected, trained 4 steps on 2 nodes, published; the operator is killed while the
    trainer pods run and started again. Returns what was seen along the way."""
    name = "happy"
    e2e.create(name, e2e.spec(name, training={"validationPrompts": ["a red circle on a white background"]}))
    e2e.wait(name, lambda s: s.get("phase") == "Training" and s.get("attempts"), 120, "training started")
    wait_for(lambda: len(e2e.running_trainer_pods(name)) == 2, timeout=60)
    e2e.stop_operator(signal.SIGKILL)  # no goodbye: a crash or a node loss
    time.sleep(2)
    e2e.start_operator()
    status = e2e.wait_phase(name, "Succeeded", timeout=240)
    return {"name": name, "status": status, "generation": e2e.get(name)["metadata"]["generation"]}


@pytest.mark.slow
def test_a_job_runs_to_succeeded_with_a_loadable_model_and_samples(
    e2e: Any, trained: dict[str, Any], tmp_path: Path
) -> None:
    name, status = trained["name"], trained["status"]
    storage = e2e.uri("jobs", name) + "/"
    assert status["modelUri"] == storage
    assert status["samplesUri"] == storage + "samples/"
    assert status["checkpointsUri"] == storage  # checkpoint-N/ folders at the root, as diffusers' scripts
    assert status["training"]["step"] == status["training"]["maxSteps"] == 4
    assert status["training"]["progress"] == "100%"
    assert status["dataset"]["kept"] == 12 and status["dataset"]["requested"] == 12
    assert status["restarts"] == 0 and status["preemptions"] == 0
    succeeded = condition(status, "Succeeded")
    assert succeeded["status"] == "True" and succeeded["observedGeneration"] == trained["generation"]
    assert condition(status, "DatasetReady")["status"] == "True"
    assert {"CollectionStarted", "DatasetCollected", "TrainingStarted", "Succeeded"} <= set(reasons(e2e, name))

    # what `kubectl get ftj` shows
    table = e2e.api.ok(
        e2e.api.get(e2e.path("finetunejobs", name), headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    )
    columns = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(columns, table["rows"][0]["cells"], strict=True))
    assert row["Phase"] == "Succeeded" and row["Progress"] == "100%"

    samples = [k for k in e2e.keys("jobs", name, "samples") if k.endswith(".png")]
    assert samples, "validation samples are in S3"
    from diffusers import StableDiffusionPipeline

    local = e2e.download(tmp_path / "model", "jobs", name)
    pipeline = StableDiffusionPipeline.from_pretrained(local, safety_checker=None, requires_safety_checker=False)
    image = pipeline("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


@pytest.mark.slow
def test_the_operator_restarted_mid_training_duplicates_nothing(e2e: Any, trained: dict[str, Any]) -> None:
    name, status = trained["name"], trained["status"]
    assert e2e.operator_starts >= 2
    assert e2e.names("jobs", name) == ["happy-collect", "happy-train"]
    assert e2e.names("services", name) == ["happy-train"]
    assert [a["reason"] for a in status["attempts"]] == ["Succeeded"]
    assert (
        len(
            [
                p
                for p in e2e.list("pods", name)
                if p["metadata"]["labels"].get("app.kubernetes.io/component") == "trainer"
            ]
        )
        == 2
    )
    assert reasons(e2e, name).count("TrainingStarted") == 1 and reasons(e2e, name).count("CollectionStarted") == 1


@pytest.mark.slow
def test_deleting_the_finetunejob_removes_its_children_and_keeps_the_artifacts(
    e2e: Any, trained: dict[str, Any]
) -> None:
    name = trained["name"]
    before = set(e2e.keys("jobs", name))
    assert e2e.list("pods", name)
    e2e.api.ok(e2e.api.delete(e2e.path("finetunejobs", name)))
    wait_for(
        lambda: not e2e.list("jobs", name) and not e2e.list("services", name) and not e2e.list("pods", name), timeout=60
    )
    assert e2e.api.get(e2e.path("finetunejobs", name)).status_code == 404
    assert set(e2e.keys("jobs", name)) == before  # the dataset, checkpoints, samples and model stay
    assert "model_index.json" in before and "dataset/manifest.json" in before


# -- recovery ------------------------------------------------------------------------------------


def recovery_spec(e2e: Any, name: str, **overrides: Any) -> dict[str, Any]:
    return e2e.spec(name, training={"maxTrainSteps": MAX_STEPS, "checkpointEverySteps": EVERY}, **overrides)


def resumed_lines(e2e: Any, name: str, job: str) -> str:
    """The 'resuming from ...' lines of every rank 0 pod of a trainer Job still listed."""
    lines = []
    for pod in trainer_pods(e2e, name, job):
        if pod["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "0":
            log = e2e.pod_log(pod["metadata"]["name"], tail=2000)
            lines += [line for line in log.splitlines() if "resuming from" in line]
    return "\n".join(lines) or f"no 'resuming from' line; pods:\n{e2e.pod_summary()}"


def wait_for_checkpoint_after(e2e: Any, name: str, after: int, below: int) -> int:
    def ready() -> int:
        steps = [s for s in checkpoint_steps(e2e, name) if after < s < below]
        return steps[-1] if steps else 0

    return int(wait_for(ready, timeout=240, interval=0.1))


@pytest.mark.slow
def test_a_job_survives_suspension_a_preemption_and_a_failure_resuming_from_checkpoints(e2e: Any) -> None:
    """One job, three interruptions, each resumed from the newest checkpoint in S3: spec.suspend (the
    pods checkpoint on SIGTERM; not an attempt, the same Job resumes), an evicted pod (a preemption:
    a new attempt that does not use the backoff budget), a killed trainer (a failure: a new attempt)."""
    name, steps = "recovered", MAX_STEPS
    # backoffLimit 1: were the preemption counted as a failure, the failure after it would end the job
    e2e.create(name, recovery_spec(e2e, name, runPolicy={"backoffLimit": 1}))
    first = wait_for_checkpoint_after(e2e, name, 0, steps)
    assert e2e.status(name).get("phase") == "Training"

    # spec.suspend: the pods get SIGTERM, save a checkpoint and exit; resuming continues in the same Job
    e2e.patch_spec(name, {"suspend": True})
    status = e2e.wait_phase(name, "Suspended", timeout=60)
    assert condition(status, "Suspended")["status"] == "True"
    wait_for(  # terminating pods still run until they have saved
        lambda: not [p for p in trainer_pods(e2e, name, f"{name}-train") if p["status"].get("phase") == "Running"],
        timeout=90,
    )
    suspended_at = checkpoint_steps(e2e, name)[-1]
    assert suspended_at >= first and e2e.progress(name)["state"] == "preempted"
    e2e.patch_spec(name, {"suspend": False})
    wait_for(lambda: len(e2e.running_trainer_pods(name)) == 2, timeout=60)
    second = wait_for_checkpoint_after(e2e, name, suspended_at, steps)
    assert f"/checkpoint-{suspended_at} " in resumed_lines(e2e, name, f"{name}-train")
    assert [a.get("reason") for a in e2e.status(name)["attempts"]] == [""]  # a suspension is not an attempt

    # an evicted pod: the attempt ends as Preempted and the next one resumes in a fresh Job
    rank1 = next(
        p["metadata"]["name"]
        for p in e2e.running_trainer_pods(name)
        if p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") == "1"
    )
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": rank1, "namespace": e2e.namespace}}
    e2e.api.ok(e2e.api.post(e2e.path("pods", rank1) + "/eviction", eviction))
    e2e.wait(name, lambda s: len(s.get("attempts") or []) == 2, 120, "a second attempt after the eviction")
    preempted = e2e.status(name)["attempts"][1]["startStep"]
    assert preempted >= second
    third = wait_for_checkpoint_after(e2e, name, preempted, steps)  # written by the new attempt
    assert f"/checkpoint-{preempted} " in resumed_lines(e2e, name, f"{name}-train-r1")

    # a killed trainer (as the OOM killer would): a failed attempt, the next one resumes and finishes
    rank0 = next(p for p in e2e.running_trainer_pods(name) if p["metadata"]["name"].startswith(f"{name}-train-r1-0-"))
    os.kill(e2e.trainer_process(rank0), signal.SIGKILL)
    status = e2e.wait_phase(name, "Succeeded", timeout=300)
    assert [a["reason"] for a in status["attempts"]] == ["Preempted", "Failed", "Succeeded"]
    assert status["preemptions"] == 1 and status["restarts"] == 1
    last = status["attempts"][2]
    assert last["startStep"] >= third and last["endStep"] == status["training"]["step"] == steps
    assert f"/checkpoint-{last['startStep']} " in resumed_lines(e2e, name, f"{name}-train-r2")
    assert e2e.names("jobs", name) == [f"{name}-collect", f"{name}-train", f"{name}-train-r1", f"{name}-train-r2"]
    assert {"Suspended", "Resumed", "PodPreempted", "AttemptFailed", "Succeeded"} <= set(reasons(e2e, name))
    assert e2e.progress(name)["step"] == steps


@pytest.mark.slow
def test_backoff_exhausted_fails_the_job(e2e: Any, tiny_model_dir: Path) -> None:
    # A model whose tokenizer pads to more positions than its text encoder has: loading works,
    # encoding the captions fails, and every attempt fails the same way (a retryable exit code 1).
    broken = f"{e2e.prefix}/models/broken-sd/"
    for path in sorted(p for p in tiny_model_dir.rglob("*") if p.is_file()):
        body = path.read_bytes()
        if path.name == "tokenizer_config.json":
            body = json.dumps({**json.loads(body), "model_max_length": 1000}).encode()
        e2e.s3.put_object(Bucket=e2e.bucket, Key=broken + path.relative_to(tiny_model_dir).as_posix(), Body=body)
    name = "broken"
    e2e.create(
        name,
        e2e.spec(
            name,
            model={"base": f"s3://{e2e.bucket}/{broken}"},
            runPolicy={"backoffLimit": 1},
            trainer={"nodes": 1, "gpusPerNode": 0},
        ),
    )
    status = e2e.wait_phase(name, "Failed", timeout=300)
    assert condition(status, "Succeeded")["reason"] == "BackoffLimitExceeded"
    assert "runPolicy.backoffLimit=1" in status["message"]
    assert "last failure: kubetune train: error: (rank 0) " in status["message"]  # the trainer's own line
    assert [a["reason"] for a in status["attempts"]] == ["Failed", "Failed"]
    assert status["restarts"] == 2 and status["preemptions"] == 0
    assert e2e.names("jobs", name) == ["broken-collect", "broken-train", "broken-train-r1"]


@pytest.mark.slow
def test_an_unsupported_pipeline_fails_after_one_attempt_naming_its_class(e2e: Any, tiny_model_dir: Path) -> None:
    # Only model_index.json is there: the trainer must refuse from it alone, before any download.
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    key = f"{e2e.prefix}/models/kandinsky/model_index.json"
    e2e.s3.put_object(Bucket=e2e.bucket, Key=key, Body=json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    name = "unsupported"
    model = {"base": f"s3://{e2e.bucket}/{e2e.prefix}/models/kandinsky/"}
    e2e.create(name, e2e.spec(name, model=model, runPolicy={"backoffLimit": 3}, trainer={"nodes": 1, "gpusPerNode": 0}))
    status = e2e.wait_phase(name, "Failed", timeout=300)
    assert condition(status, "Succeeded")["reason"] == "TrainerInvalidInput"
    assert "KandinskyPipeline" in status["message"]
    assert [a["reason"] for a in status["attempts"]] == ["Failed"]  # one attempt: no retry
    assert e2e.names("jobs", name) == ["unsupported-collect", "unsupported-train"]


@pytest.mark.slow
def test_a_flux_lora_job_runs_to_succeeded_and_its_lora_loads(e2e: Any, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    from kubetune.dev.testing.tiny_flow import build_tiny_flux_pipeline

    model = build_tiny_flux_pipeline(tmp_path / "tiny-flux")
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        key = f"{e2e.prefix}/models/tiny-flux/{path.relative_to(model).as_posix()}"
        e2e.s3.upload_file(str(path), e2e.bucket, key)
    name = "flux-lora"
    training = {"method": "lora", "loraRank": 4, "learningRate": 1e-3, "maxSequenceLength": 16}
    spec = e2e.spec(name, model={"base": e2e.uri("models", "tiny-flux") + "/"}, training=training, trainer={"nodes": 1})
    e2e.create(name, spec)
    status = e2e.wait_phase(name, "Succeeded", timeout=300)
    assert status["training"]["step"] == 4 and [a["reason"] for a in status["attempts"]] == ["Succeeded"]
    local = e2e.download(tmp_path / "lora", "jobs", name)
    assert "| model family | flux (FluxPipeline) |" in (local / "README.md").read_text()
    pipeline = FluxPipeline.from_pretrained(model)
    pipeline.load_lora_weights(local)
    image = pipeline("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=16).images[0]
    assert image.size == (32, 32)


# -- Kueue ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_kueue_queued_job_survives_preemption_suspension_and_a_failure_resuming_from_checkpoints(e2e: Any) -> None:
    """Kueue owns the queued Jobs' `suspend`: the local cluster's Kueue admits the trainer gang as one
    Workload, preempts it for a higher-priority Job (the same Job resumes from its checkpoint when
    readmitted), spec.suspend goes through the Workload's spec.active, and a new attempt gets a fresh
    Job while the failed one's is deleted."""
    name, steps = "queued", MAX_STEPS
    queue, urgent = f"{e2e.namespace}-q", f"{e2e.namespace}-urgent"
    kueue_queue(e2e.api, e2e.namespace, queue, {"cpu": "64", "memory": "1Ti", "pods": 2}, preemption="LowerPriority")
    priority = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "WorkloadPriorityClass", "metadata": {"name": urgent}}
    e2e.api.ok(e2e.api.post("/apis/kueue.x-k8s.io/v1beta1/workloadpriorityclasses", {**priority, "value": 1000}))
    e2e.create(name, recovery_spec(e2e, name, runPolicy={"queueName": queue, "backoffLimit": 1}))
    first = wait_for_checkpoint_after(e2e, name, 0, steps)
    job = e2e.api.ok(e2e.api.get(e2e.path("jobs", "queued-train")))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue
    (workload,) = [w for w in kueue_workloads(e2e.api, e2e.namespace) if w["spec"]["podSets"][0]["count"] == 2]
    assert workload["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]  # the 2 nodes: one Workload

    # a higher-priority Job in the same queue: Kueue evicts the training, runs it, then readmits the training
    preemptor = job_manifest("urgent", "import time; time.sleep(1)", suspend=True)
    preemptor["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": queue, "kueue.x-k8s.io/priority-class": urgent}
    e2e.api.ok(e2e.api.post(e2e.path("jobs"), preemptor))
    status = e2e.wait(
        name,
        lambda s: any(c["reason"] == "PreemptedByKueue" for c in s.get("conditions") or [] if c["type"] == "Training"),
        60,
        "preempted by Kueue",
    )
    assert status["message"].startswith("queued again after preemption by Kueue (Preempted to accommodate")
    assert status["phase"] == "Training" and status["preemptions"] == 1 and status["restarts"] == 0
    wait_for(lambda: true_condition(e2e.api.ok(e2e.api.get(e2e.path("jobs", "urgent"))), "Complete"), timeout=120)
    preempted_at = checkpoint_steps(e2e, name)[-1]  # the trainer saved one on SIGTERM
    assert preempted_at >= first
    wait_for(lambda: len(e2e.running_trainer_pods(name)) == 2, timeout=60)  # readmitted: the same Job
    second = wait_for_checkpoint_after(e2e, name, preempted_at, steps)
    assert f"/checkpoint-{preempted_at} " in resumed_lines(e2e, name, "queued-train")
    assert [a.get("reason") for a in e2e.status(name)["attempts"]] == [""]

    # spec.suspend: the operator deactivates the Workload, Kueue stops the Job; resuming reactivates it
    e2e.patch_spec(name, {"suspend": True})
    status = e2e.wait_phase(name, "Suspended", timeout=60)
    assert "its Kueue Workload is deactivated" in status["message"]
    wait_for(lambda: e2e.api.ok(e2e.api.get(e2e.path("jobs", "queued-train")))["spec"]["suspend"], timeout=60)
    # the pods get SIGTERM, save a checkpoint and exit (terminating pods still run until then)
    wait_for(
        lambda: not [p for p in trainer_pods(e2e, name, "queued-train") if p["status"].get("phase") == "Running"],
        timeout=90,
    )
    suspended_at = checkpoint_steps(e2e, name)[-1]
    assert suspended_at >= second
    e2e.patch_spec(name, {"suspend": False})
    wait_for(lambda: len(e2e.running_trainer_pods(name)) == 2, timeout=60)
    third = wait_for_checkpoint_after(e2e, name, suspended_at, steps)
    assert f"/checkpoint-{suspended_at} " in resumed_lines(e2e, name, "queued-train")

    # a failed attempt: the next one runs in a fresh Job and the old Job is deleted (no quota held)
    rank0 = next(p for p in e2e.running_trainer_pods(name) if p["metadata"]["name"].startswith("queued-train-0-"))
    os.kill(e2e.trainer_process(rank0), signal.SIGKILL)
    status = e2e.wait_phase(name, "Succeeded", timeout=300)
    assert [a["reason"] for a in status["attempts"]] == ["Failed", "Succeeded"]
    assert status["restarts"] == 1 and status["preemptions"] == 1
    assert status["attempts"][1]["startStep"] >= third and status["training"]["step"] == steps
    assert e2e.names("jobs", name) == ["queued-collect", "queued-train-r1"]
    assert {"PreemptedByKueue", "Suspended", "Resumed", "AttemptFailed", "Succeeded"} <= set(reasons(e2e, name))


@pytest.mark.slow
def test_a_captioned_job_trains_on_captions_from_a_vision_language_model(e2e: Any, tmp_path: Path) -> None:
    from kubetune.dev.testing.tiny_vlm import build_tiny_blip

    blip = build_tiny_blip(tmp_path / "blip")
    for path in sorted(p for p in blip.rglob("*") if p.is_file()):
        e2e.s3.upload_file(str(path), e2e.bucket, f"{e2e.prefix}/models/blip/{path.relative_to(blip).as_posix()}")
    name = "captioned"
    model_uri = e2e.uri("models", "blip") + "/"
    dataset = {"captioning": {"model": model_uri, "mode": "append", "maxNewTokens": 8, "batchSize": 4}}
    e2e.create(name, e2e.spec(name, dataset=dataset, trainer={"nodes": 1}))
    status = e2e.wait_phase(name, "Succeeded", timeout=300)
    assert [a["reason"] for a in status["attempts"]] == ["Succeeded"]
    columns = [k for k in e2e.keys("jobs", name, "dataset", ".kubetune", "captions") if k.endswith("metadata.jsonl")]
    assert columns, "the captions are stored beside the collected dataset"
    key = f"{e2e.prefix}/jobs/{name}/dataset/.kubetune/captions/{columns[0]}"
    body = e2e.s3.get_object(Bucket=e2e.bucket, Key=key)["Body"].read().decode()
    rows = [json.loads(line) for line in body.splitlines() if line.strip()]
    assert len(rows) == status["dataset"]["kept"]
    assert all(r["text"] == f"{r['original_text']}, {r['caption']}" for r in rows)  # mode append
    card = e2e.s3.get_object(Bucket=e2e.bucket, Key=f"{e2e.prefix}/jobs/{name}/README.md")["Body"].read().decode()
    assert f"generated by `{model_uri}` (mode `append`" in card


@pytest.mark.slow
def test_a_dreambooth_lora_job_generates_its_class_images_into_s3_and_says_so_in_its_card(
    e2e: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    name = "dreambooth"
    dreambooth = {
        "instancePrompt": "a photo of sks shape",
        "classPrompt": "a photo of a shape",
        "priorPreservation": True,
        "priorLossWeight": 0.5,
        "numClassImages": 3,
        "sampleBatchSize": 2,
    }
    training = {"method": "lora", "loraRank": 4, "learningRate": 1e-3, "dreambooth": dreambooth}
    e2e.create(name, e2e.spec(name, training=training, trainer={"nodes": 1}))
    status = e2e.wait_phase(name, "Succeeded", timeout=300)
    assert [a["reason"] for a in status["attempts"]] == ["Succeeded"]
    # generated by the base model beside the collected dataset (the instance images), for later jobs
    generated = sorted(k for k in e2e.keys("jobs", name, "dataset", ".kubetune", "class-images") if k.endswith(".png"))
    assert [k.rsplit("/", 1)[-1] for k in generated] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    local = e2e.download(tmp_path / "lora", "jobs", name)
    card = (local / "README.md").read_text()
    assert "## DreamBooth" in card and "`a photo of sks shape`" in card
    assert "| class prompt | `a photo of a shape` |" in card and "| class images | 3 (" in card
    assert "| prior loss weight | 0.5 |" in card
    pipeline = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipeline.load_lora_weights(local)
    image = pipeline("a photo of sks shape", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


# -- last: the chart's RBAC against every request the operator made above ------------------------


def test_the_chart_rbac_allows_every_request_the_operator_made_and_grants_nothing_unused(
    e2e: Any, chart_roles: Any, request: pytest.FixtureRequest
) -> None:
    requests = e2e.cluster.audit(e2e.user)
    assert requests
    namespaced = chart_roles(f"watchNamespaces={{{e2e.namespace}}}")
    cluster_wide = [r for r in chart_roles() if r["kind"] == "ClusterRole"]
    for roles in (namespaced, cluster_wide):
        assert not rbac.denied(roles, requests), rbac.denied(roles, requests)
    module_tests = {name for name in globals() if name.startswith("test_")}
    ran = {item.name.split("[")[0] for item in request.session.items if item.module is request.module}
    if ran >= module_tests:  # the whole module ran: every verb the chart grants was used
        # finalizers update is checked by admission when a child with blockOwnerDeletion is created,
        # not a request of its own
        used = rbac.used(requests) | {("kubetune.dev", "finetunejobs/finalizers", "update")}
        (role,) = cluster_wide
        assert rbac.granted(role) - used == set(), f"granted, never used: {sorted(rbac.granted(role) - used)}"
