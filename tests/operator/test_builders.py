"""The Kubernetes objects the operator creates, as data: what pods will run and see."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api.layout import dataset_fingerprint
from kubetune.api.load import parse_spec, read_spec_arg
from kubetune.api.models import FineTuneJobSpec
from kubetune.operator import builders as b

OWNER = b.Owner(name="lighthouses", namespace="team-a", uid="uid-123")


def make_spec(**overrides: Any) -> FineTuneJobSpec:
    spec: dict[str, Any] = {
        "dataset": {
            "unsplash": {"prompts": ["a lighthouse"], "accessKeySecretRef": {"name": "unsplash", "key": "access-key"}}
        },
        "model": {"base": "s3://models/tiny-sd/", "tokenSecretRef": {"name": "hf", "key": "token"}},
        "storage": {
            "uri": "s3://models/lighthouses/",
            "endpoint": "http://minio:9000",
            "region": "eu-west-1",
            "credentialsSecretRef": {"name": "s3"},
        },
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) and key not in ("dataset",) else value
    return parse_spec(spec)


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def env_map(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# -- collector ---------------------------------------------------------------------------------


def test_collector_job_is_an_indexed_job_of_shards_running_kubetune_collect() -> None:
    spec = make_spec(collector={"shards": 4, "image": "registry/collector:1"})
    job = b.collector_job(spec, OWNER)
    assert job["kind"] == "Job" and job["metadata"]["name"] == "lighthouses-collect"
    assert job["metadata"]["namespace"] == "team-a"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    container = container_of(job)
    assert container["image"] == "registry/collector:1"
    assert container["command"] == ["kubetune", "collect", "--spec", "env:KUBETUNE_SPEC"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["metadata"]["annotations"][b.ANNOTATION_FINGERPRINT] == dataset_fingerprint(spec.dataset)


def test_collector_uses_the_operator_default_image_when_the_spec_has_none() -> None:
    job = b.collector_job(make_spec(), OWNER, b.Images(collector="mine/collector:7", trainer="x"))
    assert container_of(job)["image"] == "mine/collector:7"


def test_children_are_owned_by_the_finetunejob_and_labelled() -> None:
    spec = make_spec()
    for obj in (b.collector_job(spec, OWNER), b.trainer_service(spec, OWNER), b.trainer_job(spec, OWNER)):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "lighthouses",
            "uid": "uid-123",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert obj["metadata"]["labels"][b.LABEL_JOB] == "lighthouses"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
    pod_labels = b.trainer_job(spec, OWNER)["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[b.LABEL_COMPONENT] == "trainer" and pod_labels[b.LABEL_JOB] == "lighthouses"


def test_pod_failure_policy_ignores_preemption_and_fails_fast_on_invalid_input() -> None:
    for job, container in (
        (b.collector_job(make_spec(), OWNER), "collector"),
        (b.trainer_job(make_spec(), OWNER), "trainer"),
    ):
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        assert {
            "action": "Ignore",
            "onExitCodes": {"containerName": container, "operator": "In", "values": [75]},
        } in rules
        assert {
            "action": "FailJob",
            "onExitCodes": {"containerName": container, "operator": "In", "values": [2]},
        } in rules
        diverged = {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": [3]}}
        assert diverged in rules, "a NaN run is not retried with the same settings"


# -- env and secrets ---------------------------------------------------------------------------

SOURCES = {
    "unsplash": (
        {"prompts": ["x"], "accessKeySecretRef": {"name": "u", "key": "k"}},
        {"UNSPLASH_ACCESS_KEY": ("u", "k")},
    ),
    "google": (
        {
            "prompts": ["x"],
            "apiKeySecretRef": {"name": "g", "key": "api"},
            "searchEngineIdSecretRef": {"name": "g", "key": "cx"},
        },
        {"GOOGLE_API_KEY": ("g", "api"), "GOOGLE_CSE_ID": ("g", "cx")},
    ),
    "openverse": (
        {
            "prompts": ["x"],
            "clientIdSecretRef": {"name": "o", "key": "id"},
            "clientSecretSecretRef": {"name": "o", "key": "secret"},
        },
        {"OPENVERSE_CLIENT_ID": ("o", "id"), "OPENVERSE_CLIENT_SECRET": ("o", "secret")},
    ),
    "huggingface": (
        {"name": "org/data", "tokenSecretRef": {"name": "hf-data", "key": "token"}},
        {"HF_TOKEN": ("hf-data", "token")},
    ),
    "wikimedia": ({"prompts": ["x"]}, {}),
    "urls": ({"uri": "s3://lists/a.jsonl"}, {}),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_collector_gets_each_source_key_only_as_a_secret_key_ref(source: str) -> None:
    settings, expected = SOURCES[source]
    spec = make_spec(dataset={source: settings})
    env = env_map(container_of(b.collector_job(spec, OWNER)))
    for variable, (secret, key) in {
        **expected,
        "AWS_ACCESS_KEY_ID": ("s3", "AWS_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": ("s3", "AWS_SECRET_ACCESS_KEY"),
    }.items():
        assert env[variable] == {"secretKeyRef": {"name": secret, "key": key}}
    source_keys = {
        "UNSPLASH_ACCESS_KEY",
        "GOOGLE_API_KEY",
        "GOOGLE_CSE_ID",
        "OPENVERSE_CLIENT_ID",
        "OPENVERSE_CLIENT_SECRET",
        "HF_TOKEN",
    }
    assert source_keys & set(env) == set(expected)


def test_spec_reaches_pods_as_json_with_references_and_no_values() -> None:
    spec = make_spec()
    for job in (b.collector_job(spec, OWNER), b.trainer_job(spec, OWNER)):
        env = env_map(container_of(job))
        handed = json.loads(env["KUBETUNE_SPEC"])
        assert handed["dataset"]["unsplash"]["accessKeySecretRef"] == {"name": "unsplash", "key": "access-key"}
        assert handed["storage"]["credentialsSecretRef"] == {"name": "s3"}
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_REGION"] == "eu-west-1"
        # Every env entry with a literal value is either the spec or a plain setting; keys come only by reference.
        literal = {e["name"] for e in container_of(job)["env"] if "value" in e}
        assert not literal & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "UNSPLASH_ACCESS_KEY"}


def test_spec_env_round_trips_through_the_spec_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec(training={"maxTrainSteps": 7, "method": "lora"})
    env = env_map(container_of(b.trainer_job(spec, OWNER)))
    monkeypatch.setenv("KUBETUNE_SPEC", env["KUBETUNE_SPEC"])
    assert read_spec_arg("env:KUBETUNE_SPEC") == spec


def test_trainer_gets_the_model_token_and_storage_credentials_but_not_source_keys() -> None:
    env = env_map(container_of(b.trainer_job(make_spec(), OWNER)))
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert "UNSPLASH_ACCESS_KEY" not in env


def test_a_hub_push_token_reaches_the_trainer_by_reference_only() -> None:
    from kubetune.trainer.hub import TOKEN_ENV

    spec = make_spec(output={"hub": {"repo": "org/lighthouses", "tokenSecretRef": {"name": "hf-write", "key": "t"}}})
    env = env_map(container_of(b.trainer_job(spec, OWNER)))
    assert env[TOKEN_ENV] == {"secretKeyRef": {"name": "hf-write", "key": "t"}}
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}, "the base model's token stays"
    assert TOKEN_ENV not in env_map(container_of(b.collector_job(spec, OWNER)))
    assert ("spec.output.hub.tokenSecretRef", spec.output.hub.token_secret_ref) in b.secret_ref_paths(spec, b.TRAINER)
    handed = json.loads(env["KUBETUNE_SPEC"])["output"]["hub"]
    assert handed == {
        "repo": "org/lighthouses",
        "tokenSecretRef": {"name": "hf-write", "key": "t"},
        "private": False,
        "revision": "",
        "pushCheckpoints": False,
    }


@pytest.mark.parametrize(
    "repo",
    ["lighthouses", "org/", "/name", "org/na me", "org/name/extra", "-org/name", "org/" + "n" * 97],
)
def test_a_hub_repo_must_be_namespace_slash_name(repo: str) -> None:
    from kubetune.api.load import SpecError

    with pytest.raises(SpecError, match=r"^spec\.output\.hub\.repo: String should match pattern|at most 193"):
        make_spec(output={"hub": {"repo": repo, "tokenSecretRef": {"name": "hf-write", "key": "t"}}})


def test_without_credentials_secret_pods_use_their_own_identity() -> None:
    spec = make_spec().model_copy(
        update={
            "storage": parse_spec(
                {
                    "dataset": {"wikimedia": {"prompts": ["x"]}},
                    "model": {"base": "m"},
                    "storage": {"uri": "s3://models/x/"},
                }
            ).storage
        }
    )
    env = env_map(container_of(b.trainer_job(spec, OWNER)))
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_ENDPOINT_URL" not in env


# -- trainer -----------------------------------------------------------------------------------


def test_headless_service_selects_the_trainer_pods_on_the_rendezvous_port() -> None:
    service = b.trainer_service(make_spec(trainer={"port": 29600}), OWNER)
    assert service["metadata"]["name"] == "lighthouses-train"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {b.LABEL_JOB: "lighthouses", b.LABEL_COMPONENT: "trainer"}
    assert service["spec"]["ports"][0]["port"] == 29600


@pytest.mark.parametrize(
    ("nodes", "gpus", "processes"),
    [(1, 1, 1), (1, 8, 8), (4, 8, 32), (2, 0, 2), (1, 0, 1)],
)
def test_trainer_pods_render_the_accelerate_flags_for_their_layout(nodes: int, gpus: int, processes: int) -> None:
    spec = make_spec(trainer={"nodes": nodes, "gpusPerNode": gpus, "port": 29511}, training={"mixedPrecision": "bf16"})
    job = b.trainer_job(spec, OWNER)
    assert job["metadata"]["name"] == "lighthouses-train"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    command = container_of(job)["command"]
    assert command[:3] == ["python", "-m", "kubetune.launch"]
    assert flag(command, "--num_processes") == str(processes)
    assert flag(command, "--num_machines") == str(nodes)
    if nodes > 1:
        assert flag(command, "--machine_rank") == "$(JOB_COMPLETION_INDEX)"
        assert flag(command, "--main_process_ip") == "lighthouses-train-0.lighthouses-train"
    if processes > 1:
        assert "--multi_gpu" in command  # also what runs gloo on CPU nodes
        assert flag(command, "--main_process_port") == "29511"
    assert flag(command, "--mixed_precision") == "bf16"
    tail = command[command.index("-m", 3) :]
    assert tail == ["-m", "kubetune.trainer", "--spec", "env:KUBETUNE_SPEC", "--resume_from_checkpoint", "latest"]
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "lighthouses-train"
    resources = container_of(job)["resources"]
    if gpus:
        assert resources["limits"]["nvidia.com/gpu"] == gpus == resources["requests"]["nvidia.com/gpu"]
    else:
        assert "nvidia.com/gpu" not in json.dumps(resources)
    # The completion index the command refers to is defined in the pod's own env.
    assert env_map(container_of(job))["JOB_COMPLETION_INDEX"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }


def test_each_restart_gets_its_own_job_and_rank0_address() -> None:
    spec = make_spec(trainer={"nodes": 2, "gpusPerNode": 1})
    job = b.trainer_job(spec, OWNER, restart=2)
    assert job["metadata"]["name"] == "lighthouses-train-r2"
    assert job["metadata"]["labels"][b.LABEL_ATTEMPT] == "2"
    assert flag(container_of(job)["command"], "--main_process_ip") == "lighthouses-train-r2-0.lighthouses-train"
    assert job["spec"]["backoffLimit"] == 0  # the operator restarts the gang as a whole


def test_trainer_scheduling_resources_and_shared_memory_come_from_the_spec() -> None:
    spec = make_spec(
        trainer={
            "nodes": 2,
            "gpusPerNode": 8,
            "shmSize": "64Gi",
            "image": "registry/trainer:2",
            "resources": {"limits": {"memory": "600Gi"}, "requests": {"cpu": "32"}},
            "nodeSelector": {"nvidia.com/gpu.product": "H100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
            "priorityClassName": "training",
            "serviceAccountName": "trainer-sa",
        }
    )
    job = b.trainer_job(spec, OWNER)
    pod = job["spec"]["template"]["spec"]
    container = container_of(job)
    assert container["image"] == "registry/trainer:2"
    assert container["resources"] == {
        "limits": {"memory": "600Gi", "nvidia.com/gpu": 8},
        "requests": {"cpu": "32", "nvidia.com/gpu": 8},
    }
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeAffinity" in pod["affinity"]
    assert pod["priorityClassName"] == "training" and pod["serviceAccountName"] == "trainer-sa"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["restartPolicy"] == "Never"
    # The spec did not touch the user's resources object.
    assert "nvidia.com/gpu" not in spec.trainer.resources.limits


def test_kueue_queue_label_and_jobs_start_suspended() -> None:
    spec = make_spec(runPolicy={"queueName": "gpu-team"})
    for job in (b.collector_job(spec, OWNER), b.trainer_job(spec, OWNER)):
        assert job["metadata"]["labels"][b.KUEUE_QUEUE_LABEL] == "gpu-team"
        assert job["spec"]["suspend"] is True
    plain = b.trainer_job(make_spec(), OWNER)
    assert plain["spec"]["suspend"] is False and b.KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"]


def test_suspended_spec_creates_suspended_jobs() -> None:
    assert b.collector_job(make_spec(suspend=True), OWNER)["spec"]["suspend"] is True


@pytest.mark.parametrize("name", ["a" * 200, "my.dotted.name", "9lives", "x" * 41])
def test_long_or_dotted_names_still_give_valid_deterministic_child_names(name: str) -> None:
    base = b.base_name(name)
    assert base == b.base_name(name)
    assert len(base) <= b.MAX_BASE_LENGTH and b._DNS_LABEL.match(base)
    hostname = b.rank0_host(name, restart=99).split(".")[0] + "55"  # index up to 255
    assert len(hostname) <= 63
    assert b.base_name(name + "-other") != base


def test_cluster_wide_s3_defaults_reach_pods_through_the_effective_spec() -> None:
    """The chart's S3 defaults (operator env) fill in what a spec leaves out, for the pods too."""
    import json

    from kubetune.api.load import parse_spec
    from kubetune.operator.kube import Kube

    kube = Kube.__new__(Kube)  # only the defaults matter here; no API client is needed
    kube.default_endpoint, kube.default_region, kube.default_credentials_secret = (
        "http://minio:9000",
        "eu-1",
        "s3-creds",
    )
    plain = parse_spec(
        {"dataset": {"urls": {"uri": "s3://bkt/l.jsonl"}}, "model": {"base": "m"}, "storage": {"uri": "s3://bkt/p/"}}
    )
    spec = kube.effective_spec(plain)
    assert (spec.storage.endpoint, spec.storage.region, spec.storage.credentials_secret_ref.name) == (
        "http://minio:9000",
        "eu-1",
        "s3-creds",
    )
    assert json.loads(b.spec_json(spec))["storage"]["endpoint"] == "http://minio:9000"
    assert b.secret_refs(spec, b.TRAINER)["AWS_SECRET_ACCESS_KEY"].name == "s3-creds"
    own = parse_spec(
        {
            "dataset": {"urls": {"uri": "s3://bkt/l.jsonl"}},
            "model": {"base": "m"},
            "storage": {"uri": "s3://bkt/p/", "endpoint": "http://own:1", "credentialsSecretRef": {"name": "mine"}},
        }
    )
    kept = kube.effective_spec(own)
    assert (kept.storage.endpoint, kept.storage.credentials_secret_ref.name) == ("http://own:1", "mine")


def test_pods_meet_the_restricted_pod_security_standard_with_a_writable_tmp() -> None:
    spec = make_spec(trainer={"nodes": 2, "gpusPerNode": 1})
    for job in (b.collector_job(spec, OWNER), b.trainer_job(spec, OWNER)):
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        context = container_of(job)["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["readOnlyRootFilesystem"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        (tmp,) = [m for m in container_of(job)["volumeMounts"] if m["mountPath"] == "/tmp"]
        limit = {"sizeLimit": b.DEFAULT_STAGING_SIZE} if "train" in job["metadata"]["name"] else {}
        assert volumes[tmp["name"]] == {"name": tmp["name"], "emptyDir": limit}


def trainer_tmp(spec: FineTuneJobSpec) -> dict[str, Any]:
    volumes = b.trainer_job(spec, OWNER)["spec"]["template"]["spec"]["volumes"]
    return next(v for v in volumes if v["name"] == b.TMP_VOLUME)["emptyDir"]  # type: ignore[no-any-return]


def test_the_trainers_staging_volume_is_bounded_by_the_spec_or_the_operators_default() -> None:
    from kubetune.api.load import SpecError
    from kubetune.operator.kube import Kube

    assert trainer_tmp(make_spec()) == {"sizeLimit": "64Gi"}
    assert trainer_tmp(make_spec(trainer={"stagingSize": "200Gi"})) == {"sizeLimit": "200Gi"}
    kube = Kube.__new__(Kube)
    kube.default_staging_size = "120Gi"
    assert trainer_tmp(kube.effective_spec(make_spec())) == {"sizeLimit": "120Gi"}
    assert trainer_tmp(kube.effective_spec(make_spec(trainer={"stagingSize": "10Gi"}))) == {"sizeLimit": "10Gi"}
    with pytest.raises(SpecError, match="trainer.stagingSize"):
        make_spec(trainer={"stagingSize": "lots"})


# -- hardening (#13) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build", [lambda s: b.collector_job(s, OWNER), lambda s: b.trainer_job(s, OWNER)], ids=["collector", "trainer"]
)
def test_pods_get_no_service_account_token(build: Any) -> None:
    account = {"serviceAccountName": "s3-reader"}
    pod = build(make_spec(trainer=account, collector=account))
    assert pod["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_collector_pods_have_default_requests_and_a_memory_limit() -> None:
    resources = container_of(b.collector_job(make_spec(), OWNER))["resources"]
    assert resources == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"limits": {"memory": "8Gi"}}, {"requests": {"cpu": "500m"}, "limits": {"memory": "8Gi"}}),
        ({"requests": {"memory": "16Gi", "cpu": "4"}}, {"requests": {"memory": "16Gi", "cpu": "4"}}),
        (
            {"requests": {"cpu": "2"}, "limits": {"cpu": "2"}},
            {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        ),
    ],
)
def test_collector_resources_from_the_spec_win_over_the_defaults(
    given: dict[str, Any], expected: dict[str, Any]
) -> None:
    job = b.collector_job(make_spec(collector={"resources": given}), OWNER)
    resources = container_of(job)["resources"]
    assert resources == expected


@pytest.mark.parametrize(
    ("collector", "run_policy", "expected"),
    [
        ({}, {}, 86_400),
        ({"activeDeadlineSeconds": 3600}, {}, 3600),
        ({}, {"activeDeadlineSeconds": 600}, 600),
        ({"activeDeadlineSeconds": 3600}, {"activeDeadlineSeconds": 7200}, 3600),
    ],
)
def test_collector_jobs_have_an_active_deadline(
    collector: dict[str, Any], run_policy: dict[str, Any], expected: int
) -> None:
    job = b.collector_job(make_spec(collector=collector, runPolicy=run_policy), OWNER)
    assert job["spec"]["activeDeadlineSeconds"] == expected


# -- what the kubelet hands the container ------------------------------------------------------

TRICKY = ["cost $$5 a $(HOME) night", "$(KUBETUNE_FINETUNEJOB) at $$(PYTHONUNBUFFERED)", "a $ sign", "$$$("]


def as_pod_sees_it(container: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The container's environment and argv after the kubelet's `$(VAR)` / `$$` expansion (the
    local cluster's, which follows the documented rules): env values in order, each seeing the
    ones before it, then command and args seeing them all."""
    from kubetune.dev.node.kubelet import expand

    seen: dict[str, str] = {"HOME": "/home/pod"}  # an env var the image might define: never expanded
    resolved: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            resolved[entry["name"]] = expand(entry["value"], resolved)
        else:
            resolved[entry["name"]] = "0" if entry["name"] == "JOB_COMPLETION_INDEX" else "from-a-secret"
    argv = [expand(arg, resolved) for arg in container["command"] + container.get("args", [])]
    return {**seen, **resolved}, argv


@pytest.mark.parametrize("build", [b.collector_job, b.trainer_job])
def test_dollar_signs_in_the_spec_reach_the_pod_unchanged(build: Any) -> None:
    spec = make_spec(
        dataset={"unsplash": {"prompts": TRICKY, "accessKeySecretRef": {"name": "unsplash", "key": "access-key"}}},
        storage={"endpoint": "http://minio:9000/$$(HOME)"},
        training={"validationPrompts": ["a $$ lighthouse $(KUBETUNE_FINETUNEJOB)"]},
    )
    environment, argv = as_pod_sees_it(container_of(build(spec, OWNER)))
    seen = parse_spec(json.loads(environment["KUBETUNE_SPEC"]))
    assert seen == spec
    assert seen.dataset.unsplash is not None and seen.dataset.unsplash.prompts == TRICKY
    assert dataset_fingerprint(seen.dataset) == dataset_fingerprint(spec.dataset)
    assert environment["AWS_ENDPOINT_URL"] == "http://minio:9000/$$(HOME)"
    assert environment["KUBETUNE_FINETUNEJOB"] == OWNER.name
    if build is b.trainer_job:
        assert "--spec" in argv and argv[argv.index("--spec") + 1] == "env:KUBETUNE_SPEC"


def test_the_machine_rank_is_still_expanded_from_the_completion_index() -> None:
    spec = make_spec(trainer={"nodes": 2})
    _, argv = as_pod_sees_it(container_of(b.trainer_job(spec, OWNER)))
    assert flag(argv, "--machine_rank") == "0"


def test_a_two_node_fsdp_trainer_wires_16_ranks_and_hands_the_trainer_its_strategy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubetune.trainer.config import parse_config

    spec = make_spec(
        trainer={"nodes": 2, "gpusPerNode": 8, "strategy": "fsdp", "fsdpCpuOffload": True},
        training={"mixedPrecision": "bf16", "gradientCheckpointing": True},
    )
    job = b.trainer_job(spec, OWNER)
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    env, argv = as_pod_sees_it(container_of(job))  # pod 0 of the Indexed Job
    assert "--multi_gpu" in argv and flag(argv, "--num_processes") == "16" and flag(argv, "--num_machines") == "2"
    assert flag(argv, "--machine_rank") == "0" and flag(argv, "--mixed_precision") == "bf16"
    assert flag(argv, "--main_process_ip") == "lighthouses-train-0.lighthouses-train"
    assert flag(argv, "--main_process_port") == "29500"
    # every pod's trainer reads the same strategy from the spec it is handed
    monkeypatch.setenv("KUBETUNE_SPEC", env["KUBETUNE_SPEC"])
    config = parse_config(argv[argv.index("kubetune.trainer") + 1 :], "kubetune train")
    assert (config.strategy, config.fsdp_cpu_offload, config.gradient_checkpointing) == ("fsdp", True, True)
    assert config.precision == "bf16" and config.method == "full"
    # a strategy changed after training started is a change of the training, as nodes are
    changed = make_spec(trainer={"nodes": 2, "gpusPerNode": 8, "strategy": "ddp"}, training={"mixedPrecision": "bf16"})
    assert b.training_hash(changed) != b.training_hash(spec)
    assert b.training_hash(make_spec()) == b.training_hash(make_spec(trainer={"strategy": "auto"}))
