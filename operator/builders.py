"""Kubernetes objects for a FineTuneJob, as pure functions: spec in, dicts out.

Nothing here talks to a cluster, so every object the operator creates is unit-tested as data.
Names are deterministic (a restarted operator finds what it created), every child carries an
owner reference (deleting the FineTuneJob deletes it) and the same set of labels.

Secrets never enter an object as a value: keys and S3 credentials reach pods only as
`secretKeyRef` env entries, and the spec in `KUBETUNE_SPEC` holds only the references.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune import __version__
from kubetune.api.contracts import SOURCE_SECRET_ENV
from kubetune.api.layout import (
    EXIT_DIVERGED,
    EXIT_EMPTY_DATASET,
    EXIT_INVALID,
    EXIT_PREEMPTED,
    EXIT_STORAGE_OWNED,
    OWNER_NAME_ENV,
    OWNER_NAMESPACE_ENV,
    OWNER_UID_ENV,
    SPEC_ENV,
    dataset_fingerprint,
)
from kubetune.api.load import SpecError, dump_spec
from kubetune.api.models import (
    API_VERSION,
    KIND,
    CredentialsSecretRef,
    FineTuneJobSpec,
    JobDefaults,
    PodSettings,
    SecretKeyRef,
)
from kubetune.storage import storage_env

# -- labels and annotations --------------------------------------------------------------------

LABEL_JOB = "kubetune.dev/finetunejob"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_ATTEMPT = "kubetune.dev/restart"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ANNOTATION_FINGERPRINT = "kubetune.dev/dataset-fingerprint"
ANNOTATION_TRAINING_HASH = "kubetune.dev/training-hash"
ANNOTATION_PREEMPTED_PODS = "kubetune.dev/preempted-pods"
ANNOTATION_OWNER = "kubetune.dev/finetunejob-name"  # the full name (labels hold at most 63 chars)
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

COLLECTOR = "collector"
TRAINER = "trainer"

# The released images (Dockerfile, Dockerfile.trainer), tagged with this package's version: an operator
# runs the collector and trainer of its own release. One image holds the operator and the collector.
# The chart's values, Chart.yaml's appVersion and the README name the same (tests/test_release.py).
IMAGE_REGISTRY = "ghcr.io/kubetune"
OPERATOR_IMAGE = f"{IMAGE_REGISTRY}/kubetune:{__version__}"
DEFAULT_COLLECTOR_IMAGE = OPERATOR_IMAGE
DEFAULT_TRAINER_IMAGE = f"{IMAGE_REGISTRY}/kubetune-trainer:{__version__}"

# Seconds a trainer pod gets between SIGTERM and SIGKILL: enough to finish the step and write a
# checkpoint (the trainer exits 75 after it). The collector just stops between downloads.
TRAINER_GRACE_SECONDS = 300
COLLECTOR_GRACE_SECONDS = 30

# A collector Job is failed by Kubernetes after this long unless spec.collector (or a shorter
# spec.runPolicy) says otherwise: every download has its own deadline, so a day is generous.
COLLECTOR_DEADLINE_SECONDS = 86_400
# Collector pods decode untrusted images; without a limit one pod could take a node's memory.
# The collector budgets the pixels it decodes at once from the limit it finds in its cgroup.
COLLECTOR_RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}

# A pod hostname is `<job>-<index>` and must be a DNS label (63 chars): keep room for
# `-train-r99-255` after the base name.
MAX_BASE_LENGTH = 40
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Images:
    """The operator's default images, used when a spec leaves `image` empty."""

    collector: str = DEFAULT_COLLECTOR_IMAGE
    trainer: str = DEFAULT_TRAINER_IMAGE


@dataclass(frozen=True)
class SpecDefaults:
    """The operator's cluster-wide settings for what a spec leaves empty (chart values, given to
    the operator as env: `from_env`): S3 endpoint, region and credentials Secret, and the
    trainer's staging size."""

    endpoint: str = ""
    region: str = ""
    credentials_secret: str = ""
    staging_size: str = ""
    # chart value jobDefaults: a pod-template overlay per component (COLLECTOR, TRAINER), applied
    # under each job's own spec.<component>.podTemplate
    pod_templates: Mapping[str, dict[str, Any]] = field(default_factory=dict, hash=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SpecDefaults:
        return cls(
            endpoint=environ.get("KUBETUNE_S3_ENDPOINT", ""),
            region=environ.get("KUBETUNE_S3_REGION", ""),
            credentials_secret=environ.get("KUBETUNE_S3_CREDENTIALS_SECRET", ""),
            staging_size=environ.get("KUBETUNE_TRAINER_STAGING_SIZE", ""),
        )


def pod_template_defaults(job_defaults: JobDefaults) -> dict[str, dict[str, Any]]:
    """SpecDefaults.pod_templates from the operator's --job-defaults (chart value jobDefaults)."""
    return {COLLECTOR: job_defaults.collector, TRAINER: job_defaults.trainer}


def effective_spec(spec: FineTuneJobSpec, defaults: SpecDefaults) -> FineTuneJobSpec:
    """The spec with the operator's defaults filled in where it sets nothing, so that the pods,
    the operator's own reads and KUBETUNE_SPEC all see one configuration."""
    storage_spec = spec.storage
    updates: dict[str, Any] = {}
    if not storage_spec.endpoint and defaults.endpoint:
        updates["endpoint"] = defaults.endpoint
    if not storage_spec.region and defaults.region:
        updates["region"] = defaults.region
    if storage_spec.credentials_secret_ref is None and defaults.credentials_secret:
        updates["credentials_secret_ref"] = CredentialsSecretRef(name=defaults.credentials_secret)
    if not spec.trainer.staging_size and defaults.staging_size:
        trainer = spec.trainer.model_copy(update={"staging_size": defaults.staging_size})
        spec = spec.model_copy(update={"trainer": trainer})
    for component in (COLLECTOR, TRAINER):  # jobDefaults under the job's own overlay
        template = defaults.pod_templates.get(component)
        if template:
            settings = getattr(spec, component)
            merged = merge_overlays(template, settings.pod_template)
            spec = spec.model_copy(update={component: settings.model_copy(update={"pod_template": merged})})
        check_volume_mounts(component, getattr(spec, component).pod_template)
    if not updates:
        return spec
    return spec.model_copy(update={"storage": storage_spec.model_copy(update=updates)})


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob a child belongs to."""

    name: str
    namespace: str
    uid: str


def base_name(name: str) -> str:
    """The prefix of every child's name: the FineTuneJob's name when it is a short DNS label,
    otherwise a shortened form with a hash so that it stays unique and deterministic (FineTuneJob
    names may be 253 characters and contain dots; Service names and hostnames may not)."""
    if len(name) <= MAX_BASE_LENGTH and _DNS_LABEL.match(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = "j" + cleaned
    return f"{cleaned[: MAX_BASE_LENGTH - 9].rstrip('-')}-{digest}"


def collector_job_name(name: str) -> str:
    return f"{base_name(name)}-collect"


def trainer_service_name(name: str) -> str:
    return f"{base_name(name)}-train"


def trainer_job_name(name: str, restart: int) -> str:
    """`<name>-train` for the first trainer Job, `<name>-train-r<N>` after the N-th restart.

    A new name per restart (instead of deleting and recreating `<name>-train`) means no waiting
    for garbage collection before the next attempt, no clash with the old pods' hostnames, and
    the failed attempt's pods and logs stay inspectable until the FineTuneJob is deleted.
    """
    return trainer_service_name(name) + (f"-r{restart}" if restart else "")


def labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": base_name(name),
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB: base_name(name),
    }


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    owner: Owner,
    name: str,
    component: str,
    extra_labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**labels(owner.name, component), **(extra_labels or {})},
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


# -- environment -------------------------------------------------------------------------------


def secret_env(variable: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def dataset_secret_refs(spec: FineTuneJobSpec) -> dict[str, SecretKeyRef]:
    """Env variable -> Secret key the collector needs for the dataset source."""
    source = spec.dataset.source
    variables = SOURCE_SECRET_ENV.get(spec.dataset.source_name, {})
    refs = {variable: getattr(source, field_name) for field_name, variable in variables.items()}
    return {variable: ref for variable, ref in refs.items() if ref is not None}


def storage_secret_refs(spec: FineTuneJobSpec) -> dict[str, SecretKeyRef]:
    creds = spec.storage.credentials_secret_ref
    if creds is None:
        return {}
    return {key: SecretKeyRef(name=creds.name, key=key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


def model_secret_refs(spec: FineTuneJobSpec) -> dict[str, SecretKeyRef]:
    ref = spec.model.token_secret_ref
    refs = {"HF_TOKEN": ref} if ref else {}
    if spec.output and spec.output.hub:  # the push token apart: HF_TOKEN may be a read token for the base model
        refs[HUB_TOKEN_ENV] = spec.output.hub.token_secret_ref
    return refs


HUB_TOKEN_ENV = "KUBETUNE_HUB_TOKEN"  # kubetune.trainer.hub.TOKEN_ENV (the operator does not import the trainer)


def secret_refs(spec: FineTuneJobSpec, component: str) -> dict[str, SecretKeyRef]:
    """Every Secret key a component's pods read, by env variable."""
    own = dataset_secret_refs(spec) if component == COLLECTOR else model_secret_refs(spec)
    return {**own, **storage_secret_refs(spec)}


def secret_ref_paths(spec: FineTuneJobSpec, component: str) -> list[tuple[str, SecretKeyRef]]:
    """(field path, reference) of every Secret key a component needs, for error messages."""
    paths: list[tuple[str, SecretKeyRef]] = []
    if component == COLLECTOR:
        source = spec.dataset.source_name
        for field_name, value in spec.dataset.source:
            if isinstance(value, SecretKeyRef):
                paths.append((f"spec.dataset.{source}.{_camel(field_name)}", value))
    else:
        if spec.model.token_secret_ref:
            paths.append(("spec.model.tokenSecretRef", spec.model.token_secret_ref))
        if spec.output and spec.output.hub:
            paths.append(("spec.output.hub.tokenSecretRef", spec.output.hub.token_secret_ref))
    for ref in storage_secret_refs(spec).values():
        paths.append(("spec.storage.credentialsSecretRef", ref))
    return paths


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


def spec_json(spec: FineTuneJobSpec) -> str:
    """The spec as pods receive it: camelCase JSON, defaults filled in, Secret *references* only.
    Without the pod-template overlays: the pods already are what they say (and an env value such as
    a proxy URL is not repeated)."""
    handed = dump_spec(spec)
    for component in (COLLECTOR, TRAINER):
        handed.get(component, {}).pop("podTemplate", None)
    return json.dumps(handed, sort_keys=True, separators=(",", ":"))


def literal(text: str) -> str:
    """`text` as Kubernetes must receive it in an env value, command or arg to hand it to the
    container unchanged: Kubernetes expands `$(VAR)` there and turns `$$` into `$`, so every `$`
    is doubled. Every value or argument carrying spec-derived text goes through here (a prompt
    with `$$` in KUBETUNE_SPEC would otherwise change the dataset fingerprint the pods compute)."""
    return text.replace("$", "$$")


def env(spec: FineTuneJobSpec, owner: Owner, component: str) -> list[dict[str, Any]]:
    """The container's env; literal values escaped (see `literal`)."""
    entries: list[dict[str, Any]] = [
        {"name": SPEC_ENV, "value": spec_json(spec)},
        # the job's identity: the first pod to write to storage.uri claims it (owner.json)
        {"name": OWNER_NAME_ENV, "value": owner.name},
        {"name": OWNER_NAMESPACE_ENV, "value": owner.namespace},
        {"name": OWNER_UID_ENV, "value": owner.uid},
        # Declared here (the Job controller adds it too) so `$(JOB_COMPLETION_INDEX)` in the
        # command expands from an env entry the pod spec itself defines.
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if component == TRAINER:  # torch's agent must stop its workers within the pod's grace period
        entries.append({"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(TRAINER_GRACE_SECONDS - 30)})
    entries += [{"name": name, "value": value} for name, value in storage_env(spec.storage).items()]
    entries = [{**entry, "value": literal(entry["value"])} if "value" in entry else entry for entry in entries]
    entries += [secret_env(variable, ref) for variable, ref in secret_refs(spec, component).items()]
    return entries


# -- pods and jobs -----------------------------------------------------------------------------

# The images' user (Dockerfile, Dockerfile.trainer): pods meet the "restricted" Pod Security
# Standard, so a namespace that enforces it (the chart's restricted mode) admits them.
POD_USER = 10001
TMP_VOLUME = "tmp"


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": POD_USER,
        "runAsGroup": POD_USER,
        "fsGroup": POD_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


# The trainer's /tmp (checkpoint staging, the model download) when neither spec.trainer.stagingSize
# nor the operator's default (chart value trainer.stagingSize) sets one: two full SD 1.5
# checkpoints being uploaded (about 14 GB each), one being resumed, and the model (about 5 GB).
DEFAULT_STAGING_SIZE = "64Gi"


def tmp_volume(size_limit: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) of a writable /tmp: the root filesystem is read-only, and the images keep
    HOME, TMPDIR and the Hugging Face / model caches under /tmp. `size_limit`: the emptyDir's
    sizeLimit (the kubelet evicts a pod that writes more); empty: none."""
    empty_dir = {"sizeLimit": size_limit} if size_limit else {}
    return {"name": TMP_VOLUME, "emptyDir": empty_dir}, {"name": TMP_VOLUME, "mountPath": "/tmp"}


def pod_failure_policy(container: str) -> dict[str, Any]:
    """Preemption (eviction, node drain, or the program's own "preempted" exit code after it
    saved a checkpoint) is not a failure; invalid input cannot be fixed by a retry, nor can a
    collection that kept nothing (the same search finds the same nothing), nor a training run
    that diverged (NaN/inf: the same settings diverge again)."""

    def exit_codes(*codes: int) -> dict[str, Any]:
        return {"containerName": container, "operator": "In", "values": list(codes)}

    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "Ignore", "onExitCodes": exit_codes(EXIT_PREEMPTED)},
            {"action": "FailJob", "onExitCodes": exit_codes(EXIT_INVALID)},
            {"action": "FailJob", "onExitCodes": exit_codes(EXIT_EMPTY_DATASET)},
            {"action": "FailJob", "onExitCodes": exit_codes(EXIT_DIVERGED)},
            {"action": "FailJob", "onExitCodes": exit_codes(EXIT_STORAGE_OWNED)},
        ]
    }


def collector_resources(settings: PodSettings) -> dict[str, Any]:
    """spec.collector.resources, with COLLECTOR_RESOURCES for what it leaves out: the memory
    request and limit as a pair (so a default can never fall below a request that was given),
    and the CPU request."""
    resources = {kind: dict(values) for kind, values in settings.resources.items()}
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    if "memory" not in requests and "memory" not in limits:
        resources.setdefault("requests", {})["memory"] = COLLECTOR_RESOURCES["requests"]["memory"]
        resources.setdefault("limits", {})["memory"] = COLLECTOR_RESOURCES["limits"]["memory"]
    if "cpu" not in requests and "cpu" not in limits:
        resources.setdefault("requests", {})["cpu"] = COLLECTOR_RESOURCES["requests"]["cpu"]
    return resources


def collector_deadline(spec: FineTuneJobSpec) -> int:
    """activeDeadlineSeconds of the collector Job: spec.collector.activeDeadlineSeconds or the
    default, and never past the whole job's spec.runPolicy.activeDeadlineSeconds."""
    deadline = spec.collector.active_deadline_seconds or COLLECTOR_DEADLINE_SECONDS
    if spec.run_policy.active_deadline_seconds:
        deadline = min(deadline, spec.run_policy.active_deadline_seconds)
    return deadline


def pod_scheduling(settings: PodSettings) -> dict[str, Any]:
    """The pod-level scheduling fields a spec may set directly (spec.<component>.nodeSelector...);
    unset ones are left out."""
    pod: dict[str, Any] = {}
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_defaults=True) for t in settings.tolerations]
    if settings.affinity:
        pod["affinity"] = copy.deepcopy(settings.affinity)
    if settings.priority_class_name:
        pod["priorityClassName"] = settings.priority_class_name
    if settings.service_account_name:
        pod["serviceAccountName"] = settings.service_account_name
    return pod


# -- the pod-template overlay ------------------------------------------------------------------
#
# spec.<component>.podTemplate (over the chart's jobDefaults.<component>) is merged like a strategic
# merge patch: maps key by key, these lists by their merge key, tolerations and envFrom appended,
# every other list and value replaced. The operator's own fields then win (apply_pod_overlay).

OVERLAY_LIST_KEYS = {
    ("spec", "containers"): "name",
    ("spec", "volumes"): "name",
    ("spec", "imagePullSecrets"): "name",
    ("spec", "containers", "env"): "name",
    ("spec", "containers", "volumeMounts"): "mountPath",
}
OVERLAY_APPENDED = {("spec", "tolerations"), ("spec", "containers", "envFrom")}
# restricted Pod Security: what no overlay changes (the schema allows no other value either)
POD_SECURITY_PINNED = {"runAsNonRoot": True}
CONTAINER_SECURITY_PINNED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def merge_overlays(base: Mapping[str, Any], overlay: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """`overlay` strategically merged over `base` (two pod-template overlays); neither is changed."""
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        here = (*path, key)
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[key] = merge_overlays(old, value, here)
        elif isinstance(old, list) and isinstance(value, list) and here in OVERLAY_LIST_KEYS:
            merged[key] = _merge_by_key(old, value, OVERLAY_LIST_KEYS[here], here)
        elif isinstance(old, list) and isinstance(value, list) and here in OVERLAY_APPENDED:
            merged[key] = old + copy.deepcopy(value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_by_key(old: list[Any], new: list[Any], key: str, path: tuple[str, ...]) -> list[Any]:
    merged = list(old)
    index = {item.get(key): i for i, item in enumerate(merged)}
    for item in new:
        if item.get(key) in index:
            merged[index[item.get(key)]] = merge_overlays(merged[index[item.get(key)]], item, path)
        else:
            index[item.get(key)] = len(merged)
            merged.append(copy.deepcopy(item))
    return merged


OPERATOR_VOLUMES = {COLLECTOR: ("tmp",), TRAINER: ("dshm", "tmp")}


def check_volume_mounts(component: str, overlay: Mapping[str, Any]) -> None:
    """Every mount of the overlay (jobDefaults merged in) names a volume the pods will have: caught
    here, the job fails as InvalidSpec naming the mount, instead of the API server refusing the Job."""
    spec = overlay.get("spec") or {}
    volumes = {volume["name"] for volume in spec.get("volumes") or []} | set(OPERATOR_VOLUMES[component])
    for container in spec.get("containers") or []:
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                raise SpecError(
                    f"spec.{component}.podTemplate.spec.containers[name={container['name']}].volumeMounts"
                    f"[mountPath={mount['mountPath']}].name: no volume {mount['name']!r} in the podTemplate, the "
                    f"operator's jobDefaults or the operator's own volumes ({', '.join(OPERATOR_VOLUMES[component])})"
                )


def pod_overlay(settings: PodSettings) -> dict[str, Any]:
    """A component's whole overlay: its podTemplate (jobDefaults already under it, see effective_spec),
    then the fields the spec sets directly (nodeSelector, tolerations, affinity, priorityClassName,
    serviceAccountName), which are the more specific."""
    direct = pod_scheduling(settings)
    return merge_overlays(settings.pod_template, {"spec": direct} if direct else {})


def apply_pod_overlay(template: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """The operator's pod template (`metadata` and `spec`, one container) with `overlay` merged in,
    the operator's own fields winning: its labels and annotations, env entries (by name), volumes
    (by name) and mounts (by mountPath), and the restricted security settings. The overlay cannot
    name command, args, image, resources or ports at all (the schema has no such fields)."""
    result = copy.deepcopy(template)
    meta_overlay, spec_overlay = overlay.get("metadata") or {}, overlay.get("spec") or {}
    pod_meta, pod = result.setdefault("metadata", {}), result["spec"]
    for kind in ("labels", "annotations"):
        if meta_overlay.get(kind):
            pod_meta[kind] = {**meta_overlay[kind], **(pod_meta.get(kind) or {})}
    for key in ("runtimeClassName", "priorityClassName", "serviceAccountName", "affinity"):
        if key in spec_overlay:  # the operator sets none of these itself
            pod[key] = copy.deepcopy(spec_overlay[key])
    if spec_overlay.get("nodeSelector"):
        pod["nodeSelector"] = {**spec_overlay["nodeSelector"], **(pod.get("nodeSelector") or {})}
    if spec_overlay.get("tolerations"):
        pod["tolerations"] = (pod.get("tolerations") or []) + copy.deepcopy(spec_overlay["tolerations"])
    if spec_overlay.get("imagePullSecrets"):
        pod["imagePullSecrets"] = _merge_by_key(
            pod.get("imagePullSecrets") or [], spec_overlay["imagePullSecrets"], "name", ("spec", "imagePullSecrets")
        )
    if spec_overlay.get("securityContext"):
        pod["securityContext"] = {**pod.get("securityContext", {}), **spec_overlay["securityContext"]}
        pod["securityContext"].update(POD_SECURITY_PINNED)
    pod["volumes"] = _own_first(pod.get("volumes") or [], spec_overlay.get("volumes") or [], "name")
    main = pod["containers"][0]
    for container_overlay in spec_overlay.get("containers") or []:
        if container_overlay.get("name") != main["name"]:
            continue  # the schema allows only the main container's name
        main["env"] = _own_first(main.get("env") or [], container_overlay.get("env") or [], "name")
        if container_overlay.get("envFrom"):
            main["envFrom"] = (main.get("envFrom") or []) + copy.deepcopy(container_overlay["envFrom"])
        mounts = _own_first(main.get("volumeMounts") or [], container_overlay.get("volumeMounts") or [], "mountPath")
        if mounts:
            main["volumeMounts"] = mounts
        if container_overlay.get("securityContext"):
            main["securityContext"] = {**main.get("securityContext", {}), **container_overlay["securityContext"]}
            main["securityContext"].update(copy.deepcopy(CONTAINER_SECURITY_PINNED))
    if not pod["volumes"]:
        del pod["volumes"]
    return result


def _own_first(own: list[dict[str, Any]], extra: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The operator's entries, then the overlay's whose `key` the operator does not use itself. The
    operator's env comes first so that the overlay's values may refer to it as $(VAR)."""
    taken = {item[key] for item in own}
    return own + [copy.deepcopy(item) for item in extra if item.get(key) not in taken]


def job(
    owner: Owner,
    name: str,
    component: str,
    *,
    completions: int,
    backoff_limit: int,
    pod_spec: dict[str, Any],
    pod_overlay: Mapping[str, Any],
    suspend: bool,
    queue_name: str,
    annotations: dict[str, str] | None = None,
    extra_labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    job_labels = dict(extra_labels or {})
    if queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = queue_name
    pod_labels = {**labels(owner.name, component), **(extra_labels or {})}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(owner, name, component, job_labels, annotations),
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": backoff_limit,
            "podFailurePolicy": pod_failure_policy(component),
            # Kueue admits a Job by unsuspending it, so with a queue every Job starts suspended.
            "suspend": suspend or bool(queue_name),
            "template": apply_pod_overlay(
                {"metadata": {"labels": pod_labels, "annotations": {ANNOTATION_OWNER: owner.name}}, "spec": pod_spec},
                pod_overlay,
            ),
        },
    }


def container(
    spec: FineTuneJobSpec, owner: Owner, component: str, image: str, command: list[str], resources: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": component,
        "image": image,
        "command": command,
        "env": env(spec, owner, component),
        "resources": resources,
        "securityContext": container_security_context(),
        # A failed pod's last log lines become its termination message, which status shows.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def collector_job(spec: FineTuneJobSpec, owner: Owner, images: Images = Images()) -> dict[str, Any]:
    """`<name>-collect`: an Indexed Job of `collector.shards` pods running `kubetune collect`."""
    settings = spec.collector
    tmp, tmp_mount = tmp_volume()
    pod_spec = {
        "restartPolicy": "Never",  # podFailurePolicy requires it; the Job makes new pods
        "enableServiceLinks": False,  # hundreds of Services would otherwise become env vars
        "automountServiceAccountToken": False,  # pods never call the Kubernetes API
        "terminationGracePeriodSeconds": COLLECTOR_GRACE_SECONDS,
        "securityContext": pod_security_context(),
        "containers": [
            {
                **container(
                    spec,
                    owner,
                    COLLECTOR,
                    settings.image or images.collector,
                    ["kubetune", "collect", "--spec", f"env:{SPEC_ENV}"],
                    collector_resources(settings),
                ),
                "volumeMounts": [tmp_mount],
            },
        ],
        "volumes": [tmp],
    }
    collector = job(
        owner,
        collector_job_name(owner.name),
        COLLECTOR,
        completions=settings.shards,
        backoff_limit=spec.run_policy.backoff_limit,
        pod_spec=pod_spec,
        pod_overlay=pod_overlay(settings),
        suspend=spec.suspend,
        queue_name=spec.run_policy.queue_name,
        annotations={ANNOTATION_FINGERPRINT: dataset_fingerprint(spec.dataset)},
    )
    collector["spec"]["activeDeadlineSeconds"] = collector_deadline(spec)
    return collector


def trainer_service(spec: FineTuneJobSpec, owner: Owner) -> dict[str, Any]:
    """Headless Service `<name>-train`: gives each trainer pod the stable DNS name
    `<job>-<index>.<name>-train`, so rank 0 is reachable before any pod is ready."""
    name = trainer_service_name(owner.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(owner, name, TRAINER),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: base_name(owner.name), LABEL_COMPONENT: TRAINER},
            "ports": [
                {"name": "rendezvous", "port": spec.trainer.port, "targetPort": spec.trainer.port, "protocol": "TCP"}
            ],
        },
    }


def rank0_host(owner_name: str, restart: int) -> str:
    """Rank 0's hostname: an Indexed Job's pod is named by host `<job>-<index>`, and setting
    `subdomain` to the headless Service makes `<job>-0.<service>` resolve."""
    return f"{trainer_job_name(owner_name, restart)}-0.{trainer_service_name(owner_name)}"


def trainer_args() -> list[str]:
    """The trainer's flags after `-m kubetune.trainer`. `latest` resumes from the newest
    complete checkpoint when there is one, so a replaced pod or a new attempt continues."""
    return ["--spec", f"env:{SPEC_ENV}", "--resume_from_checkpoint", "latest"]


def trainer_command(spec: FineTuneJobSpec, owner_name: str, restart: int) -> list[str]:
    """`python -m kubetune.launch` (which forwards SIGTERM to every process and exits 75 when the
    trainers were preempted) around `accelerate launch <flags> -m kubetune.trainer --spec ...`."""
    from kubetune.launch import accelerate_launch_command  # torch-free, owned by the trainer

    rank = "$(JOB_COMPLETION_INDEX)"  # the one `$(...)` meant to be expanded; the rest is literal
    launch = accelerate_launch_command(
        spec.trainer.nodes,
        spec.trainer.gpus_per_node,
        rank,
        rank0_host(owner_name, restart),
        spec.trainer.port,
        trainer_args(),
        mixed_precision=spec.training.mixed_precision,
    )
    return ["python", "-m", "kubetune.launch", *(arg if arg == rank else literal(arg) for arg in launch)]


def trainer_resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    resources = {kind: dict(values) for kind, values in spec.trainer.resources.items()}
    gpus = spec.trainer.gpus_per_node
    if gpus > 0:  # extended resources: the request must equal the limit
        resources.setdefault("limits", {})["nvidia.com/gpu"] = gpus
        resources.setdefault("requests", {})["nvidia.com/gpu"] = gpus
    return resources


def training_hash(spec: FineTuneJobSpec) -> str:
    """Hash of what a running training depends on; a change after training started is reported
    instead of silently mixing two configurations in one run."""
    settings = {
        "model": spec.model.model_dump(mode="json", by_alias=True, exclude_none=True),
        "training": spec.training.model_dump(mode="json", by_alias=True, exclude_none=True),
        "nodes": spec.trainer.nodes,
        "gpusPerNode": spec.trainer.gpus_per_node,
    }
    if spec.trainer.strategy != "auto":  # (absent otherwise: the hashes of jobs made before it are unchanged)
        settings["strategy"] = spec.trainer.strategy
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def trainer_job(spec: FineTuneJobSpec, owner: Owner, restart: int = 0, images: Images = Images()) -> dict[str, Any]:
    """`<name>-train[-rN]`: an Indexed Job of `trainer.nodes` pods, one accelerate launch each.

    Its own backoffLimit is 0: a distributed gang must restart as a whole, which the Job
    controller's per-pod retries cannot do, so the operator owns retries (attempts).
    """
    settings = spec.trainer
    tmp, tmp_mount = tmp_volume(settings.staging_size or DEFAULT_STAGING_SIZE)
    pod_spec = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "subdomain": trainer_service_name(owner.name),
        "terminationGracePeriodSeconds": TRAINER_GRACE_SECONDS,
        "securityContext": pod_security_context(),
        "containers": [
            {
                **container(
                    spec,
                    owner,
                    TRAINER,
                    settings.image or images.trainer,
                    trainer_command(spec, owner.name, restart),
                    trainer_resources(spec),
                ),
                "ports": [{"name": "rendezvous", "containerPort": settings.port, "protocol": "TCP"}],
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, tmp_mount],
            }
        ],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}, tmp],
    }
    return job(
        owner,
        trainer_job_name(owner.name, restart),
        TRAINER,
        completions=settings.nodes,
        backoff_limit=0,
        pod_spec=pod_spec,
        pod_overlay=pod_overlay(settings),
        suspend=spec.suspend,
        queue_name=spec.run_policy.queue_name,
        annotations={ANNOTATION_TRAINING_HASH: training_hash(spec)},
        extra_labels={LABEL_ATTEMPT: str(restart)},
    )
