"""How a trainer is started: the `accelerate launch` command line, and a small supervisor.

`accelerate_launch_command` is pure (no torch, no environment): the operator renders it into
trainer pods and `kubetune run` runs it on one machine. One process per GPU; a CPU node
(gpusPerNode 0) runs one process. `--multi_gpu` whenever there is more than one process in all:
on a machine without GPUs accelerate then runs gloo (MULTI_CPU), which is what makes two
"nodes" on one CPU machine work (`--cpu` would silently run a single process).
`local_launch_command` is that command for this machine (`kubetune run`, `kubetune collect
--train`), with `count_gpus` and `free_port`.

`python -m kubetune.launch accelerate launch ...` (`supervise`) exists because of two facts
measured with accelerate 1.15 (tests/trainer/test_resume.py):
- single process: `accelerate launch` does not forward SIGTERM; it dies with 143 and leaves the
  trainer running unaware (and as a container's PID 1 it ignores SIGTERM altogether);
- several processes: torch's elastic agent forwards SIGTERM, waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT
  (30 s by default) before SIGKILL, and then `accelerate launch` exits 1 with a traceback, even when
  every worker saved its checkpoint and exited 75.
The supervisor sends SIGTERM to every process of the launch, gives the agent the grace period,
and exits 75 (EXIT_PREEMPTED) when the trainers say they were preempted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kubetune.api.layout import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED

# The trainer writes its exit code to <this dir>/exit-<rank> (see kubetune.trainer.cli).
EXIT_DIR_ENV = "KUBETUNE_EXIT_DIR"


def accelerate_launch_command(
    nodes: int,
    gpus_per_node: int,
    machine_rank: int | str,
    main_process_ip: str,
    main_process_port: int,
    trainer_args: Sequence[str],
    mixed_precision: str | None = None,
    python: str | None = None,
) -> list[str]:
    """`accelerate launch` flags for `nodes` machines with `gpus_per_node` GPUs each, then
    `-m kubetune.trainer <trainer_args>`.

    `machine_rank` may be a string Kubernetes expands, e.g. "$(JOB_COMPLETION_INDEX)".
    `mixed_precision` is the trainer's (`no`, `fp16`, `bf16`; `fp32` means `no`); by default it is
    read from `--mixed_precision` in `trainer_args`.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be at least 1 (got {nodes})")
    if gpus_per_node < 0:
        raise ValueError(f"gpusPerNode must be 0 or more (got {gpus_per_node})")
    processes = nodes * max(gpus_per_node, 1)
    precision = mixed_precision or _flag_value(trainer_args, "--mixed_precision") or "no"
    precision = "no" if precision == "fp32" else precision
    command = [python, "-m", "accelerate.commands.launch"] if python else ["accelerate", "launch"]
    if processes > 1:
        command.append("--multi_gpu")
    elif gpus_per_node == 0:
        command.append("--cpu")  # one process: force CPU even where a GPU is visible
    command += ["--num_processes", str(processes), "--num_machines", str(nodes)]
    if nodes > 1:
        command += ["--machine_rank", str(machine_rank), "--main_process_ip", main_process_ip]
    if processes > 1:
        command += ["--main_process_port", str(main_process_port)]
    command += ["--mixed_precision", precision, "--dynamo_backend", "no", "-m", "kubetune.trainer", *trainer_args]
    return command


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The flag's last value, as argparse reads it (a later flag overrides an earlier one)."""
    value = None
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def count_gpus() -> int:
    """GPUs visible to this process, without importing torch (nvidia-smi, CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def local_launch_command(trainer_args: Sequence[str], gpus: int, mixed_precision: str | None = None) -> list[str]:
    """The trainer on this machine, one node with `gpus` processes (0: one CPU process), under the
    supervisor, exactly as a trainer pod runs it."""
    launch = accelerate_launch_command(
        1, gpus, 0, "127.0.0.1", free_port(), trainer_args, mixed_precision=mixed_precision, python=sys.executable
    )
    return [sys.executable, "-m", "kubetune.launch", *launch]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def supervise(command: Sequence[str], grace_seconds: int = 600) -> int:
    """Run `command` (an `accelerate launch` line) in its own process group; on SIGTERM/SIGINT
    signal the whole group, wait, and return 75 when the trainers exited as preempted."""
    with tempfile.TemporaryDirectory(prefix="kubetune-exit-") as exit_dir:
        env = dict(os.environ)
        env[EXIT_DIR_ENV] = exit_dir
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(grace_seconds))
        _become_subreaper()
        process = subprocess.Popen(list(command), env=env, start_new_session=True)
        stopping = False

        def forward(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        returncode = process.wait()
        _reap_orphans()  # a single-process `accelerate launch` dies first and orphans the trainer
        codes = [int(p.read_text() or EXIT_FAILED) for p in Path(exit_dir).glob("exit-*")]
        messages = sorted(Path(exit_dir).glob("message-*"), key=lambda p: int(p.name.split("-")[1]))
        if returncode != EXIT_OK and messages:
            # the last line of the pod's log: what the operator reports (FallbackToLogsOnError),
            # rather than the tail of torch elastic's ChildFailedError banner
            rank, message = messages[0].name.split("-")[1], messages[0].read_text().strip()
            print(f"kubetune train: error: (rank {rank}) {message}", file=sys.stderr, flush=True)
    if returncode == EXIT_OK:
        return EXIT_OK
    if codes and all(code == EXIT_PREEMPTED for code in codes):
        return EXIT_PREEMPTED
    if stopping and not codes:
        return EXIT_PREEMPTED if returncode in (EXIT_PREEMPTED, -signal.SIGTERM, 128 + signal.SIGTERM) else EXIT_FAILED
    nonzero = [code for code in codes if code not in (EXIT_OK, EXIT_PREEMPTED)]
    if nonzero:
        return nonzero[0]
    return returncode if 0 < returncode < 128 else EXIT_FAILED


def _become_subreaper() -> None:
    """Adopt orphaned descendants (Linux prctl PR_SET_CHILD_SUBREAPER), so we can wait for them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap_orphans() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(
            "usage: python -m kubetune.launch accelerate launch [FLAGS] -m kubetune.trainer [ARGS]\n"
            "Runs the command, forwards SIGTERM to every process of it, exits 75 when preempted."
        )
        return 0 if args else 2
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
