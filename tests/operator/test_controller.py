"""The work queue behind the kopf handlers: bursts collapse, one FineTuneJob is never handled twice at once."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune.operator.controller import Controller, WorkQueue, retry_delay
from kubetune.operator.kube import Kube
from kubetune.operator.metrics import Metrics
from kubetune.storage import Store


def test_a_burst_of_events_for_one_job_costs_one_pass() -> None:
    queue = WorkQueue()
    for _ in range(100):
        queue.add(("ns", "a"))
    queue.add(("ns", "b"))
    assert len(queue) == 2
    first = queue.get(timeout=0.1)
    assert first is not None and first[0] == ("ns", "a")


def test_a_job_changed_while_being_handled_is_handled_again_after_not_during() -> None:
    queue = WorkQueue()
    queue.add(("ns", "a"))
    item = queue.get(timeout=0.1)
    assert item is not None
    queue.add(("ns", "a"))  # an event arrives mid-pass
    assert queue.get(timeout=0.05) is None  # no second worker gets it now
    queue.done(("ns", "a"))
    again = queue.get(timeout=0.1)
    assert again is not None and again[0] == ("ns", "a")


def test_workers_never_overlap_on_one_key() -> None:
    queue = WorkQueue()
    active: dict[str, int] = {}
    overlaps: list[str] = []
    handled: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            item = queue.get(timeout=0.05)
            if item is None:
                continue
            key = item[0][1]
            with lock:
                active[key] = active.get(key, 0) + 1
                if active[key] > 1:
                    overlaps.append(key)
            time.sleep(0.002)
            with lock:
                active[key] -= 1
                handled.append(key)
            queue.done(item[0])

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for i in range(400):
        queue.add(("ns", f"job-{i % 5}"))
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert overlaps == []
    assert set(handled) == {f"job-{i}" for i in range(5)}
    assert len(handled) < 400  # coalesced


def test_operator_help_lists_its_flags() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "operator", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    for flag in (
        "--namespace",
        "--all-namespaces",
        "--liveness-port",
        "--metrics-port",
        "--collector-image",
        "--trainer-image",
    ):
        assert flag in done.stdout


def test_operator_rejects_both_scopes_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "operator", "--namespace", "a", "--all-namespaces"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--all-namespaces" in done.stderr


def test_operator_refuses_bad_job_defaults_in_one_line_naming_the_field(tmp_path: Path) -> None:
    defaults = tmp_path / "job-defaults.yaml"
    defaults.write_text("trainer:\n  spec:\n    volumes: [{name: scratch, emptyDir: {sizeLimit: lots}}]\n")
    done = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "operator", "--job-defaults", str(defaults)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "jobDefaults.trainer.spec.volumes[0].emptyDir.sizeLimit: must be a Kubernetes quantity" in done.stderr


def test_kopf_handler_success_lines_are_dropped_and_everything_else_kept() -> None:
    import logging

    from kubetune.operator.cli import quiet_handler_successes

    def record(level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)

    assert not quiet_handler_successes(record(logging.INFO, "Handler 'register.<locals>.pod_event' succeeded."))
    assert quiet_handler_successes(
        record(logging.ERROR, "Handler 'register.<locals>.pod_event' failed with an exception.")
    )
    assert quiet_handler_successes(record(logging.INFO, "BackoffLimitExceeded: the trainer failed 3 time(s)"))


def test_new_finetunejobs_go_before_rechecks_and_the_resync_goes_last() -> None:
    """A burst of new FineTuneJobs is answered before re-checks of known ones, and a periodic
    resync of hundreds of running jobs never delays either."""
    from kubetune.operator.controller import CHANGED, FIRST, RESYNC

    queue = WorkQueue()
    queue.add(("ns", "running"), RESYNC)
    queue.add(("ns", "known"), CHANGED)
    queue.add(("ns", "new"), FIRST)
    order = [item[0][1] for item in (queue.get(timeout=0.1) for _ in range(3)) if item is not None]
    assert order == ["new", "known", "running"]


def test_a_queued_key_moves_up_once_and_keeps_its_waiting_time() -> None:
    from kubetune.operator.controller import CHANGED, FIRST, RESYNC

    queue = WorkQueue()
    queue.add(("ns", "a"), RESYNC)
    waiting_since = queue._pending[RESYNC][("ns", "a")]
    queue.add(("ns", "b"), CHANGED)
    queue.add(("ns", "a"), FIRST)
    queue.add(("ns", "a"), RESYNC)  # a lower priority does not move it back
    assert len(queue) == 2
    first = queue.get(timeout=0.1)
    assert first == (("ns", "a"), waiting_since)


def test_a_key_changed_while_held_comes_back_with_the_most_urgent_priority() -> None:
    from kubetune.operator.controller import CHANGED, FIRST, RESYNC

    queue = WorkQueue()
    queue.add(("ns", "a"))
    held = queue.get(timeout=0.1)
    assert held is not None
    queue.add(("ns", "a"), RESYNC)
    queue.add(("ns", "a"), FIRST)
    queue.add(("ns", "b"), CHANGED)
    queue.done(("ns", "a"))
    again = queue.get(timeout=0.1)
    assert again is not None and again[0] == ("ns", "a")


# -- API writes the server refuses ---------------------------------------------------------------

INVALID_JOB = {
    "kind": "Status",
    "apiVersion": "v1",
    "status": "Failure",
    "message": 'Job.batch "bad-collect" is invalid: spec.template.spec.affinity.nodeAffinity: Invalid value',
    "reason": "Invalid",
    "details": {
        "name": "bad-collect",
        "group": "batch",
        "kind": "Job",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": 'Invalid value: "In ": not a valid selector operator',
                "field": "spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                ".nodeSelectorTerms[0].matchExpressions[0].operator",
            }
        ],
    },
    "code": 422,
}


class _Response:
    def __init__(self, status: int, body: dict[str, object] | None) -> None:
        self.status, self.reason, self.headers = status, {422: "Unprocessable Entity", 500: "Internal"}.get(status), {}
        self.data = json.dumps(body).encode() if body is not None else b""

    def read(self) -> bytes:
        return self.data


class _ApiClient:
    """The two methods Kube.request uses; every call answered by `answer(method, path, body)`."""

    def __init__(self, answer: Callable[[str, str, object], tuple[int, dict[str, object] | None]]) -> None:
        self.answer, self.calls = answer, []  # type: ignore[var-annotated]

    def param_serialize(self, method: str, resource_path: str, body: object = None, **_: object) -> tuple[object, ...]:
        return (method, resource_path, body)

    def call_api(self, method: str, path: str, body: object, **_: object) -> _Response:
        self.calls.append((method, path, body))
        return _Response(*self.answer(method, path, body))


FTJ = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bad", "namespace": "team", "uid": "u1", "generation": 1},
    "spec": {
        "dataset": {"urls": {"uri": "s3://data/urls.jsonl"}},
        "model": {"base": "s3://models/tiny/"},
        "storage": {"uri": "s3://bucket/bad/"},
        "collector": {"affinity": {"nodeAffinity": {}}},
    },
}


def _controller(answer: Callable[[str, str, object], tuple[int, dict[str, object] | None]], tmp: Path) -> Controller:
    def answer_or_the_job(method: str, path: str, body: object) -> tuple[int, dict[str, object] | None]:
        if method == "GET" and path.endswith("/finetunejobs/bad"):
            return 200, FTJ
        return answer(method, path, body)

    kube = Kube(_ApiClient(answer_or_the_job))  # type: ignore[arg-type]
    kube.store = lambda spec, secrets: Store(str(tmp))  # type: ignore[method-assign]
    controller = Controller(kube, Metrics())
    controller.finetunejob_seen("team", "bad", FTJ, deleted=False)
    return controller


def test_a_child_the_api_server_rejects_fails_the_job_naming_the_field(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spec the CRD accepts but the Job API refuses (422) is not retried forever: the job fails
    with InvalidChildObject, its condition and Warning Event name the field the API server named."""

    def answer(method: str, path: str, body: object) -> tuple[int, dict[str, object] | None]:
        if method == "POST" and path.endswith("/jobs"):
            return 422, INVALID_JOB
        return 200, {}

    controller = _controller(answer, tmp_path)
    with caplog.at_level(logging.WARNING, logger="kubetune.operator"):
        controller.handle(("team", "bad"), time.monotonic())
    api = controller.kube.api_client
    statuses = [body["status"] for method, path, body in api.calls if path.endswith("/status")]  # type: ignore[index]
    assert len(statuses) == 1 and statuses[0]["phase"] == "Failed"
    summary = next(c for c in statuses[0]["conditions"] if c["type"] == "Succeeded")
    assert summary["status"] == "False" and summary["reason"] == "InvalidChildObject"
    field = "matchExpressions[0].operator"
    assert field in statuses[0]["message"] and "Job bad-collect" in statuses[0]["message"]
    events = [body for method, path, body in api.calls if path.endswith("/events")]
    assert [(e["type"], e["reason"]) for e in events] == [("Warning", "InvalidChildObject")]  # type: ignore[index]
    assert field in events[0]["message"]  # type: ignore[index]
    assert field in caplog.text  # the log says more than "HTTP 422"
    assert controller.known[("team", "bad")] == "Failed" and ("team", "bad") not in controller._failures


def test_a_transient_api_error_is_retried_with_a_growing_backoff_and_logged_with_its_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = [True]

    def answer(method: str, path: str, body: object) -> tuple[int, dict[str, object] | None]:
        if method == "POST" and path.endswith("/jobs") and down[0]:
            return 500, {"kind": "Status", "message": "etcdserver: request timed out", "code": 500}
        return 200, {}

    controller = _controller(answer, tmp_path)
    delays: list[float] = []
    controller._retry_later = lambda key, delay=2.0: delays.append(delay)  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="kubetune.operator"):
        for _ in range(4):
            controller.handle(("team", "bad"), time.monotonic())
    assert delays == [2.0, 4.0, 8.0, 16.0]
    assert "etcdserver: request timed out" in caplog.text
    assert retry_delay(30) == 300.0
    assert ("team", "bad") in controller._backoff_until
    down[0] = False
    controller.handle(("team", "bad"), time.monotonic())  # healed: the backoff starts over
    assert ("team", "bad") not in controller._failures and ("team", "bad") not in controller._backoff_until
