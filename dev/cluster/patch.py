"""The three patch formats of the Kubernetes API.

- JSON merge patch (RFC 7386): `application/merge-patch+json`.
- JSON patch (RFC 6902, via the `jsonpatch` library), including `test` ops: a failed test is a 422,
  which is how kopf's finalizer patches detect a concurrent change.
- Strategic merge patch for built-in kinds: lists with a patch merge key (containers by name,
  env by name, conditions by type, ...) merge item by item; `$patch: delete|replace`,
  `$deleteFromPrimitiveList/<field>`, `$setElementOrder/<field>` and `$retainKeys` directives
  (https://kubernetes.io/docs/tasks/manage-kubernetes-objects/update-api-object-kubectl-patch/).
  Custom resources reject it with 415, as on a real server.
"""

from __future__ import annotations

from typing import Any

import jsonpatch

from kubetune.dev.cluster.errors import ApiError
from kubetune.dev.cluster.jsoncopy import clone

# field name -> merge key, from the built-in types' `patchMergeKey` tags (k8s.io/api).
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "resourceClaims": "name",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "podIPs": "ip",
    "hostIPs": "ip",
    "topologySpreadConstraints": "topologyKey",
    "addresses": "type",
    "images": "names",
}
# Primitive lists that merge as sets (patchStrategy "merge" without a key).
MERGED_PRIMITIVE_LISTS = {"finalizers"}
# "ports" merges by containerPort in containers, by port in services.
PORTS_KEY = {"containers": "containerPort", "initContainers": "containerPort", "spec": "port"}


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return clone(patch)
    result = clone(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: dict[str, Any], operations: Any) -> dict[str, Any]:
    if not isinstance(operations, list):
        raise ApiError(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    try:
        result: dict[str, Any] = jsonpatch.JsonPatch(operations).apply(clone(target))
        return result
    except jsonpatch.JsonPatchTestFailed as error:
        raise ApiError(
            422, "Invalid", f"the server rejected our request due to an error in our request: {error}"
        ) from None
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, IndexError, TypeError) as error:
        raise ApiError(
            422, "Invalid", f"the server rejected our request due to an error in our request: {error}"
        ) from None


def strategic_merge_patch(target: Any, patch: Any, parent_field: str = "") -> Any:
    if not isinstance(patch, dict):
        return clone(patch)
    if patch.get("$patch") == "replace":
        return {k: clone(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = clone(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [item for item in result.get(name) or [] if item not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, key, parent_field)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value, key)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = value
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(current: Any, patch: list[Any], field: str, parent_field: str) -> list[Any]:
    merge_key = MERGE_KEYS.get(field)
    if field == "ports":
        merge_key = PORTS_KEY.get(parent_field, "containerPort")
    current = list(current or [])
    if field in MERGED_PRIMITIVE_LISTS:
        return current + [item for item in patch if item not in current]
    if not merge_key or not all(isinstance(item, dict) for item in patch):
        return [clone(item) for item in patch if not (isinstance(item, dict) and "$patch" in item)]
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [clone(item) for item in patch if item.get("$patch") != "replace"]
    for item in patch:
        position = next(
            (i for i, old in enumerate(current) if isinstance(old, dict) and old.get(merge_key) == item.get(merge_key)),
            None,
        )
        if item.get("$patch") == "delete":
            if position is not None:
                del current[position]
        elif position is None:
            current.append(strategic_merge_patch({}, item, field))
        else:
            current[position] = strategic_merge_patch(current[position], item, field)
    return current
