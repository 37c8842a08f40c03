"""Defaulting and validation of the built-in kinds, as their API server strategies do it.

Only the rules the local cluster's users meet are here (Pods, Jobs, Services, Namespaces, Secrets,
CRDs); messages follow the real server's `field.Error` format so failures read the same.
"""

from __future__ import annotations

import base64
import random
from typing import Any

from kubetune.dev.cluster.errors import invalid
from kubetune.dev.cluster.resources import ResourceType

Obj = dict[str, Any]

JOB_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
CRD_CLEANUP_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"


def grace_period(rt: ResourceType, obj: Obj, requested: Any) -> int:
    """Seconds of graceful deletion: only pods bound to a node and still running get one."""
    if rt.key != ("", "pods"):
        return 0
    if not (obj.get("spec") or {}).get("nodeName") or (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return 0
    if requested is not None:
        return max(0, int(requested))
    if obj["metadata"].get("deletionGracePeriodSeconds") is not None:
        return int(obj["metadata"]["deletionGracePeriodSeconds"])
    spec_grace = obj["spec"].get("terminationGracePeriodSeconds", 30)
    return 1 if spec_grace == 0 else int(spec_grace)


def admit(rt: ResourceType, obj: Obj, old: Obj | None, subresource: str = "") -> None:
    handler = _HANDLERS.get(rt.key)
    if handler is not None and subresource != "status":
        handler(rt, obj, old)


def _fail(rt: ResourceType, obj: Obj, field: str, reason: str, message: str) -> None:
    raise invalid(rt.kind, rt.group, obj["metadata"].get("name", ""), [(field, reason, f"{field}: {message}")])


def _namespace(rt: ResourceType, obj: Obj, old: Obj | None) -> None:
    obj.setdefault("metadata", {}).setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
    if old is None:
        obj["spec"] = {"finalizers": ["kubernetes"]}
        obj["status"] = {"phase": "Active"}
    else:
        obj["spec"] = old.get("spec", {})
        obj["status"] = old.get("status", {})


def default_pod_spec(spec: Obj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    for container in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        image = str(container.get("image", ""))
        latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
        container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        container.setdefault("resources", {})
        for port in container.get("ports") or []:
            port.setdefault("protocol", "TCP")


def _pod(rt: ResourceType, obj: Obj, old: Obj | None) -> None:
    spec = obj.setdefault("spec", {})
    if old is not None:
        comparable_new = {**spec, "containers": [{**c, "image": ""} for c in spec.get("containers") or []]}
        comparable_old = {
            **old["spec"],
            "containers": [{**c, "image": ""} for c in old["spec"].get("containers") or []],
        }
        for mutable in ("activeDeadlineSeconds", "tolerations"):
            comparable_new.pop(mutable, None)
            comparable_old.pop(mutable, None)
        default_pod_spec(comparable_new)
        if comparable_new != comparable_old:
            _fail(
                rt,
                obj,
                "spec",
                "FieldValueForbidden",
                "Forbidden: pod updates may not change fields other than "
                "`spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
                "`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
                "(allow it to be set to 1 if it was previously negative)",
            )
        obj["status"] = old.get("status", {})
        return
    containers = spec.get("containers") or []
    if not containers:
        _fail(rt, obj, "spec.containers", "FieldValueRequired", "Required value")
    for index, container in enumerate(containers):
        if not container.get("name"):
            _fail(rt, obj, f"spec.containers[{index}].name", "FieldValueRequired", "Required value")
        if not container.get("image"):
            _fail(rt, obj, f"spec.containers[{index}].image", "FieldValueRequired", "Required value")
    if spec.get("restartPolicy", "Always") not in ("Always", "OnFailure", "Never"):
        _fail(
            rt,
            obj,
            "spec.restartPolicy",
            "FieldValueNotSupported",
            f'Unsupported value: "{spec["restartPolicy"]}": supported values: "Always", "Never", "OnFailure"',
        )
    default_pod_spec(spec)
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}


def _job(rt: ResourceType, obj: Obj, old: Obj | None) -> None:
    spec = obj.setdefault("spec", {})
    meta = obj["metadata"]
    if old is not None:
        for immutable in ("selector", "template", "completionMode", "podFailurePolicy"):
            if spec.get(immutable) != old["spec"].get(immutable):
                _fail(
                    rt,
                    obj,
                    f"spec.{immutable}",
                    "FieldValueInvalid",
                    f"Invalid value: {spec.get(immutable)!r}: field is immutable",
                )
        obj["status"] = old.get("status", {})
        return
    template = spec.get("template")
    if not isinstance(template, dict) or not (template.get("spec") or {}).get("containers"):
        _fail(rt, obj, "spec.template.spec.containers", "FieldValueRequired", "Required value")
    policy = template["spec"].get("restartPolicy")
    if policy not in ("OnFailure", "Never"):
        if policy is None:
            _fail(
                rt,
                obj,
                "spec.template.spec.restartPolicy",
                "FieldValueRequired",
                'Required value: valid values: "OnFailure", "Never"',
            )
        _fail(
            rt,
            obj,
            "spec.template.spec.restartPolicy",
            "FieldValueNotSupported",
            f'Unsupported value: "{policy}": supported values: "OnFailure", "Never"',
        )
    if spec.get("podFailurePolicy") and policy != "Never":
        _fail(
            rt,
            obj,
            "spec.template.spec.restartPolicy",
            "FieldValueInvalid",
            f'Invalid value: "{policy}": only "Never" is supported when podFailurePolicy is specified',
        )
    if spec.get("completions") is None and spec.get("parallelism") is None:
        spec["completions"] = 1
    spec.setdefault("parallelism", 1)
    spec.setdefault("completionMode", "NonIndexed")
    if spec["completionMode"] == "Indexed" and spec.get("completions") is None:
        _fail(rt, obj, "spec.completions", "FieldValueRequired", "Required value: when completion mode is Indexed")
    if spec.get("backoffLimitPerIndex") is None:
        spec.setdefault("backoffLimit", 6)
    spec.setdefault("suspend", False)
    spec.setdefault("manualSelector", False)
    spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed")
    uid, name = meta["uid"], meta["name"]
    generated = {
        "batch.kubernetes.io/controller-uid": uid,
        "batch.kubernetes.io/job-name": name,
        "controller-uid": uid,
        "job-name": name,
    }
    if not spec["manualSelector"]:
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        template.setdefault("metadata", {}).setdefault("labels", {}).update(generated)
    default_pod_spec(template["spec"])
    obj["status"] = {}


def _service(rt: ResourceType, obj: Obj, old: Obj | None) -> None:
    spec = obj.setdefault("spec", {})
    if old is not None:
        spec.setdefault("clusterIP", old["spec"].get("clusterIP"))
        if spec["clusterIP"] != old["spec"].get("clusterIP"):
            _fail(
                rt,
                obj,
                "spec.clusterIPs[0]",
                "FieldValueInvalid",
                f'Invalid value: ["{spec["clusterIP"]}"]: may not change once set',
            )
        obj["status"] = old.get("status", {})
    spec.setdefault("type", "ClusterIP")
    if not spec.get("clusterIP"):
        spec["clusterIP"] = f"10.96.{random.randint(1, 254)}.{random.randint(1, 254)}"
    spec["clusterIPs"] = [spec["clusterIP"]]
    spec.setdefault("sessionAffinity", "None")
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port.get("port"))
    obj.setdefault("status", {"loadBalancer": {}})


def _secret(rt: ResourceType, obj: Obj, old: Obj | None) -> None:
    obj.setdefault("type", "Opaque")
    string_data = obj.pop("stringData", None) or {}
    data = obj.setdefault("data", {}) or {}
    obj["data"] = data
    for key, value in string_data.items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except (ValueError, TypeError):
            _fail(rt, obj, f"data[{key}]", "FieldValueInvalid", "Invalid value: illegal base64 data")
    if old is not None and old.get("type") != obj["type"]:
        _fail(rt, obj, "type", "FieldValueInvalid", f'Invalid value: "{obj["type"]}": field is immutable')


def _event(rt: ResourceType, obj: Obj, old: Obj | None) -> None:
    if rt.group == "":
        obj.setdefault("count", 1)
        obj.setdefault("type", "Normal")
        obj.setdefault("source", {})


def _crd(rt: ResourceType, obj: Obj, old: Obj | None) -> None:
    spec = obj.get("spec") or {}
    names = spec.get("names") or {}
    name = obj["metadata"]["name"]
    if f"{names.get('plural')}.{spec.get('group')}" != name:
        _fail(
            rt,
            obj,
            "metadata.name",
            "FieldValueInvalid",
            f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group',
        )
    if not spec.get("versions"):
        _fail(
            rt,
            obj,
            "spec.versions",
            "FieldValueInvalid",
            "Invalid value: null: must have exactly one version marked as storage version",
        )
    if sum(1 for v in spec["versions"] if v.get("storage")) != 1:
        _fail(
            rt,
            obj,
            "spec.versions",
            "FieldValueInvalid",
            "Invalid value: must have exactly one version marked as storage version",
        )
    names.setdefault("singular", names.get("kind", "").lower())
    names.setdefault("listKind", f"{names.get('kind')}List")
    spec.setdefault("conversion", {"strategy": "None"})
    finalizers = obj["metadata"].setdefault("finalizers", [])
    if old is None and CRD_CLEANUP_FINALIZER not in finalizers:
        finalizers.append(CRD_CLEANUP_FINALIZER)
    stamp = obj["metadata"].get("creationTimestamp")
    storage = next(v["name"] for v in spec["versions"] if v.get("storage"))
    obj["status"] = {
        "acceptedNames": dict(names),
        "conditions": [
            {
                "type": "NamesAccepted",
                "status": "True",
                "reason": "NoConflicts",
                "message": "no conflicts found",
                "lastTransitionTime": stamp,
            },
            {
                "type": "Established",
                "status": "True",
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
                "lastTransitionTime": stamp,
            },
        ],
        "storedVersions": sorted(set((old or {}).get("status", {}).get("storedVersions", [])) | {storage}),
    }


_HANDLERS = {
    ("", "namespaces"): _namespace,
    ("", "pods"): _pod,
    ("batch", "jobs"): _job,
    ("", "services"): _service,
    ("", "secrets"): _secret,
    ("", "events"): _event,
    ("apiextensions.k8s.io", "customresourcedefinitions"): _crd,
}
