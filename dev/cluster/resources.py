"""The resource types the local cluster serves: built-in kinds plus those of created CRDs.

Discovery, the OpenAPI documents, URL routing and the store all read this one table, so a CRD
becomes routable, discoverable and watchable the moment it is created (as on a real server, where
the CRD's `Established` condition marks that moment).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    subresources: tuple[str, ...] = ()  # "status", "log", "eviction"
    has_generation: bool = False
    # For custom resources: the version's openAPIV3Schema and printer columns.
    schema: dict[str, Any] | None = None
    printer_columns: list[dict[str, Any]] | None = None
    crd_name: str = ""
    storage_version: str = ""  # custom resources: the version objects are stored in

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """How errors name the resource: `pods`, `jobs.batch`, `finetunejobs.kubetune.dev`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def is_custom(self) -> bool:
        return bool(self.crd_name)

    def discovery(self) -> list[dict[str, Any]]:
        """APIResource entries: the resource and its subresources."""
        main: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(ALL_VERBS),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        for sub in self.subresources:
            if sub == "status":
                entries.append(
                    {
                        "name": f"{self.plural}/status",
                        "singularName": "",
                        "namespaced": self.namespaced,
                        "kind": self.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
            elif sub == "log":
                entries.append(
                    {
                        "name": f"{self.plural}/log",
                        "singularName": "",
                        "namespaced": True,
                        "kind": self.kind,
                        "verbs": ["get"],
                    }
                )
            elif sub == "eviction":
                entries.append(
                    {
                        "name": f"{self.plural}/eviction",
                        "singularName": "",
                        "namespaced": True,
                        "group": "policy",
                        "version": "v1",
                        "kind": "Eviction",
                        "verbs": ["create"],
                    }
                )
        return entries


def builtin_types() -> list[ResourceType]:
    return [
        ResourceType("", "v1", "namespaces", "Namespace", False, short_names=["ns"], subresources=("status",)),
        ResourceType(
            "",
            "v1",
            "pods",
            "Pod",
            True,
            short_names=["po"],
            categories=["all"],
            subresources=("status", "log", "eviction"),
            has_generation=True,
        ),
        ResourceType(
            "", "v1", "services", "Service", True, short_names=["svc"], categories=["all"], subresources=("status",)
        ),
        ResourceType("", "v1", "secrets", "Secret", True),
        ResourceType("", "v1", "configmaps", "ConfigMap", True, short_names=["cm"]),
        ResourceType("", "v1", "events", "Event", True, short_names=["ev"]),
        ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, short_names=["sa"]),
        ResourceType("", "v1", "nodes", "Node", False, short_names=["no"], subresources=("status",)),
        ResourceType(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            True,
            short_names=["pvc"],
            subresources=("status",),
        ),
        ResourceType(
            "batch", "v1", "jobs", "Job", True, categories=["all"], subresources=("status",), has_generation=True
        ),
        ResourceType(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            True,
            short_names=["deploy"],
            categories=["all"],
            subresources=("status",),
            has_generation=True,
        ),
        ResourceType(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            False,
            short_names=["crd", "crds"],
            categories=["api-extensions"],
            subresources=("status",),
            has_generation=True,
        ),
        ResourceType("events.k8s.io", "v1", "events", "Event", True, short_names=["ev"]),
        ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
        ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
        ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
        ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
        ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    ]


class Registry:
    """Every served (group, version, plural); CRDs add and remove entries at run time."""

    def __init__(self) -> None:
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        for rt in builtin_types():
            self.add(rt)

    def add(self, rt: ResourceType) -> None:
        self.types[(rt.group, rt.version, rt.plural)] = rt

    def remove_crd(self, crd_name: str) -> None:
        for key in [k for k, rt in self.types.items() if rt.crd_name == crd_name]:
            del self.types[key]

    def get(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.types.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> ResourceType | None:
        group, _, version = api_version.rpartition("/")
        for rt in self.types.values():
            if rt.group == group and rt.version == version and rt.kind == kind:
                return rt
        return None

    def groups(self) -> dict[str, list[str]]:
        """group -> served versions (preferred first), named groups only."""
        out: dict[str, list[str]] = {}
        for (group, version, _), rt in self.types.items():
            if group and version not in out.setdefault(group, []):
                if rt.storage_version == version:
                    out[group].insert(0, version)
                else:
                    out[group].append(version)
        return out

    def in_group_version(self, group: str, version: str) -> list[ResourceType]:
        return [rt for (g, v, _), rt in self.types.items() if g == group and v == version]

    def types_of_crd(self, crd: dict[str, Any]) -> list[ResourceType]:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        out = []
        storage = next((v["name"] for v in spec.get("versions", []) if v.get("storage")), "")
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            subresources = tuple(k for k in (version.get("subresources") or {}) if k in ("status",))
            out.append(
                ResourceType(
                    spec["group"],
                    version["name"],
                    names["plural"],
                    names["kind"],
                    spec.get("scope") == "Namespaced",
                    singular=names.get("singular", ""),
                    short_names=list(names.get("shortNames") or []),
                    categories=list(names.get("categories") or []),
                    subresources=subresources,
                    has_generation=True,
                    schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                    printer_columns=version.get("additionalPrinterColumns"),
                    crd_name=crd["metadata"]["name"],
                    storage_version=storage,
                )
            )
        return out
