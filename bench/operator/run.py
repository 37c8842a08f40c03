"""The operator under a burst: N FineTuneJobs (default 500) created at once on the local cluster.

Three processes, as on a real cluster: the local cluster (`kubetune dev up --no-pods`: API
server, Job controller, S3; pods are scheduled but never started, so only the control plane
works), the operator (`kubetune operator`, the real process, watching one namespace), and this
client. Each FineTuneJob has its own storage.uri and no dataset there yet, so the operator's
answer to each is a collector Job `<name>-collect`.

The client starts a watch on Jobs, then sends all creations concurrently (--concurrency
connections). Latency of a FineTuneJob = the moment its collector Job's ADDED event reaches the
client's watch minus the moment the API server's 201 for the FineTuneJob reached the client (both
on the client's monotonic clock; creationTimestamp has only 1 s resolution). "All" is measured
from the first request sent to the last Job seen. The operator's peak memory is VmHWM of its
process (/proc/<pid>/status: the kernel's high-water mark of resident memory, startup included),
read after a settle period of --settle seconds that spans a periodic resync of every unfinished
job. Status writes are counted on a FineTuneJob watch (MODIFIED events): per job, and in the last
seconds of the settle period (a steady state should have none).

    .venv/bin/python bench/operator/run.py [--jobs 500] [--concurrency 64] [--settle 20] [--keep] [--strict]

Prints each figure next to its goal (all Jobs within 60 s, p99 < 5 s, peak < 300 MB) and writes
bench/results/operator.json. Exit code 1 when the run failed (a Job missing, the operator dead), or
with --strict when a goal is missed. The machine is shared with whatever else runs: the CPU seconds
of the operator, the cluster and the whole machine during the burst are printed next to the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
GOAL_ALL_S, GOAL_P99_S, GOAL_PEAK_MB = 60.0, 5.0, 300.0


def kubetune(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], text=True, capture_output=True, **kwargs)


# -- the cluster and the operator ---------------------------------------------------------------


def cluster_up(state_dir: Path) -> dict[str, Any]:
    kubetune("dev", "down", "--state-dir", str(state_dir), timeout=120)  # a run interrupted earlier
    up = kubetune(
        "dev",
        "up",
        "--state-dir",
        str(state_dir),
        "--no-operator",
        "--no-model",
        "--no-pods",
        "--network",
        "host",
        timeout=300,
    )
    if up.returncode != 0:
        raise SystemExit(f"bench-operator: kubetune dev up failed: {up.stderr.strip().splitlines()[-1:]}")
    return dict(json.loads((state_dir / "cluster.json").read_text()))


def cluster_down(state_dir: Path) -> None:
    kubetune("dev", "down", "--state-dir", str(state_dir), timeout=120)


def start_operator(
    info: dict[str, Any], namespace: str, log_path: Path, metrics_port: int, extra: list[str]
) -> subprocess.Popen[bytes]:
    from kubetune.dev.cluster.local import S3_SECRET, ClusterInfo
    from kubetune.dev.testing import operator_command

    fields = ClusterInfo.__dataclass_fields__
    cluster = ClusterInfo(**{k: v for k, v in info.items() if k in fields})
    env = {
        **os.environ,
        **cluster.env(),
        "KUBETUNE_S3_ENDPOINT": cluster.s3_endpoint,
        "KUBETUNE_S3_CREDENTIALS_SECRET": S3_SECRET,
    }
    env.pop("PYTHONPATH", None)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            operator_command(sys.executable, ("--namespace", namespace), metrics_port, "bench", *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def stop_operator(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB) of one process."""
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores of this machine spent busy (anyone's processes), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class MemorySampler(threading.Thread):
    """VmRSS of the operator every `interval` seconds (a timeline for the JSON)."""

    def __init__(self, pid: int, start: float, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.pid, self.start_time, self.interval = pid, start, interval
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            rss = memory_kb(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append((round(time.monotonic() - self.start_time, 2), rss))


def operator_metrics(port: int) -> dict[str, float]:
    import requests

    wanted = (
        "kubetune_reconcile_duration_seconds_count",
        "kubetune_reconcile_duration_seconds_sum",
        "kubetune_reconcile_queue_wait_seconds_sum",
        "kubetune_reconcile_errors_total",
    )
    values: dict[str, float] = {}
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except requests.RequestException:
        return values
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


# -- the burst -------------------------------------------------------------------------------------


def spec(bucket: str, name: str) -> dict[str, Any]:
    """A small job as in examples/demo.yaml; its own storage.uri, so its dataset is not there yet."""
    return {
        "dataset": {"urls": {"uri": f"s3://{bucket}/bench/urls.jsonl"}, "resolution": 64, "minSize": 32},
        "model": {"base": f"s3://{bucket}/models/tiny-sd/"},
        "training": {
            "resolution": 32,
            "batchSize": 2,
            "maxTrainSteps": 10,
            "mixedPrecision": "fp32",
            "gradientCheckpointing": False,
            "useEma": False,
        },
        "trainer": {"nodes": 1, "gpusPerNode": 0},
        "collector": {"workers": 4},
        "storage": {"uri": f"s3://{bucket}/bench/jobs/{name}/"},
    }


class Burst:
    def __init__(self, api_url: str, namespace: str, bucket: str) -> None:
        self.api_url, self.namespace, self.bucket = api_url, namespace, bucket
        self.ftj_path = f"{api_url}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        self.jobs_path = f"{api_url}/apis/batch/v1/namespaces/{namespace}/jobs"
        self.sent: dict[str, float] = {}
        self.created: dict[str, float] = {}
        self.job_seen: dict[str, float] = {}
        self.ftj_modified: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.all_seen = asyncio.Event()
        self.expected: set[str] = set()

    async def _watch(self, session: Any, url: str, on_event: Any, ready: asyncio.Event) -> None:
        async with session.get(url) as listing:
            version = (await listing.json())["metadata"]["resourceVersion"]
        params = {"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true", "timeoutSeconds": "3600"}
        async with session.get(url, params=params, timeout=None) as response:
            ready.set()
            async for line in response.content:
                if line.strip():
                    event = json.loads(line)
                    on_event(time.monotonic(), event["type"], event["object"])

    def _on_job(self, now: float, etype: str, obj: dict[str, Any]) -> None:
        from kubetune.operator.builders import collector_job_name

        if etype != "ADDED":
            return
        for ref in obj["metadata"].get("ownerReferences") or []:
            owner = ref.get("name", "")
            if ref.get("kind") == "FineTuneJob" and obj["metadata"]["name"] == collector_job_name(owner):
                self.job_seen.setdefault(owner, now)
        if self.expected and self.expected <= self.job_seen.keys():
            self.all_seen.set()

    def _on_ftj(self, now: float, etype: str, obj: dict[str, Any]) -> None:
        if etype == "MODIFIED":
            self.ftj_modified.append((now, obj["metadata"]["name"]))

    async def _create(self, session: Any, name: str) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": spec(self.bucket, name),
        }
        self.sent[name] = time.monotonic()
        async with session.post(self.ftj_path, json=body) as response:
            if response.status != 201:
                self.errors.append(f"{name}: HTTP {response.status} {(await response.text())[:200]}")
                return
            self.created[name] = time.monotonic()

    async def run(
        self, names: list[str], concurrency: int, timeout: float, settle: float, at_burst_end: Any = None
    ) -> tuple[float, float]:
        """Create every FineTuneJob at once, wait for all their collector Jobs (or `timeout`), then
        keep watching for `settle` seconds. Returns (first request sent, last Job seen or timeout)."""
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency + 4)
        async with aiohttp.ClientSession(
            connector=connector, read_bufsize=1 << 20, timeout=aiohttp.ClientTimeout(total=None, sock_connect=30)
        ) as session:
            ready_jobs, ready_ftjs = asyncio.Event(), asyncio.Event()
            watches = [
                asyncio.create_task(self._watch(session, self.jobs_path, self._on_job, ready_jobs)),
                asyncio.create_task(self._watch(session, self.ftj_path, self._on_ftj, ready_ftjs)),
            ]
            await asyncio.wait_for(asyncio.gather(ready_jobs.wait(), ready_ftjs.wait()), 30)
            self.expected = set(names)
            pending = list(reversed(names))
            start = time.monotonic()

            async def sender() -> None:
                while pending:
                    await self._create(session, pending.pop())

            await asyncio.gather(*(sender() for _ in range(concurrency)))
            self.expected = set(self.created)
            if self.expected <= self.job_seen.keys():
                self.all_seen.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.all_seen.wait(), max(1.0, timeout - (time.monotonic() - start)))
            burst_end = time.monotonic()
            if at_burst_end is not None:
                at_burst_end()
            await asyncio.sleep(settle)
            for task in watches:
                task.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
            return start, burst_end


# -- setup, report ---------------------------------------------------------------------------------


def prepare_namespace(info: dict[str, Any], namespace: str) -> None:
    from kubetune.dev.cluster.local import S3_SECRET, s3_client_for
    from kubetune.dev.testing import Api

    api = Api(info["api_url"])
    api.ok(api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))
    secret = api.ok(api.get(f"/api/v1/namespaces/default/secrets/{S3_SECRET}"))
    api.ok(
        api.post(
            f"/api/v1/namespaces/{namespace}/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": S3_SECRET},
                "data": secret["data"],
            },
        )
    )
    lines = [json.dumps({"url": f"http://127.0.0.1:9/{i}.jpg", "caption": f"image {i}"}) for i in range(10)]
    s3_client_for(info["s3_endpoint"]).put_object(
        Bucket=info["bucket"], Key="bench/urls.jsonl", Body="\n".join(lines).encode()
    )


def warm_up(
    info: dict[str, Any], namespace: str, operator: subprocess.Popen[bytes], timeout: float, log_path: Path
) -> float:
    """One FineTuneJob through the operator (its watches are up once its Job appears), then gone
    again (its Job with it), so that the burst starts from an idle operator and an empty namespace."""
    from kubetune.dev.testing import Api

    api = Api(info["api_url"])
    ftjs = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    started = time.monotonic()
    api.ok(
        api.post(
            ftjs,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "FineTuneJob",
                "metadata": {"name": "warmup"},
                "spec": spec(info["bucket"], "warmup"),
            },
        )
    )
    while api.get(f"{jobs}/warmup-collect").status_code != 200:
        if operator.poll() is not None or time.monotonic() - started > timeout:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(
                f"bench-operator: the operator did not create the warm-up Job within {timeout:.0f} s\n{tail}"
            )
        time.sleep(0.1)
    first_job = time.monotonic() - started
    api.ok(api.delete(f"{ftjs}/warmup"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        api.get(f"{ftjs}/warmup").status_code == 200 or api.get(f"{jobs}/warmup-collect").status_code == 200
    ):
        time.sleep(0.1)
    return first_job


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 500 is the 495th smallest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def namespace_summary(info: dict[str, Any], namespace: str) -> dict[str, Any]:
    """What a user would see afterwards: phases, the operator's events (for the burst's jobs), Jobs, pods."""
    from kubetune.dev.testing import Api

    api = Api(info["api_url"])
    ftjs = api.ok(api.get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"))["items"]
    phases: dict[str, int] = {}
    for ftj in ftjs:
        phase = (ftj.get("status") or {}).get("phase") or "(none)"
        phases[phase] = phases.get(phase, 0) + 1
    reasons: dict[str, int] = {}
    for event in api.ok(api.get(f"/api/v1/namespaces/{namespace}/events"))["items"]:
        if (event.get("source") or {}).get("component") == "kubetune-operator" and event["involvedObject"][
            "name"
        ].startswith("ftj-"):
            reasons[event["reason"]] = reasons.get(event["reason"], 0) + 1
    jobs = api.ok(api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs"))["items"]
    pods = api.ok(api.get(f"/api/v1/namespaces/{namespace}/pods"))["items"]
    return {
        "finetunejobs_by_phase": phases,
        "operator_events_by_reason": reasons,
        "jobs": len(jobs),
        "pods": len(pods),
        "pods_pending": sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Pending"),
    }


def line_count(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=500, help="FineTuneJobs to create at once (default 500)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent create requests (default 64)")
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for every collector Job (default 180)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=20.0,
        help="seconds to keep watching after the last Job; status writes are counted in its second half, "
        "where the operator's 10 s resync of every job falls (default 20)",
    )
    parser.add_argument("--workers", type=int, default=None, help="the operator's --workers (default: its own, 32)")
    parser.add_argument(
        "--resync-seconds", type=float, default=None, help="the operator's --resync-seconds (default: its own, 10)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=ROOT / ".kubetune" / "bench-operator",
        help="the local cluster's state and the operator's log (default .kubetune/bench-operator)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the local cluster (and the jobs) up afterwards; the operator is stopped",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a goal is missed (default: only when the run failed)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "operator.json",
        help="JSON results (default bench/results/operator.json)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.concurrency < 1 or args.timeout <= 0 or args.settle < 0:
        parser.error("--jobs and --concurrency must be at least 1, --timeout positive, --settle not negative")
    extra = (["--workers", str(args.workers)] if args.workers else []) + (
        ["--resync-seconds", str(args.resync_seconds)] if args.resync_seconds else []
    )
    namespace = "bench-operator"
    state_dir: Path = args.state_dir.resolve()
    log_path = state_dir / "bench-operator.log"
    names = [f"ftj-{i:04d}" for i in range(args.jobs)]
    burst = Burst("", namespace, "")
    cpu: dict[str, dict[str, float]] = {}

    print(f"starting the local cluster without running pods ({state_dir}) ...", file=sys.stderr)
    info = cluster_up(state_dir)
    try:
        prepare_namespace(info, namespace)
        metrics_port = free_port()
        operator = start_operator(info, namespace, log_path, metrics_port, extra)
        sampler: MemorySampler | None = None
        try:
            warmup_s = warm_up(info, namespace, operator, 120, log_path)
            idle = memory_kb(operator.pid)
            metrics_before = operator_metrics(metrics_port)
            log_lines_before = line_count(log_path)
            burst = Burst(info["api_url"], namespace, info["bucket"])
            sampler = MemorySampler(operator.pid, time.monotonic())
            sampler.start()

            def read_cpu(when: str) -> None:
                cpu[when] = {
                    "operator": cpu_seconds(operator.pid),
                    "cluster": cpu_seconds(int(info["pid"])),
                    "machine": machine_busy_seconds(),
                }

            print(f"creating {args.jobs} FineTuneJobs at once ...", file=sys.stderr)
            read_cpu("before")
            start, burst_end = asyncio.run(
                burst.run(names, args.concurrency, args.timeout, args.settle, lambda: read_cpu("burst_end"))
            )
            metrics_after = operator_metrics(metrics_port)
            final = memory_kb(operator.pid)
            operator_alive = operator.poll() is None
        finally:
            if sampler is not None:
                sampler.halt.set()
            stop_operator(operator)
        log_lines = line_count(log_path) - log_lines_before
        summary = namespace_summary(info, namespace)
    finally:
        if args.keep:
            print(
                f"cluster left up: export KUBECONFIG={info['kubeconfig']}; stop it with "
                f"'kubetune dev down --state-dir {state_dir}'",
                file=sys.stderr,
            )
        else:
            cluster_down(state_dir)

    latencies = {n: burst.job_seen[n] - burst.created[n] for n in burst.created if n in burst.job_seen}
    values = list(latencies.values())
    from_send = [burst.job_seen[n] - burst.sent[n] for n in latencies]
    missing = sorted(set(names) - set(latencies))
    complete = not missing and not burst.errors
    nan = float("nan")
    all_s = (max(burst.job_seen[n] for n in latencies) - start) if latencies else nan
    p50, p99 = (percentile(values, 50), percentile(values, 99)) if values else (nan, nan)
    peak_mb = final.get("VmHWM", 0) * 1024 / 1e6
    writes = [at for at, name in burst.ftj_modified if name.startswith("ftj-")]
    steady_window = min(10.0, args.settle / 2)  # the settle's second half: a 10 s resync of every job falls in it
    steady_from = burst_end + args.settle - steady_window
    during, after = sum(1 for at in writes if at <= burst_end), sum(1 for at in writes if at > burst_end)
    steady = sum(1 for at in writes if at >= steady_from)
    passes = metrics_after.get("kubetune_reconcile_duration_seconds_count", 0) - metrics_before.get(
        "kubetune_reconcile_duration_seconds_count", 0
    )
    errors = metrics_after.get("kubetune_reconcile_errors_total", 0) - metrics_before.get(
        "kubetune_reconcile_errors_total", 0
    )
    created_s = max(burst.created.values(), default=start) - start
    used = {k: round(cpu["burst_end"][k] - cpu["before"][k], 2) for k in cpu.get("burst_end", {})}
    goals = {
        "all_jobs_seconds": (all_s, f"<= {GOAL_ALL_S:.0f} s", complete and all_s <= GOAL_ALL_S),
        "p99_seconds": (p99, f"< {GOAL_P99_S:.0f} s", complete and p99 < GOAL_P99_S),
        "peak_memory_mb": (peak_mb, f"< {GOAL_PEAK_MB:.0f} MB", peak_mb < GOAL_PEAK_MB and operator_alive),
    }
    result = {
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "operator_args": extra,
        "settle_seconds": args.settle,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "latency_from": (
            "the FineTuneJob's 201 reaching the client -> its collector Job's ADDED event reaching the client's watch"
        ),
        "created": len(burst.created),
        "create_errors": burst.errors[:20],
        "jobs_missing": missing[:20],
        "create_seconds": round(created_s, 3),
        "warmup_first_job_seconds": round(warmup_s, 3),
        "all_jobs_seconds": round(all_s, 3),
        "latency_seconds": {
            "p50": round(p50, 3),
            "p90": round(percentile(values, 90), 3) if values else None,
            "p99": round(p99, 3),
            "max": round(max(values), 3) if values else None,
            "min": round(min(values), 3) if values else None,
        },
        "latency_from_send_seconds": {
            "p50": round(percentile(from_send, 50), 3) if values else None,
            "p99": round(percentile(from_send, 99), 3) if values else None,
        },
        "operator_memory_mb": {
            "peak_vmhwm": round(peak_mb, 1),
            "idle_before_burst_rss": round(idle.get("VmRSS", 0) * 1024 / 1e6, 1),
            "after_settle_rss": round(final.get("VmRSS", 0) * 1024 / 1e6, 1),
        },
        "operator_alive": operator_alive,
        "cpu_seconds_during_burst": used,
        "status_writes": {
            "during_burst": during,
            "after_burst": after,
            "per_job": round((during + after) / args.jobs, 2),
            "steady_window_seconds": steady_window,
            "in_steady_window": steady,
        },
        "operator": {
            "reconcile_passes": passes,
            "reconcile_errors": errors,
            "log_lines": log_lines,
            "metrics_before_burst": metrics_before,
            "metrics_after_settle": metrics_after,
        },
        "namespace": summary,
        "rss_timeline_kb": sampler.samples if sampler else [],
        "goals": {k: {"value": round(v, 3), "goal": g, "pass": ok} for k, (v, g, ok) in goals.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    def row(label: str, value: str, goal: str = "", verdict: bool | None = None) -> None:
        mark = "" if verdict is None else ("PASS" if verdict else "MISS")
        print(f"  {label:<46} {value:>10}  {goal:<10} {mark}")

    print(
        f"\nkubetune operator: {args.jobs} FineTuneJobs created at once on the local cluster (pods not run), "
        f"{os.cpu_count()} CPUs"
    )
    row("", "measured", "goal")
    row("every collector Job created (from 1st create)", f"{all_s:.1f} s", *goals["all_jobs_seconds"][1:])
    row("latency p50 (FineTuneJob created -> its Job)", f"{p50:.2f} s")
    row("latency p99", f"{p99:.2f} s", *goals["p99_seconds"][1:])
    row("latency max", f"{max(values, default=nan):.2f} s")
    row("operator peak memory (VmHWM)", f"{peak_mb:.0f} MB", *goals["peak_memory_mb"][1:])
    print(
        f"  creates: {len(burst.created)}/{args.jobs} in {created_s:.1f} s ({args.concurrency} at a time); "
        f"operator RSS idle {result['operator_memory_mb']['idle_before_burst_rss']:.0f} MB, "
        f"after {args.settle:.0f} s settle {result['operator_memory_mb']['after_settle_rss']:.0f} MB"
    )
    if used:
        print(
            f"  CPU seconds during the burst ({burst_end - start:.1f} s x {os.cpu_count()} CPUs): operator "
            f"{used['operator']:.1f}, "
            f"cluster {used['cluster']:.1f}, whole machine {used['machine']:.1f} (other processes included)"
        )
    print(
        f"  status writes: {(during + after) / args.jobs:.2f} per job ({during} before the last Job, {after} after), "
        f"{steady} in the last {steady_window:.0f} s; reconcile passes {passes:.0f}, errors {errors:.0f}; "
        f"operator log lines {log_lines}"
    )
    print(f"  phases: {summary['finetunejobs_by_phase']}; operator events: {summary['operator_events_by_reason']}")
    if missing or burst.errors:
        print(
            f"  INCOMPLETE: {len(missing)} FineTuneJobs without a collector Job, {len(burst.errors)} create errors "
            f"(first: {(burst.errors or missing)[:3]}); operator log: {log_path}"
        )
    print(f"  results: {args.output}")
    if not complete or not operator_alive:
        return 1  # the run itself failed: its figures mean little
    return 1 if args.strict and not all(ok for _, _, ok in goals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
