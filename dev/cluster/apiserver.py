"""The HTTP face of the local cluster: a Kubernetes API on aiohttp.

Why not kmock: kmock 0.8 lacks server metadata, PUT, selectors, watch from a resourceVersion,
Table output, OpenAPI v3 and status isolation, and its internals are not a stable API; adding all
of that around it would leave two state models. A small aiohttp server over our own store
(store.py) implements exactly the documented behaviour and nothing else.

Routes: discovery (/api, /apis, groups), /version, /openapi/v3 (kubectl's server-side field
validation probe), CRUD + watch + deletecollection on every registered resource, the status
subresource, pods/log (with follow) and pods/eviction.

Audit log: with `audit_path` set, every request made with a bearer token other than the cluster
admin's (`ADMIN_TOKEN`, what `kubetune dev up`'s kubeconfig uses; requests without a token are
not recorded either) is appended to that file as one
JSON line with its RBAC attributes (user, verb, apiGroup, resource, subresource, namespace, name,
or nonResourceURL) and response code, as the real server's audit log at level Metadata. The
stand-in authorizes nothing; tests check the recorded attributes against RBAC rules
(kubetune.dev.testing.rbac). The user is the token itself (the stand-in has no authentication).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from aiohttp import web

from kubetune.dev.cluster.errors import ApiError, not_found
from kubetune.dev.cluster.resources import Registry, ResourceType
from kubetune.dev.cluster.selectors import field_selector, label_selector
from kubetune.dev.cluster.status import set_condition
from kubetune.dev.cluster.store import Store, Watcher, WriteOptions
from kubetune.dev.cluster.tables import to_table

if TYPE_CHECKING:
    from kubetune.dev.node.kubelet import Kubelet

Obj = dict[str, Any]
KUBERNETES_VERSION = {
    "major": "1",
    "minor": "37",
    "gitVersion": "v1.37.0-kubetune-dev",
    "gitCommit": "",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.25",
    "compiler": "gc",
    "platform": "linux/amd64",
    "emulationMajor": "1",
    "emulationMinor": "37",
    "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "36",
}
ADMIN_TOKEN = "kubetune-dev"
PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
    "application/apply-patch+cbor": "apply",
}


def _json(body: Any, status: int = 200, warnings: list[str] | None = None) -> web.Response:
    headers = {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)} if warnings else None
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json", headers=headers)


class ApiServer:
    def __init__(
        self, store: Store, registry: Registry, bookmark_interval: float = 30.0, audit_path: Path | None = None
    ) -> None:
        self.store = store
        self.audit_path = audit_path
        self.registry = registry
        self.bookmark_interval = bookmark_interval
        self.kubelet: Kubelet | None = None
        self.server_addresses: list[str] = []
        self.app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._audit, self._errors])
        self.app.router.add_route("*", "/{path:.*}", self._dispatch)

    @web.middleware
    async def _audit(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        user = auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else ""
        if self.audit_path is None or user in ("", ADMIN_TOKEN):
            return await handler(request)
        entry: Obj = {"user": user, **request_attributes(request.method, request.path, request.query)}
        if entry["verb"] == "watch":  # recorded when it starts: a watch may last as long as the client
            self._audit_write({**entry, "code": 200})
            return await handler(request)
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except web.HTTPException as error:
            code = error.status
            raise
        finally:
            self._audit_write({**entry, "code": code})

    def _audit_write(self, entry: Obj) -> None:
        assert self.audit_path is not None
        with open(self.audit_path, "a") as audit:
            audit.write(json.dumps(entry) + "\n")

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as error:
            return _json(error.status(), error.code)
        except web.HTTPException:
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as error:  # a bug in the stand-in: report it like the real server's 500
            import traceback

            traceback.print_exc()
            return _json(ApiError(500, "InternalError", f"an error on the server: {error!r}").status(), 500)

    # -- routing -------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if request.method == "GET":
            static = self._static(parts)
            if static is not None:
                return static
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rt = self.registry.get(group, version, rest[0])
        if rt is None or (namespace is not None and not rt.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        if sub and sub not in rt.subresources and not (rt.plural == "namespaces" and sub == "finalize"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        ns = namespace or ""
        if rt.namespaced and name is not None and namespace is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if name is None:
            return await self._collection(request, rt, namespace)
        return await self._item(request, rt, ns, name, sub)

    def _static(self, parts: list[str]) -> web.Response | None:
        if parts in (["healthz"], ["readyz"], ["livez"]):
            return web.Response(text="ok")
        if parts == ["version"]:
            return _json(KUBERNETES_VERSION)
        if parts == ["api"]:
            return _json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {
                            "clientCIDR": "0.0.0.0/0",
                            "serverAddress": self.server_addresses[0] if self.server_addresses else "",
                        }
                    ],
                }
            )
        if parts == ["api", "v1"]:
            return _json(self._resource_list("", "v1"))
        if parts == ["apis"]:
            return _json(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [self._group(g, v) for g, v in self.registry.groups().items()],
                }
            )
        if len(parts) == 2 and parts[0] == "apis":
            versions = self.registry.groups().get(parts[1])
            if versions is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return _json(self._group(parts[1], versions))
        if len(parts) == 3 and parts[0] == "apis":
            if not self.registry.in_group_version(parts[1], parts[2]):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return _json(self._resource_list(parts[1], parts[2]))
        if parts[:2] == ["openapi", "v3"]:
            return self._openapi_v3(parts[2:])
        if parts[:1] == ["openapi"]:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return None

    def _group(self, group: str, versions: list[str]) -> Obj:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": entries,
            "preferredVersion": entries[0],
        }

    def _resource_list(self, group: str, version: str) -> Obj:
        resources: list[Obj] = []
        for rt in sorted(self.registry.in_group_version(group, version), key=lambda r: r.plural):
            resources.extend(rt.discovery())
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def _openapi_v3(self, rest: list[str]) -> web.Response:
        """kubectl probes these documents to learn that PATCH/POST take `fieldValidation` (so it
        validates server side) and to find CRD schemas (`kubectl explain`)."""
        gvs = [("", "v1")] + [(g, v) for g, versions in self.registry.groups().items() for v in versions]
        if not rest:
            paths = {}
            for group, version in gvs:
                path = f"apis/{group}/{version}" if group else "api/v1"
                digest = (
                    hashlib.sha256(json.dumps(self._openapi_doc(group, version), sort_keys=True).encode())
                    .hexdigest()[:32]
                    .upper()
                )
                paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
            return _json({"paths": paths})
        if rest == ["api", "v1"]:
            return _json(self._openapi_doc("", "v1"))
        if len(rest) == 3 and rest[0] == "apis" and (rest[1], rest[2]) in gvs:
            return _json(self._openapi_doc(rest[1], rest[2]))
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _openapi_doc(self, group: str, version: str) -> Obj:
        paths: dict[str, Obj] = {}
        schemas: dict[str, Obj] = {}
        query = [
            {"name": n, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
            for n in ("dryRun", "fieldManager", "fieldValidation")
        ]
        for rt in self.registry.in_group_version(group, version):
            gvk = {"group": group, "version": version, "kind": rt.kind}
            prefix = f"/apis/{group}/{version}" if group else "/api/v1"
            base = f"{prefix}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{prefix}/{rt.plural}"
            schema_name = (
                ".".join(reversed(group.split("."))) + f".{version}.{rt.kind}"
                if group
                else f"io.k8s.api.core.v1.{rt.kind}"
            )
            ref = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}}}
            operation = {
                "x-kubernetes-group-version-kind": gvk,
                "parameters": query,
                "responses": {"200": {"description": "OK", **ref}},
            }
            paths[base] = {
                "post": {**operation, "x-kubernetes-action": "post"},
                "get": {
                    "x-kubernetes-group-version-kind": gvk,
                    "x-kubernetes-action": "list",
                    "responses": {"200": {"description": "OK"}},
                },
            }
            paths[f"{base}/{{name}}"] = {
                "patch": {**operation, "x-kubernetes-action": "patch"},
                "put": {**operation, "x-kubernetes-action": "put"},
                "get": {
                    "x-kubernetes-group-version-kind": gvk,
                    "x-kubernetes-action": "get",
                    "responses": {"200": {"description": "OK", **ref}},
                },
            }
            if "status" in rt.subresources:
                paths[f"{base}/{{name}}/status"] = {
                    "patch": {**operation, "x-kubernetes-action": "patch"},
                    "put": {**operation, "x-kubernetes-action": "put"},
                }
            if rt.schema is not None:
                schemas[schema_name] = {**rt.schema, "x-kubernetes-group-version-kind": [gvk]}
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION["gitVersion"]},
            "paths": paths,
            "components": {"schemas": schemas},
        }

    # -- collections -------------------------------------------------------------------------------

    async def _collection(self, request: web.Request, rt: ResourceType, namespace: str | None) -> web.StreamResponse:
        query = request.query
        if request.method == "GET":
            predicate = self._predicate(rt, query)
            if query.get("watch") in ("1", "true", "True"):
                return await self._watch(request, rt, namespace, predicate)
            return self._list(request, rt, namespace, predicate)
        if request.method == "POST":
            if rt.namespaced and namespace is None:
                raise ApiError(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            body = await self._body(request)
            result = self.store.create(
                rt,
                namespace or "",
                body,
                dry_run=_dry_run(query),
                field_validation=query.get("fieldValidation", "Warn"),
            )
            return _json(result.obj, 201, result.warnings)
        if request.method == "DELETE":
            predicate = self._predicate(rt, query)
            options = await self._delete_options(request)
            deleted = []
            for obj in self.store.list(rt, namespace, predicate):
                meta = obj["metadata"]
                deleted.append(
                    self.store.delete(rt, meta.get("namespace", ""), meta["name"], options, dry_run=_dry_run(query))
                )
            return _json(
                {
                    "kind": f"{rt.kind}List",
                    "apiVersion": rt.api_version,
                    "metadata": {"resourceVersion": str(self.store.revision)},
                    "items": deleted,
                }
            )
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _predicate(self, rt: ResourceType, query: Any) -> Callable[[Obj], bool]:
        labels = label_selector(query.get("labelSelector"))
        fields = field_selector(query.get("fieldSelector"), rt.key, rt.kind)
        return lambda obj: labels(obj) and fields(obj)

    def _list(
        self, request: web.Request, rt: ResourceType, namespace: str | None, predicate: Callable[[Obj], bool]
    ) -> web.Response:
        items = self.store.list(rt, namespace, predicate)
        revision = str(self.store.revision)
        meta: Obj = {"resourceVersion": revision}
        limit = int(request.query.get("limit") or 0)
        token = request.query.get("continue")
        if token:
            state = json.loads(base64.urlsafe_b64decode(token.encode()))
            items = [
                o for o in items if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > tuple(state["after"])
            ]
            meta["resourceVersion"] = state["rv"]
        if limit and len(items) > limit:
            last = items[limit - 1]["metadata"]
            rest = len(items) - limit
            items = items[:limit]
            meta["continue"] = base64.urlsafe_b64encode(
                json.dumps({"rv": meta["resourceVersion"], "after": [last.get("namespace", ""), last["name"]]}).encode()
            ).decode()
            meta["remainingItemCount"] = rest
        accept = request.headers.get("Accept", "")
        if "as=Table" in accept:
            table = to_table(rt, items, request.query.get("includeObject", "Metadata"), meta["resourceVersion"])
            table["metadata"].update({k: v for k, v in meta.items() if k != "resourceVersion"})
            return _json(table)
        if "as=PartialObjectMetadataList" in accept:
            return _json(
                {
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": meta,
                    "items": [
                        {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}
                        for o in items
                    ],
                }
            )
        return _json({"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": meta, "items": items})

    async def _watch(
        self, request: web.Request, rt: ResourceType, namespace: str | None, predicate: Callable[[Obj], bool]
    ) -> web.StreamResponse:
        query = request.query
        watcher = Watcher(rt.key, namespace if rt.namespaced else None, predicate)
        table = "as=Table" in request.headers.get("Accept", "")
        include_object = query.get("includeObject", "Metadata")
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        send_initial = query.get("sendInitialEvents") == "true"
        version = query.get("resourceVersion") or ""
        timeout = float(query.get("timeoutSeconds") or 0) or None
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})

        def encode(etype: str, obj: Obj) -> bytes:
            if table and etype in ("ADDED", "MODIFIED", "DELETED"):
                obj = to_table(
                    rt, [self.store._as_version(rt, obj)], include_object, obj["metadata"]["resourceVersion"]
                )
            elif etype != "BOOKMARK" and etype != "ERROR":
                obj = {**obj, "apiVersion": rt.api_version}  # as _as_version, without a copy: only serialized
            return (json.dumps({"type": etype, "object": obj}) + "\n").encode()

        def bookmark(extra: Obj | None = None) -> bytes:
            meta: Obj = {"resourceVersion": str(self.store.revision)}
            if extra:
                meta["annotations"] = extra
            return encode("BOOKMARK", {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta})

        self.store.watchers.add(watcher)
        try:
            initial: list[bytes] = []
            if send_initial or version in ("", "0"):
                initial = [encode("ADDED", o) for o in self.store.list(rt, namespace, predicate)]
                if send_initial and bookmarks:
                    initial.append(bookmark({"k8s.io/initial-events-end": "true"}))
            else:
                try:
                    self.store.events_since(int(version), watcher)
                except ValueError:
                    raise ApiError(
                        400, "BadRequest", f'resourceVersion: Invalid value: "{version}": must be an integer'
                    ) from None
                except ApiError as error:
                    await response.prepare(request)
                    await response.write(encode("ERROR", error.status()))
                    return response
            await response.prepare(request)
            for chunk in initial:
                await response.write(chunk)
            deadline = time.monotonic() + timeout if timeout else None
            while True:
                wait = self.bookmark_interval if bookmarks else 3600.0
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        break
                if watcher.queue.empty():
                    try:
                        batch = [await asyncio.wait_for(watcher.queue.get(), wait)]
                    except asyncio.TimeoutError:
                        if bookmarks:
                            await response.write(bookmark())
                        continue
                else:
                    batch = []
                # Everything queued meanwhile goes out in one write: under a burst of changes, one
                # loop turn and one send per event made watchers fall seconds behind.
                while not watcher.queue.empty() and len(batch) < 500:
                    batch.append(watcher.queue.get_nowait())
                await response.write(b"".join(encode(etype, obj) for etype, obj in batch))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.watchers.discard(watcher)
        return response

    # -- items ---------------------------------------------------------------------------------------

    async def _item(
        self, request: web.Request, rt: ResourceType, namespace: str, name: str, sub: str
    ) -> web.StreamResponse:
        query = request.query
        method = request.method
        if sub == "log" and method == "GET":
            return await self._logs(request, namespace, name)
        if sub == "eviction" and method == "POST":
            return await self._evict(request, rt, namespace, name)
        if sub == "finalize" and method == "PUT":
            body = await self._body(request)
            current = self.store.get(rt, namespace, name)
            current["spec"] = body.get("spec", {})
            return _json(self.store.internal_write(rt.key, current))
        if method == "GET":
            obj = self.store.get(rt, namespace, name)
            if "as=Table" in request.headers.get("Accept", ""):
                return _json(
                    to_table(rt, [obj], query.get("includeObject", "Metadata"), obj["metadata"]["resourceVersion"])
                )
            if "as=PartialObjectMetadata" in request.headers.get("Accept", ""):
                return _json(
                    {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}
                )
            return _json(obj)
        validation = query.get("fieldValidation", "Warn")
        if method == "PUT":
            body = await self._body(request)
            result = self.store.update(rt, namespace, name, body, WriteOptions(sub, _dry_run(query), validation))
            return _json(result.obj, 200, result.warnings)
        if method == "PATCH":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            patch_type = PATCH_TYPES.get(content_type)
            if patch_type is None:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types include: "
                    f"{', '.join(PATCH_TYPES)}",
                )
            raw = await request.read()
            try:
                patch = yaml.safe_load(raw) if patch_type == "apply" else json.loads(raw or b"null")
            except (ValueError, yaml.YAMLError) as error:
                raise ApiError(400, "BadRequest", f"error decoding patch: {error}") from None
            options = WriteOptions(sub, _dry_run(query), validation)
            result = self.store.patch(rt, namespace, name, patch_type, patch, options)
            return _json(result.obj, 200, result.warnings)
        if method == "DELETE":
            options = await self._delete_options(request)
            return _json(self.store.delete(rt, namespace, name, options, dry_run=_dry_run(query)))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    async def _evict(self, request: web.Request, rt: ResourceType, namespace: str, name: str) -> web.Response:
        """The Eviction API: mark the pod with the DisruptionTarget condition, then delete it."""
        body = await self._body(request)
        pod = self.store.get(rt, namespace, name)
        if not pod["metadata"].get("deletionTimestamp"):
            set_condition(
                pod.setdefault("status", {}),
                "DisruptionTarget",
                "True",
                "EvictionByEvictionAPI",
                "Eviction API: evicting",
            )
            self.store.internal_write(rt.key, pod)
        self.store.delete(rt, namespace, name, body.get("deleteOptions") or {})
        return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}, 201)

    async def _logs(self, request: web.Request, namespace: str, name: str) -> web.StreamResponse:
        rt = self.registry.get("", "v1", "pods")
        assert rt is not None
        pod = self.store.get(rt, namespace, name)
        containers = [c["name"] for c in pod["spec"].get("initContainers") or []] + [
            c["name"] for c in pod["spec"]["containers"]
        ]
        query = request.query
        container = query.get("container")
        if not container:
            if len(pod["spec"]["containers"]) != 1:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod {name}, choose one of: [{' '.join(containers)}]",
                )
            container = pod["spec"]["containers"][0]["name"]
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        if self.kubelet is None:
            raise not_found("pods", name)
        lines = self.kubelet.log_lines(pod, container, previous=query.get("previous") == "true")
        if lines is None:
            reason = "ContainerCreating"
            raise ApiError(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        timestamps = query.get("timestamps") == "true"
        tail = int(query["tailLines"]) if query.get("tailLines") else None
        since = float(query["sinceSeconds"]) if query.get("sinceSeconds") else None
        limit = int(query["limitBytes"]) if query.get("limitBytes") else None

        def render(batch: list[tuple[str, str]]) -> bytes:
            if since is not None:
                cutoff = time.time() - since
                batch = [(s, line) for s, line in batch if _epoch(s) >= cutoff]
            return "".join(f"{s} {line}" if timestamps else line for s, line in batch).encode()

        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        if query.get("follow") != "true":
            data = render(lines)
            return web.Response(body=data[:limit] if limit else data, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain", "Transfer-Encoding": "chunked"})
        await response.prepare(request)
        seen = len(self.kubelet.log_lines(pod, container) or [])
        sent = 0
        chunk = render(lines)
        try:
            await response.write(chunk)
            sent += len(chunk)
            while not (limit and sent >= limit):
                await asyncio.sleep(0.1)
                current = self.kubelet.log_lines(pod, container) or []
                if len(current) > seen:
                    chunk = render(current[seen:])
                    seen = len(current)
                    await response.write(chunk)
                    sent += len(chunk)
                elif not self.kubelet.container_running(pod["metadata"]["uid"], container):
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    # -- bodies ----------------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return {}
        try:
            if "yaml" in request.headers.get("Content-Type", ""):
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as error:
            raise ApiError(400, "BadRequest", f"the body of the request was in an unknown format: {error}") from None

    async def _delete_options(self, request: web.Request) -> Obj:
        body = await self._body(request)
        options: Obj = dict(body) if isinstance(body, dict) else {}
        query = request.query
        if "gracePeriodSeconds" in query:
            options["gracePeriodSeconds"] = int(query["gracePeriodSeconds"])
        if "propagationPolicy" in query:
            options["propagationPolicy"] = query["propagationPolicy"]
        if "orphanDependents" in query:
            options["orphanDependents"] = query["orphanDependents"] == "true"
        return options


def request_attributes(method: str, path: str, query: Any) -> Obj:
    """A request's RBAC attributes, as the real server's RequestInfoFactory derives them: a GET of one
    object is `get`, of a collection `list` (`watch` with watch=true), POST `create`, PUT `update`,
    PATCH `patch`, DELETE `delete` (`deletecollection` on a collection). Paths outside
    /api/v1/... and /apis/<group>/<version>/... (discovery, /version, /openapi) are non-resource
    URLs with the lowercased method as verb."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"] and len(parts) > 2:
        group, rest = "", parts[2:]
    elif len(parts) > 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return {"verb": method.lower(), "nonResourceURL": path}
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    elif len(rest) == 2 and rest[0] == "namespaces":  # a namespace object is also its own namespace
        namespace = rest[1]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    sub = "/".join(rest[2:])
    watch = query.get("watch") in ("1", "true", "True")
    if method == "GET":
        verb = "watch" if watch else ("get" if name else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())
    return {
        "verb": verb,
        "apiGroup": group,
        "resource": resource,
        "subresource": sub,
        "namespace": namespace,
        "name": name,
    }


def _dry_run(query: Any) -> bool:
    return query.get("dryRun") == "All"


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
