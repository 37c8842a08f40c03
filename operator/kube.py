"""The operator's side effects: observe a FineTuneJob's world through the Kubernetes API and S3,
and carry out a Decision. Everything that decides lives in `decide`; this module only reads
and writes, so that a pass is `observe -> decide -> act`.

Secrets are read through the API by name (never listed); their values are used to build an S3
client and are never logged, put in status or events, or kept anywhere but that client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from kubetune import storage
from kubetune.api.layout import (
    CHECKPOINT_KEYS_PREFIX,
    DATASET_MANIFEST,
    OWNER_FILE,
    PROGRESS_FILE,
    complete_checkpoint_names,
    step_of_checkpoint_uri,
)
from kubetune.api.load import SpecError, parse_spec
from kubetune.api.models import GROUP, KIND, PLURAL, VERSION, FineTuneJobSpec

from . import builders as b
from .decide import Decision, Observed
from .objects import KUEUE_JOB_UID_LABEL, component, job_finished, new_attempt_due, now_utc, queued

log = logging.getLogger("kubetune.operator")

KUEUE_WORKLOADS = "/apis/kueue.x-k8s.io/v1beta1/namespaces/{namespace}/workloads"


class SecretForbidden(Exception):
    """The API answered 403 to reading a Secret: the operator's RBAC, not the Secret, is missing."""


# Answers to a write that the same write cannot get past, however often it is retried: the object
# itself is invalid (422) or malformed (400). Everything else (409, 429, 5xx, timeouts) may heal.
PERMANENT_STATUSES = (400, 422)


class ChildRejected(Exception):
    """The API server refused a child object the operator built from the spec (HTTP 400/422):
    the spec passed the CRD's checks but the object it makes does not pass the Job's (or
    Service's). Retrying cannot help; `detail` names the fields from the Status's causes."""

    def __init__(self, kind: str, name: str, status: int, detail: str) -> None:
        super().__init__(f"the API server rejected {kind} {name} (HTTP {status}): {detail}")
        self.kind, self.name, self.status, self.detail = kind, name, status, detail


def api_error_detail(error: Exception) -> str:
    """What an API error says, from its Status body: each `details.causes[]` as `field: message`,
    else the Status's message; the HTTP status and reason when there is no body."""
    status = getattr(error, "status", None)
    body = getattr(error, "body", None)
    try:
        parsed = json.loads(body) if body else None
    except (TypeError, ValueError):
        parsed = None
    if isinstance(parsed, dict):
        causes = (parsed.get("details") or {}).get("causes") or []
        lines = [
            f"{c.get('field')}: {c.get('message', '')}".strip() if c.get("field") else str(c.get("message", ""))
            for c in causes
            if isinstance(c, dict)
        ]
        lines = [line for line in lines if line]
        if lines:
            return "; ".join(dict.fromkeys(lines))[:1000]
        if parsed.get("message"):
            return str(parsed["message"])[:1000]
    if status:
        return f"HTTP {status} {getattr(error, 'reason', '') or ''}".strip()
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# S3 clients kept, one per (endpoint, region, credentials), least recently used dropped: jobs
# with distinct endpoints or rotated keys must not grow the operator without bound.
S3_CLIENTS_CACHED = 16
SECRET_TTL_SECONDS = 30.0


def normalize_endpoint(endpoint: str) -> str:
    """An S3 endpoint URL as compared with the allowlist: scheme and host lowercased, default port
    and trailing slash dropped."""
    parts = urlsplit(endpoint.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


@dataclass(frozen=True)
class StorageAccess:
    """How the operator may read a job's storage (progress.json, the dataset manifest, the
    checkpoint list). `mode`: "secret" (the job's own credentials Secret, or the chart's default
    one), "own" (the operator's identity), "none" (it reads nothing; `why` says why) or "refused"
    (the endpoint is not allowed; the job fails)."""

    mode: str
    why: str = ""


def storage_access(
    user_endpoint: str,
    secret_named: bool,
    credentials: tuple[str, str] | None,
    own_identity: bool,
    allowed_endpoints: tuple[str, ...],
) -> StorageAccess:
    """Whose identity the operator reads a job's storage with. A FineTuneJob chooses
    `spec.storage.endpoint`: were the operator to sign requests there with its own identity, any
    job could make it send them to any host, or read any bucket its role can. So it reads with
    the job's credentials Secret (`spec.storage.credentialsSecretRef` or the chart's default), at
    an endpoint the allowlist admits (empty: any); with its own identity only when the job names no
    endpoint (AWS, or the chart's own endpoint) and `own_identity` (chart value) allows it; and
    otherwise not at all."""
    if user_endpoint and allowed_endpoints:
        allowed = {normalize_endpoint(e) for e in allowed_endpoints}
        if normalize_endpoint(user_endpoint) not in allowed:
            return StorageAccess(
                "refused",
                f"spec.storage.endpoint {user_endpoint} is not an endpoint this operator allows "
                f"(--allowed-storage-endpoint: {', '.join(sorted(allowed_endpoints))})",
            )
    if credentials is not None:
        return StorageAccess("secret")
    if secret_named:
        return StorageAccess("none", "its credentials Secret is missing or incomplete")
    if user_endpoint:
        return StorageAccess(
            "none",
            "the job names a storage endpoint but no spec.storage.credentialsSecretRef, and the operator "
            "never signs requests with its own identity at an endpoint a job chose",
        )
    if not own_identity:
        return StorageAccess(
            "none",
            "the job names no spec.storage.credentialsSecretRef and the operator may not read storage with "
            "its own identity (chart value operator.storageOwnIdentity)",
        )
    return StorageAccess("own")  # how stale a Secret's values may be (a rotated S3 key is used within this)


def load_kube_config(connections: int = 40) -> Any:
    """In-cluster config inside a pod, else $KUBECONFIG / ~/.kube/config; `connections` kept
    open to the API server (one per reconcile worker, and then some)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = connections
    hook = configuration.refresh_api_key_hook
    if hook is not None:  # it re-reads the whole config, proxies from the environment included, per request
        configuration.refresh_api_key_hook = _at_most_every(10.0, hook)
    return client.ApiClient(configuration)


def _at_most_every(seconds: float, hook: Any) -> Any:
    """The client's token refresh hook, run at most every `seconds` (tokens live for minutes). The
    kubeconfig loader's hook installs itself again when it runs: it is wrapped again each time."""
    lock = threading.Lock()
    state = {"hook": hook, "last": -seconds}

    def throttled(configuration: Any) -> None:
        with lock:
            if time.monotonic() - state["last"] < seconds:
                return
            state["last"] = time.monotonic()
            state["hook"](configuration)
            if configuration.refresh_api_key_hook is not throttled:
                state["hook"] = configuration.refresh_api_key_hook
                configuration.refresh_api_key_hook = throttled

    return throttled


@dataclass
class Kube:
    """The few API calls the operator makes, on one thread-safe ApiClient."""

    api_client: Any
    images: b.Images = field(default_factory=b.Images)
    default_endpoint: str = ""
    default_region: str = ""
    default_staging_size: str = ""  # spec.trainer.stagingSize for jobs that set none (chart: trainer.stagingSize)
    default_credentials_secret: str = ""  # Secret (in the job's namespace) for jobs that name none
    # chart value jobDefaults: (component, pod-template overlay) pairs
    default_pod_templates: tuple[tuple[str, dict[str, Any]], ...] = ()
    allowed_storage_endpoints: tuple[str, ...] = ()  # empty: any endpoint, with the job's own Secret
    storage_own_identity: bool = False  # read storage with the operator's identity when a job names no Secret
    s3_connections: int = 32  # per S3 client: one per reconcile worker
    _clients: dict[str, Any] = field(default_factory=dict)
    _secrets: dict[tuple[str, str], tuple[float, dict[str, str]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- the API ---------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        missing_ok: bool = False,
    ) -> Any:
        """One API call with the client's configuration (server, TLS, token refresh), its JSON
        answer parsed; None for a 404 when missing_ok. The generated typed methods were skipped
        on purpose: they turn every dict body into models and back (a Job's create cost twice
        the CPU of the request itself), and the operator deals in dicts anyway."""
        api = self.api_client
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        serialized = api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = api.call_api(*serialized, _request_timeout=60)
        data = response.read()  # read to the end: the connection goes back to the pool
        if missing_ok and response.status == 404:
            return None
        if not 200 <= response.status <= 299:
            raise _api_exception().from_response(http_resp=response, body=data.decode(errors="replace"), data=None)
        return json.loads(data) if data else None

    # -- reads ---------------------------------------------------------------------------------

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}", missing_ok=True)  # type: ignore[no-any-return]

    def children(self, namespace: str, name: str, uid: str, kind: str) -> list[dict[str, Any]]:
        """Jobs or pods of this FineTuneJob (by label, then by owner uid for Jobs: a FineTuneJob
        recreated under the same name must not adopt its predecessor's children)."""
        path = (
            f"/apis/batch/v1/namespaces/{namespace}/jobs" if kind == "Job" else f"/api/v1/namespaces/{namespace}/pods"
        )
        objects: list[dict[str, Any]] = self.request(
            "GET", path, query={"labelSelector": f"{b.LABEL_JOB}={b.base_name(name)}"}
        )["items"]
        if kind == "Job":
            objects = [
                o for o in objects if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])
            ]
        return objects

    def workloads(self, namespace: str, job_uids: list[str]) -> list[dict[str, Any]]:
        """Kueue's Workloads of these Jobs, by the job-uid label Kueue puts on them; none where
        Kueue is not installed (its API answers 404)."""
        selector = f"{KUEUE_JOB_UID_LABEL} in ({','.join(sorted(job_uids))})"
        found = self.request(
            "GET", KUEUE_WORKLOADS.format(namespace=namespace), query={"labelSelector": selector}, missing_ok=True
        )
        return list((found or {}).get("items") or [])

    def service_exists(self, namespace: str, name: str) -> bool:
        path = f"/api/v1/namespaces/{namespace}/services/{b.trainer_service_name(name)}"
        return self.request("GET", path, missing_ok=True) is not None

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data (base64 values), or None when it does not exist. A Secret found is
        remembered for SECRET_TTL_SECONDS: hundreds of jobs usually share one S3 Secret, and
        reading it on every pass of each doubled the API requests of a new job (the operator
        may get Secrets, not watch them). A missing one is asked for again on every pass. Raises
        SecretForbidden on a 403 (a permission problem, not a missing Secret)."""
        key = (namespace, name)
        with self._lock:
            cached = self._secrets.get(key)
        if cached is not None and time.monotonic() - cached[0] < SECRET_TTL_SECONDS:
            return cached[1]
        try:
            secret = self.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}", missing_ok=True)
        except _api_exception() as error:
            if error.status != 403:
                raise
            with self._lock:
                self._secrets.pop(key, None)
            raise SecretForbidden(f"HTTP 403 reading Secret {namespace}/{name}") from None
        if secret is None:
            with self._lock:
                self._secrets.pop(key, None)
            return None
        data = {
            **(secret.get("data") or {}),
            **{k: base64.b64encode(v.encode()).decode() for k, v in (secret.get("stringData") or {}).items()},
        }
        with self._lock:
            self._secrets[key] = (time.monotonic(), data)
        return data

    def effective_spec(self, spec: FineTuneJobSpec) -> FineTuneJobSpec:
        """The spec with the operator's cluster-wide S3 defaults, trainer staging size and job pod
        templates (chart values) filled in (builders.effective_spec; `kubetune render` applies the same)."""
        return b.effective_spec(spec, self.spec_defaults)

    @property
    def spec_defaults(self) -> b.SpecDefaults:
        return b.SpecDefaults(
            endpoint=self.default_endpoint,
            region=self.default_region,
            credentials_secret=self.default_credentials_secret,
            staging_size=self.default_staging_size,
            pod_templates=dict(self.default_pod_templates),
        )

    def store(self, spec: FineTuneJobSpec, secrets: dict[str, dict[str, str] | None]) -> storage.Store:
        """The job's storage with the credentials of spec.storage.credentialsSecretRef (or the
        operator's own identity). Clients are cached per endpoint and credentials: making one
        costs tens of milliseconds and megabytes."""
        endpoint = spec.storage.endpoint or None
        region = spec.storage.region or None
        credentials = storage_credentials(spec, secrets)
        key = hashlib.sha256(json.dumps([endpoint, region, credentials]).encode()).hexdigest()
        with self._lock:
            client = self._clients.pop(key, None)
            if client is None:
                client = s3_client(endpoint, region, credentials, self.s3_connections)
            self._clients[key] = client  # newest last: the least recently used goes first
            while len(self._clients) > S3_CLIENTS_CACHED:
                self._clients.pop(next(iter(self._clients))).close()
        return storage.Store(spec.storage.uri, endpoint, region, client)

    # -- writes --------------------------------------------------------------------------------

    def create(self, namespace: str, obj: dict[str, Any]) -> bool:
        """Create a child; False when it already exists (another pass or operator made it)."""
        paths = {
            "Job": f"/apis/batch/v1/namespaces/{namespace}/jobs",
            "Service": f"/api/v1/namespaces/{namespace}/services",
        }
        if obj["kind"] not in paths:
            raise ValueError(f"cannot create a {obj['kind']}")
        try:
            self.request("POST", paths[obj["kind"]], obj)
        except _api_exception() as error:
            if error.status == 409:
                return False
            raise
        return True

    def patch_job(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self.request(
            "PATCH",
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            body,
            content_type="application/strategic-merge-patch+json",
        )

    def patch_workload(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self.request(
            "PATCH",
            f"{KUEUE_WORKLOADS.format(namespace=namespace)}/{name}",
            body,
            content_type="application/merge-patch+json",
        )

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and (in the background) its pods: a Job's own default would orphan them."""
        self.request(
            "DELETE",
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            query={"propagationPolicy": "Background"},
            missing_ok=True,
        )

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )

    def post_event(self, ftj: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = ftj["metadata"]
        now = now_utc().isoformat().replace("+00:00", "Z")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
            },
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": b.MANAGED_BY},
            "reportingComponent": b.MANAGED_BY,
            "reportingInstance": os.environ.get("HOSTNAME", "kubetune-operator"),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except Exception as error:  # an event lost is not worth failing the pass for
            log.warning("cannot post event %s: %s", reason, _short(error))


def storage_credentials(spec: FineTuneJobSpec, secrets: dict[str, dict[str, str] | None]) -> tuple[str, str] | None:
    """The S3 key pair of the (effective) spec's credentials Secret; None when it names none, or
    the Secret or one of its keys is missing."""
    ref = spec.storage.credentials_secret_ref
    data = secrets.get(ref.name) if ref else None
    if data and "AWS_ACCESS_KEY_ID" in data and "AWS_SECRET_ACCESS_KEY" in data:
        return (
            base64.b64decode(data["AWS_ACCESS_KEY_ID"]).decode(),
            base64.b64decode(data["AWS_SECRET_ACCESS_KEY"]).decode(),
        )
    return None


def s3_client(endpoint: str | None, region: str | None, credentials: tuple[str, str] | None, connections: int) -> Any:
    """kubetune.storage's client, with the job's Secret's credentials when it has one."""
    return storage.s3_client(endpoint, region, max_pool_connections=connections, credentials=credentials)


def _api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    return ApiException


def _short(error: Exception) -> str:
    status = getattr(error, "status", None)
    detail = api_error_detail(error)
    return f"HTTP {status}: {detail}" if status and not detail.startswith("HTTP") else detail


# -- observe and act ---------------------------------------------------------------------------


def observe(kube: Kube, ftj: dict[str, Any], extra_pods: list[dict[str, Any]], now: datetime | None = None) -> Observed:
    """Everything decide() needs, read fresh: children, Secrets (presence and keys), the
    dataset manifest and progress.json."""
    meta = ftj["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta.get("uid", "")
    status = ftj.get("status") or {}
    observed = Observed(
        name=name,
        namespace=namespace,
        uid=uid,
        generation=meta.get("generation"),
        spec=None,
        status=status,
        now=now or now_utc(),
        images=kube.images,
    )
    try:
        user_spec = parse_spec(ftj.get("spec"))
        spec = observed.spec = kube.effective_spec(user_spec)
    except SpecError as error:
        observed.spec_error = str(error)
        return observed
    if status:
        # A FineTuneJob that no pass has written status to has no children yet: a pass creates
        # them and writes status together. (Should an operator stop between the two, the create
        # answers "already exists" and the next pass, status written, lists them.)
        observed.jobs = {j["metadata"]["name"]: j for j in kube.children(namespace, name, uid, "Job")}
    waiting_for_kueue = [j["metadata"]["uid"] for j in observed.jobs.values() if queued(j) and not job_finished(j)]
    if waiting_for_kueue and status.get("phase") != "Succeeded":  # a failed job's are deactivated
        observed.workloads = kube.workloads(namespace, waiting_for_kueue)
    if status.get("phase") in ("Succeeded", "Failed"):
        return observed  # nothing else matters once finished
    pods = kube.children(namespace, name, uid, "Pod") if pods_needed(status, observed.jobs) else []
    seen = {p["metadata"].get("uid") for p in pods}
    observed.pods = pods + [p for p in extra_pods if p["metadata"].get("uid") not in seen]
    wanted = {ref.name for component in (b.COLLECTOR, b.TRAINER) for _, ref in b.secret_ref_paths(spec, component)}
    secret_values: dict[str, dict[str, str] | None] = {}
    for secret in sorted(wanted):
        try:
            secret_values[secret] = kube.secret_data(namespace, secret)
        except SecretForbidden:
            secret_values[secret] = None
            observed.forbidden_secrets.add(secret)
    observed.secrets = {secret: (set(data) if data is not None else None) for secret, data in secret_values.items()}
    training_started = bool(status.get("attempts"))
    if training_started or b.trainer_job_name(name, 0) in observed.jobs:
        observed.service_exists = kube.service_exists(namespace, name)
    access = storage_access(
        user_spec.storage.endpoint,
        spec.storage.credentials_secret_ref is not None,
        storage_credentials(spec, secret_values),
        kube.storage_own_identity,
        kube.allowed_storage_endpoints,
    )
    if access.mode == "refused":
        observed.storage_refused = access.why
        return observed
    if access.mode == "none":
        observed.storage_unreadable = access.why
        return observed
    store = kube.store(spec, secret_values)
    collector = observed.jobs.get(b.collector_job_name(name))
    collecting = collector is not None and not job_finished(collector)
    try:
        # While the collector runs, its manifest is not final: no S3 read on every pass (with
        # hundreds of jobs collecting, the periodic resync would otherwise read them all).
        if not spec.dataset.imagefolder and not training_started and not collecting:
            observed.dataset_manifest = _read_json(store, DATASET_MANIFEST)
        if training_started or spec.dataset.imagefolder or observed.dataset_manifest:
            observed.progress = _read_json(store, PROGRESS_FILE)
        if new_attempt_due(status):
            observed.latest_checkpoint = latest_complete_checkpoint(store)
        if not observed.jobs or new_attempt_due(status):  # before the operator makes pods
            observed.storage_owner = _read_json(store, OWNER_FILE)
    except storage.StorageError as error:
        observed.storage_error = str(error)
    return observed


def pods_needed(status: dict[str, Any], jobs: dict[str, dict[str, Any]]) -> bool:
    """decide() reads pods for a finished Job (its pods' termination messages) and once training
    started (preemptions, a previous attempt's pods still running); a collector that is still
    running needs none (a label-selected list makes the API server filter every pod of the namespace:
    the costliest read of a pass)."""
    return bool(status.get("attempts")) or any(
        job_finished(job) or component(job) == b.TRAINER for job in jobs.values()
    )


def latest_complete_checkpoint(store: storage.Store) -> str:
    """The newest complete checkpoint (`checkpoint-N/`, or `checkpoints/step-N/` of the earlier
    layout, with its manifest written last), as the trainer's `--resume_from_checkpoint latest`
    finds it; "" when there is none. Lists only the keys under `checkpoint*`, once per new attempt."""
    names = complete_checkpoint_names(store.keys_starting_with(CHECKPOINT_KEYS_PREFIX))
    return max(names, key=step_of_checkpoint_uri, default="")


def _read_json(store: storage.Store, key: str) -> dict[str, Any] | None:
    try:
        value = store.read_json(key)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # being rewritten by a store that is not atomic: read it next pass
    return value if isinstance(value, dict) else None


def act(kube: Kube, ftj: dict[str, Any], decision: Decision) -> None:
    """Create what is missing, apply patches, write status if it changed, post events."""
    meta = ftj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    for obj in decision.create:
        try:
            created = kube.create(namespace, obj)
        except _api_exception() as error:
            _raise_if_permanent(error, obj["kind"], obj["metadata"]["name"])
            raise
        if created:
            log.info("created %s %s", obj["kind"], obj["metadata"]["name"], extra=_ref(namespace, name))
    for patch in decision.patch:
        try:
            if patch.kind == "Workload":
                kube.patch_workload(namespace, patch.name, patch.body)
            else:
                kube.patch_job(namespace, patch.name, patch.body)
        except _api_exception() as error:
            _raise_if_permanent(error, patch.kind, patch.name)
            raise
    for job_name in decision.delete:
        kube.delete_job(namespace, job_name)
        log.info("deleted Job %s", job_name, extra=_ref(namespace, name))
    old = ftj.get("status") or {}
    if decision.status != old:
        # Merge patch: keys this pass dropped are set to null so that they disappear.
        body = {**{key: None for key in old if key not in decision.status}, **decision.status}
        kube.patch_status(namespace, name, body)
    for event in decision.events:
        kube.post_event(ftj, event.type, event.reason, event.message)
        log.info("%s: %s", event.reason, event.message, extra=_ref(namespace, name))


def _raise_if_permanent(error: Any, kind: str, name: str) -> None:
    if error.status in PERMANENT_STATUSES:
        raise ChildRejected(kind, name, error.status, api_error_detail(error)) from error


def _ref(namespace: str, name: str) -> dict[str, Any]:
    return {"k8s_ref": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "namespace": namespace, "name": name}}
