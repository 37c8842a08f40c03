"""API semantics of the local cluster, each test stating the documented behaviour of a real
Kubernetes API server (https://kubernetes.io/docs/reference/using-api/api-concepts/)."""

from __future__ import annotations

import copy
import json
import threading
from typing import Any

import requests
import yaml

from kubetune.dev.testing import Api, condition, wait_for

FTJ = "/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"


def ftj(name: str, **training: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "dataset": {"urls": {"uri": "s3://kubetune-dev/datasets/shapes.jsonl"}},
            "model": {"base": "s3://kubetune-dev/models/tiny-sd/"},
            "training": {"maxTrainSteps": 10, **training},
            "storage": {"uri": "s3://kubetune-dev/runs/x/"},
        },
    }


def configmap(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}, "data": {"k": "v"}}


def test_discovery_lists_core_named_and_crd_groups(api: Api) -> None:
    """/api and /apis list the served versions; a CRD's group and resource appear once it is
    created (Established) and disappear when it is deleted."""
    assert api.ok(api.get("/api"))["versions"] == ["v1"]
    core = {r["name"]: r for r in api.ok(api.get("/api/v1"))["resources"]}
    assert (
        core["pods"]["namespaced"]
        and "pods/log" in core
        and "pods/status" in core
        and core["namespaces"]["namespaced"] is False
    )
    groups = {g["name"] for g in api.ok(api.get("/apis"))["groups"]}
    assert {"batch", "apiextensions.k8s.io", "kubetune.dev"} <= groups
    ftj_resources = {r["name"]: r for r in api.ok(api.get("/apis/kubetune.dev/v1alpha1"))["resources"]}
    assert ftj_resources["finetunejobs"]["shortNames"] == ["ftj"] and "finetunejobs/status" in ftj_resources
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.test"},
        "spec": {
            "group": "example.test",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }
    created = api.ok(api.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd))
    assert condition(created, "Established")
    assert "example.test" in {g["name"] for g in api.ok(api.get("/apis"))["groups"]}
    assert api.get("/apis/example.test/v1/namespaces/default/widgets").status_code == 200
    api.ok(api.delete("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.test"))
    wait_for(lambda: api.get("/apis/example.test/v1").status_code == 404)


def test_server_sets_metadata_and_generation_moves_on_spec_changes_only(api: Api, k8s_namespace: str) -> None:
    """uid, resourceVersion, creationTimestamp and the namespace (from the URL) are set by the
    server; metadata.generation starts at 1 and increases only when the spec changes."""
    base = FTJ.format(ns=k8s_namespace)
    obj = api.ok(api.post(base, ftj("meta")))
    meta = obj["metadata"]
    assert meta["namespace"] == k8s_namespace and meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1 and int(meta["resourceVersion"]) > 0
    labelled = api.ok(api.patch(f"{base}/meta", {"metadata": {"labels": {"a": "b"}}}))
    assert (
        labelled["metadata"]["generation"] == 1 and labelled["metadata"]["resourceVersion"] != meta["resourceVersion"]
    )
    changed = api.ok(api.patch(f"{base}/meta", {"spec": {"training": {"maxTrainSteps": 20}}}))
    assert changed["metadata"]["generation"] == 2
    again = api.ok(api.patch(f"{base}/meta", {"spec": {"training": {"maxTrainSteps": 20}}}))
    assert again["metadata"]["resourceVersion"] == changed["metadata"]["resourceVersion"]  # a no-op write


def test_generate_name_and_conflicts(api: Api, k8s_namespace: str) -> None:
    """generateName gets a random 5-character suffix; creating an existing name is 409
    AlreadyExists; an update with a stale resourceVersion is 409 Conflict."""
    base = f"/api/v1/namespaces/{k8s_namespace}/configmaps"
    generated = api.ok(api.post(base, {"metadata": {"generateName": "cm-"}, "data": {}}))
    assert generated["metadata"]["name"].startswith("cm-") and len(generated["metadata"]["name"]) == 8
    api.ok(api.post(base, configmap("fixed")))
    duplicate = api.post(base, configmap("fixed"))
    assert duplicate.status_code == 409 and duplicate.json()["reason"] == "AlreadyExists"
    first = api.ok(api.get(f"{base}/fixed"))
    api.ok(api.put(f"{base}/fixed", {**first, "data": {"k": "new"}}))
    stale = api.put(f"{base}/fixed", {**first, "data": {"k": "stale"}})
    assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"
    assert "the object has been modified" in stale.json()["message"]


def test_json_patch_test_op_guards_against_concurrent_changes(api: Api, k8s_namespace: str) -> None:
    """A JSON patch whose `test` op fails is rejected (422) and changes nothing: how kopf adds
    finalizers safely."""
    path = f"/api/v1/namespaces/{k8s_namespace}/configmaps/guarded"
    created = api.ok(api.post(f"/api/v1/namespaces/{k8s_namespace}/configmaps", configmap("guarded")))
    rv = created["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.test/x"]},
    ]
    assert api.ok(api.patch(path, ops, "json"))["metadata"]["finalizers"] == ["example.test/x"]
    rejected = api.patch(
        path,
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "replace", "path": "/data/k", "value": "lost"},
        ],
        "json",
    )
    assert rejected.status_code == 422
    assert api.ok(api.get(path))["data"]["k"] == "v"
    api.ok(api.patch(path, {"metadata": {"finalizers": None}}))  # merge patch: null deletes a key


def test_strategic_merge_patch_merges_lists_by_key(api: Api, k8s_namespace: str) -> None:
    """Strategic merge patch merges containers and env by name and honours `$patch: delete`;
    custom resources do not support it (415)."""
    base = f"/apis/apps/v1/namespaces/{k8s_namespace}/deployments"
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "containers": [
                        {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
                        {"name": "b", "image": "b:1"},
                    ]
                },
            },
        },
    }
    api.ok(api.post(base, deployment))
    patched = api.ok(
        api.patch(
            f"{base}/web",
            {
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {"name": "a", "env": [{"name": "Y", "value": "2"}]},
                                {"name": "b", "$patch": "delete"},
                            ]
                        }
                    }
                }
            },
            "strategic",
        )
    )
    containers = patched["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["a"] and containers[0]["image"] == "a:1"
    assert containers[0]["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    api.ok(api.post(FTJ.format(ns=k8s_namespace), ftj("smp")))
    assert (
        api.patch(f"{FTJ.format(ns=k8s_namespace)}/smp", {"metadata": {"labels": {"a": "b"}}}, "strategic").status_code
        == 415
    )


def test_status_subresource_isolation(api: Api, k8s_namespace: str) -> None:
    """With a status subresource, the main endpoint ignores status changes and /status ignores
    everything but status (and neither bumps generation for a status change)."""
    base = FTJ.format(ns=k8s_namespace)
    created = api.ok(api.post(base, {**ftj("iso"), "status": {"phase": "Succeeded"}}))
    assert "phase" not in (created.get("status") or {})
    with_status = api.ok(
        api.patch(f"{base}/iso/status", {"status": {"phase": "Training"}, "spec": {"training": {"maxTrainSteps": 99}}})
    )
    assert with_status["status"]["phase"] == "Training" and with_status["spec"]["training"]["maxTrainSteps"] == 10
    assert with_status["metadata"]["generation"] == 1
    main = api.ok(api.patch(f"{base}/iso", {"status": {"phase": "Failed"}}))
    assert main["status"]["phase"] == "Training"


def test_crd_schema_validation_defaults_and_pruning(api: Api, k8s_namespace: str) -> None:
    """Custom resources are validated against the CRD's OpenAPI schema and CEL rules: 422 Invalid
    with the field path in the causes; defaults are filled in; unknown fields are pruned (and
    rejected with fieldValidation=Strict, as kubectl sends)."""
    base = FTJ.format(ns=k8s_namespace)
    bad = api.post(base, ftj("bad", resolution=500))
    assert bad.status_code == 422 and bad.json()["reason"] == "Invalid"
    assert [c["field"] for c in bad.json()["details"]["causes"]] == ["spec.training.resolution"]
    assert bad.json()["message"].startswith('FineTuneJob.kubetune.dev "bad" is invalid: spec.training.resolution')
    no_source = ftj("nosource")
    no_source["spec"]["dataset"] = {}
    rejected = api.post(base, no_source)
    assert rejected.status_code == 422 and "spec.dataset" in rejected.text
    extra = ftj("extra")
    extra["spec"]["training"]["notAField"] = 1
    created = api.ok(api.post(base, extra))
    assert "notAField" not in created["spec"]["training"]
    assert created["spec"]["training"]["method"] == "full"  # a schema default
    extra["metadata"]["name"] = "strict"
    strict = api.post(base + "?fieldValidation=Strict", extra)
    assert strict.status_code == 400 and 'unknown field "spec.training.notAField"' in strict.json()["message"]


def test_crd_pod_template_rejections_name_the_field(api: Api, k8s_namespace: str) -> None:
    """spec.trainer.podTemplate carries the Kubernetes schema: a bad env name, a bad quantity and a
    duplicate env entry (x-kubernetes-list-type map) are refused as a real API server does."""
    base = FTJ.format(ns=k8s_namespace)
    cases = [
        ({"containers": [{"name": "trainer", "env": [{"name": "NO PROXY"}]}]}, "containers[0].env[0].name"),
        ({"volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "lots"}}]}, "volumes[0].emptyDir.sizeLimit"),
        ({"containers": [{"name": "trainer", "env": [{"name": "A"}, {"name": "A"}]}]}, "containers[0].env[1]"),
    ]
    for index, (pod_spec, field) in enumerate(cases):
        job = ftj(f"pod-{index}")
        job["spec"]["trainer"] = {"podTemplate": {"spec": pod_spec}}
        bad = api.post(base, job)
        assert bad.status_code == 422, bad.text
        causes = [c["field"] for c in bad.json()["details"]["causes"]]
        assert causes == [f"spec.trainer.podTemplate.spec.{field}"], causes
    good = ftj("pod-ok")
    good["spec"]["trainer"] = {"podTemplate": {"spec": {"volumes": [{"name": "s", "emptyDir": {"sizeLimit": 10}}]}}}
    created = api.ok(api.post(base, good))
    assert created["spec"]["trainer"]["podTemplate"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] == 10


def test_label_and_field_selectors(api: Api, k8s_namespace: str) -> None:
    """labelSelector supports =, !=, in, notin, exists and !exists; fieldSelector supports
    metadata.name and each kind's own fields, and rejects others with 400."""
    base = f"/api/v1/namespaces/{k8s_namespace}/configmaps"
    for name, labels in (("one", {"tier": "a", "x": "1"}), ("two", {"tier": "b"}), ("three", {"tier": "c"})):
        api.ok(api.post(base, configmap(name, labels=labels)))

    def names(query: str) -> list[str]:
        return sorted(i["metadata"]["name"] for i in api.ok(api.get(f"{base}?{query}"))["items"])

    assert names("labelSelector=tier%3Da") == ["one"]
    assert names("labelSelector=tier!%3Da") == ["three", "two"]
    assert names("labelSelector=tier+in+(a,c)") == ["one", "three"]
    assert names("labelSelector=tier+notin+(a,c)") == ["two"]
    assert names("labelSelector=x") == ["one"]
    assert names("labelSelector=!x") == ["three", "two"]
    assert names("fieldSelector=metadata.name%3Dtwo") == ["two"]
    assert api.get(f"{base}?fieldSelector=data.k%3Dv").status_code == 400
    pods = api.ok(api.get(f"/api/v1/namespaces/{k8s_namespace}/pods?fieldSelector=status.phase%3DRunning"))
    assert pods["kind"] == "PodList" and pods["items"] == []


def _read_events(response: requests.Response, count: int) -> list[dict[str, Any]]:
    events = []
    for line in response.iter_lines():
        if line:
            events.append(json.loads(line))
            if len(events) == count:
                break
    return events


def test_watch_from_resource_version_with_bookmarks_and_410(local_cluster_factory: Any) -> None:
    """A watch from resourceVersion N streams every later change in order; with
    allowWatchBookmarks the server sends BOOKMARK events; a version older than the compacted
    history gets a 410 Gone (an ERROR event with code 410, reason Expired)."""
    cluster = local_cluster_factory(bookmark_interval=0.3, s3=False, images=False)
    api = Api(cluster.api_url)
    base = "/api/v1/namespaces/default/configmaps"
    start = api.ok(api.post(base, configmap("w1")))["metadata"]["resourceVersion"]
    api.ok(api.patch(f"{base}/w1", {"data": {"k": "2"}}))
    api.ok(api.post(base, configmap("w2")))
    with api.session.get(
        f"{cluster.api_url}{base}?watch=true&allowWatchBookmarks=true&resourceVersion={start}", stream=True, timeout=30
    ) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        events = _read_events(response, 3)
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [
        ("MODIFIED", "w1"),
        ("ADDED", "w2"),
        ("BOOKMARK", None),
    ]
    assert int(events[2]["object"]["metadata"]["resourceVersion"]) >= int(
        events[1]["object"]["metadata"]["resourceVersion"]
    )
    cluster.call(cluster.store.compact)
    with api.session.get(
        f"{cluster.api_url}{base}?watch=true&resourceVersion={start}", stream=True, timeout=30
    ) as response:
        (error,) = _read_events(response, 1)
    assert error["type"] == "ERROR" and error["object"]["code"] == 410 and error["object"]["reason"] == "Expired"


def test_watch_sees_live_changes_filtered_by_selector(api: Api, k8s_namespace: str) -> None:
    """A watch without resourceVersion starts with ADDED for what exists, then streams changes;
    an object leaving the label selection arrives as DELETED."""
    base = f"/api/v1/namespaces/{k8s_namespace}/configmaps"
    api.ok(api.post(base, configmap("seen", labels={"w": "yes"})))
    events: list[dict[str, Any]] = []

    def watch() -> None:
        with requests.get(
            f"{api.base}{base}?watch=1&labelSelector=w%3Dyes&timeoutSeconds=10", stream=True, timeout=30
        ) as response:
            for line in response.iter_lines():
                if line:
                    events.append(json.loads(line))
                if len(events) == 3:
                    return

    thread = threading.Thread(target=watch)
    thread.start()
    wait_for(lambda: events)
    api.ok(api.patch(f"{base}/seen", {"data": {"k": "2"}}))
    api.ok(api.patch(f"{base}/seen", {"metadata": {"labels": {"w": "no"}}}))
    thread.join(15)
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]


def test_finalizers_hold_deletion(api: Api, k8s_namespace: str) -> None:
    """Deleting an object with finalizers only sets deletionTimestamp; no new finalizer may be
    added then; removing the last finalizer deletes it."""
    base = f"/api/v1/namespaces/{k8s_namespace}/configmaps"
    api.ok(api.post(base, configmap("held", finalizers=["example.test/hold"])))
    deleting = api.ok(api.delete(f"{base}/held"))
    assert deleting["metadata"]["deletionTimestamp"]
    assert api.ok(api.get(f"{base}/held"))["metadata"]["deletionTimestamp"]
    assert api.patch(f"{base}/held", {"metadata": {"finalizers": ["example.test/hold", "new"]}}).status_code == 422
    api.ok(api.patch(f"{base}/held", {"metadata": {"finalizers": []}}))
    assert api.get(f"{base}/held").status_code == 404


def _owned(name: str, owner: dict[str, Any], block: bool = False) -> dict[str, Any]:
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}
    if block:
        ref["blockOwnerDeletion"] = True
    return configmap(name, ownerReferences=[ref])


def test_garbage_collection_background_foreground_orphan(api: Api, k8s_namespace: str) -> None:
    """Background: the owner goes at once, dependents after. Foreground: the owner stays (with the
    foregroundDeletion finalizer) until blocking dependents are gone. Orphan: dependents stay and
    lose their ownerReference."""
    base = f"/api/v1/namespaces/{k8s_namespace}/configmaps"
    for policy in ("Background", "Foreground", "Orphan"):
        owner = api.ok(api.post(base, configmap(f"owner-{policy.lower()}")))
        api.ok(api.post(base, _owned(f"dep-{policy.lower()}", owner, block=True)))
        api.ok(api.post(base, _owned(f"held-{policy.lower()}", owner, block=True) | {}))
        # A finalizer on one dependent keeps it (and a foreground owner) around until released.
        api.ok(api.patch(f"{base}/held-{policy.lower()}", {"metadata": {"finalizers": ["example.test/hold"]}}))
        response = api.ok(api.delete(f"{base}/owner-{policy.lower()}", {"propagationPolicy": policy}))
        if policy == "Foreground":
            assert "foregroundDeletion" in response["metadata"]["finalizers"]
            wait_for(lambda p=policy: api.get(f"{base}/dep-{p.lower()}").status_code == 404)
            assert api.get(f"{base}/owner-foreground").status_code == 200  # blocked by held-foreground
            api.ok(api.patch(f"{base}/held-foreground", {"metadata": {"finalizers": []}}))
            wait_for(lambda: api.get(f"{base}/owner-foreground").status_code == 404)
        elif policy == "Background":
            assert api.get(f"{base}/owner-background").status_code == 404
            wait_for(lambda: api.get(f"{base}/dep-background").status_code == 404)
            api.ok(api.patch(f"{base}/held-background", {"metadata": {"finalizers": []}}))
        else:
            wait_for(lambda: api.get(f"{base}/owner-orphan").status_code == 404)
            orphan = api.ok(api.get(f"{base}/dep-orphan"))
            assert not orphan["metadata"].get("ownerReferences")
            api.ok(api.patch(f"{base}/held-orphan", {"metadata": {"finalizers": []}}))


def test_events_are_found_by_involved_object(api: Api, k8s_namespace: str) -> None:
    """Events (core/v1) can be listed by involvedObject fields, which `kubectl describe` does."""
    base = f"/api/v1/namespaces/{k8s_namespace}/events"
    event = {
        "metadata": {"name": "e1"},
        "involvedObject": {"kind": "FineTuneJob", "name": "x", "namespace": k8s_namespace, "uid": "u1"},
        "reason": "Started",
        "message": "collector started",
        "type": "Normal",
    }
    api.ok(api.post(base, event))
    api.ok(
        api.post(
            base, {**event, "metadata": {"name": "e2"}, "involvedObject": {**event["involvedObject"], "name": "y"}}
        )
    )
    found = api.ok(api.get(f"{base}?fieldSelector=involvedObject.name%3Dx,involvedObject.kind%3DFineTuneJob"))["items"]
    assert [e["metadata"]["name"] for e in found] == ["e1"]


def test_namespace_lifecycle(api: Api) -> None:
    """Creating in a missing namespace is 404; a deleted namespace is Terminating, refuses new
    objects (403) and is removed once its contents are gone."""
    assert api.post("/api/v1/namespaces/missing-ns/configmaps", configmap("x")).status_code == 404
    api.ok(api.post("/api/v1/namespaces", {"metadata": {"name": "doomed"}}))
    api.ok(api.post("/api/v1/namespaces/doomed/configmaps", configmap("held", finalizers=["example.test/hold"])))
    assert api.ok(api.delete("/api/v1/namespaces/doomed"))["status"]["phase"] == "Terminating"
    forbidden = api.post("/api/v1/namespaces/doomed/configmaps", configmap("late"))
    assert forbidden.status_code == 403 and "being terminated" in forbidden.json()["message"]
    wait_for(lambda: api.ok(api.get("/api/v1/namespaces/doomed/configmaps/held"))["metadata"].get("deletionTimestamp"))
    assert api.get("/api/v1/namespaces/doomed").status_code == 200
    api.ok(api.patch("/api/v1/namespaces/doomed/configmaps/held", {"metadata": {"finalizers": []}}))
    wait_for(lambda: api.get("/api/v1/namespaces/doomed").status_code == 404)


def test_table_output_has_the_crd_printer_columns(api: Api, k8s_namespace: str) -> None:
    """Asked for a meta.k8s.io Table (as kubectl get does), the server prints the CRD's
    additionalPrinterColumns, evaluating their JSONPath; dates become ages."""
    base = FTJ.format(ns=k8s_namespace)
    api.ok(api.post(base, ftj("table")))
    api.ok(
        api.patch(f"{base}/table/status", {"status": {"phase": "Training", "training": {"step": 7, "progress": "70%"}}})
    )
    table = api.ok(api.get(base, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}))
    assert table["kind"] == "Table"
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:4] == ["Name", "Phase", "Progress", "Step"] and names[-1] == "Age"
    row = dict(zip(names, table["rows"][0]["cells"], strict=True))
    assert row["Name"] == "table" and row["Phase"] == "Training" and row["Step"] == 7 and row["Progress"] == "70%"
    assert row["Age"].endswith("s")
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


def test_openapi_v3_documents_field_validation_and_crd_schema(api: Api) -> None:
    """kubectl learns from /openapi/v3 that PATCH takes fieldValidation (server-side validation)
    and finds each CRD's schema there."""
    root = api.ok(api.get("/openapi/v3"))["paths"]
    doc = api.ok(api.get(root["apis/kubetune.dev/v1alpha1"]["serverRelativeURL"]))
    patch = doc["paths"]["/apis/kubetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs/{name}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"]["kind"] == "FineTuneJob"
    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]
    schema = doc["components"]["schemas"]["dev.kubetune.v1alpha1.FineTuneJob"]
    assert "spec" in schema["properties"]
    assert copy.deepcopy(yaml.safe_load(json.dumps(schema)))["type"] == "object"
