"""`kubetune dev up|status|down`: the local cluster in the background.

`up` starts `kubetune dev serve` as a detached process (its own session), waits until it wrote
<state-dir>/cluster.json, and prints the export line. `serve` runs the cluster, seeds it, and
starts the operator as its child. `down` sends SIGTERM to serve (which stops pods and the
operator), waits, then SIGKILLs the session and any pod process group listed in <state-dir>/pids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from kubetune.cli_util import OneLineArgumentParser, OneLineError

DEFAULT_STATE_DIR = Path(".kubetune/dev")


def _parser(prog: str) -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=prog, description="A local Kubernetes stand-in with S3, for trying kubetune without a cluster."
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fixtures = sub.add_parser(
        "fixtures", help="write the tiny model and captioned shapes to a folder (for kubetune run, no S3)"
    )
    fixtures.add_argument(
        "folder", nargs="?", type=Path, default=Path(".kubetune/fixtures"), help="default .kubetune/fixtures"
    )
    fixtures.add_argument(
        "--vae-steps", type=int, default=None, metavar="N", help="VAE pre-training steps (0: none, fastest)"
    )
    for name, text in (
        ("up", "start the cluster in the background"),
        ("status", "show whether it runs and where"),
        ("down", "stop it and every process it started"),
        ("serve", "run the cluster in the foreground"),
    ):
        action = sub.add_parser(name, help=text)
        action.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help="where the kubeconfig, logs and state live (default .kubetune/dev)",
        )
        if name in ("up", "serve"):
            action.add_argument("--no-operator", action="store_true", help="do not start `kubetune operator`")
            action.add_argument(
                "--no-model", action="store_true", help="do not seed the tiny SD pipeline (faster start)"
            )
            action.add_argument(
                "--no-pods", action="store_true", help="pods are scheduled, never started (control-plane benchmarks)"
            )
            action.add_argument(
                "--network",
                choices=("auto", "netns", "host"),
                default="auto",
                help="pod network: own namespace per pod (root) or the host's (default auto)",
            )
            action.add_argument(
                "--port", type=int, default=0, help="API server port on 127.0.0.1 (default: a free one)"
            )
            action.add_argument(
                "--timeout", type=float, default=300.0, help="seconds `up` waits for the cluster (default 300)"
            )
    return parser


def main(argv: Sequence[str], prog: str = "kubetune dev") -> int:
    args = _parser(prog).parse_args(list(argv))
    if args.action == "fixtures":
        from kubetune.dev.demo.seed import write_fixtures

        model, data = write_fixtures(args.folder, args.vae_steps)
        print(f"tiny model: {model}\nimagefolder: {data}")
        return 0
    state_dir: Path = args.state_dir.resolve()
    if args.action == "up":
        return up(state_dir, args)
    if args.action == "status":
        return status(state_dir)
    if args.action == "down":
        return down(state_dir)
    return serve(state_dir, args)


def _read_info(state_dir: Path) -> dict[str, object] | None:
    try:
        info = json.loads((state_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


def serve_command(state_dir: Path, *flags: str) -> list[str]:
    """The command line of `kubetune dev serve --state-dir STATE_DIR FLAGS...` in this interpreter."""
    return [sys.executable, "-m", "kubetune.cli", "dev", "serve", "--state-dir", str(state_dir), *flags]


def up(state_dir: Path, args: object) -> int:
    info = _read_info(state_dir)
    if info and _alive(int(info.get("pid", 0))):  # type: ignore[call-overload]
        raise OneLineError(f"already running (pid {info['pid']}); run 'kubetune dev down' first")
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "cluster.json").unlink(missing_ok=True)
    command = serve_command(state_dir, "--network", args.network, "--port", str(args.port))  # type: ignore[attr-defined]
    command += ["--no-operator"] if args.no_operator else []  # type: ignore[attr-defined]
    command += ["--no-model"] if args.no_model else []  # type: ignore[attr-defined]
    command += ["--no-pods"] if args.no_pods else []  # type: ignore[attr-defined]
    with open(state_dir / "cluster.log", "ab") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + args.timeout  # type: ignore[attr-defined]
    print(f"starting the local cluster (log: {state_dir / 'cluster.log'}) ...", file=sys.stderr)
    while time.monotonic() < deadline:
        info = _read_info(state_dir)
        if info and info.get("ready"):
            _print_info(info)
            print(f"export KUBECONFIG={info['kubeconfig']}")
            return 0
        if process.poll() is not None:
            tail = (state_dir / "cluster.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise OneLineError(f"the cluster exited with code {process.returncode}: {tail[0]}")
        time.sleep(0.2)
    down(state_dir)
    raise OneLineError(f"the cluster was not ready within {args.timeout:.0f} s (see {state_dir / 'cluster.log'})")  # type: ignore[attr-defined]


def _print_info(info: dict[str, object]) -> None:
    print(f"API server:   {info['api_url']}", file=sys.stderr)
    print(
        f"S3 endpoint:  {info['s3_endpoint']}  (bucket {info['bucket']}, Secret default/kubetune-dev-s3)",
        file=sys.stderr,
    )
    print(f"images:       {info['images_url']}", file=sys.stderr)
    print(f"pod network:  {info['network']}", file=sys.stderr)
    print(f"operator:     {info.get('operator', 'not started')}", file=sys.stderr)
    for line in info.get("seeded") or []:  # type: ignore[attr-defined]
        print(f"seeded:       {line}", file=sys.stderr)


def status(state_dir: Path) -> int:
    info = _read_info(state_dir)
    if not info or not _alive(int(info.get("pid", 0))):  # type: ignore[call-overload]
        print(f"not running (state dir {state_dir})")
        return 1
    import requests

    try:
        healthy = requests.get(f"{info['api_url']}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        healthy = False
    print(f"running (pid {info['pid']}), API {'ready' if healthy else 'NOT responding'}")
    _print_info(info)
    print(f"export KUBECONFIG={info['kubeconfig']}")
    return 0 if healthy else 1


def down(state_dir: Path) -> int:
    info = _read_info(state_dir)
    pid = int(info.get("pid", 0)) if info else 0  # type: ignore[call-overload]
    stopped = False
    if pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # anything left in serve's session (the operator's children)
        stopped = True
    for marker in (state_dir / "pids").glob("*") if (state_dir / "pids").exists() else []:
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.killpg(int(marker.name), signal.SIGKILL)  # pods a crashed control plane left
        marker.unlink(missing_ok=True)
    (state_dir / "cluster.json").unlink(missing_ok=True)
    print("stopped" if stopped else "not running")
    return 0


def serve(state_dir: Path, args: object) -> int:
    from kubetune.dev.cluster.local import LocalCluster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = LocalCluster(state_dir, network=args.network, api_port=args.port, run_pods=not args.no_pods)  # type: ignore[attr-defined]
    operator: subprocess.Popen[bytes] | None = None
    try:
        info = cluster.start()
        document: dict[str, object] = json.loads(info.to_json())
        document["pid"] = os.getpid()
        _write_info(state_dir, document)
        from kubetune.dev.demo import seed

        seeded = [seed.seed_images(info)]
        if not args.no_model:  # type: ignore[attr-defined]
            model = seed.seed_model(info)
            seeded.append(model or "models/tiny-sd/ skipped: kubetune.dev.testing.tiny_sd is not available")
        document["seeded"] = seeded
        document["operator"] = "skipped (--no-operator)"
        if not args.no_operator:  # type: ignore[attr-defined]
            operator, document["operator"] = _start_operator(state_dir, info.env())
        document["ready"] = True
        _write_info(state_dir, document)
        logging.getLogger("kubetune.dev").info("local cluster ready: %s", info.api_url)
        while not stop.wait(0.5):
            if operator is not None and operator.poll() is not None:
                logging.getLogger("kubetune.dev").warning("the operator exited with code %s", operator.returncode)
                operator = None
        return 0
    finally:
        if operator is not None:
            _stop_process_group(operator)
        cluster.stop()
        (state_dir / "cluster.json").unlink(missing_ok=True)


def _write_info(state_dir: Path, document: dict[str, object]) -> None:
    temporary = state_dir / "cluster.json.tmp"
    temporary.write_text(json.dumps(document, indent=2))
    temporary.replace(state_dir / "cluster.json")


def _start_operator(state_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    log_path = state_dir / "operator.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "operator", "--liveness-port", "0", "--metrics-port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # The chart's S3 defaults, as a real install sets them: specs then need no endpoint or Secret.
            env={
                **os.environ,
                **env,
                "KUBETUNE_S3_ENDPOINT": env["AWS_ENDPOINT_URL"],
                "KUBETUNE_S3_CREDENTIALS_SECRET": "kubetune-dev-s3",
            },
        )
    return process, f"running (pid {process.pid}, log {log_path})"


def _stop_process_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
