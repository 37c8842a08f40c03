"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it.

Several operator replicas can run; only the one holding the Lease runs kopf and the controller
(nothing else of kopf starts in the others: no watches, no handlers, no resync). The others try
to take the Lease every `retry` seconds and get it once its holder has not renewed it for
`lease` seconds (measured on their own clock, from when they saw the record change: no clock
skew between nodes matters). The holder renews every `retry` seconds; when it has not renewed
for `renew_deadline` seconds (shorter than `lease`, so it stops before anyone else may start),
it has lost the Lease and the process exits at once (the Deployment restarts it as a standby).
A holder that stops normally releases the Lease (an empty holderIdentity), so the next replica
takes over within `retry` seconds instead of `lease`.

All updates are PUTs with the resourceVersion read, so two replicas can never both win one
round: the second gets 409 Conflict.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kubetune.operator.leader")

Obj = dict[str, Any]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElection:
    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        identity: str,
        lease: float = 15.0,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.api_client = api_client
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease = lease
        self.renew_deadline = lease * 2 / 3
        self.retry = max(lease / 7.5, 0.2)  # 2 s of a 15 s lease, as client-go's defaults
        self.on_lost = on_lost or _exit_lost
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.leading = False

    # -- the API ---------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Obj | None = None) -> tuple[int, Obj]:
        """(status, parsed body); status 0 when the API server did not answer."""
        import json

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            serialized = self.api_client.param_serialize(
                method=method, resource_path=path, header_params=headers, body=body, auth_settings=["BearerToken"]
            )
            response = self.api_client.call_api(*serialized, _request_timeout=max(self.retry * 2, 2.0))
            data = response.read()
        except Exception as error:  # a timeout, a refused connection: this round failed
            log.warning("lease %s: %s %s", self.name, method, str(error).splitlines()[0] if str(error) else error)
            return 0, {}
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:
            parsed = {}
        return int(response.status), parsed if 200 <= response.status <= 299 else {}

    def try_acquire_or_renew(self) -> bool:
        """One round: True when this process holds the Lease afterwards."""
        now = _now()
        spec: Obj = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease)),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        }
        code, lease = self._call("GET", self.path)
        if code == 404:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec,
            }
            code, created = self._call("POST", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases", body)
            if code == 201:
                self._observed = (self.identity, now, 0)
                self._observed_at = time.monotonic()
            return code == 201
        if code != 200:
            return False
        old = lease.get("spec") or {}
        holder = old.get("holderIdentity") or ""
        record = (holder, old.get("renewTime"), old.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        if holder and holder != self.identity and time.monotonic() - self._observed_at < self.lease:
            return False  # someone else holds it and renewed within the lease
        if holder == self.identity:
            spec["acquireTime"] = old.get("acquireTime") or now
            spec["leaseTransitions"] = old.get("leaseTransitions") or 0
        else:
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + (1 if holder else 0)
        lease["spec"] = spec
        code, updated = self._call("PUT", self.path, lease)
        if code != 200:
            return False
        new = updated.get("spec") or {}
        self._observed = (self.identity, new.get("renewTime"), new.get("leaseTransitions"))
        self._observed_at = time.monotonic()
        return True

    # -- the loops -------------------------------------------------------------------------------

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until this process leads (True), or `stop` is set (False); then keep renewing in
        a thread."""
        stop = stop or threading.Event()
        log.info("waiting to lead: lease %s/%s, identity %s", self.namespace, self.name, self.identity)
        while not stop.is_set():
            if self.try_acquire_or_renew():
                self.leading = True
                self._last_renew = time.monotonic()
                log.info("leading: lease %s/%s acquired by %s", self.namespace, self.name, self.identity)
                self._thread = threading.Thread(target=self._renew_loop, name="kubetune-leader", daemon=True)
                self._thread.start()
                return True
            stop.wait(self.retry)
        return False

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.retry):
            if self.try_acquire_or_renew():
                self._last_renew = time.monotonic()
            elif time.monotonic() - self._last_renew > self.renew_deadline:
                if self._stop.is_set():
                    return
                self.leading = False
                log.error(
                    "lost the lease %s/%s (not renewed for %.0f s): stopping",
                    self.namespace,
                    self.name,
                    time.monotonic() - self._last_renew,
                )
                self.on_lost()
                return

    def release(self) -> None:
        """Stop renewing and hand the Lease back (best effort) so a standby takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if not self.leading:
            return
        self.leading = False
        code, lease = self._call("GET", self.path)
        if code != 200 or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": _now()}
        self._call("PUT", self.path, lease)
        log.info("released the lease %s/%s", self.namespace, self.name)


def _exit_lost() -> None:
    # As client-go's users do (klog.Fatal in OnStoppedLeading): nothing of this process may act
    # once another replica may lead; the container restarts as a standby.
    logging.shutdown()
    os._exit(1)


def default_namespace() -> str:
    """POD_NAMESPACE (the chart sets it from the downward API), the in-cluster service account's
    namespace, or the kubeconfig context's namespace."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as file:
            return file.read().strip()
    except OSError:
        pass
    try:
        from kubernetes import config

        _, context = config.list_kube_config_contexts()
        return str((context or {}).get("context", {}).get("namespace") or "default")
    except Exception:
        return "default"


def default_identity() -> str:
    """POD_NAME (the chart sets it), else the host name and process id: unique per replica."""
    import socket

    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"
