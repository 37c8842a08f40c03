"""Server-side printing: the `meta.k8s.io/v1` Table that `kubectl get` asks for.

Custom resources get the CRD's additionalPrinterColumns (evaluated JSONPath, `date` columns as
ages); built-in kinds get the columns their real table convertors print.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from kubetune.dev.cluster.resources import ResourceType

Obj = dict[str, Any]


def _column(name: str, description: str = "", priority: int = 0, fmt: str = "") -> Obj:
    """A TableColumnDefinition of type string (priority 0: shown by default; 1: with `-o wide`)."""
    return {"name": name, "type": "string", "format": fmt, "description": description, "priority": priority}


NAME_COLUMN = _column("Name", "Name must be unique within a namespace.", fmt="name")
AGE_COLUMN = _column(
    "Age", "CreationTimestamp is a timestamp representing the server time when this object was created."
)


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    return f"{hours // 24 // 365}y"


def age(stamp: str | None) -> str:
    if not stamp:
        return "<unknown>"
    moment = datetime.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return human_duration((datetime.now(timezone.utc) - moment).total_seconds())


def jsonpath(obj: Any, path: str) -> list[Any]:
    """The subset of JSONPath that printer columns use: `.a.b`, `.a[0]`, `.a[*]`, `.a[?(@.k=="v")]`."""
    tokens = re.findall(
        r"\.([A-Za-z0-9_\-]+)|\[(\d+|\*)\]|\[\?\(@\.([A-Za-z0-9_.]+)\s*==\s*[\"']([^\"']*)[\"']\)\]", path
    )
    nodes = [obj]
    for name, index, filter_key, filter_value in tokens:
        next_nodes: list[Any] = []
        for node in nodes:
            if name and isinstance(node, dict) and name in node:
                next_nodes.append(node[name])
            elif index == "*" and isinstance(node, list):
                next_nodes.extend(node)
            elif index and index != "*" and isinstance(node, list) and int(index) < len(node):
                next_nodes.append(node[int(index)])
            elif filter_key and isinstance(node, list):
                for item in node:
                    value: Any = item
                    for part in filter_key.split("."):
                        value = value.get(part) if isinstance(value, dict) else None
                    if str(value) == filter_value:
                        next_nodes.append(item)
        nodes = next_nodes
    return nodes


def _custom_cell(column: Obj, obj: Obj) -> Any:
    values = jsonpath(obj, column["jsonPath"])
    if not values or values[0] is None:
        return None
    value = values[0]
    kind = column.get("type", "string")
    if kind == "date":
        return age(value) if isinstance(value, str) else None
    if kind == "integer":
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if kind == "number":
        return value if isinstance(value, (int, float)) else None
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    return value if isinstance(value, str) else json.dumps(value)


def _pod_cells(pod: Obj) -> tuple[list[Obj], list[Any]]:
    status = pod.get("status") or {}
    containers = pod.get("spec", {}).get("containers") or []
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount", 0)) for c in statuses)
    reason = status.get("reason") or status.get("phase", "Pending")
    for cs in statuses:
        state = cs.get("state") or {}
        if state.get("waiting", {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif state.get("terminated"):
            terminated = state["terminated"]
            reason = terminated.get("reason") or f"ExitCode:{terminated.get('exitCode')}"
    if status.get("phase") == "Running" and ready == len(containers):
        reason = "Running"
    if pod["metadata"].get("deletionTimestamp") and status.get("phase") not in ("Succeeded", "Failed"):
        reason = "Terminating"
    columns = [
        NAME_COLUMN,
        _column("Ready", "The aggregate readiness state of this pod for accepting traffic."),
        _column("Status", "The aggregate status of the containers in this pod."),
        _column(
            "Restarts",
            "The number of times the containers in this pod have been restarted and when the last container "
            "in this pod has restarted.",
        ),
        AGE_COLUMN,
        _column("IP", "The IP address assigned to the pod", priority=1),
        _column("Node", "The name of the node the pod is assigned to", priority=1),
    ]
    cells = [
        pod["metadata"]["name"],
        f"{ready}/{len(containers)}",
        reason,
        str(restarts),
        age(pod["metadata"].get("creationTimestamp")),
        status.get("podIP", "<none>"),
        pod.get("spec", {}).get("nodeName", "<none>"),
    ]
    return columns, cells


def _job_cells(job: Obj) -> tuple[list[Obj], list[Any]]:
    spec, status = job.get("spec") or {}, job.get("status") or {}
    conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
    state = "Running"
    for kind in ("Complete", "Failed", "FailureTarget", "SuccessCriteriaMet", "Suspended"):
        if conditions.get(kind) == "True":
            state = kind
            break
    if job["metadata"].get("deletionTimestamp"):
        state = "Terminating"
    completions = spec.get("completions")
    done = (
        f"{status.get('succeeded', 0)}/{completions}"
        if completions is not None
        else f"{status.get('succeeded', 0)}/1 of {spec.get('parallelism', 1)}"
    )
    duration = ""
    if status.get("startTime"):
        start = datetime.strptime(status["startTime"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
        end = (
            datetime.strptime(status["completionTime"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
            if status.get("completionTime")
            else datetime.now(timezone.utc)
        )
        duration = human_duration((end - start).total_seconds())
    containers = spec.get("template", {}).get("spec", {}).get("containers") or []
    columns = [
        NAME_COLUMN,
        _column("Status", "Status of the job."),
        _column("Completions", "The desired number of successfully finished pods the job should be run with."),
        _column("Duration", "Time required to complete the job."),
        AGE_COLUMN,
        _column("Containers", "Names of each container in the template.", priority=1),
        _column("Images", "Images referenced by each container in the template.", priority=1),
        _column("Selector", "A label query over pods that should match the pod count.", priority=1),
    ]
    selector = ",".join(f"{k}={v}" for k, v in (spec.get("selector", {}).get("matchLabels") or {}).items())
    cells = [
        job["metadata"]["name"],
        state,
        done,
        duration,
        age(job["metadata"].get("creationTimestamp")),
        ",".join(c.get("name", "") for c in containers),
        ",".join(c.get("image", "") for c in containers),
        selector,
    ]
    return columns, cells


def _simple(extra: list[tuple[str, Any]]) -> Any:
    def convert(obj: Obj) -> tuple[list[Obj], list[Any]]:
        columns = [NAME_COLUMN] + [_column(n) for n, _ in extra] + [AGE_COLUMN]
        cells = [obj["metadata"]["name"]] + [f(obj) for _, f in extra] + [age(obj["metadata"].get("creationTimestamp"))]
        return columns, cells

    return convert


def _event_cells(event: Obj) -> tuple[list[Obj], list[Any]]:
    involved = event.get("involvedObject") or event.get("regarding") or {}
    columns = [
        _column("Last Seen"),
        _column("Type"),
        _column("Reason"),
        _column("Object"),
        _column("Message"),
    ]
    seen = event.get("lastTimestamp") or event.get("eventTime") or event["metadata"].get("creationTimestamp")
    cells = [
        age(seen),
        event.get("type", ""),
        event.get("reason", ""),
        f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}",
        event.get("message") or event.get("note", ""),
    ]
    return columns, cells


CONVERTERS: dict[tuple[str, str], Any] = {
    ("", "pods"): _pod_cells,
    ("batch", "jobs"): _job_cells,
    ("", "events"): _event_cells,
    ("events.k8s.io", "events"): _event_cells,
    ("", "namespaces"): _simple([("Status", lambda o: (o.get("status") or {}).get("phase", ""))]),
    ("", "secrets"): _simple([("Type", lambda o: o.get("type", "")), ("Data", lambda o: len(o.get("data") or {}))]),
    ("", "configmaps"): _simple([("Data", lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {}))]),
    ("", "services"): _simple(
        [
            ("Type", lambda o: o["spec"].get("type", "")),
            ("Cluster-IP", lambda o: o["spec"].get("clusterIP", "")),
            ("External-IP", lambda o: "<none>"),
            (
                "Port(s)",
                lambda o: (
                    ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in o["spec"].get("ports") or [])
                    or "<none>"
                ),
            ),
        ]
    ),
    ("apiextensions.k8s.io", "customresourcedefinitions"): lambda o: (
        [NAME_COLUMN, {"name": "Created At", "type": "date", "format": "", "description": "", "priority": 0}],
        [o["metadata"]["name"], o["metadata"].get("creationTimestamp")],
    ),
    ("", "nodes"): _simple(
        [
            ("Status", lambda o: "Ready"),
            ("Roles", lambda o: "control-plane"),
            ("Version", lambda o: (o.get("status") or {}).get("nodeInfo", {}).get("kubeletVersion", "")),
        ]
    ),
}


def to_table(
    rt: ResourceType, objects: list[Obj], include_object: str, resource_version: str, with_columns: bool = True
) -> Obj:
    rows = []
    columns: list[Obj] = [NAME_COLUMN, AGE_COLUMN]
    if rt.is_custom and rt.printer_columns:
        columns = [NAME_COLUMN] + [
            {
                "name": c["name"],
                "type": "string" if c.get("type") == "date" else c.get("type", "string"),
                "format": c.get("format", ""),
                "description": c.get("description", ""),
                "priority": c.get("priority", 0),
            }
            for c in rt.printer_columns
        ]
    for obj in objects:
        if rt.is_custom and rt.printer_columns:
            cells = [obj["metadata"]["name"]] + [_custom_cell(c, obj) for c in rt.printer_columns]
        elif rt.key in CONVERTERS:
            columns, cells = CONVERTERS[rt.key](obj)
        else:
            cells = [obj["metadata"]["name"], age(obj["metadata"].get("creationTimestamp"))]
        row: Obj = {"cells": cells}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            }
        rows.append(row)
    if not objects and rt.key in CONVERTERS:
        columns = CONVERTERS[rt.key](_EMPTY.get(rt.key, _EMPTY_DEFAULT))[0]
    table: Obj = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "rows": rows,
    }
    if with_columns:
        table["columnDefinitions"] = columns
    return table


_EMPTY_DEFAULT: Obj = {"metadata": {"name": ""}, "spec": {}, "status": {}}
_EMPTY: dict[tuple[str, str], Obj] = {}
