"""RBAC rule evaluation for tests: is a request (its attributes from the local cluster's audit log,
`ClusterInfo.audit`) allowed by a set of Role or ClusterRole rules?

The semantics are Kubernetes' RBAC authorizer's: a rule matches when its apiGroups, resources
(`resource` or `resource/subresource`, `*` and `*/sub` wildcards), verbs and resourceNames (when
set) match; a Role's rules only apply inside its namespace; non-resource URLs match a rule's
nonResourceURLs (a trailing `*` is a prefix). Everyone authenticated also holds the default
`system:discovery`, `system:basic-user` and `system:public-info-viewer` ClusterRoles, whose
non-resource URLs (discovery, /version, /openapi, health) are granted here too.
"""

from __future__ import annotations

from typing import Any

DISCOVERY_URLS = [
    "/api",
    "/api/*",
    "/apis",
    "/apis/*",
    "/healthz",
    "/livez",
    "/readyz",
    "/openapi",
    "/openapi/*",
    "/version",
    "/version/",
]
DEFAULT_RULES: list[dict[str, Any]] = [{"nonResourceURLs": DISCOVERY_URLS, "verbs": ["get"]}]


def _has(values: list[str] | None, value: str) -> bool:
    return bool(values) and ("*" in values or value in values)  # type: ignore[operator]


def _resource_matches(resources: list[str], resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for granted in resources:
        if granted in ("*", combined):
            return True
        if subresource and granted == f"*/{subresource}":
            return True
    return False


def rule_allows(rule: dict[str, Any], request: dict[str, Any]) -> bool:
    if not _has(rule.get("verbs"), request["verb"]):
        return False
    if "nonResourceURL" in request:
        url = request["nonResourceURL"]
        return any(u == url or (u.endswith("*") and url.startswith(u[:-1])) for u in rule.get("nonResourceURLs") or [])
    if not _has(rule.get("apiGroups"), request["apiGroup"]):
        return False
    if not _resource_matches(rule.get("resources") or [], request["resource"], request.get("subresource", "")):
        return False
    names = rule.get("resourceNames")
    return not names or request.get("name", "") in names


def allows(roles: list[dict[str, Any]], request: dict[str, Any]) -> bool:
    """`roles`: rendered Role and ClusterRole objects, all bound to the requester (a ClusterRole
    cluster-wide, a Role in its own namespace)."""
    if any(rule_allows(rule, request) for rule in DEFAULT_RULES):
        return True
    for role in roles:
        # A Role grants nothing cluster-scoped nor across namespaces (a list of all namespaces).
        outside = "nonResourceURL" in request or request.get("namespace", "") != role["metadata"].get("namespace")
        if role["kind"] == "Role" and outside:
            continue
        if any(rule_allows(rule, request) for rule in role.get("rules") or []):
            return True
    return False


def denied(roles: list[dict[str, Any]], requests: list[dict[str, Any]]) -> list[str]:
    """One line for each distinct request the roles do not allow."""
    lines = []
    for request in requests:
        if not allows(roles, request):
            line = describe(request)
            if line not in lines:
                lines.append(line)
    return lines


def describe(request: dict[str, Any]) -> str:
    if "nonResourceURL" in request:
        return f"{request['verb']} {request['nonResourceURL']}"
    resource = request["resource"] + (f"/{request['subresource']}" if request.get("subresource") else "")
    group = request["apiGroup"] or "core"
    where = f" in {request['namespace']}" if request.get("namespace") else " (cluster-wide)"
    return f"{request['verb']} {group} {resource}{where}"


def used(requests: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) of each resource request."""
    return {
        (r["apiGroup"], r["resource"] + (f"/{r['subresource']}" if r.get("subresource") else ""), r["verb"])
        for r in requests
        if "nonResourceURL" not in r
    }


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of each grant of a role without wildcards."""
    return {
        (group, resource, verb)
        for rule in role.get("rules") or []
        for group in rule.get("apiGroups") or []
        for resource in rule.get("resources") or []
        for verb in rule.get("verbs") or []
    }
