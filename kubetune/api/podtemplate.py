"""The pod-template overlay (`spec.trainer.podTemplate`, `spec.collector.podTemplate`, the chart's
`jobDefaults`) and `affinity`: their schemas are the Kubernetes API's own, cut to the accepted subset.

`generate()` reads the Kubernetes OpenAPI definitions that the `kubernetes-validate` package ships
(the chart's floor version, so every field exists in every supported cluster), keeps the fields the
operator lets a job set, and adds what a CRD needs and Kubernetes itself would refuse at pod
creation: a maxLength for every string, maxItems/maxProperties for every list and map, bounds for
every number, patterns for names (env var, volume, Secret, label value) and quantities, and enums
that keep the pods within the "restricted" Pod Security Standard. The result is committed as
`podtemplate.schema.json` (`python -m kubetune.api.crd_write` regenerates it; a test checks it is
current), so neither the operator nor `kubetune render` needs kubernetes-validate.

`validate()` checks a value against that schema in Python (the models use it, so local runs and the
operator refuse what the API server would), with one-line errors naming the field. It also checks
what the CRD cannot say cheaply (label and annotation keys: a CEL rule over map keys of unbounded
length exceeds the API server's cost budget), which Kubernetes checks again at pod creation.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from kubetune.api.contracts import SOURCE_SECRET_ENV

SCHEMA_FILE = Path(__file__).with_name("podtemplate.schema.json")
KUBERNETES_VERSION = "1.29.0"  # the chart's kubeVersion floor
PREFIX = "io.k8s.api.core.v1."
KEY_PATTERN = "x-kubetune-key-pattern"  # Python-only: dropped from the CRD (see the module docstring)
RESERVED = "x-kubetune-reserved-env"  # a CEL rule in the CRD, a check here

# Env names the operator sets or keeps for itself: an overlay may not set them, so that a job's
# podTemplate (or envFrom... which env entries beat) cannot point the pods at another S3 endpoint
# than the one the operator checked (allowedStorageEndpoints), nor change the spec or the wiring.
RESERVED_ENV_PREFIXES = ["KUBETUNE_", "AWS_ENDPOINT_URL"]
RESERVED_ENV_NAMES = sorted(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "JOB_COMPLETION_INDEX",
        "PYTHONUNBUFFERED",
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
        *(variable for variables in SOURCE_SECRET_ENV.values() for variable in variables.values()),
    }
)
RESERVED_ENV_MESSAGE = (
    "env names the operator sets are reserved: "
    + ", ".join(f"{prefix}*" for prefix in RESERVED_ENV_PREFIXES)
    + ", "
    + ", ".join(RESERVED_ENV_NAMES)
)

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# a qualified name with an optional DNS-subdomain prefix: app.kubernetes.io/name, team
QUALIFIED_NAME = f"^({DNS_SUBDOMAIN[1:-1]}/)?" + r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"  # Kubernetes' IsEnvVarName
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
PATH = r"^[^\x00-\x1f\x7f]*$"
INT32_MAX = 2_147_483_647

# Which properties of each definition are accepted; definitions not named here keep all of theirs.
ALLOWED: dict[str, list[str]] = {
    "PodTemplateSpec": ["metadata", "spec"],
    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": ["labels", "annotations"],
    "PodSpec": [
        "containers",
        "volumes",
        "imagePullSecrets",
        "runtimeClassName",
        "securityContext",
        "nodeSelector",
        "tolerations",
        "affinity",
        "priorityClassName",
        "serviceAccountName",
    ],
    "Container": ["name", "env", "envFrom", "volumeMounts", "securityContext"],
    # the volume types the "restricted" (and "baseline") Pod Security Standard admits
    "Volume": [
        "name",
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ],
    "PodSecurityContext": [
        "runAsUser",
        "runAsGroup",
        "runAsNonRoot",
        "fsGroup",
        "fsGroupChangePolicy",
        "supplementalGroups",
        "seccompProfile",
        "seLinuxOptions",
    ],
    "SecurityContext": [
        "runAsUser",
        "runAsGroup",
        "runAsNonRoot",
        "allowPrivilegeEscalation",
        "readOnlyRootFilesystem",
        "seccompProfile",
        "seLinuxOptions",
    ],
    "SELinuxOptions": ["level", "type"],  # restricted: no user or role
}

NAME_253 = {"maxLength": 253, "pattern": DNS_SUBDOMAIN}
OPTIONAL_NAME_253 = {"maxLength": 253, "pattern": f"^$|{DNS_SUBDOMAIN}"}
LABEL_MAP = {"maxProperties": 64, KEY_PATTERN: QUALIFIED_NAME}
LABEL_VALUES = {"maxLength": 63, "pattern": LABEL_VALUE}
NON_ROOT_ID = {"minimum": 1, "maximum": INT32_MAX}  # restricted: never user 0
ID = {"minimum": 0, "maximum": INT32_MAX}
MODE = {"minimum": 0, "maximum": 511}  # file modes 0000-0777
SELECTOR_OPERATOR = {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]}
SECCOMP = {"enum": ["RuntimeDefault", "Localhost"]}  # restricted: not Unconfined
SELINUX_TYPES = {"enum": ["", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"]}

# Per (definition, property): what the Kubernetes API checks at pod creation, or restricted requires.
# "values" applies to a map's values, "items" to a list's items.
FIELDS: dict[tuple[str, str], dict[str, Any]] = {
    ("ObjectMeta", "labels"): {**LABEL_MAP, "values": LABEL_VALUES},
    ("ObjectMeta", "annotations"): {**LABEL_MAP, "values": {"maxLength": 65536}},
    ("PodSpec", "containers"): {"maxItems": 1, "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    ("PodSpec", "volumes"): {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    ("PodSpec", "imagePullSecrets"): {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    ("PodSpec", "runtimeClassName"): NAME_253,
    ("PodSpec", "priorityClassName"): NAME_253,
    ("PodSpec", "serviceAccountName"): NAME_253,
    ("PodSpec", "nodeSelector"): {**LABEL_MAP, "values": LABEL_VALUES},
    ("Container", "env"): {
        "maxItems": 256,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        RESERVED: True,
    },
    ("Container", "volumeMounts"): {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["mountPath"]},
    ("EnvVar", "name"): {"maxLength": 256, "pattern": ENV_NAME},
    ("EnvVar", "value"): {"maxLength": 32768},
    ("EnvFromSource", "prefix"): {"maxLength": 256, "pattern": r"^([-._a-zA-Z][-._a-zA-Z0-9]*)?$"},
    ("Volume", "name"): {"maxLength": 63, "pattern": DNS_LABEL},
    ("VolumeMount", "name"): {"maxLength": 63, "pattern": DNS_LABEL},
    ("VolumeMount", "mountPath"): {"minLength": 1, "maxLength": 4096, "pattern": PATH},
    ("VolumeMount", "subPath"): {"maxLength": 4096, "pattern": PATH},
    ("VolumeMount", "subPathExpr"): {"maxLength": 4096, "pattern": PATH},
    ("VolumeMount", "mountPropagation"): {"enum": ["None", "HostToContainer"]},  # Bidirectional: privileged only
    ("LocalObjectReference", "name"): NAME_253,
    ("ConfigMapEnvSource", "name"): NAME_253,
    ("SecretEnvSource", "name"): NAME_253,
    ("ConfigMapKeySelector", "name"): NAME_253,
    ("SecretKeySelector", "name"): NAME_253,
    ("ConfigMapKeySelector", "key"): {"maxLength": 253, "pattern": r"^[-._a-zA-Z0-9]+$"},
    ("SecretKeySelector", "key"): {"maxLength": 253, "pattern": r"^[-._a-zA-Z0-9]+$"},
    ("ConfigMapVolumeSource", "name"): NAME_253,
    ("ConfigMapProjection", "name"): NAME_253,
    ("SecretVolumeSource", "secretName"): NAME_253,
    ("SecretProjection", "name"): NAME_253,
    ("PersistentVolumeClaimVolumeSource", "claimName"): NAME_253,
    ("PersistentVolumeClaimSpec", "storageClassName"): OPTIONAL_NAME_253,
    ("ConfigMapVolumeSource", "defaultMode"): MODE,
    ("SecretVolumeSource", "defaultMode"): MODE,
    ("DownwardAPIVolumeSource", "defaultMode"): MODE,
    ("ProjectedVolumeSource", "defaultMode"): MODE,
    ("KeyToPath", "mode"): MODE,
    ("DownwardAPIVolumeFile", "mode"): MODE,
    ("EmptyDirVolumeSource", "medium"): {"maxLength": 64, "pattern": r"^(|Memory|HugePages(-[0-9]+[KMGTPE]i)?)$"},
    ("ServiceAccountTokenProjection", "expirationSeconds"): {"minimum": 600, "maximum": 4_294_967_296},
    ("PodSecurityContext", "runAsUser"): NON_ROOT_ID,
    ("SecurityContext", "runAsUser"): NON_ROOT_ID,
    ("PodSecurityContext", "runAsGroup"): ID,
    ("SecurityContext", "runAsGroup"): ID,
    ("PodSecurityContext", "fsGroup"): ID,
    ("PodSecurityContext", "supplementalGroups"): {"maxItems": 32, "items": ID},
    ("PodSecurityContext", "fsGroupChangePolicy"): {"enum": ["OnRootMismatch", "Always"]},
    ("PodSecurityContext", "runAsNonRoot"): {"enum": [True]},  # restricted
    ("SecurityContext", "runAsNonRoot"): {"enum": [True]},
    ("SecurityContext", "allowPrivilegeEscalation"): {"enum": [False]},
    ("SeccompProfile", "type"): SECCOMP,
    ("SELinuxOptions", "type"): SELINUX_TYPES,
    ("Toleration", "operator"): {"enum": ["Exists", "Equal"]},
    ("Toleration", "effect"): {"enum": ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]},
    ("Toleration", "key"): {"maxLength": 317, "pattern": r"^[A-Za-z0-9./_-]*$"},
    ("Toleration", "value"): LABEL_VALUES,
    ("Toleration", "tolerationSeconds"): {"minimum": 0, "maximum": 31_536_000},
    ("NodeSelectorRequirement", "operator"): {"enum": ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]},
    ("NodeSelectorRequirement", "values"): {"items": LABEL_VALUES},
    ("LabelSelectorRequirement", "operator"): SELECTOR_OPERATOR,
    ("LabelSelectorRequirement", "values"): {"items": LABEL_VALUES},
    ("LabelSelector", "matchLabels"): {**LABEL_MAP, "values": LABEL_VALUES},
    ("PodAffinityTerm", "topologyKey"): {"minLength": 1, "maxLength": 317, "pattern": QUALIFIED_NAME},
    ("PodAffinityTerm", "namespaces"): {"items": {"maxLength": 63, "pattern": DNS_LABEL}},
    ("WeightedPodAffinityTerm", "weight"): {"minimum": 1, "maximum": 100},
    ("PreferredSchedulingTerm", "weight"): {"minimum": 1, "maximum": 100},
}
# the overlay may leave out what a full object requires (a PodSpec's containers); list-map keys stay required
REQUIRED: dict[str, list[str]] = {"PodSpec": [], "LocalObjectReference": ["name"]}
DEFAULT_STRING = {"maxLength": 1024}
DEFAULT_LIST = {"maxItems": 64}
DEFAULT_MAP = {"maxProperties": 64}
DEFAULT_INTEGER = {"minimum": 0, "maximum": INT32_MAX}


def _short(name: str) -> str:
    return name.removeprefix(PREFIX)


def _description(text: str) -> str:
    """The definition's first sentence: the CRD carries two pod templates, and a CRD applied with
    `kubectl apply` must fit its last-applied annotation (256 KiB)."""
    text = re.sub(r"\s+", " ", text).strip()
    first = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0].rstrip(".")
    return first if len(first) <= 300 else first[:297].rstrip() + "..."


def _plain_type(node: dict[str, Any]) -> str | None:
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return kinds[0] if len(kinds) == 1 else None
    return str(kind) if kind else None


def generate(definitions: dict[str, Any]) -> dict[str, Any]:
    """The overlay's schema (a PodTemplateSpec subset) from Kubernetes' definitions (`$defs` of
    kubernetes-validate's `_definitions.json`)."""

    def convert(ref: str, stack: tuple[str, ...]) -> dict[str, Any]:
        name = ref.split("/")[-1]
        short = _short(name)
        if name in stack:
            raise ValueError(f"recursive definition {name}")
        if short == "io.k8s.apimachinery.pkg.api.resource.Quantity":
            return {
                "x-kubernetes-int-or-string": True,
                "minimum": 0,
                "maximum": 10**15,
                "maxLength": 64,
                "pattern": QUANTITY,
            }
        if short == "io.k8s.apimachinery.pkg.util.intstr.IntOrString":
            return {"x-kubernetes-int-or-string": True, "minimum": 0, "maximum": INT32_MAX, "maxLength": 63}
        source = definitions[name]
        keep = ALLOWED.get(short) or ALLOWED.get(name)
        if short.endswith("ObjectMeta"):
            keep, short = ALLOWED["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"], "ObjectMeta"
        props = source.get("properties") or {}
        out: dict[str, Any] = {"type": "object", "properties": {}}
        for prop in keep or sorted(props):
            out["properties"][prop] = field(props[prop], short.split(".")[-1], prop, (*stack, name))
        required = REQUIRED.get(short, source.get("required"))
        if required:
            out["required"] = [r for r in required if r in out["properties"]]
        return out

    def field(node: dict[str, Any], owner: str, prop: str, stack: tuple[str, ...]) -> dict[str, Any]:
        extra = dict(FIELDS.get((owner, prop), {}))
        out = shape(node, stack, extra)
        if node.get("description"):
            out["description"] = _description(node["description"])
        return out

    def shape(node: dict[str, Any], stack: tuple[str, ...], extra: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            out = convert(node["$ref"], stack)
        else:
            kind = _plain_type(node)
            if kind == "array":
                out = {"type": "array", "items": shape(node["items"], stack, extra.pop("items", {})), **DEFAULT_LIST}
            elif kind == "object":
                values = node.get("additionalProperties") or {"type": "string"}
                out = {
                    "type": "object",
                    "additionalProperties": shape(values, stack, extra.pop("values", {})),
                    **DEFAULT_MAP,
                }
            elif kind == "string":
                out = {"type": "string", **DEFAULT_STRING}
            elif kind == "integer":
                out = {"type": "integer", **DEFAULT_INTEGER}
            elif kind in ("boolean", "number"):
                out = {"type": kind}
            else:
                raise ValueError(f"unsupported schema node {node}")
        out.update(extra)
        return out

    pod = convert("#/$defs/" + PREFIX + "PodTemplateSpec", ())
    pod["description"] = (
        "A strategic-merge overlay of the pods' template: labels, annotations and the pod fields listed here, and "
        "in spec.containers the main container (by its name) for env, envFrom, volumeMounts and securityContext. "
        "The operator's own fields win; see docs/operator.md."
    )
    return pod


def generate_from_kubernetes_validate() -> dict[str, Any]:
    import kubernetes_validate  # type: ignore[import-untyped]  # a development dependency, only to regenerate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    definitions = json.loads((root / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json").read_text())
    return generate(definitions["$defs"])


def render_schema_json() -> str:
    return json.dumps(generate_from_kubernetes_validate(), indent=1, sort_keys=True) + "\n"


# -- the schemas the models use ------------------------------------------------------------------


@lru_cache(maxsize=1)
def _pod_template() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())  # type: ignore[no-any-return]


def pod_template_schema(container: str) -> dict[str, Any]:
    """The overlay's schema for a component whose main container is named `container`."""
    schema = copy.deepcopy(_pod_template())
    name = schema["properties"]["spec"]["properties"]["containers"]["items"]["properties"]["name"]
    name["enum"] = [container]
    name["description"] = f"The main container: `{container}` (the only container the overlay may change)."
    return schema


def affinity_schema() -> dict[str, Any]:
    return copy.deepcopy(_pod_template()["properties"]["spec"]["properties"]["affinity"])


def reserved_env_rule() -> dict[str, str]:
    names = ", ".join(f"'{name}'" for name in RESERVED_ENV_NAMES)
    prefixes = " && ".join(f"!e.name.startsWith('{prefix}')" for prefix in RESERVED_ENV_PREFIXES)
    return {"rule": f"self.all(e, {prefixes} && !(e.name in [{names}]))", "message": RESERVED_ENV_MESSAGE}


def for_crd(schema: Any) -> Any:
    """`schema` without the Python-only keys, the reserved env names as a CEL rule."""
    if isinstance(schema, list):
        return [for_crd(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: for_crd(value) for key, value in schema.items() if key not in (KEY_PATTERN, RESERVED)}
    if schema.get(RESERVED):
        out["x-kubernetes-validations"] = [reserved_env_rule()]
    return out


def for_helm(schema: Any) -> Any:
    """`schema` as JSON Schema for the chart's values.schema.json (jobDefaults): unknown fields
    refused (`helm install` then names them), no Kubernetes extensions, no descriptions."""
    if isinstance(schema, list):
        return [for_helm(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        key: ({name: for_helm(child) for name, child in value.items()} if key == "properties" else for_helm(value))
        for key, value in schema.items()
        if not key.startswith("x-") and key != "description"
    }
    if "properties" in out:
        out["additionalProperties"] = False
    return out


# -- validation ----------------------------------------------------------------------------------


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


def _got(value: Any) -> str:
    return f" (got {value!r:.80})" if not isinstance(value, (dict, list)) else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(schema: dict[str, Any], value: Any, path: str = "") -> str | None:
    """The first problem as `<path>: what is wrong (got ...)`, None when `value` is valid. Unknown
    fields are errors, as kubectl's strict field validation makes them."""
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        if not (_is_int(value) or isinstance(value, str)):
            return f"{path}: must be an integer or a string{_got(value)}"
    elif kind == "object" and not isinstance(value, dict):
        return f"{path}: must be an object{_got(value)}"
    elif kind == "array" and not isinstance(value, list):
        return f"{path}: must be a list{_got(value)}"
    elif kind == "string" and not isinstance(value, str):
        return f"{path}: must be a string{_got(value)}"
    elif kind == "integer" and not _is_int(value):
        return f"{path}: must be an integer{_got(value)}"
    elif kind == "boolean" and not isinstance(value, bool):
        return f"{path}: must be true or false{_got(value)}"
    elif kind == "number" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return f"{path}: must be a number{_got(value)}"
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        return f"{path}: must be one of {allowed}{_got(value)}"
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            return f"{path}: must be at most {schema['maxLength']} characters (got {len(value)})"
        if len(value) < schema.get("minLength", 0):
            return f"{path}: must be at least {schema['minLength']} character(s){_got(value)}"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            if schema["pattern"] == QUANTITY:
                return f"{path}: must be a Kubernetes quantity such as 500m, 2 or 16Gi{_got(value)}"
            return f"{path}: must match {schema['pattern']}{_got(value)}"
    if _is_int(value) or isinstance(value, float):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{path}: must be at least {schema['minimum']}{_got(value)}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{path}: must be at most {schema['maximum']}{_got(value)}"
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            return f"{path}: must have at most {schema['maxItems']} items (got {len(value)})"
        for index, item in enumerate(value):
            problem = validate(schema.get("items") or {}, item, _join(path, index))
            if problem:
                return problem
        if schema.get(RESERVED):
            for index, item in enumerate(value):
                name = item.get("name", "")
                if name in RESERVED_ENV_NAMES or name.startswith(tuple(RESERVED_ENV_PREFIXES)):
                    return f"{_join(path, index)}.name: {RESERVED_ENV_MESSAGE} (got {name!r})"
        keys = schema.get("x-kubernetes-list-map-keys")
        if keys:
            seen: set[tuple[Any, ...]] = set()
            for index, item in enumerate(value):
                key = tuple(item.get(k) for k in keys)
                if key in seen:
                    return f"{_join(path, index)}: duplicate entry with {', '.join(keys)} {', '.join(map(repr, key))}"
                seen.add(key)
    if isinstance(value, dict):
        if len(value) > schema.get("maxProperties", len(value)):
            return f"{path}: must have at most {schema['maxProperties']} entries (got {len(value)})"
        for key in schema.get("required", []):
            if key not in value:
                return f"{_join(path, key)}: required"
        properties = schema.get("properties")
        for key, item in value.items():
            if properties is not None:
                if key not in properties:
                    return f"{_join(path, key)}: unknown field"
                problem = validate(properties[key], item, _join(path, key))
            else:
                if KEY_PATTERN in schema and not re.search(schema[KEY_PATTERN], key):
                    wanted = "a qualified name such as example.com/team"
                    return f"{_join(path, key)}: the key must be {wanted} (got {key!r:.80})"
                problem = validate(schema.get("additionalProperties") or {}, item, _join(path, key))
            if problem:
                return problem
    return None
