"""The work queue behind the kopf handlers: bursts collapse, one FineTuneJob is never handled twice at once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from kubetune.operator.controller import WorkQueue


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
