"""The API server's object semantics over an in-memory store (etcd's role).

One global resourceVersion counter orders every write; an event history backs watches from a
resourceVersion (older than the history: 410 Gone, as after etcd compaction). Create, update,
patch and delete apply the documented server behaviour: server-set metadata, generateName,
optimistic concurrency, generation bumped on spec changes only, status-subresource isolation,
no-op writes that keep the resourceVersion, finalizers and deletionTimestamp, graceful pod deletion
and propagation policies (the garbage collector in controllers.py finishes what they start).

Everything runs on one asyncio loop (HTTP handlers, controllers, kubelet), so no locks are needed.
"""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from kubetune.dev.cluster import builtins
from kubetune.dev.cluster.errors import ApiError, already_exists, conflict, invalid, not_found
from kubetune.dev.cluster.jsoncopy import clone
from kubetune.dev.cluster.patch import json_patch, merge_patch, strategic_merge_patch
from kubetune.dev.cluster.resources import Registry, ResourceType

Obj = dict[str, Any]
Key = tuple[str, str]  # (group, plural)

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the API server's generateName alphabet


def now() -> datetime:
    return datetime.now(timezone.utc)


def timestamp(moment: datetime | None = None) -> str:
    return (moment or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)


@dataclass(eq=False)
class Watcher:
    key: Key
    namespace: str | None
    predicate: Callable[[Obj], bool]
    queue: asyncio.Queue[tuple[str, Obj]] = field(default_factory=asyncio.Queue)


@dataclass
class WriteResult:
    obj: Obj
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WriteOptions:
    """The query parameters of an update or patch: `/status`-style subresource, `dryRun=All`,
    `fieldValidation` (Ignore, Warn, Strict)."""

    subresource: str = ""
    dry_run: bool = False
    field_validation: str = "Warn"


WRITE = WriteOptions()


class Store:
    def __init__(self, registry: Registry, history: int = 20000) -> None:
        self.registry = registry
        self.objects: dict[Key, dict[tuple[str, str], Obj]] = {}
        self.revision = 0
        self.history: deque[tuple[int, Key, str, Obj, Obj | None]] = deque(maxlen=history)
        self.compacted = 0  # events at or below this revision are gone
        self.watchers: set[Watcher] = set()
        self.listeners: list[Callable[[str, Key, Obj], None]] = []
        self.recorded_events: dict[
            tuple[Any, ...], str
        ] = {}  # the control plane's event recorder: (ns, uid, reason, message) -> name

    # -- low level ---------------------------------------------------------------------------------

    def _bucket(self, key: Key) -> dict[tuple[str, str], Obj]:
        return self.objects.setdefault(key, {})

    def _commit(self, etype: str, key: Key, obj: Obj, old: Obj | None) -> Obj:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        meta = obj["metadata"]
        bucket = self._bucket(key)
        if etype == "DELETED":
            bucket.pop((meta.get("namespace", ""), meta["name"]), None)
        else:
            bucket[(meta.get("namespace", ""), meta["name"])] = obj
        if len(self.history) == self.history.maxlen:
            self.compacted = self.history[0][0]
        snapshot = clone(obj)
        self.history.append((self.revision, key, etype, snapshot, old))
        for watcher in list(self.watchers):
            self._deliver(watcher, key, etype, snapshot, old)
        for listener in self.listeners:
            listener(etype, key, snapshot)
        return clone(obj)

    @staticmethod
    def _deliver(watcher: Watcher, key: Key, etype: str, obj: Obj, old: Obj | None) -> None:
        if watcher.key != key:
            return
        if watcher.namespace is not None and obj["metadata"].get("namespace") != watcher.namespace:
            return
        now_matches = watcher.predicate(obj)
        was_matching = old is not None and watcher.predicate(old)
        if etype == "MODIFIED" and now_matches and not was_matching:
            etype = "ADDED"  # entered the selection
        elif etype == "MODIFIED" and was_matching and not now_matches:
            etype, now_matches = "DELETED", True  # left the selection
        if now_matches:
            watcher.queue.put_nowait((etype, obj))

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does (watches from older versions get 410)."""
        self.compacted = self.revision
        self.history.clear()

    def events_since(self, revision: int, watcher: Watcher) -> None:
        """Queue the history after `revision` for a new watcher; 410 Gone when it was compacted."""
        if revision < self.compacted:
            raise ApiError(410, "Expired", f"too old resource version: {revision} ({self.compacted + 1})")
        for rev, key, etype, obj, old in self.history:
            if rev > revision:
                self._deliver(watcher, key, etype, obj, old)

    def find(self, key: Key, namespace: str, name: str) -> Obj | None:
        return self._bucket(key).get((namespace, name))

    def all(self, key: Key, namespace: str | None = None) -> list[Obj]:
        items = [o for (ns, _), o in self._bucket(key).items() if namespace is None or ns == namespace]
        return sorted(items, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    def by_uid(self, uid: str) -> tuple[Key, Obj] | None:
        for key, bucket in self.objects.items():
            for obj in bucket.values():
                if obj["metadata"].get("uid") == uid:
                    return key, obj
        return None

    # -- reads -------------------------------------------------------------------------------------

    def _existing(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        """The stored object (not a copy), or the API's 404."""
        obj = self.find(rt.key, namespace if rt.namespaced else "", name)
        if obj is None:
            raise not_found(rt.plural, name, rt.group)
        return obj

    def get(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        return self._as_version(rt, self._existing(rt, namespace, name))

    def list(self, rt: ResourceType, namespace: str | None, predicate: Callable[[Obj], bool]) -> list[Obj]:
        scope = namespace if rt.namespaced else None
        items = [o for (ns, _), o in self._bucket(rt.key).items() if (scope is None or ns == scope) and predicate(o)]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))  # only what matched
        return [self._as_version(rt, o) for o in items]

    @staticmethod
    def _as_version(rt: ResourceType, obj: Obj) -> Obj:
        out = clone(obj)
        out["apiVersion"] = rt.api_version  # custom resources: conversion strategy None
        return out

    # -- writes ------------------------------------------------------------------------------------

    def _check_namespace(self, rt: ResourceType, namespace: str, name: str) -> None:
        if not rt.namespaced:
            return
        ns = self.find(("", "namespaces"), "", namespace)
        if ns is None:
            raise not_found("namespaces", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f'{rt.group_resource} "{name}" is forbidden: unable to create new content '
                f"in namespace {namespace} because it is being terminated",
                {"name": name, "group": rt.group, "kind": rt.plural},
            )

    def create(
        self, rt: ResourceType, namespace: str, body: Obj, *, dry_run: bool = False, field_validation: str = "Warn"
    ) -> WriteResult:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        obj = clone(body)
        meta = obj.setdefault("metadata", {}) or {}
        obj["metadata"] = meta
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            for _ in range(20):
                candidate = meta["generateName"] + "".join(random.choice(_SUFFIX_ALPHABET) for _ in range(5))
                if self.find(rt.key, namespace if rt.namespaced else "", candidate) is None:
                    meta["name"] = candidate
                    break
        name = meta.get("name") or ""
        if not name:
            raise invalid(
                rt.kind,
                rt.group,
                "",
                [
                    (
                        "metadata.name",
                        "FieldValueRequired",
                        "metadata.name: Required value: name or generateName is required",
                    )
                ],
            )
        self._validate_name(rt, name)
        self._check_namespace(rt, namespace, name)
        if self.find(rt.key, namespace if rt.namespaced else "", name) is not None:
            raise already_exists(rt.plural, name, rt.group)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        for server_field in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "managedFields"):
            meta.pop(server_field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = timestamp()
        if rt.has_generation:
            meta["generation"] = 1
        if "status" in rt.subresources and rt.is_custom:
            obj.pop("status", None)  # the main endpoint ignores status
        warnings = self._admit(rt, obj, None, field_validation)
        if dry_run:
            return WriteResult(obj, warnings)
        return WriteResult(self._commit("ADDED", rt.key, obj, None), warnings)

    def _validate_name(self, rt: ResourceType, name: str) -> None:
        if len(name) > 253 or not _NAME_RE.match(name):
            message = (
                f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            )
            raise invalid(rt.kind, rt.group, name, [("metadata.name", "FieldValueInvalid", message)])

    def _admit(
        self, rt: ResourceType, obj: Obj, old: Obj | None, field_validation: str, subresource: str = ""
    ) -> list[str]:
        """Defaulting and validation: built-in rules, or the CRD's structural schema."""
        if rt.is_custom:
            return self._admit_custom(rt, obj, old, field_validation) if rt.schema is not None else []
        builtins.admit(rt, obj, old, subresource)
        return []

    def _admit_custom(self, rt: ResourceType, obj: Obj, old: Obj | None, field_validation: str) -> list[str]:
        # CRD structural schemas (jsonschema + CEL); imported on first use, as most stores never
        # see a custom resource and jsonschema takes 0.2 s to import.
        from kubetune.dev.cluster import schema

        result = schema.validate_custom_resource(rt.schema or {}, obj, old)
        name = obj["metadata"]["name"]
        if result.unknown_fields and field_validation == "Strict":
            fields = ", ".join(f'unknown field "{f}"' for f in result.unknown_fields)
            raise ApiError(
                400,
                "BadRequest",
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                f"strict decoding error: {fields}",
            )
        if result.errors:
            raise invalid(rt.kind, rt.group, name, [(e.field, e.reason, e.message) for e in result.errors])
        pruned_meta = obj["metadata"]
        obj.clear()
        obj.update(result.obj)
        obj["metadata"] = pruned_meta
        if field_validation == "Warn":
            return [f'unknown field "{f}"' for f in result.unknown_fields]
        return []

    def update(
        self, rt: ResourceType, namespace: str, name: str, body: Obj, options: WriteOptions = WRITE
    ) -> WriteResult:
        subresource, dry_run, field_validation = options.subresource, options.dry_run, options.field_validation
        current = self._existing(rt, namespace, name)
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        meta = body.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(
                400,
                "BadRequest",
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})",
            )
        if rt.namespaced and meta.get("namespace", namespace) != namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            raise conflict(rt.plural, name, rt.group)
        new = clone(body)
        if subresource == "status":
            # /status changes only .status: everything else comes from the stored object.
            status = new.get("status")
            new = clone(current)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
        elif "status" in rt.subresources:
            # The main endpoint ignores status when a status subresource exists.
            if "status" in current:
                new["status"] = clone(current["status"])
            else:
                new.pop("status", None)
        new_meta = new.setdefault("metadata", {})
        for server_field in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ):
            if server_field in current["metadata"]:
                new_meta[server_field] = current["metadata"][server_field]
            else:
                new_meta.pop(server_field, None)
        new_meta["name"] = name
        if rt.namespaced:
            new_meta["namespace"] = namespace
        new_meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        new["apiVersion"], new["kind"] = rt.api_version, rt.kind
        if current["metadata"].get("deletionTimestamp"):
            # Finalizers may only be removed from an object being deleted, never added.
            added = set(new_meta.get("finalizers") or []) - set(current["metadata"].get("finalizers") or [])
            if added:
                raise ApiError(
                    422,
                    "Invalid",
                    f'{rt.kind} "{name}" is invalid: metadata.finalizers: Forbidden: '
                    "no new finalizers can be added if the object is being deleted, found new finalizers "
                    f"{sorted(added)}",
                )
        warnings = self._admit(rt, new, current, field_validation, subresource)
        if rt.has_generation and _spec_of(new) != _spec_of(current):
            new_meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        if _comparable(new) == _comparable(current):
            return WriteResult(clone(current), warnings)  # a no-op write keeps the resourceVersion
        if dry_run:
            return WriteResult(new, warnings)
        if new_meta.get("deletionTimestamp") and not new_meta.get("finalizers") and not _graceful_pending(rt.key, new):
            return WriteResult(self._commit("DELETED", rt.key, new, current), warnings)
        return WriteResult(self._commit("MODIFIED", rt.key, new, current), warnings)

    def patch(
        self, rt: ResourceType, namespace: str, name: str, patch_type: str, patch: Any, options: WriteOptions = WRITE
    ) -> WriteResult:
        dry_run, field_validation = options.dry_run, options.field_validation
        current = self.find(rt.key, namespace if rt.namespaced else "", name)
        if current is None:
            if patch_type == "apply":
                body = clone(patch)
                body.setdefault("metadata", {})["name"] = name
                return self.create(rt, namespace, body, dry_run=dry_run, field_validation=field_validation)
            raise not_found(rt.plural, name, rt.group)
        base = clone(current)
        base["apiVersion"] = rt.api_version
        if patch_type == "json":
            patched = json_patch(base, patch)
        elif patch_type == "merge":
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
            patched = merge_patch(base, patch)
        elif patch_type in ("strategic", "apply"):
            if patch_type == "strategic" and rt.is_custom:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted "
                    "media types include: application/json-patch+json, application/merge-patch+json, "
                    "application/apply-patch+yaml",
                )
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
            patched = strategic_merge_patch(base, patch)
        else:
            raise ApiError(
                415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {patch_type}"
            )
        if not isinstance(patched, dict):
            raise ApiError(422, "Invalid", "the patch produced an object that is not a JSON object")
        return self.update(rt, namespace, name, patched, options)

    def internal_write(self, key: Key, obj: Obj) -> Obj:
        """A controller's write (binding, status) that skips admission; keeps the no-op rule."""
        meta = obj["metadata"]
        current = self.find(key, meta.get("namespace", ""), meta["name"])
        if current is None:
            raise not_found(key[1], meta["name"], key[0])
        obj = clone(obj)
        meta = obj["metadata"]
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        if _comparable(obj) == _comparable(current):
            return clone(current)
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not _graceful_pending(key, obj):
            return self._commit("DELETED", key, obj, current)
        return self._commit("MODIFIED", key, obj, current)

    def delete(
        self, rt: ResourceType, namespace: str, name: str, options: Obj | None = None, *, dry_run: bool = False
    ) -> Obj:
        options = options or {}
        current = self._existing(rt, namespace, name)
        pre = options.get("preconditions") or {}
        for meta_field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            if pre.get(meta_field) and pre[meta_field] != current["metadata"][meta_field]:
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: {label} in precondition: {pre[meta_field]}, "
                    f"{label} in object meta: {current['metadata'][meta_field]}",
                )
        if dry_run:
            return clone(current)
        new = clone(current)
        meta = new["metadata"]
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        if policy is None:
            # batch/v1 Jobs keep the legacy default of orphaning their pods (API reference, DeleteOptions).
            policy = "Orphan" if rt.key == ("batch", "jobs") else "Background"
        if policy not in ("Orphan", "Background", "Foreground"):
            raise ApiError(422, "Invalid", f'DeleteOptions.propagationPolicy: Unsupported value: "{policy}"')
        finalizers = list(meta.get("finalizers") or [])
        if not meta.get("deletionTimestamp"):
            if policy == "Orphan" and _has_dependents(self, current) and "orphan" not in finalizers:
                finalizers.append("orphan")
            if policy == "Foreground" and "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
        meta["finalizers"] = finalizers
        if not finalizers:
            meta.pop("finalizers")
        grace = builtins.grace_period(rt, current, options.get("gracePeriodSeconds"))
        if rt.key == ("", "namespaces"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = timestamp()
                meta["deletionGracePeriodSeconds"] = 0
                new.setdefault("status", {})["phase"] = "Terminating"
                return self._commit("MODIFIED", rt.key, new, current)
            return clone(current)
        if grace > 0:
            deadline = now() + timedelta(seconds=grace)
            if meta.get("deletionTimestamp") and parse_time(meta["deletionTimestamp"]) <= deadline:
                return clone(current)  # only a shorter grace period can be set
            meta["deletionTimestamp"] = timestamp(deadline)
            meta["deletionGracePeriodSeconds"] = grace
            if meta.get("generation"):
                meta["generation"] += 1
            return self._commit("MODIFIED", rt.key, new, current)
        if finalizers:
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = timestamp()
                if meta.get("generation"):
                    meta["generation"] += 1
            meta["deletionGracePeriodSeconds"] = 0
            if new == current:
                return clone(current)
            return self._commit("MODIFIED", rt.key, new, current)
        return self._commit("DELETED", rt.key, new, current)


def _spec_of(obj: Obj) -> Obj:
    """What bumps metadata.generation: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _comparable(obj: Obj) -> Obj:
    """The object without what a no-op write may differ in (a shallow view: only compared)."""
    meta = {k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "managedFields")}
    return {**obj, "metadata": meta}


def _graceful_pending(key: Key, obj: Obj) -> bool:
    """A pod whose grace period runs stays until the kubelet confirms its containers stopped."""
    return key == ("", "pods") and bool(obj["metadata"].get("deletionGracePeriodSeconds"))


def _has_dependents(store: Store, owner: Obj) -> bool:
    uid = owner["metadata"]["uid"]
    return any(
        ref.get("uid") == uid
        for bucket in store.objects.values()
        for o in bucket.values()
        for ref in o["metadata"].get("ownerReferences") or []
    )
