"""`kubetune operator`: run the FineTuneJob operator (kopf) against the current cluster.

kopf watches FineTuneJobs and the Jobs and trainer pods the operator made; its handlers only
queue the owning FineTuneJob, and the controller's workers reconcile it (see controller.py).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

from kubetune.api.load import SpecError, load_job_defaults
from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.cli_util import OneLineArgumentParser, OneLineError

from . import builders as b
from .objects import annotations, meta

log = logging.getLogger("kubetune.operator")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=prog, description="Run the FineTuneJob operator.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; a glob pattern such as 'team-*' also works, "
        "but needs permission to list namespaces)",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    parser.add_argument(
        "--liveness-port", type=_port, default=8080, help="port of /healthz (0 disables it; default 8080)"
    )
    parser.add_argument(
        "--metrics-port", type=_port, default=9090, help="port of Prometheus /metrics (0 disables it; default 9090)"
    )
    parser.add_argument(
        "--collector-image",
        default=os.environ.get("KUBETUNE_COLLECTOR_IMAGE", b.DEFAULT_COLLECTOR_IMAGE),
        help="collector image when a spec sets none (env KUBETUNE_COLLECTOR_IMAGE)",
    )
    parser.add_argument(
        "--trainer-image",
        default=os.environ.get("KUBETUNE_TRAINER_IMAGE", b.DEFAULT_TRAINER_IMAGE),
        help="trainer image when a spec sets none (env KUBETUNE_TRAINER_IMAGE)",
    )
    parser.add_argument(
        "--job-defaults",
        default=os.environ.get("KUBETUNE_JOB_DEFAULTS", ""),
        metavar="FILE",
        help="YAML file of pod-template overlays applied to every job's pods under its own podTemplate: "
        "{collector: ..., trainer: ...} (chart value jobDefaults; env KUBETUNE_JOB_DEFAULTS)",
    )
    parser.add_argument(
        "--workers",
        type=_positive,
        default=32,
        help="concurrent reconcile passes (default 32; each mostly waits on the API server or S3)",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=10.0,
        help="how often unfinished jobs are re-checked: progress, deadlines (default 10)",
    )
    parser.add_argument(
        "--allowed-storage-endpoint",
        action="append",
        default=[e for e in os.environ.get("KUBETUNE_ALLOWED_STORAGE_ENDPOINTS", "").split(",") if e.strip()],
        metavar="URL",
        help="an S3 endpoint a FineTuneJob's spec.storage.endpoint may name (repeatable; env "
        "KUBETUNE_ALLOWED_STORAGE_ENDPOINTS, comma-separated); none given: any, read only with the job's own Secret",
    )
    parser.add_argument(
        "--storage-own-identity",
        action="store_true",
        default=os.environ.get("KUBETUNE_STORAGE_OWN_IDENTITY", "").lower() in ("1", "true", "yes"),
        help="read progress of jobs that name no credentials Secret and no endpoint (AWS) with the operator's "
        "own identity, e.g. IRSA (env KUBETUNE_STORAGE_OWN_IDENTITY)",
    )
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help="run as one of several replicas: only the holder of a coordination.k8s.io Lease reconciles",
    )
    parser.add_argument("--leader-elect-lease", default="kubetune-operator", metavar="NAME", help="the Lease's name")
    parser.add_argument(
        "--leader-elect-namespace",
        default="",
        metavar="NS",
        help="the Lease's namespace (default: POD_NAMESPACE, the pod's own namespace, or the kubeconfig's)",
    )
    parser.add_argument(
        "--leader-elect-lease-seconds",
        type=float,
        default=15.0,
        help="a standby takes over this long after the leader last renewed the Lease (default 15)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logs")
    return parser


def _port(value: str) -> int:
    port = int(value) if value.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535 (got {value!r})")
    return port


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1 (got {value!r})")
    return int(value)


def owner_of_job(body: dict[str, Any]) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "FineTuneJob" and ref.get("apiVersion", "").startswith(GROUP + "/"):
            return str(ref["name"])
    return None


def quiet_handler_successes(record: logging.LogRecord) -> bool:
    """Drop kopf's "Handler '...' succeeded." lines: the handlers only queue work."""
    return not (
        record.levelno <= logging.INFO
        and str(record.msg).startswith("Handler ")
        and str(record.msg).endswith(" succeeded.")
    )


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def is_pattern(namespace: str) -> bool:
    return any(char in namespace for char in "*?[!")


def register(controller: Any, verbose: bool = False, scan_namespaces: bool = False) -> Any:
    """kopf handlers on a registry of their own (importing this module registers nothing)."""
    import kopf

    registry = kopf.OperatorRegistry()
    managed = {b.LABEL_MANAGED_BY: b.MANAGED_BY}
    trainer_pods = {**managed, b.LABEL_COMPONENT: b.TRAINER}

    class NoDiffBase(kopf.DiffBaseStorage):
        """kopf computes a diff base (a deep copy of the body) on every event for on.create/update
        handlers; this operator has only on.event handlers, so there is nothing to keep."""

        def build(self, *, body: Any, extra_fields: Any = None) -> Any:
            return {}

        def fetch(self, *, body: Any) -> Any:
            return None

        def store(self, *, body: Any, patch: Any, essence: Any) -> None:
            pass

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # the operator posts its own Events, with its own reasons
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 60
        # No cluster-wide listing of namespaces and CRDs: the chart's restricted mode does not grant
        # it. Namespaces are then exact names; only glob patterns need the namespace scan.
        settings.scanning.disabled = not scan_namespaces
        settings.persistence.diffbase_storage = NoDiffBase()
        # Filter Jobs and pods on the API server: the handlers' own label filters run only after
        # kopf has received and parsed every Job and pod of the namespace (collector pods included).
        settings.watching.label_selectors["batch", "v1", "jobs"] = _selector(managed)
        settings.watching.label_selectors["", "v1", "pods"] = _selector(trainer_pods)
        controller.start()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:  # a registry of our own has no default login handler
        return (
            kopf.login_via_client(**kwargs)
            or kopf.login_with_service_account(**kwargs)
            or kopf.login_with_kubeconfig(**kwargs)
        )

    @kopf.on.cleanup(registry=registry)
    def stop(**_: Any) -> None:
        controller.stop()

    # The handlers only queue a key (never blocking): async, so that kopf calls them on its event
    # loop instead of handing each watch event to a thread pool and back.
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def finetunejob_event(event: dict[str, Any], **_: Any) -> None:
        body = event.get("object") or {}
        body_meta = meta(body)
        controller.finetunejob_seen(
            body_meta.get("namespace", ""), body_meta.get("name", ""), body, deleted=event.get("type") == "DELETED"
        )

    @kopf.on.event("batch", "v1", "jobs", labels=managed, registry=registry)
    async def job_event(event: dict[str, Any], **_: Any) -> None:
        body = event.get("object") or {}
        owner = owner_of_job(body)
        if owner:
            controller.child_seen(body["metadata"]["namespace"], owner)

    @kopf.on.event("", "v1", "pods", labels=trainer_pods, registry=registry)
    async def pod_event(event: dict[str, Any], **_: Any) -> None:
        body = event.get("object") or {}
        owner = annotations(body).get(b.ANNOTATION_OWNER)
        if owner:
            controller.child_seen(body["metadata"]["namespace"], owner, pod=body)

    return registry


def main(argv: Sequence[str], prog: str = "kubetune operator") -> int:
    args = build_parser(prog).parse_args(list(argv))
    pod_templates: dict[str, dict[str, Any]] = {}
    if args.job_defaults:  # before anything else: a bad file is refused at once, in one line
        try:
            pod_templates = b.pod_template_defaults(load_job_defaults(args.job_defaults))
        except SpecError as error:
            raise OneLineError(f"--job-defaults {error}") from None
    import kopf

    from .controller import Controller
    from .kube import Kube, load_kube_config
    from .metrics import Metrics

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON, log_refkey="object")
    if not args.verbose:  # every watch event of every Pod and Job would log a line
        logging.getLogger("kopf.objects").addFilter(quiet_handler_successes)
    try:
        api_client = load_kube_config(connections=args.workers + 8)
    except Exception as error:  # no kubeconfig, no in-cluster account
        raise OneLineError(f"cannot reach Kubernetes: {str(error).splitlines()[0]}") from None
    defaults = b.SpecDefaults.from_env(os.environ)  # `kubetune render` reads the same
    kube = Kube(
        api_client,
        b.Images(args.collector_image, args.trainer_image),
        default_endpoint=defaults.endpoint,
        default_region=defaults.region,
        default_staging_size=defaults.staging_size,
        default_credentials_secret=defaults.credentials_secret,
        default_pod_templates=tuple(pod_templates.items()),
        allowed_storage_endpoints=tuple(args.allowed_storage_endpoint),
        storage_own_identity=args.storage_own_identity,
        s3_connections=args.workers,
    )
    metrics = Metrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    leader = wait_to_lead(api_client, args) if args.leader_elect else None
    controller = Controller(kube, metrics, workers=args.workers, resync_seconds=args.resync_seconds)
    namespaces = list(args.namespace)
    registry = register(controller, args.verbose, scan_namespaces=any(is_pattern(ns) for ns in namespaces))
    log.info("starting: namespaces=%s", ",".join(namespaces) or "*")
    try:
        kopf.run(
            registry=registry,
            # No kopf peering: with --leader-elect only the Lease's holder gets here (kopf's peering
            # would pause kopf's watches only, not the controller's resync).
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
        )
    finally:
        if leader is not None:
            leader.release()
    return 0


def wait_to_lead(api_client: Any, args: argparse.Namespace) -> Any:
    """Block until this replica holds the Lease (answering /healthz meanwhile: a standby is alive).
    SIGTERM while waiting exits at once."""
    import signal
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from .leader import LeaderElection, default_identity, default_namespace

    election = LeaderElection(
        api_client,
        args.leader_elect_namespace or default_namespace(),
        args.leader_elect_lease,
        default_identity(),
        lease=args.leader_elect_lease_seconds,
    )
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    health = None
    if args.liveness_port:

        class Healthy(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self.send_response(200 if self.path == "/healthz" else 404)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: Any) -> None:
                pass

        health = ThreadingHTTPServer(("0.0.0.0", args.liveness_port), Healthy)
        threading.Thread(target=health.serve_forever, name="kubetune-standby-health", daemon=True).start()
    try:
        if not election.acquire(stop):
            raise SystemExit(0)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if health is not None:
            health.shutdown()
            health.server_close()
    return election
