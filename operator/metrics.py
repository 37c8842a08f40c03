"""Prometheus metrics of the operator (prometheus_client), on their own registry."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune.api.models import PHASES


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _phases: dict[tuple[str, str], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        r = self.registry
        self.jobs = Gauge("kubetune_finetunejobs", "FineTuneJobs by phase.", ["phase"], registry=r)
        self.transitions = Counter(
            "kubetune_phase_transitions", "Phase transitions of FineTuneJobs.", ["from_phase", "to_phase"], registry=r
        )
        self.restarts = Counter(
            "kubetune_trainer_restarts", "Failed trainer attempts (they use the backoff budget).", registry=r
        )
        self.preemptions = Counter("kubetune_trainer_preemptions", "Preempted trainer attempts or pods.", registry=r)
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors", "Reconcile passes that raised (retried).", registry=r
        )
        self.reconcile_seconds = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time of one reconcile pass.",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.queue_wait_seconds = Histogram(
            "kubetune_reconcile_queue_wait_seconds",
            "Time a FineTuneJob waited in the queue.",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        for phase in PHASES:
            self.jobs.labels(phase).set(0)

    def observe_pass(self, key: tuple[str, str], old: dict[str, Any], new: dict[str, Any]) -> None:
        old_phase, new_phase = str(old.get("phase") or "Pending"), str(new.get("phase") or "Pending")
        if old_phase != new_phase:
            self.transitions.labels(old_phase, new_phase).inc()
        self.restarts.inc(max(0, int(new.get("restarts") or 0) - int(old.get("restarts") or 0)))
        self.preemptions.inc(max(0, int(new.get("preemptions") or 0) - int(old.get("preemptions") or 0)))
        with self._lock:
            self._phases[key] = new_phase
            self._recount()

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._phases.pop(key, None)
            self._recount()

    def _recount(self) -> None:
        counts = dict.fromkeys(PHASES, 0)
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            self.jobs.labels(phase).set(count)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)
