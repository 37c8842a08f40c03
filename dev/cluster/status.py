"""Status writes the whole control plane shares: conditions and events.

The controllers, the kubelet and the API server (the Eviction API) all set conditions and record
Events the same way, so the helpers live beside the store rather than in any one of them.
"""

from __future__ import annotations

import contextlib
import uuid

from kubetune.dev.cluster.errors import ApiError
from kubetune.dev.cluster.jsoncopy import clone
from kubetune.dev.cluster.store import Key, Obj, Store, timestamp

PODS: Key = ("", "pods")
NODE_NAME = "kubetune-dev"


def set_condition(status: Obj, ctype: str, value: str, reason: str, message: str) -> bool:
    """Add or update a condition keyed by type; lastTransitionTime moves only when status changes."""
    conditions = status.setdefault("conditions", [])
    for condition in conditions:
        if condition["type"] == ctype:
            if condition["status"] == value and condition.get("reason") == reason:
                return False
            if condition["status"] != value:
                condition["lastTransitionTime"] = timestamp()
            condition.update(status=value, reason=reason, message=message, lastProbeTime=condition.get("lastProbeTime"))
            return True
    conditions.append(
        {
            "type": ctype,
            "status": value,
            "reason": reason,
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": timestamp(),
        }
    )
    return True


def has_condition(obj: Obj, ctype: str) -> bool:
    return any(c["type"] == ctype and c["status"] == "True" for c in (obj.get("status") or {}).get("conditions") or [])


def record_event(
    store: Store,
    involved: Obj,
    reason: str,
    message: str,
    event_type: str = "Normal",
    component: str = "job-controller",
) -> None:
    """A core/v1 Event about `involved`, aggregated by (object, reason, message) like the recorder."""
    rt = store.registry.get("", "v1", "events")
    assert rt is not None
    meta = involved["metadata"]
    namespace = meta.get("namespace") or "default"
    # Like client-go's event correlator, the recorder remembers its own events (not a scan of all).
    key = (namespace, meta.get("uid"), reason, message)
    recorded = store.recorded_events.get(key)
    event = store.find(rt.key, namespace, recorded) if recorded else None
    if event is not None:
        event = clone(event)
        event["count"] = int(event.get("count", 1)) + 1
        event["lastTimestamp"] = timestamp()
        store.internal_write(rt.key, event)
        return
    stamp = timestamp()
    body = {
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
        "involvedObject": {
            "kind": involved.get("kind"),
            "namespace": meta.get("namespace"),
            "name": meta["name"],
            "uid": meta.get("uid"),
            "apiVersion": involved.get("apiVersion"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "reason": reason,
        "message": message,
        "type": event_type,
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "eventTime": None,
        "source": {"component": component, **({"host": NODE_NAME} if component == "kubelet" else {})},
        "reportingComponent": component,
        "reportingInstance": NODE_NAME if component == "kubelet" else "",
    }
    with contextlib.suppress(ApiError):  # the namespace is going away; real recorders drop such events too
        store.create(rt, namespace, body)
        if len(store.recorded_events) > 50_000:
            store.recorded_events.clear()
        store.recorded_events[key] = body["metadata"]["name"]
