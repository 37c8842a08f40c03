"""The FineTuneJob API: the CRD, the Python models and the examples agree, case for case.

The CRD side is checked as the API server would check it (kubetune.dev.cluster.schema: jsonschema on the
openAPIV3Schema, cel-python on the x-kubernetes-validations, pruning and defaulting), with unknown
fields rejected as kubectl's default strict field validation does. The Python side is
kubetune.api.load, which the operator and every CLI use.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import crd, load
from kubetune.api.load import SpecError, load_yaml_documents, parse_finetunejob
from kubetune.dev.cluster.schema import validate_custom_resource

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "finetunejob.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd_doc() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())


@pytest.fixture(scope="module")
def schema(crd_doc: dict[str, Any]) -> dict[str, Any]:
    return crd_doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def crd_errors(schema: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    result = validate_custom_resource(schema, obj, old)
    return [e.message for e in result.errors] + [f'unknown field "{f}"' for f in result.unknown_fields]


def model_error(obj: dict[str, Any]) -> str | None:
    try:
        parse_finetunejob(obj)
    except SpecError as error:
        return str(error)
    return None


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "t"},
        "spec": {
            "dataset": {"unsplash": {"prompts": ["a cat"], "accessKeySecretRef": {"name": "u", "key": "k"}}},
            "model": {"base": "org/model"},
            "storage": {"uri": "s3://bucket/prefix/"},
        },
    }


# -- the CRD file ----------------------------------------------------------------------------------


def test_crd_file_is_generated_from_the_models() -> None:
    assert CRD_FILE.read_text() == crd.render_crd_yaml(), "run `make crds`"


def test_pod_template_schema_is_generated_from_the_kubernetes_definitions() -> None:
    pytest.importorskip("kubernetes_validate")
    from kubetune.api import podtemplate

    assert podtemplate.SCHEMA_FILE.read_text() == podtemplate.render_schema_json(), "run `make crds`"


def test_crd_fits_a_client_side_apply(crd_doc: dict[str, Any]) -> None:
    """Two pod templates and two affinities make the CRD large: it must still fit the 256 KiB
    last-applied annotation of a plain `kubectl apply` (the docs use --server-side)."""
    import json

    assert len(json.dumps(crd_doc, separators=(",", ":"))) < 240 * 1024


def test_crd_passes_kubernetes_validate_strict() -> None:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(tool), "--strict", str(CRD_FILE)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in (node.get("properties") or {}).items():
        found += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def test_crd_schema_is_structural_and_documented(schema: dict[str, Any]) -> None:
    for path, node in _walk(schema):
        # Structural: every node has a type (or says it preserves unknown fields), no unions.
        assert (
            "type" in node or node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        ), path
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "const"):
            assert forbidden not in node, f"{path} has {forbidden}"
        assert not ("properties" in node and "additionalProperties" in node), path
        # `kubectl explain` is useful: every field below the root says what it is.
        is_field = path.count(".") >= 1 and not path.endswith("[]") and not path.endswith("{}")
        if is_field and not path.startswith(".metadata"):
            assert node.get("description"), f"{path} has no description"


def test_crd_metadata_columns_and_subresources(crd_doc: dict[str, Any]) -> None:
    spec = crd_doc["spec"]
    assert spec["group"] == "kubetune.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "FineTuneJob" and spec["names"]["plural"] == "finetunejobs"
    assert "ftj" in spec["names"]["shortNames"] and spec["names"]["categories"]
    # `kubectl get all` (and `kubectl delete all --all`) must not take FineTuneJobs with it
    assert "all" not in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Progress", "Step", "Loss", "Restarts", "Age"} <= columns


# -- examples ----------------------------------------------------------------------------------------


def test_there_is_an_example_per_source_plus_lora_and_multinode() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {
        "unsplash",
        "google",
        "openverse",
        "wikimedia",
        "urls",
        "huggingface",
        "imagefolder",
        "lora",
        "multinode",
    } <= names
    sources = {parse_finetunejob(load_yaml_documents(p.read_text())[0]).spec.dataset.source_name for p in EXAMPLES}
    assert sources == {"unsplash", "google", "openverse", "wikimedia", "urls", "huggingface", "imagefolder"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted_and_defaulted_alike(path: Path, schema: dict[str, Any]) -> None:
    for obj in load_yaml_documents(path.read_text()):
        if obj.get("kind") != "FineTuneJob":
            continue
        assert crd_errors(schema, obj) == []
        assert model_error(obj) is None
        server_view = validate_custom_resource(schema, obj).obj["spec"]
        python_view = load.dump_spec(parse_finetunejob(obj).spec)
        assert server_view == python_view, "the CRD and the models default differently"
        assert path.read_text().lstrip().startswith("#"), "examples start with a comment for newcomers"


# -- invalid specs from api.md ---------------------------------------------------------------------


def _set(obj: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = obj
    for part in parents:
        node = node.setdefault(part, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value


_DELETE = object()
GOOGLE = {
    "prompts": ["x"],
    "apiKeySecretRef": {"name": "g", "key": "k"},
    "searchEngineIdSecretRef": {"name": "g", "key": "c"},
}

INVALID = [
    # (case id, dotted path to change, new value, the field the error must name)
    ("no-source", "spec.dataset.unsplash", _DELETE, "spec.dataset"),
    ("two-sources", "spec.dataset.google", GOOGLE, "spec.dataset"),
    ("maxTrainSteps-0", "spec.training.maxTrainSteps", 0, "spec.training.maxTrainSteps"),
    ("imagesPerPrompt-0", "spec.dataset.unsplash.imagesPerPrompt", 0, "spec.dataset.unsplash.imagesPerPrompt"),
    ("checkpointsToKeep-0", "spec.training.checkpointsToKeep", 0, "spec.training.checkpointsToKeep"),
    ("nodes-0", "spec.trainer.nodes", 0, "spec.trainer.nodes"),
    ("gpusPerNode-negative", "spec.trainer.gpusPerNode", -1, "spec.trainer.gpusPerNode"),
    ("learningRate-0", "spec.training.learningRate", 0, "spec.training.learningRate"),
    ("learningRate-negative", "spec.training.learningRate", -1.0e-5, "spec.training.learningRate"),
    ("storage-not-s3", "spec.storage.uri", "/data/models", "spec.storage.uri"),
    ("storage-https", "spec.storage.uri", "https://bucket.example.com/x", "spec.storage.uri"),
    ("mixedPrecision-yaml-no", "spec.training.mixedPrecision", False, "spec.training.mixedPrecision"),
    ("mixedPrecision-string-no", "spec.training.mixedPrecision", "no", "spec.training.mixedPrecision"),
    ("method-unknown", "spec.training.method", "dreambooth", "spec.training.method"),
    ("unsplash-size-unknown", "spec.dataset.unsplash.size", "huge", "spec.dataset.unsplash.size"),
    ("resolution-not-multiple-of-8", "spec.training.resolution", 500, "spec.training.resolution"),
    ("model-base-missing", "spec.model.base", _DELETE, "spec.model.base"),
    ("model-missing", "spec.model", _DELETE, "spec.model"),
    ("storage-missing", "spec.storage", _DELETE, "spec.storage"),
    ("type-steps-string", "spec.training.maxTrainSteps", "100", "spec.training.maxTrainSteps"),
    ("type-bool-string", "spec.training.centerCrop", "yes", "spec.training.centerCrop"),
    ("type-prompts-string", "spec.dataset.unsplash.prompts", "a cat", "spec.dataset.unsplash.prompts"),
    ("type-nodes-float", "spec.trainer.nodes", 1.5, "spec.trainer.nodes"),
    ("type-source-string", "spec.dataset.unsplash", "cats", "spec.dataset.unsplash"),
    ("type-lr-bool", "spec.training.learningRate", True, "spec.training.learningRate"),
    ("unknown-field", "spec.training.learningRat", 1.0e-4, "spec.training.learningRat"),
]

U, TR, CO = "spec.dataset.unsplash", "spec.trainer", "spec.collector"
REF = f"{U}.accessKeySecretRef"
# Bounds a real API has (#13): numbers, strings, lists, names, label values, quantities.
# (case id, dotted path, new value, the field the error must name; None: the path itself)
BOUNDS: list[tuple[str, str, Any, str | None]] = [
    ("timeout-1e300", f"{CO}.timeoutSeconds", 1e300, None),
    ("collector-deadline-short", f"{CO}.activeDeadlineSeconds", 10, None),
    ("nodes-200000", f"{TR}.nodes", 200000, None),
    ("gpusPerNode-17", f"{TR}.gpusPerNode", 17, None),
    ("imagesPerPrompt-10001", f"{U}.imagesPerPrompt", 10001, None),
    ("maxTrainSteps-huge", "spec.training.maxTrainSteps", 10**12, None),
    ("learningRate-2", "spec.training.learningRate", 2.0, None),
    ("seed-over-32-bits", "spec.training.seed", 2**32, None),
    ("backoffLimit-huge", "spec.runPolicy.backoffLimit", 10**6, None),
    ("prompt-too-long", f"{U}.prompts", ["x" * 1001], f"{U}.prompts[0]"),
    ("prompt-newline", f"{U}.prompts", ["a\nb"], f"{U}.prompts[0]"),
    ("too-many-prompts", f"{U}.prompts", ["x"] * 1001, None),
    ("too-many-validation-prompts", "spec.training.validationPrompts", ["x"] * 65, None),
    ("model-base-too-long", "spec.model.base", "o/" + "m" * 2047, None),
    ("secret-name-not-dns", f"{REF}.name", "Bad_Name", None),
    ("secret-key-slash", f"{REF}.key", "a/b", None),
    (
        "credentials-name-too-long",
        "spec.storage.credentialsSecretRef",
        {"name": "a" * 254},
        "spec.storage.credentialsSecretRef.name",
    ),
    ("storage-uri-too-long", "spec.storage.uri", "s3://bucket/" + "k" * 1100, None),
    ("storage-uri-newline", "spec.storage.uri", "s3://bucket/a\nb", None),
    ("endpoint-not-url", "spec.storage.endpoint", "minio:9000\nX: y", None),
    ("region-upper", "spec.storage.region", "EU WEST", None),
    ("queue-not-label-value", "spec.runPolicy.queueName", "gpu team", None),
    ("queue-too-long", "spec.runPolicy.queueName", "q" * 64, None),
    ("service-account-not-dns", f"{TR}.serviceAccountName", "Trainer SA", None),
    ("priority-class-too-long", f"{CO}.priorityClassName", "p" * 254, None),
    ("image-with-space", f"{TR}.image", "registry/img:1 --privileged", None),
    ("shm-not-quantity", f"{TR}.shmSize", "8 gigs", None),
    ("resources-not-quantity", f"{TR}.resources", {"limits": {"memory": "lots"}}, f"{TR}.resources.limits.memory"),
    ("resources-negative", f"{CO}.resources", {"requests": {"cpu": "-1"}}, f"{CO}.resources.requests.cpu"),
    ("resources-negative-int", f"{TR}.resources", {"limits": {"cpu": -2}}, f"{TR}.resources.limits.cpu"),
    ("resources-unknown-kind", f"{TR}.resources", {"claims": []}, f"{TR}.resources.claims"),
    ("node-selector-value", f"{TR}.nodeSelector", {"zone": "a b"}, f"{TR}.nodeSelector.zone"),
    ("toleration-operator", f"{TR}.tolerations", [{"key": "k", "operator": "Maybe"}], f"{TR}.tolerations[0].operator"),
    ("too-many-tolerations", f"{TR}.tolerations", [{"key": "k"}] * 65, None),
    (
        "urls-column-too-long",
        "spec.dataset",
        {"urls": {"uri": "s3://b/l", "urlColumn": "c" * 257}},
        "spec.dataset.urls.urlColumn",
    ),
    (
        "urls-local-path",
        "spec.dataset",
        {"urls": {"uri": "/proc/self/environ", "format": "csv"}},
        "spec.dataset.urls.uri",
    ),
    (
        "hf-revision-space",
        "spec.dataset",
        {"huggingface": {"name": "o/d", "revision": "main; rm"}},
        "spec.dataset.huggingface.revision",
    ),
    (
        "wikimedia-contact-header",
        "spec.dataset",
        {"wikimedia": {"prompts": ["x"], "contact": "a@b\r\nX-Evil: 1"}},
        "spec.dataset.wikimedia.contact",
    ),
]
PT = f"{TR}.podTemplate"


def _main(**fields: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "trainer", **fields}]}}


# spec.training.dreambooth (#17)
DB = "spec.training.dreambooth"
BOUNDS += [
    ("dreambooth-no-instancePrompt", DB, {"classPrompt": "a dog"}, f"{DB}.instancePrompt"),
    ("dreambooth-prior-without-classPrompt", DB, {"instancePrompt": "sks dog", "priorPreservation": True}, DB),
    ("dreambooth-priorLossWeight-11", DB, {"instancePrompt": "sks dog", "priorLossWeight": 11.0}, None),
    ("dreambooth-numClassImages-0", DB, {"instancePrompt": "sks dog", "numClassImages": 0}, None),
    ("dreambooth-numClassImages-10001", DB, {"instancePrompt": "sks dog", "numClassImages": 10001}, None),
    ("dreambooth-sampleBatchSize-65", DB, {"instancePrompt": "sks dog", "sampleBatchSize": 65}, None),
    ("dreambooth-instancePrompt-newline", DB, {"instancePrompt": "sks\ndog"}, f"{DB}.instancePrompt"),
]

# spec.<component>.podTemplate and affinity: the Kubernetes API's own schema, bounded (#18)
BOUNDS += [
    ("pod-env-name", PT, _main(env=[{"name": "HTTPS PROXY", "value": "x"}]), f"{PT}.spec.containers[0].env[0].name"),
    ("pod-env-duplicate", PT, _main(env=[{"name": "A"}, {"name": "A"}]), f"{PT}.spec.containers[0].env[1]"),
    (
        "pod-quantity",
        PT,
        {"spec": {"volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "lots"}}]}},
        f"{PT}.spec.volumes[0].emptyDir.sizeLimit",
    ),
    (
        "pod-pvc-quantity",
        f"{CO}.podTemplate",
        {
            "spec": {
                "volumes": [
                    {
                        "name": "s",
                        "ephemeral": {
                            "volumeClaimTemplate": {"spec": {"resources": {"requests": {"storage": "1 TB"}}}}
                        },
                    }
                ]
            }
        },
        f"{CO}.podTemplate.spec.volumes[0].ephemeral.volumeClaimTemplate.spec.resources.requests.storage",
    ),
    (
        "pod-volume-name",
        PT,
        {"spec": {"volumes": [{"name": "HF_cache", "emptyDir": {}}]}},
        f"{PT}.spec.volumes[0].name",
    ),
    (
        "pod-host-path",
        PT,
        {"spec": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}},
        f"{PT}.spec.volumes[0].hostPath",
    ),
    ("pod-host-network", PT, {"spec": {"hostNetwork": True}}, f"{PT}.spec.hostNetwork"),
    ("pod-command", PT, _main(command=["sh"]), f"{PT}.spec.containers[0].command"),
    ("pod-sidecar", PT, {"spec": {"containers": [{"name": "sidecar"}]}}, f"{PT}.spec.containers[0].name"),
    ("pod-run-as-root", PT, {"spec": {"securityContext": {"runAsUser": 0}}}, f"{PT}.spec.securityContext.runAsUser"),
    (
        "pod-privilege-escalation",
        PT,
        _main(securityContext={"allowPrivilegeEscalation": True}),
        f"{PT}.spec.containers[0].securityContext.allowPrivilegeEscalation",
    ),
    ("pod-label-value", PT, {"metadata": {"labels": {"team": "a b"}}}, f"{PT}.metadata.labels.team"),
    (
        "pod-pull-secret",
        PT,
        {"spec": {"imagePullSecrets": [{"name": "Reg Cred"}]}},
        f"{PT}.spec.imagePullSecrets[0].name",
    ),
    ("pod-runtime-class", PT, {"spec": {"runtimeClassName": "x" * 254}}, f"{PT}.spec.runtimeClassName"),
    (
        "pod-env-reserved",
        PT,
        _main(env=[{"name": "AWS_ENDPOINT_URL", "value": "http://x"}]),
        f"{PT}.spec.containers[0].env",
    ),
    ("pod-too-many-env", PT, _main(env=[{"name": f"E{i}"} for i in range(257)]), f"{PT}.spec.containers[0].env"),
    ("affinity-unknown-field", f"{TR}.affinity", {"nodeAffinity": {"typo": {}}}, f"{TR}.affinity.nodeAffinity.typo"),
    (
        "affinity-weight",
        f"{CO}.affinity",
        {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 101, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
                ]
            }
        },
        f"{CO}.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight",
    ),
]
# spec.output: trackers and the Hub push (#18)
BOUNDS += [
    ("output-reportTo-neptune", "spec.output", {"reportTo": "neptune"}, "spec.output.reportTo"),
    ("output-project-slash", "spec.output", {"trackerProjectName": "team/run"}, "spec.output.trackerProjectName"),
    ("output-project-129", "spec.output", {"trackerProjectName": "p" * 129}, "spec.output.trackerProjectName"),
    (
        "output-hub-pushCheckpoints-string",
        "spec.output",
        {"hub": {"repo": "o/n", "tokenSecretRef": {"name": "hf", "key": "t"}, "pushCheckpoints": "yes"}},
        "spec.output.hub.pushCheckpoints",
    ),
]
INVALID += [(case, path, value, field or path) for case, path, value, field in BOUNDS]


@pytest.mark.parametrize(("path", "value", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec_is_rejected_by_both_naming_the_field(
    path: str, value: Any, field: str, schema: dict[str, Any]
) -> None:
    obj = minimal()
    _set(obj, path, value)
    server = crd_errors(schema, obj)
    python = model_error(obj)
    assert server, "the CRD accepted it"
    assert any(field in message for message in server), server
    if field in CLUSTER_ONLY:
        return  # `kubetune run` may read a local list; the API server refuses it
    assert python, "the models accepted it"
    assert any(field in message for message in server), server
    assert field in python, python
    assert "\n" not in python


def test_yaml_no_is_rejected_not_coerced(schema: dict[str, Any], tmp_path: Path) -> None:
    text = yaml.safe_dump(minimal()) + ""
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(text.replace("spec:\n", "spec:\n  training:\n    mixedPrecision: no\n", 1))
    with pytest.raises(
        SpecError, match=r"spec\.training\.mixedPrecision: must be one of 'fp32', 'fp16' or 'bf16' \(got False\)"
    ):
        load.load_finetunejob(spec_file)
    obj = load_yaml_documents(spec_file.read_text())[0]
    assert any("spec.training.mixedPrecision: Unsupported value: false" in m for m in crd_errors(schema, obj))


def test_scientific_notation_is_a_number_as_in_kubernetes(tmp_path: Path) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        yaml.safe_dump(minimal()).replace("spec:\n", "spec:\n  training:\n    learningRate: 1e-4\n", 1)
    )
    assert load.load_finetunejob(spec_file).spec.training.learning_rate == pytest.approx(1e-4)


def test_storage_uri_is_immutable_on_update(schema: dict[str, Any]) -> None:
    old = minimal()
    new = copy.deepcopy(old)
    assert crd_errors(schema, new, old) == []
    new["spec"]["storage"]["uri"] = "s3://bucket/elsewhere/"
    assert any("spec.storage.uri" in m and "immutable" in m for m in crd_errors(schema, new, old))


def test_unchanged_values_are_ratcheted_on_update(schema: dict[str, Any]) -> None:
    """Validation ratcheting (Kubernetes 1.33+): an update that leaves an invalid value as it was
    (a status write on an object stored before a rule existed) is accepted; changing it is not."""
    old = minimal()
    old["spec"]["dataset"]["urls"] = {"uri": "s3://bucket/urls.jsonl"}  # two sources: breaks exactly-one
    assert any("exactly one dataset source" in m for m in crd_errors(schema, old))
    old = validate_custom_resource(schema, old).obj  # as stored: defaulted
    new = copy.deepcopy(old)
    new["status"] = {"phase": "Pending"}
    assert crd_errors(schema, new, old) == []
    new["spec"]["dataset"]["urls"] = {"uri": "s3://bucket/other.jsonl"}
    assert any("exactly one dataset source" in m for m in crd_errors(schema, new, old))
    # the same for the OpenAPI schema: an out-of-range value left as it was
    old["spec"]["training"]["resolution"] = 500  # not a multiple of 8
    new = copy.deepcopy(old)
    new["status"] = {"phase": "Pending"}
    assert crd_errors(schema, new, old) == []
    new["spec"]["training"]["resolution"] = 501
    assert any("spec.training.resolution" in m for m in crd_errors(schema, new, old))


# -- agreement on every field ----------------------------------------------------------------------

PROBES: list[Any] = [True, False, 0, -1, 1, 7, 8, 2.5, "", "x", "s3://bucket/x", [], ["x"], {}, {"name": "a"}, None]


# Fields the API server restricts further than the models, because local runs may use what a
# pod must not: a URL list at a local path (in a pod, /proc/self/environ would be one).
CLUSTER_ONLY = {"spec.dataset.urls.uri"}


def _spec_paths(node: dict[str, Any], path: str) -> list[str]:
    paths = []
    for name, child in (node.get("properties") or {}).items():
        paths.append(f"{path}.{name}")
        paths += _spec_paths(child, f"{path}.{name}")
    return paths


SOURCES = ("unsplash", "google", "openverse", "wikimedia", "urls", "huggingface", "imagefolder")


def _source_of(path: str) -> str | None:
    """The dataset source a field belongs to (spec.dataset.<source>.…), or None."""
    parts = path.split(".")
    return parts[2] if len(parts) > 3 and parts[1] == "dataset" and parts[2] in SOURCES else None


def test_models_and_crd_agree_on_every_field_and_value(schema: dict[str, Any]) -> None:
    """Put each probe value at each spec field (all sources, every section) and require the same
    verdict from both sides, and on rejection an error naming the same field."""
    disagreements = []
    for source, body in [
        ("unsplash", None),
        ("google", GOOGLE),
        ("openverse", {"prompts": ["x"]}),
        ("wikimedia", {"prompts": ["x"]}),
        ("urls", {"uri": "s3://b/l.jsonl"}),
        ("huggingface", {"name": "org/ds"}),
        ("imagefolder", {"uri": "s3://b/d/"}),
    ]:
        base = minimal()
        if body is not None:
            base["spec"]["dataset"] = {source: body}
        spec_schema = schema["properties"]["spec"]
        # each source's fields with that source set, every other field once (with the first source)
        paths = [
            p
            for p in _spec_paths(spec_schema, "spec")
            if _source_of(p) == source or (_source_of(p) is None and source == "unsplash")
        ]
        for path in paths:
            for value in PROBES:
                obj = copy.deepcopy(base)
                _set(obj, path, value)
                server, python = crd_errors(schema, obj), model_error(obj)
                local_only = path in CLUSTER_ONLY and not python
                if local_only and server and all(path in m for m in server):
                    continue  # a local path: fine for `kubetune run`, refused by the API server
                if bool(server) != bool(python):
                    disagreements.append(f"{path}={value!r}: crd={server} models={python}")
                elif python and not any(python.split(":")[0] in m for m in server):
                    disagreements.append(f"{path}={value!r}: crd names {server}, models name {python}")
    assert not disagreements, f"{len(disagreements)} disagreements:\n" + "\n".join(disagreements[:40])


def test_spec_reference_is_generated_from_the_crd() -> None:
    reference = (REPO / "docs" / "spec-reference.md").read_text()
    assert reference == crd.render_reference_markdown(), "run `make crds`"
    for field in ("imagesPerPrompt", "mixedPrecision", "gpusPerNode", "backoffLimit", "accessKeySecretRef"):
        assert f"`{field}`" in reference


def test_quantities_may_be_integers_or_strings(schema: dict[str, Any]) -> None:
    obj = minimal()
    resources = {"requests": {"cpu": 2, "memory": "16Gi"}, "limits": {"cpu": "1500m", "memory": "1.5e9"}}
    obj["spec"]["trainer"] = {"resources": resources, "shmSize": "64Gi"}
    assert crd_errors(schema, obj) == []
    assert model_error(obj) is None
