"""spec.<component>.podTemplate and the operator's jobDefaults: what reaches the pods, the merge rules,
and the fields the operator keeps for itself. Pure builders, no cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.load import SpecError, load_job_defaults, parse_spec
from kubetune.api.models import FineTuneJobSpec
from kubetune.cli import main as kubetune_main
from kubetune.operator import builders as b

OWNER = b.Owner(name="shots", namespace="team-a", uid="uid-1")
COMPONENTS = (b.COLLECTOR, b.TRAINER)


def make_spec(trainer: dict[str, Any] | None = None, collector: dict[str, Any] | None = None) -> FineTuneJobSpec:
    return parse_spec(
        {
            "dataset": {"urls": {"uri": "s3://bkt/list.jsonl"}},
            "model": {"base": "org/model", "tokenSecretRef": {"name": "hf", "key": "token"}},
            "storage": {
                "uri": "s3://bkt/shots/",
                "endpoint": "http://minio:9000",
                "credentialsSecretRef": {"name": "s3"},
            },
            "trainer": trainer or {},
            "collector": collector or {},
        }
    )


def build(spec: FineTuneJobSpec, component: str) -> dict[str, Any]:
    """The component's pod template as the API server receives it (JSON)."""
    job = b.trainer_job(spec, OWNER) if component == b.TRAINER else b.collector_job(spec, OWNER)
    return json.loads(json.dumps(job["spec"]["template"]))  # type: ignore[no-any-return]


def with_overlay(component: str, overlay: dict[str, Any], **direct: Any) -> dict[str, Any]:
    return build(make_spec(**{component: {"podTemplate": overlay, **direct}}), component)


def main_container(template: dict[str, Any]) -> dict[str, Any]:
    (container,) = template["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def env_of(template: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in main_container(template)["env"]}


def containers(component: str, **fields: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": component, **fields}]}}


# -- every field reaches the pods ----------------------------------------------------------------

AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]
        }
    }
}
POD_FIELDS: list[tuple[str, Any]] = [
    ("runtimeClassName", "nvidia"),
    ("priorityClassName", "batch-low"),
    ("serviceAccountName", "s3-reader"),
    ("nodeSelector", {"pool": "gpu"}),
    ("tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
    ("affinity", AFFINITY),
    ("imagePullSecrets", [{"name": "regcred"}]),
]


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize(("field", "value"), POD_FIELDS, ids=[f for f, _ in POD_FIELDS])
def test_each_pod_field_of_the_overlay_reaches_the_pods(component: str, field: str, value: Any) -> None:
    template = with_overlay(component, {"spec": {field: value}})
    assert template["spec"][field] == value


@pytest.mark.parametrize("component", COMPONENTS)
def test_labels_and_annotations_are_added_to_the_pods(component: str) -> None:
    template = with_overlay(
        component,
        {"metadata": {"labels": {"cost-center": "ml"}, "annotations": {"sidecar.istio.io/inject": "false"}}},
    )
    assert template["metadata"]["labels"]["cost-center"] == "ml"
    assert template["metadata"]["labels"][b.LABEL_JOB] == "shots"
    assert template["metadata"]["annotations"] == {
        "sidecar.istio.io/inject": "false",
        b.ANNOTATION_OWNER: "shots",
    }


@pytest.mark.parametrize("component", COMPONENTS)
def test_env_env_from_volumes_and_mounts_reach_the_main_container(component: str) -> None:
    overlay = containers(
        component,
        env=[{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}, {"name": "NCCL_DEBUG", "value": "INFO"}],
        envFrom=[{"configMapRef": {"name": "proxy-settings"}, "prefix": "CORP_"}],
        volumeMounts=[{"name": "cache", "mountPath": "/cache"}, {"name": "scratch", "mountPath": "/scratch"}],
    )
    overlay["spec"]["volumes"] = [
        {"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache"}},
        {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"], "storageClassName": "local-nvme",
            "resources": {"requests": {"storage": "500Gi"}},
        }}}},
    ]  # fmt: skip
    template = with_overlay(component, overlay)
    container = main_container(template)
    env = env_of(template)
    assert env["HTTPS_PROXY"] == "http://proxy:3128" and env["NCCL_DEBUG"] == "INFO"
    # the operator's env first: the overlay's values may refer to it as $(VAR)
    names = [e["name"] for e in container["env"]]
    assert names.index(b.SPEC_ENV) < names.index("HTTPS_PROXY")
    assert container["envFrom"] == [{"configMapRef": {"name": "proxy-settings"}, "prefix": "CORP_"}]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/cache"] == "cache" and mounts["/scratch"] == "scratch" and mounts["/tmp"] == b.TMP_VOLUME
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache"}
    assert volumes["scratch"]["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"] == "500Gi"


@pytest.mark.parametrize("component", COMPONENTS)
def test_security_contexts_may_change_within_restricted(component: str) -> None:
    overlay = containers(component, securityContext={"runAsUser": 1000700000, "readOnlyRootFilesystem": False})
    overlay["spec"]["securityContext"] = {
        "runAsUser": 1000700000,
        "runAsGroup": 0,
        "fsGroup": 1000700000,
        "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/train.json"},
    }
    template = with_overlay(component, overlay)
    pod = template["spec"]["securityContext"]
    assert pod == {
        "runAsNonRoot": True,
        "runAsUser": 1000700000,
        "runAsGroup": 0,
        "fsGroup": 1000700000,
        "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/train.json"},
    }
    assert main_container(template)["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000700000,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": False,
        "capabilities": {"drop": ["ALL"]},
    }


def test_without_an_overlay_the_pods_are_as_before() -> None:
    template = build(make_spec(), b.TRAINER)
    assert set(template["spec"]) >= {"containers", "volumes", "securityContext"}
    assert not {"nodeSelector", "tolerations", "affinity", "imagePullSecrets", "runtimeClassName"} & set(
        template["spec"]
    )
    assert "envFrom" not in main_container(template)


# -- the operator's fields win -------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_the_operators_env_volumes_mounts_labels_and_annotations_win(component: str) -> None:
    plain = build(make_spec(), component)
    overlay = containers(
        component,
        env=[
            {"name": b.SPEC_ENV, "value": "{}"},
            {"name": "JOB_COMPLETION_INDEX", "value": "7"},
            {"name": "AWS_ACCESS_KEY_ID", "value": "stolen"},
            {"name": "AWS_ENDPOINT_URL", "value": "http://elsewhere"},
            {"name": "EXTRA", "value": "1"},
        ],
        volumeMounts=[{"name": "mine", "mountPath": "/tmp"}, {"name": "tmp", "mountPath": "/other"}],
    )
    overlay["spec"]["volumes"] = [{"name": "tmp", "emptyDir": {"sizeLimit": "1Mi"}}, {"name": "mine", "emptyDir": {}}]
    overlay["metadata"] = {
        "labels": {b.LABEL_JOB: "someone-else", b.LABEL_COMPONENT: "x", "team": "a"},
        "annotations": {b.ANNOTATION_OWNER: "someone-else"},
    }
    # the reserved env names are refused by the schema already (below); the builder drops them anyway
    template = json.loads(json.dumps(b.apply_pod_overlay(plain, overlay)))
    container, plain_container = main_container(template), main_container(plain)
    assert container["env"][: len(plain_container["env"])] == plain_container["env"]
    assert [e["name"] for e in container["env"][len(plain_container["env"]) :]] == ["EXTRA"]
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/tmp"] == b.TMP_VOLUME
    assert {"name": "tmp", "mountPath": "/other"} in container["volumeMounts"]  # the operator's volume, elsewhere
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["tmp"] == next(v for v in plain["spec"]["volumes"] if v["name"] == "tmp")
    assert template["metadata"]["labels"] == {**plain["metadata"]["labels"], "team": "a"}
    assert template["metadata"]["annotations"] == plain["metadata"]["annotations"]
    for key in ("name", "image", "command", "resources", "terminationMessagePolicy"):
        assert container.get(key) == plain_container.get(key)
    for key in ("restartPolicy", "automountServiceAccountToken", "enableServiceLinks", "terminationGracePeriodSeconds"):
        assert template["spec"][key] == plain["spec"][key]


@pytest.mark.parametrize(
    ("overlay", "field"),
    [
        ({"spec": {"containers": [{"name": "trainer", "command": ["sh"]}]}}, "containers[0].command"),
        ({"spec": {"containers": [{"name": "trainer", "image": "evil"}]}}, "containers[0].image"),
        ({"spec": {"containers": [{"name": "trainer", "args": ["x"]}]}}, "containers[0].args"),
        ({"spec": {"containers": [{"name": "sidecar"}]}}, "containers[0].name"),
        ({"spec": {"containers": [{"name": "trainer"}, {"name": "trainer"}]}}, "spec.containers"),
        ({"spec": {"hostNetwork": True}}, "spec.hostNetwork"),
        ({"spec": {"restartPolicy": "Always"}}, "spec.restartPolicy"),
        ({"spec": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}, "volumes[0].hostPath"),
        ({"spec": {"securityContext": {"runAsUser": 0}}}, "securityContext.runAsUser"),
        ({"spec": {"securityContext": {"runAsNonRoot": False}}}, "securityContext.runAsNonRoot"),
        ({"spec": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}}, "seccompProfile.type"),
        (
            {"spec": {"containers": [{"name": "trainer", "securityContext": {"allowPrivilegeEscalation": True}}]}},
            "securityContext.allowPrivilegeEscalation",
        ),
        (
            {"spec": {"containers": [{"name": "trainer", "securityContext": {"privileged": True}}]}},
            "securityContext.privileged",
        ),
        ({"spec": {"containers": [{"name": "trainer", "env": [{"name": "BAD NAME"}]}]}}, "env[0].name"),
        (
            {"spec": {"containers": [{"name": "trainer", "env": [{"name": "A"}, {"name": "A", "value": "2"}]}]}},
            "env[1]",
        ),
        ({"spec": {"volumes": [{"name": "c", "emptyDir": {"sizeLimit": "lots"}}]}}, "emptyDir.sizeLimit"),
        ({"spec": {"volumes": [{"name": "Cache", "emptyDir": {}}]}}, "volumes[0].name"),
        ({"spec": {"imagePullSecrets": [{"name": "Reg Cred"}]}}, "imagePullSecrets[0].name"),
        ({"metadata": {"labels": {"team": "a b"}}}, "metadata.labels.team"),
        ({"metadata": {"labels": {"bad key": "a"}}}, "metadata.labels.bad key"),
        ({"metadata": {"name": "x"}}, "metadata.name"),
        ({"spec": {"containers": [{"name": "trainer", "env": [{"name": "AWS_ENDPOINT_URL_S3"}]}]}}, "env[0].name"),
        ({"spec": {"containers": [{"name": "trainer", "env": [{"name": "KUBETUNE_SPEC"}]}]}}, "env[0].name"),
        ({"spec": {"containers": [{"name": "trainer", "env": [{"name": "X"}, {"name": "HF_TOKEN"}]}]}}, "env[1].name"),
    ],
)
def test_what_the_operator_owns_or_restricted_forbids_is_refused_naming_the_field(
    overlay: dict[str, Any], field: str
) -> None:
    with pytest.raises(SpecError) as raised:
        make_spec(trainer={"podTemplate": overlay})
    message = str(raised.value)
    assert message.startswith("spec.trainer.podTemplate.") and field in message, message
    assert "\n" not in message


def test_every_env_name_the_operator_sets_is_reserved() -> None:
    from kubetune.api import podtemplate

    spec = make_spec()
    names = {e["name"] for c in COMPONENTS for e in main_container(build(spec, c))["env"]}
    for variables in b.SOURCE_SECRET_ENV.values():
        names |= set(variables.values())
    assert names, "nothing built"
    for name in names:
        assert name in podtemplate.RESERVED_ENV_NAMES or name.startswith(tuple(podtemplate.RESERVED_ENV_PREFIXES)), name
    assert "AWS_ENDPOINT_URL" in names and "HF_TOKEN" in names and "AWS_SECRET_ACCESS_KEY" in names


def test_affinity_has_the_kubernetes_schema_not_free_form() -> None:
    with pytest.raises(SpecError, match=r"^spec\.trainer\.affinity\.nodeAffinity\.nodeAffinity: unknown field"):
        make_spec(trainer={"affinity": {"nodeAffinity": {"nodeAffinity": {}}}})
    bad_weight = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 101, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
    ]}}  # fmt: skip
    with pytest.raises(
        SpecError, match=r"preferredDuringSchedulingIgnoredDuringExecution\[0\]\.weight: must be at most 100"
    ):
        make_spec(collector={"affinity": bad_weight})


# -- merge rules ---------------------------------------------------------------------------------


def test_merge_overlays_is_a_strategic_merge() -> None:
    base = {
        "metadata": {"labels": {"a": "1", "b": "1"}, "annotations": {"x": "1"}},
        "spec": {
            "containers": [
                {
                    "name": "trainer",
                    "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "1"}],
                    "envFrom": [{"secretRef": {"name": "one"}}],
                    "volumeMounts": [{"name": "v1", "mountPath": "/a"}],
                    "securityContext": {"runAsUser": 5},
                }
            ],
            "volumes": [{"name": "v1", "emptyDir": {}}],
            "imagePullSecrets": [{"name": "r1"}],
            "tolerations": [{"key": "t1", "operator": "Exists"}],
            "nodeSelector": {"pool": "a", "zone": "z"},
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
            "priorityClassName": "low",
        },
    }
    overlay = {
        "metadata": {"labels": {"b": "2"}},
        "spec": {
            "containers": [
                {
                    "name": "trainer",
                    "env": [{"name": "B", "value": "2"}, {"name": "C", "value": "2"}],
                    "envFrom": [{"secretRef": {"name": "two"}}],
                    "volumeMounts": [{"name": "v2", "mountPath": "/a"}, {"name": "v2", "mountPath": "/b"}],
                    "securityContext": {"runAsGroup": 6},
                }
            ],
            "volumes": [{"name": "v1", "persistentVolumeClaim": {"claimName": "c"}}, {"name": "v2", "emptyDir": {}}],
            "imagePullSecrets": [{"name": "r2"}],
            "tolerations": [{"key": "t2", "operator": "Exists"}],
            "nodeSelector": {"pool": "b"},
            "affinity": {"podAntiAffinity": {}},
            "priorityClassName": "high",
        },
    }
    merged = b.merge_overlays(base, overlay)
    assert merged["metadata"] == {"labels": {"a": "1", "b": "2"}, "annotations": {"x": "1"}}
    (container,) = merged["spec"]["containers"]
    assert container["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}, {"name": "C", "value": "2"}]
    assert container["envFrom"] == [{"secretRef": {"name": "one"}}, {"secretRef": {"name": "two"}}]
    assert container["volumeMounts"] == [{"name": "v2", "mountPath": "/a"}, {"name": "v2", "mountPath": "/b"}]
    assert container["securityContext"] == {"runAsUser": 5, "runAsGroup": 6}
    # volumes by name, fields merged like a strategic merge patch (retainKeys aside)
    assert merged["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "c"}
    assert [v["name"] for v in merged["spec"]["volumes"]] == ["v1", "v2"]
    assert merged["spec"]["imagePullSecrets"] == [{"name": "r1"}, {"name": "r2"}]
    assert merged["spec"]["tolerations"] == [{"key": "t1", "operator": "Exists"}, {"key": "t2", "operator": "Exists"}]
    assert merged["spec"]["nodeSelector"] == {"pool": "b", "zone": "z"}
    assert set(merged["spec"]["affinity"]) == {"nodeAffinity", "podAntiAffinity"}
    assert merged["spec"]["priorityClassName"] == "high"
    assert base["spec"]["containers"][0]["env"][1]["value"] == "1", "the inputs are not changed"


def test_defaults_then_the_podtemplate_then_the_direct_fields_then_the_operator() -> None:
    job_defaults = {
        "metadata": {"labels": {"cost-center": "platform", "tier": "batch"}},
        "spec": {
            "containers": [{"name": "trainer", "env": [{"name": "HTTPS_PROXY", "value": "http://default:3128"},
                                                       {"name": "NCCL_IB_DISABLE", "value": "1"}]}],
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "nodeSelector": {"pool": "gpu", "zone": "a"},
            "priorityClassName": "default-class",
            "imagePullSecrets": [{"name": "regcred"}],
        },
    }  # fmt: skip
    spec = make_spec(
        trainer={
            "podTemplate": {
                "metadata": {"labels": {"cost-center": "research"}},
                "spec": {
                    "containers": [{"name": "trainer", "env": [{"name": "HTTPS_PROXY", "value": "http://job:3128"}]}],
                    "tolerations": [{"key": "spot", "operator": "Exists"}],
                    "nodeSelector": {"zone": "b"},
                    "priorityClassName": "job-class",
                },
            },
            "nodeSelector": {"zone": "c"},
            "tolerations": [{"key": "direct", "operator": "Exists"}],
        }
    )
    defaults = b.SpecDefaults(pod_templates={b.TRAINER: job_defaults})
    template = build(b.effective_spec(spec, defaults), b.TRAINER)
    assert template["metadata"]["labels"]["cost-center"] == "research"
    assert template["metadata"]["labels"]["tier"] == "batch"
    env = env_of(template)
    assert env["HTTPS_PROXY"] == "http://job:3128" and env["NCCL_IB_DISABLE"] == "1"
    assert [t["key"] for t in template["spec"]["tolerations"]] == ["gpu", "spot", "direct"]
    assert template["spec"]["nodeSelector"] == {"pool": "gpu", "zone": "c"}
    assert template["spec"]["priorityClassName"] == "job-class"
    assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    # the collector has no defaults of its own here
    assert "tolerations" not in build(b.effective_spec(spec, defaults), b.COLLECTOR)["spec"]


def test_a_mount_of_no_volume_is_an_invalid_spec_unless_the_defaults_have_the_volume() -> None:
    mount = containers("trainer", volumeMounts=[{"name": "cache", "mountPath": "/cache"}])
    spec = make_spec(trainer={"podTemplate": mount})
    with pytest.raises(
        SpecError, match=r"^spec\.trainer\.podTemplate\..*volumeMounts\[mountPath=/cache\]\.name: no volume 'cache'"
    ):
        b.effective_spec(spec, b.SpecDefaults())
    defaults = b.SpecDefaults(pod_templates={b.TRAINER: {"spec": {"volumes": [{"name": "cache", "emptyDir": {}}]}}})
    template = build(b.effective_spec(spec, defaults), b.TRAINER)
    assert {"name": "cache", "emptyDir": {}} in template["spec"]["volumes"]
    # the operator's own volumes may be mounted elsewhere
    b.effective_spec(
        make_spec(trainer={"podTemplate": containers("trainer", volumeMounts=[{"name": "dshm", "mountPath": "/x"}])}),
        b.SpecDefaults(),
    )


def test_the_spec_handed_to_pods_carries_no_pod_template() -> None:
    spec = make_spec(
        trainer={"podTemplate": containers("trainer", env=[{"name": "HTTPS_PROXY", "value": "http://u:p@x"}])}
    )
    handed = json.loads(b.spec_json(spec))
    assert "podTemplate" not in handed["trainer"] and "podTemplate" not in handed["collector"]
    assert "u:p@x" not in b.spec_json(spec)


# -- job defaults: the file, and `kubetune render --job-defaults` -------------------------------


DEFAULTS_FILE = {
    "trainer": {
        "metadata": {"labels": {"cost-center": "platform"}},
        "spec": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    },
    "collector": {
        "spec": {"containers": [{"name": "collector", "env": [{"name": "HTTPS_PROXY", "value": "http://p"}]}]}
    },
}


@pytest.mark.parametrize("shape", ["plain", "helm-values"])
def test_job_defaults_file_plain_or_a_values_file(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "defaults.yaml"
    path.write_text(
        yaml.safe_dump(DEFAULTS_FILE if shape == "plain" else {"replicaCount": 1, "jobDefaults": DEFAULTS_FILE})
    )
    loaded = load_job_defaults(path)
    assert loaded.trainer == DEFAULTS_FILE["trainer"] and loaded.collector == DEFAULTS_FILE["collector"]


def test_a_bad_job_defaults_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "defaults.yaml"
    path.write_text(
        yaml.safe_dump({"trainer": {"spec": {"containers": [{"name": "trainer", "env": [{"name": "A B"}]}]}}})
    )
    with pytest.raises(
        SpecError, match=r"defaults\.yaml: jobDefaults\.trainer\.spec\.containers\[0\]\.env\[0\]\.name: "
    ):
        load_job_defaults(path)


def test_render_applies_the_job_defaults(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("KUBETUNE_JOB_DEFAULTS", raising=False)
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(yaml.safe_dump(DEFAULTS_FILE))
    example = Path(__file__).parents[2] / "examples" / "pod-template.yaml"
    assert kubetune_main(["render", "--job-defaults", str(defaults), str(example)]) == 0
    collector, _, trainer = list(yaml.safe_load_all(capsys.readouterr().out))
    trainer_pod = trainer["spec"]["template"]
    assert trainer_pod["metadata"]["labels"]["cost-center"] == "ml-research"  # the job's own wins
    assert trainer_pod["spec"]["tolerations"] == DEFAULTS_FILE["trainer"]["spec"]["tolerations"]
    collector_env = env_of(collector["spec"]["template"])
    assert collector_env["HTTPS_PROXY"] == "http://proxy.example.com:3128"  # the job's own wins
    # the env variable names the file too, as for the operator
    monkeypatch.setenv("KUBETUNE_JOB_DEFAULTS", str(defaults))
    assert kubetune_main(["render", "--phase", "training", str(example)]) == 0
    _, trainer = list(yaml.safe_load_all(capsys.readouterr().out))
    assert trainer["spec"]["template"]["spec"]["tolerations"] == DEFAULTS_FILE["trainer"]["spec"]["tolerations"]


def test_render_refuses_a_bad_job_defaults_file_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("trainer: {spec: {hostNetwork: true}}\n")
    example = Path(__file__).parents[2] / "examples" / "pod-template.yaml"
    assert kubetune_main(["render", "--job-defaults", str(defaults), str(example)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "jobDefaults.trainer.spec.hostNetwork: unknown field" in err, err
