"""A container's first process: enter the pod's private namespaces, then exec the command.

The kubelet runs `[ip netns exec <pod-netns>] python -m kubetune.dev.node.podinit SPEC_FILE`; this
module (stdlib only, so it starts fast) unshares a mount and a UTS namespace where it may, sets the
pod's hostname, bind-mounts the pod's hosts file over /etc/hosts (host mode; `ip netns exec` does it
in netns mode) and each volume over its mountPath, then replaces itself with the container's
command. Where namespaces are not allowed it runs the command unchanged (docs say what differs).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_BIND = 4096


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def enter(spec: dict[str, object]) -> list[str]:
    """Set up namespaces; returns warnings (never fatal: the command still runs)."""
    warnings: list[str] = []
    libc = _libc()
    try:
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
        _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    except OSError as error:
        return [f"no private namespaces ({error}); hostname, /etc/hosts and volume mounts are not applied"]
    hostname = str(spec.get("hostname") or "")
    if hostname:
        try:
            socket.sethostname(hostname[:63])
        except OSError as error:
            warnings.append(f"cannot set hostname: {error}")
    binds = list(spec.get("binds") or [])  # type: ignore[call-overload]
    # Every source is opened before the first mount: a volume mounted over /tmp would otherwise hide
    # the sources (and the pod's folders) that live under the cluster's state dir in /tmp.
    # The same goes for the "image" (the interpreter's environment, kubetune's source) when it lives
    # under a mount target: it is bound again at its own path, inside the volume.
    targets = [str(target).rstrip("/") + "/" for _, target in binds]
    image = [str(path) for path in spec.get("image") or [] if any(str(path).startswith(t) for t in targets)]  # type: ignore[attr-defined]
    binds += [(path, path) for path in image]
    sources: list[int | None] = []
    for source, target in binds:
        try:
            sources.append(os.open(source, os.O_PATH))
        except OSError as error:
            sources.append(None)
            warnings.append(f"bind {target}: {error}")
    for (_, target), fd in zip(binds, sources, strict=True):
        if fd is None:
            continue
        try:
            if target in image:
                os.makedirs(target, exist_ok=True)
            _check(libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, MS_BIND, None), f"bind {target}")
        except OSError as error:
            warnings.append(str(error))
        finally:
            os.close(fd)
    return warnings


def ensure_folders(spec: dict[str, object]) -> None:
    """The working directory, HOME and TMPDIR the kubelet chose exist, also when a volume now covers
    the place they were made in (an emptyDir at /tmp): they are made again, inside the volume."""
    env = spec["env"]
    for folder in (spec["cwd"], env.get("HOME"), env.get("TMPDIR")):  # type: ignore[union-attr]
        if folder:
            os.makedirs(str(folder), exist_ok=True)


def main() -> None:
    # The spec (with the container's env, secrets included) comes in a 0600 file, never on the
    # command line where `ps` would show it.
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    os.unlink(sys.argv[1])
    for warning in enter(spec):
        print(f"kubetune-dev podinit: {warning}", file=sys.stderr, flush=True)
    ensure_folders(spec)
    os.chdir(str(spec["cwd"]))
    argv = [str(a) for a in spec["argv"]]  # type: ignore[union-attr]
    env = {str(k): str(v) for k, v in spec["env"].items()}  # type: ignore[union-attr]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as error:
        # What a container runtime reports when the executable is missing (exit code 127 or 126).
        print(f'exec: "{argv[0]}": {error.strerror}', file=sys.stderr, flush=True)
        sys.exit(127 if isinstance(error, FileNotFoundError) else 126)


if __name__ == "__main__":
    main()
