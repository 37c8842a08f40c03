"""The Helm chart: real `helm lint --strict`, `helm template` checked by kubernetes-validate against
the Kubernetes API schemas, and what a cluster administrator relies on in the rendered objects
(least-privilege RBAC, pod security, the operator's command line, images, S3 defaults)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import kubetune
from kubetune.api.crd import render_crd_yaml
from kubetune.api.load import parse_finetunejob
from kubetune.cli import COMMANDS

from .conftest import SafeLoader

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
VALUES = Path(__file__).resolve().parent / "values"
# Console scripts of the virtualenv running the tests.
BIN = Path(sys.executable).parent
VALIDATE = BIN / "kubernetes-validate"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.29.0", "1.37.0"]


def sh(*args: Any, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=120)


def values_args(values_file: str | None) -> list[Any]:
    return ["--values", VALUES / values_file] if values_file else []


# --- helm itself ------------------------------------------------------------------------------


def test_helm_lint_strict(tools: Any, values_file: str | None) -> None:
    done = sh(tools.helm, "lint", "--strict", CHART, *values_args(values_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_rendered_objects_pass_kubernetes_schemas(
    render: Any, values_file: str | None, kubernetes_version: str
) -> None:
    rendered = render(values_file)
    done = sh(VALIDATE, "--strict", "--kubernetes-version", kubernetes_version, "-", stdin=rendered.text)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every object was checked, except the ServiceMonitor (a Prometheus Operator CRD, checked below).
    checked = [line for line in (done.stdout + done.stderr).splitlines() if "passed for resource" in line]
    expected = [o for o in rendered.objects if o["kind"] != "ServiceMonitor"]
    assert len(checked) == len(expected)


def test_chart_packages(tools: Any, tmp_path: Path) -> None:
    done = sh(tools.helm, "package", CHART, "--destination", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / f"kubetune-{yaml.safe_load((CHART / 'Chart.yaml').read_text())['version']}.tgz").exists()


def test_app_version_is_kubetunes_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == kubetune.__version__


# --- the CRD ----------------------------------------------------------------------------------


def test_chart_crd_is_the_generated_crd() -> None:
    generated = render_crd_yaml().encode()
    assert (REPO / "crds" / "finetunejob.yaml").read_bytes() == generated, "run `make crds`"
    assert (CHART / "crds" / "finetunejob.yaml").read_bytes() == generated, "run `make crds`"


def test_crd_is_installed_with_the_chart(render: Any) -> None:
    crd = render().one("CustomResourceDefinition")
    assert crd == yaml.load(render_crd_yaml(), Loader=SafeLoader)


# --- values.schema.json -----------------------------------------------------------------------


def test_values_schema_is_valid_and_accepts_every_values_file() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    for path in VALUES.glob("*.yaml"):
        merged = {**defaults, **yaml.safe_load(path.read_text())}
        jsonschema.Draft7Validator(schema).validate(merged)


def test_values_schema_checks_job_defaults_with_the_pod_template_schema() -> None:
    from kubetune.api.crd_write import values_schema

    text = (CHART / "values.schema.json").read_text()
    assert text == values_schema(text), "run `make crds`"


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("watchNamespaces=team-a", "/watchNamespaces"),
        ("watchNamespaces[0]=Team_A", "/watchNamespaces/0"),
        ("imag.tag=1.0", "imag"),
        ("image.digest=latest", "/image/digest"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("s3.endpoint=minio:9000", "/s3/endpoint"),
        ("trainer.stagingSize=lots", "/trainer/stagingSize"),
        ("s3.credentialsSecret=My_Secret", "/s3/credentialsSecret"),
        ("operator.metricsPort=80", "/operator/metricsPort"),
        ("serviceMonitor.interval=often", "/serviceMonitor/interval"),
        ("replicaCount=0", "/replicaCount"),
        ("leaderElection.leaseDurationSeconds=1", "/leaderElection/leaseDurationSeconds"),
        ("jobDefaults.trainer.spec.hostNetwork=true", "/jobDefaults/trainer/spec"),
        (
            "jobDefaults.trainer.spec.volumes[0].name=s,jobDefaults.trainer.spec.volumes[0].emptyDir.sizeLimit=lots",
            "/jobDefaults/trainer/spec/volumes/0/emptyDir/sizeLimit",
        ),
        ("jobDefaults.collector.spec.containers[0].name=trainer", "/jobDefaults/collector/spec/containers/0/name"),
        ("jobDefaults.collector.metadata.labels.team=a b", "/jobDefaults/collector/metadata/labels/team"),
    ],
)
def test_bad_values_are_rejected_naming_the_value(tools: Any, setting: str, field: str) -> None:
    done = sh(tools.helm, "template", "kt", CHART, "--set", setting)
    assert done.returncode != 0
    assert field in done.stderr, done.stderr


# --- the operator's Deployment ------------------------------------------------------------------


LEADER_ARGS = ["--leader-elect", "--leader-elect-lease=kt-kubetune", "--leader-elect-lease-seconds=15"]


def test_deployment_runs_two_replicas_with_leader_election(render: Any, values_file: str | None) -> None:
    rendered = render(values_file)
    spec = rendered.deployment["spec"]
    assert spec["replicas"] == 2
    # only the Lease's holder reconciles: a new pod may start before the old one stops
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    container = rendered.operator_container
    assert container["args"][-3:] == LEADER_ARGS
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": spec["selector"]}
    # the Lease: a Role in the release namespace, get/update limited to the Lease's name
    role = rendered.one("Role", "kt-kubetune-leader-election")
    assert role["metadata"]["namespace"] == rendered.namespace
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["kt-kubetune"],
            "verbs": ["get", "update"],
        },
    ]
    binding = rendered.one("RoleBinding", "kt-kubetune-leader-election")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == rendered.deployment["spec"]["template"]["spec"]["serviceAccountName"]


def test_replicas_on_different_nodes_by_default(render: Any) -> None:
    affinity = render().deployment["spec"]["template"]["spec"]["affinity"]
    (term,) = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    one = render(None, "replicaCount=1").deployment["spec"]["template"]["spec"]
    assert "affinity" not in one


def test_one_replica_without_leader_election_is_replaced_with_recreate(render: Any, tools: Any) -> None:
    rendered = render(None, "replicaCount=1", "leaderElection.enabled=false")
    spec = rendered.deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert not any(a.startswith("--leader-elect") for a in rendered.operator_container["args"])
    assert not rendered.all("PodDisruptionBudget")
    assert not [r for r in rendered.all("Role") if r["metadata"]["name"].endswith("-leader-election")]
    # two replicas without leader election would race: refused
    done = sh(tools.helm, "template", "kt", CHART, "--set", "leaderElection.enabled=false")
    assert done.returncode != 0 and "leaderElection.enabled" in done.stderr


def test_operator_command_line_cluster_wide(render: Any) -> None:
    for rendered in (render(), render("all-namespaces.yaml")):
        assert rendered.operator_container["args"] == [
            "operator",
            "--all-namespaces",
            "--liveness-port=8080",
            "--metrics-port=9090",
            *LEADER_ARGS,
        ]


def test_operator_command_line_restricted(render: Any) -> None:
    args = render("restricted.yaml").operator_container["args"]
    assert args == [
        "operator",
        "--namespace=team-a",
        "--namespace=team-b",
        "--liveness-port=8080",
        "--metrics-port=9090",
        *LEADER_ARGS,
    ]


def test_liveness_probe_and_ports_follow_the_operator_flags(render: Any, values_file: str | None) -> None:
    container = render(values_file).operator_container
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"] if "=" in arg)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": int(flags["liveness-port"]), "metrics": int(flags["metrics-port"])}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_defaults_point_at_this_versions_images_and_leave_s3_to_the_jobs(render: Any) -> None:
    rendered = render()
    version = kubetune.__version__
    assert rendered.operator_container["image"] == f"ghcr.io/kubetune/kubetune:{version}"
    assert rendered.operator_env == {
        "KUBETUNE_COLLECTOR_IMAGE": f"ghcr.io/kubetune/kubetune:{version}",  # one image holds both
        "KUBETUNE_TRAINER_IMAGE": f"ghcr.io/kubetune/kubetune-trainer:{version}",
        "KUBETUNE_S3_ENDPOINT": "",
        "KUBETUNE_S3_REGION": "",
        "KUBETUNE_S3_CREDENTIALS_SECRET": "",
        "KUBETUNE_TRAINER_STAGING_SIZE": "64Gi",
    }


def test_custom_images_s3_and_service_account(render: Any) -> None:
    rendered = render("custom.yaml")
    container = rendered.operator_container
    assert container["image"] == (
        "registry.example.com/ml/kubetune@sha256:4f1c9e7a0b2d3c4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6"
    )
    assert container["imagePullPolicy"] == "Always"
    assert rendered.operator_env == {
        "KUBETUNE_COLLECTOR_IMAGE": "registry.example.com/ml/kubetune-collector:0.1.0-patched",
        "KUBETUNE_TRAINER_IMAGE": "registry.example.com/ml/kubetune-trainer:0.1.0-cu128",
        "KUBETUNE_S3_ENDPOINT": "http://minio.minio.svc:9000",
        "KUBETUNE_S3_REGION": "eu-west-1",
        "KUBETUNE_S3_CREDENTIALS_SECRET": "minio-credentials",
        "KUBETUNE_TRAINER_STAGING_SIZE": "64Gi",
        "HTTPS_PROXY": "http://proxy.example.com:3128",
    }
    pod = rendered.deployment["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "finetuner"
    account = rendered.one("ServiceAccount", "finetuner")
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/kubetune"
    }
    binding = rendered.one("ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "finetuner", "namespace": rendered.namespace}]


def test_collector_image_follows_a_custom_operator_image(render: Any) -> None:
    rendered = render(None, "image.repository=registry.example.com/kubetune", "image.tag=dev")
    assert rendered.operator_env["KUBETUNE_COLLECTOR_IMAGE"] == "registry.example.com/kubetune:dev"


def test_scheduling_and_resources(render: Any) -> None:
    pod = render("all-namespaces.yaml").deployment["spec"]["template"]
    values = yaml.safe_load((VALUES / "all-namespaces.yaml").read_text())
    assert pod["spec"]["nodeSelector"] == values["nodeSelector"]
    assert pod["spec"]["tolerations"] == values["tolerations"]
    assert pod["spec"]["affinity"] == values["affinity"]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["metadata"]["annotations"] == values["podAnnotations"]
    assert pod["spec"]["containers"][0]["resources"] == values["resources"]
    defaults = render().deployment["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & defaults.keys()
    assert defaults["containers"][0]["resources"]["limits"]["memory"]


# --- pod security: the restricted Pod Security Standard -------------------------------------------


def pod_specs(rendered: Any) -> list[dict[str, Any]]:
    pods = [o["spec"] for o in rendered.all("Pod")]
    pods += [o["spec"]["template"]["spec"] for o in rendered.all("Deployment")]
    return pods


def test_every_pod_meets_the_restricted_pod_security_standard(render: Any, values_file: str | None) -> None:
    pods = pod_specs(render(values_file))
    assert len(pods) == 2  # the operator and the `helm test` pod
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not {"hostNetwork", "hostPID", "hostIPC"} & pod.keys()
        assert all("hostPath" not in volume for volume in pod.get("volumes", []))
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context.get("privileged", False) is False
            # A read-only root needs a writable /tmp: the images keep TMPDIR, HOME and caches there.
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]]


# --- RBAC: least privilege ------------------------------------------------------------------------

# What the operator may do, exactly: the requests it makes (tests/operator/test_rbac.py checks
# them against the rendered rules). Adding a permission means changing this table on purpose.
OPERATOR_PERMISSIONS = {
    ("kubetune.dev", "finetunejobs"): {"get", "list", "watch"},
    ("kubetune.dev", "finetunejobs/status"): {"patch"},
    ("kubetune.dev", "finetunejobs/finalizers"): {"update"},
    ("batch", "jobs"): {"create", "list", "watch", "patch", "delete"},  # delete: an ended queued attempt's Job
    ("kueue.x-k8s.io", "workloads"): {"list", "patch"},  # spec.active of queued Jobs' Workloads
    ("", "services"): {"create", "get"},
    ("", "pods"): {"list", "watch"},
    ("", "events"): {"create"},
    ("", "secrets"): {"get"},
}


def permissions(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def all_rbac_rules(rendered: Any) -> list[dict[str, Any]]:
    return [rule for o in rendered.objects if o["kind"] in ("Role", "ClusterRole") for rule in o["rules"]]


def test_no_wildcards_anywhere(render: Any, values_file: str | None) -> None:
    rules = all_rbac_rules(render(values_file))
    assert rules
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(key, []), rule
            assert not any("*" in item for item in rule.get(key, [])), rule


def test_secrets_can_only_be_read_by_name(render: Any, values_file: str | None) -> None:
    for rule in all_rbac_rules(render(values_file)):
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"], rule
    # Nothing can create pods or exec into them, escalate or impersonate.
    for rule in all_rbac_rules(render(values_file)):
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        assert not {
            "pods/exec",
            "pods/attach",
            "pods/portforward",
            "roles",
            "clusterroles",
            "rolebindings",
            "clusterrolebindings",
        } & set(rule["resources"])
        if "pods" in rule["resources"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}


def test_cluster_wide_install_gets_exactly_the_operator_permissions(render: Any) -> None:
    rendered = render()
    role = rendered.one("ClusterRole")
    assert permissions(role) == OPERATOR_PERMISSIONS
    binding = rendered.one("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    account = rendered.one("ServiceAccount", rendered.deployment["spec"]["template"]["spec"]["serviceAccountName"])
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": rendered.namespace}
    ]
    assert not [
        o
        for o in rendered.without_hooks()
        if o["kind"] in ("Role", "RoleBinding") and not o["metadata"]["name"].endswith("-leader-election")
    ]


def test_restricted_install_gets_roles_in_the_watched_namespaces_only(render: Any) -> None:
    rendered = render("restricted.yaml")
    # Nothing cluster-scoped but the CRD.
    assert not rendered.all("ClusterRole") and not rendered.all("ClusterRoleBinding")
    roles, bindings = (
        [
            o
            for o in rendered.without_hooks()
            if o["kind"] == kind and not o["metadata"]["name"].endswith("-leader-election")
        ]
        for kind in ("Role", "RoleBinding")
    )
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    account = rendered.deployment["spec"]["template"]["spec"]["serviceAccountName"]
    for role in roles:
        assert permissions(role) == OPERATOR_PERMISSIONS
    for binding in bindings:
        role = next(r for r in roles if r["metadata"]["namespace"] == binding["metadata"]["namespace"])
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": rendered.namespace}]


def test_rbac_can_be_left_to_the_administrators(render: Any) -> None:
    rendered = render(None, "rbac.create=false")
    assert not [
        o for o in rendered.without_hooks() if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    assert rendered.deployment


# --- metrics: Service and the optional ServiceMonitor -----------------------------------------------


def test_no_servicemonitor_unless_asked(render: Any) -> None:
    assert not render().all("ServiceMonitor")


def test_servicemonitor_scrapes_the_operators_metrics_port(render: Any) -> None:
    rendered = render("servicemonitor.yaml")
    monitor = rendered.one("ServiceMonitor")
    service = rendered.one("Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [rendered.namespace]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}
    [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["port"] == 9100
    # ...and the Service routes it to the operator's metrics port.
    pod = rendered.deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container_ports = {p["name"]: p["containerPort"] for p in rendered.operator_container["ports"]}
    assert container_ports[port["targetPort"]] == 9100
    assert "--metrics-port=9100" in rendered.operator_container["args"]


# --- `helm test` and NOTES.txt ------------------------------------------------------------------


def test_helm_test_checks_the_api_and_the_operator(render: Any, values_file: str | None) -> None:
    rendered = render(values_file)
    hooks = rendered.hooks()
    assert {o["metadata"]["annotations"]["helm.sh/hook"] for o in hooks} == {"test"}
    pod = rendered.one("Pod")
    assert pod in hooks
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    dry_run = containers["api-accepts-finetunejob"]["args"]
    assert dry_run[:2] == ["create", "--dry-run=server"]
    deployment = rendered.deployment["metadata"]["name"]
    wait = containers["operator-available"]["args"]
    assert wait[0] == "wait" and "--for=condition=Available" in wait and f"deployment/{deployment}" in wait
    # The test's ServiceAccount may create FineTuneJobs (the dry run) and read the Deployment: no more.
    role = next(o for o in hooks if o["kind"] == "Role")
    assert role["rules"] == [
        {"apiGroups": ["kubetune.dev"], "resources": ["finetunejobs"], "verbs": ["create"]},
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": [deployment],
            "verbs": ["get", "list", "watch"],
        },
    ]
    assert (
        pod["spec"]["serviceAccountName"] == next(o for o in hooks if o["kind"] == "ServiceAccount")["metadata"]["name"]
    )
    for hook in hooks:
        assert "hook-succeeded" in hook["metadata"]["annotations"]["helm.sh/hook-delete-policy"]


def test_helm_test_finetunejob_is_accepted_by_the_crd(render: Any) -> None:
    """The dry run passes on a cluster only if the job is valid: check it with the same schema and
    CEL rules offline, and with the models every kubetune command uses."""
    from kubetune.dev.cluster.schema import validate_custom_resource

    configmap = next(o for o in render().hooks() if o["kind"] == "ConfigMap")
    job = yaml.safe_load(configmap["data"]["finetunejob.yaml"])
    assert job["kind"] == "FineTuneJob" and job["metadata"]["generateName"]
    parse_finetunejob(job)
    crd = yaml.load(render_crd_yaml(), Loader=SafeLoader)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    result = validate_custom_resource(schema, job)
    assert not result.errors and not result.unknown_fields


def notes(tools: Any, *args: Any) -> str:
    done = sh(tools.helm, "install", "kt", CHART, "--namespace", "kubetune", "--dry-run=client", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("NOTES:", 1)[1]


def test_notes_tell_the_next_commands(tools: Any) -> None:
    text = notes(tools)
    assert "every namespace" in text
    assert "helm test kt --namespace kubetune" in text
    assert "kubectl apply --namespace default -f my-job.yaml" in text
    assert "kubectl get ftj --namespace default --watch" in text


def test_notes_for_restricted_namespaces_with_s3_keys(tools: Any) -> None:
    text = notes(tools, "--values", VALUES / "restricted.yaml")
    assert "team-a, team-b" in text
    assert "kubectl create secret generic s3-credentials --namespace team-a" in text
    assert "kubectl get ftj --namespace team-a --watch" in text


# --- the contract with the operator's command line --------------------------------------------


def test_operator_accepts_what_the_deployment_passes(render: Any, values_file: str | None) -> None:
    """The Deployment's arguments are flags of `kubetune operator`, and the settings it passes as
    environment variables are read by the operator."""
    container = render(values_file).operator_container
    assert container["args"][0] in COMMANDS
    done = sh(BIN / "kubetune", *container["args"][:1], "--help")
    assert done.returncode == 0, done.stderr
    for arg in container["args"][1:]:
        assert arg.split("=", 1)[0] in done.stdout, f"`kubetune operator` has no flag {arg}"
    sources = "\n".join(p.read_text() for p in (REPO / "operator").glob("*.py"))
    for variable in render(values_file).operator_env:
        if variable.startswith("KUBETUNE_"):
            assert variable in sources, f"the operator never reads ${variable}"


# --- jobDefaults --------------------------------------------------------------------------------


def test_job_defaults_reach_the_operator_as_a_file(render: Any, tmp_path: Path) -> None:
    """jobDefaults become a ConfigMap mounted into the operator, named by --job-defaults; what the
    operator (and `kubetune render --job-defaults`) reads from it is the values, applied to the pods."""
    from kubetune.api.load import load_job_defaults

    values = yaml.safe_load((VALUES / "job-defaults.yaml").read_text())["jobDefaults"]
    rendered = render("job-defaults.yaml")
    config_map = rendered.one("ConfigMap", "kt-kubetune-job-defaults")
    flag = next(a for a in rendered.operator_container["args"] if a.startswith("--job-defaults="))
    path = Path(flag.split("=", 1)[1])
    mount = next(m for m in rendered.operator_container["volumeMounts"] if m["name"] == "job-defaults")
    assert mount["readOnly"] is True and Path(mount["mountPath"]) == path.parent
    volume = next(v for v in rendered.deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "job-defaults")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert set(config_map["data"]) == {path.name}
    # a change of the defaults rolls the operator (it reads them at start)
    annotations = rendered.deployment["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/job-defaults"]) == 64
    local = tmp_path / path.name
    local.write_text(config_map["data"][path.name])
    loaded = load_job_defaults(local)
    assert (loaded.collector, loaded.trainer) == (values["collector"], values["trainer"])
    done = sh(
        BIN / "kubetune", "render", "--phase", "training", "--job-defaults", local, REPO / "examples" / "lora.yaml"
    )
    assert done.returncode == 0, done.stderr
    pod = list(yaml.safe_load_all(done.stdout))[1]["spec"]["template"]
    assert pod["metadata"]["labels"]["cost-center"] == "ml-platform"
    assert pod["spec"]["tolerations"] == values["trainer"]["spec"]["tolerations"]
    assert pod["spec"]["nodeSelector"] == {"karpenter.sh/nodepool": "gpu"}
    assert {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"} in pod["spec"]["containers"][0]["env"]


def test_no_job_defaults_no_configmap_and_no_flag(render: Any) -> None:
    rendered = render()
    assert not [c for c in rendered.all("ConfigMap") if c["metadata"]["name"].endswith("-job-defaults")]
    assert not any(a.startswith("--job-defaults") for a in rendered.operator_container["args"])
    assert "annotations" not in rendered.deployment["spec"]["template"]["metadata"]
