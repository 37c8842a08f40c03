"""One reconcile pass per FineTuneJob, run from a work queue.

kopf watches FineTuneJobs, their Jobs and their trainer pods; every event only puts the
FineTuneJob's key in a queue. Worker threads take keys off it and run
`observe -> decide -> act -> report`. The queue is controller-runtime's pattern, written here
because kopf has none: a key is in the queue at most once (a burst of events costs one pass), and
never handled by two workers at the same time (passes of one FineTuneJob are serialized, so
two passes cannot both start attempt N). A resync thread re-queues every unfinished FineTuneJob
on a timer, which reads progress.json and enforces deadlines. Keys have priorities: a FineTuneJob
seen for the first time first, then changes, then the resync.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .decide import child_rejected, decide
from .kube import ChildRejected, Kube, act, api_error_detail, observe
from .metrics import Metrics

log = logging.getLogger("kubetune.operator")

Key = tuple[str, str]  # (namespace, name)


# Priorities: a FineTuneJob seen for the first time goes before re-checks of known ones, and the
# periodic resync goes last (as controller-runtime's priority queue does), so that a burst of new
# jobs is answered first and a resync of hundreds of running jobs never delays a new one.
FIRST, CHANGED, RESYNC = 0, 1, 2


@dataclass
class WorkQueue:
    """Deduplicating priority queue: add() is cheap and idempotent, get() blocks for the next key
    that no other worker holds (most urgent priority first, FIFO within one); a key added while
    held is handled again once released."""

    _pending: list[OrderedDict[Key, float]] = field(default_factory=lambda: [OrderedDict() for _ in range(RESYNC + 1)])
    _held: set[Key] = field(default_factory=set)
    _dirty: dict[Key, int] = field(default_factory=dict)  # held key -> priority to re-queue it with
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _closed: bool = False

    def add(self, key: Key, priority: int = CHANGED) -> None:
        with self._cond:
            if key in self._held:
                self._dirty[key] = min(priority, self._dirty.get(key, priority))
                return
            for level, pending in enumerate(self._pending):
                if key in pending:
                    if level <= priority:
                        return  # already queued at least as urgently
                    queued_at = pending.pop(key)  # move it up, keeping its waiting time
                    self._pending[priority][key] = queued_at
                    return
            self._pending[priority][key] = time.monotonic()
            self._cond.notify()

    def get(self, timeout: float = 1.0) -> tuple[Key, float] | None:
        with self._cond:
            if not self._closed and not any(self._pending):
                self._cond.wait(timeout)
            for pending in self._pending:
                if pending:
                    key, queued_at = pending.popitem(last=False)
                    self._held.add(key)
                    return key, queued_at
            return None

    def done(self, key: Key) -> None:
        with self._cond:
            self._held.discard(key)
            if key in self._dirty:
                priority = self._dirty.pop(key)
                self._pending[priority][key] = time.monotonic()
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return sum(len(pending) for pending in self._pending)


@dataclass
class Controller:
    kube: Kube
    metrics: Metrics
    workers: int = 32
    resync_seconds: float = 10.0
    queue: WorkQueue = field(default_factory=WorkQueue)
    known: dict[Key, str] = field(default_factory=dict)  # key -> last phase seen
    _unhandled: dict[Key, dict[str, Any]] = field(default_factory=dict)  # watch body of a job no pass has handled yet
    _pods: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)
    _pods_lock: threading.Lock = field(default_factory=threading.Lock)
    _failures: dict[Key, int] = field(default_factory=dict)  # passes in a row that raised, per job
    _backoff_until: dict[Key, float] = field(default_factory=dict)  # the resync leaves these alone until then
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    # -- triggers (called from kopf's handlers; never block) -----------------------------------

    def finetunejob_seen(self, namespace: str, name: str, body: dict[str, Any], deleted: bool) -> None:
        key = (namespace, name)
        if deleted:
            self.known.pop(key, None)
            self._unhandled.pop(key, None)
            self._failures.pop(key, None)
            self._backoff_until.pop(key, None)
            self.metrics.forget(key)
            with self._pods_lock:
                self._pods.pop(key, None)
            return
        first = key not in self.known
        if first or key in self._unhandled:
            self._unhandled[key] = body
        self.known[key] = str((body.get("status") or {}).get("phase") or "Pending")
        self.queue.add(key, FIRST if first else CHANGED)

    def child_seen(self, namespace: str, owner: str, pod: dict[str, Any] | None = None) -> None:
        """A Job or pod of `owner` changed. A pod's last state is kept for the next pass: an
        evicted pod is gone from the API soon after, and its exit code tells a preemption."""
        key = (namespace, owner)
        if pod is not None and pod.get("metadata", {}).get("uid"):
            with self._pods_lock:
                self._pods.setdefault(key, {})[pod["metadata"]["uid"]] = pod
        self.queue.add(key)

    # -- the pass ------------------------------------------------------------------------------

    def reconcile(self, key: Key) -> None:
        namespace, name = key
        # Until a pass has written to it, the watch's latest body is as fresh as a GET; after
        # that, the watch may not have echoed the status write yet, so it is read from the API.
        ftj = self._unhandled.pop(key, None) or self.kube.get_finetunejob(namespace, name)
        if ftj is None or ftj["metadata"].get("deletionTimestamp"):
            return  # deleted: owner references take the children with it
        with self._pods_lock:
            extra = list(self._pods.get(key, {}).values())
        observed = observe(self.kube, ftj, extra)
        decision = decide(observed)
        try:
            act(self.kube, ftj, decision)
        except ChildRejected as rejected:  # the same spec would make the same object: fail, do not retry
            log.warning(
                "%s", rejected, extra={"k8s_ref": {"kind": "FineTuneJob", "namespace": namespace, "name": name}}
            )
            decision = child_rejected(observed, rejected.kind, rejected.name, rejected.detail)
            act(self.kube, ftj, decision)
        with self._pods_lock:  # pods seen before this pass are now accounted for
            held = self._pods.get(key, {})
            for pod in extra:
                held.pop(pod["metadata"]["uid"], None)
        old = ftj.get("status") or {}
        self.known[key] = decision.phase
        self.metrics.observe_pass(key, old, decision.status)

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self.queue.get(timeout=0.5)
            if item is not None:
                self.handle(*item)

    def handle(self, key: Key, queued_at: float) -> None:
        """One pass of `key` taken off the queue. A pass that raised (the API server or S3 away,
        a conflict, throttling) is retried with a per-job exponential backoff, so that a job
        failing every pass does not hammer the API server; success resets it."""
        started = time.monotonic()
        try:
            self.reconcile(key)
            self._failures.pop(key, None)
            self._backoff_until.pop(key, None)
        except Exception as error:  # one bad pass must not stop the worker; it is retried
            self.metrics.reconcile_errors.inc()
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = retry_delay(failures)
            log.warning(
                "reconcile failed (%d in a row), retrying in %.0f s: %s",
                failures,
                delay,
                _describe(error),
                extra={"k8s_ref": {"kind": "FineTuneJob", "namespace": key[0], "name": key[1]}},
            )
            self._backoff_until[key] = time.monotonic() + delay
            self._retry_later(key, delay)
        finally:
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)
            self.metrics.queue_wait_seconds.observe(started - queued_at)
            self.queue.done(key)

    def _retry_later(self, key: Key, delay: float = 2.0) -> None:
        timer = threading.Timer(delay, self.queue.add, args=(key,))
        timer.daemon = True
        timer.start()

    def _resync(self) -> None:
        while not self._stop.wait(self.resync_seconds):
            now = time.monotonic()
            for key, phase in list(self.known.items()):
                if phase not in ("Succeeded", "Failed") and self._backoff_until.get(key, 0.0) <= now:
                    self.queue.add(key, RESYNC)

    def start(self) -> None:
        for i in range(self.workers):
            self._threads.append(threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True))
        self._threads.append(threading.Thread(target=self._resync, name="resync", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()
        for thread in self._threads:
            thread.join(timeout=5)


RETRY_FIRST_SECONDS = 2.0
RETRY_MAX_SECONDS = 300.0


def retry_delay(failures: int) -> float:
    """Seconds before retrying a job whose last `failures` passes raised: 2, 4, 8, ... 300."""
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** max(0, failures - 1))


def _describe(error: Exception) -> str:
    status = getattr(error, "status", None)
    if status:
        reason = getattr(error, "reason", "") or ""
        return f"{type(error).__name__}: HTTP {status} {reason}: {api_error_detail(error)}"[:1200]
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]
