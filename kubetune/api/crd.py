"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

`make crds` writes crds/finetunejob.yaml (and the chart's copy) with this; a test fails when the
committed file differs from what the models generate, so the two cannot drift.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema. The
translation: inline every $ref, turn `Optional[X]` (anyOf X|null) into plain X, turn numeric
`exclusiveMinimum` into OpenAPI 3.0's boolean form, drop `additionalProperties: false` (the API
server prunes unknown fields; kubectl's strict validation rejects them), give nested objects with
defaults a `default: {}` so the server fills in their fields, and fold docstrings onto one line.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from kubetune.api import models

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Where the job is in its life."},
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.training.progress",
        "description": "Training steps done, in percent.",
    },
    {"name": "Step", "type": "integer", "jsonPath": ".status.training.step", "description": "Optimizer steps done."},
    {"name": "Loss", "type": "string", "jsonPath": ".status.training.loss", "description": "Recent training loss."},
    {
        "name": "ETA",
        "type": "string",
        "jsonPath": ".status.training.eta",
        "description": "Estimated time left, e.g. 12m.",
        "priority": 1,
    },
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "description": "Failed trainer attempts."},
    {
        "name": "Preemptions",
        "type": "integer",
        "jsonPath": ".status.preemptions",
        "description": "Preempted trainer attempts.",
        "priority": 1,
    },
    {
        "name": "Model",
        "type": "string",
        "jsonPath": ".status.modelUri",
        "description": "The published model.",
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _translate(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_translate(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        # Field-level keys (description, default) win over the referenced model's own.
        target.update(node)
        node = target
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {options}")
        merged = dict(options[0])
        if "$ref" in merged:
            merged = _translate(merged, defs)
        for key, value in node.items():
            merged.setdefault(key, value)
        merged.update({k: v for k, v in node.items() if k in ("description", "default")})
        node = merged
        if node.get("default", 0) is None:
            del node["default"]
    node.pop("title", None)
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"] = node.pop("exclusiveMaximum")
        node["exclusiveMaximum"] = True
    if "description" in node:
        node["description"] = _one_line(node["description"])
    if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
        node["x-kubernetes-preserve-unknown-fields"] = True
    for key in ("properties",):
        if key in node:
            node[key] = {name: _translate(child, defs) for name, child in node[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = _translate(node[key], defs)
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    return node


def _add_object_defaults(schema: dict[str, Any], model: type[models.ApiModel]) -> None:
    """Sub-objects that the model fills in by default_factory get `default: {}` so the API server
    applies their fields' defaults too (Kubernetes only defaults inside objects that exist)."""
    for name, field in model.model_fields.items():
        alias = field.alias or name
        prop = schema["properties"][alias]
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, models.ApiModel):
            if field.default_factory is not None:
                prop["default"] = {}
            _add_object_defaults(prop, annotation)
        elif field.default_factory is list:
            prop["default"] = []
        elif field.default_factory is dict:
            prop["default"] = {}


def openapi_schema(model: type[models.ApiModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema: dict[str, Any] = _translate(raw, defs)
    _add_object_defaults(schema, model)
    return schema


def finetunejob_crd() -> dict[str, Any]:
    spec_schema = openapi_schema(models.FineTuneJobSpec)
    status_schema = openapi_schema(models.FineTuneJobStatus)
    status_schema.pop("default", None)
    root = {
        "type": "object",
        "description": _one_line(models.FineTuneJob.__doc__ or ""),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion defines the versioned schema of this representation of an object.",
            },
            "kind": {
                "type": "string",
                "description": "Kind is a string value representing the REST resource this object represents.",
            },
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{models.PLURAL}.{models.GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "shortNames": models.SHORT_NAMES,
                "categories": models.CATEGORIES,
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


HEADER = "# Generated from kubetune/api/models.py by `make crds`. Do not edit by hand.\n"


def render_crd_yaml() -> str:
    return HEADER + yaml.safe_dump(finetunejob_crd(), sort_keys=False, width=100)


def _type_of(node: dict[str, Any]) -> str:
    kind = node.get("type", "object")
    if kind == "array":
        return f"[]{_type_of(node.get('items', {}))}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map[string]{_type_of(node['additionalProperties'])}"
    return str(kind)


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" if v != "" else '`""`' for v in node["enum"]))
    if "minimum" in node:
        parts.append(f"{'>' if node.get('exclusiveMinimum') else '>='} {node['minimum']}")
    if "maximum" in node:
        parts.append(f"{'<' if node.get('exclusiveMaximum') else '<='} {node['maximum']}")
    if "multipleOf" in node:
        parts.append(f"multiple of {node['multipleOf']}")
    if "minItems" in node:
        parts.append(f"at least {node['minItems']} item(s)")
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    for rule in node.get("x-kubernetes-validations", []):
        parts.append(rule["message"])
    return "; ".join(parts)


# Fields holding Kubernetes API objects (kubetune.api.podtemplate): the reference stops at them.
KUBERNETES_OBJECTS = ("podTemplate", "affinity")


def render_reference_markdown() -> str:
    """docs/spec-reference.md: every spec field with type, default, constraints and description,
    generated from the same CRD schema the API server enforces."""
    root = finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lines = [
        "# FineTuneJob spec reference",
        "",
        "<!-- Generated from kubetune/api/models.py by `make crds`. Do not edit by hand. -->",
        "",
        f"`apiVersion: {models.API_VERSION}`, `kind: {models.KIND}` (short name `ftj`). "
        "Required fields are marked **required**; `kubectl explain ftj.spec.<field>` shows the same text.",
        "",
    ]
    sections: list[tuple[str, dict[str, Any]]] = [
        ("spec", root["properties"]["spec"]),
        ("status", root["properties"]["status"]),
    ]
    while sections:
        path, node = sections.pop(0)
        lines += [
            f"## `{path}`",
            "",
            _one_line(node.get("description", "")),
            "",
            "| field | type | default | constraints | description |",
            "|---|---|---|---|---|",
        ]
        required = set(node.get("required", []))
        nested = []
        for name, child in node.get("properties", {}).items():
            default = child.get("default")
            shown = (
                ""
                if default is None
                else f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}`"
            )
            flag = " **required**" if name in required else ""
            lines.append(
                f"| `{name}`{flag} | {_type_of(child)} | {shown} | {_constraints(child)} | "
                f"{child.get('description', '')} |"
            )
            target = child.get("items") if child.get("type") == "array" else child
            if name in KUBERNETES_OBJECTS:  # the Kubernetes API's own fields: `kubectl explain` lists them
                continue
            if isinstance(target, dict) and target.get("properties"):
                nested.append((f"{path}.{name}" + ("[]" if child.get("type") == "array" else ""), target))
        lines.append("")
        sections = nested + sections
    return "\n".join(lines).rstrip() + "\n"
