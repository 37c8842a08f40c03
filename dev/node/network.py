"""Pod networking for the local cluster.

`netns` mode (root, iproute2): one Linux bridge per cluster with the host at `.1`; each pod gets
its own network namespace, a veth into the bridge and its own IP, like a CNI plugin's bridge
network. Two pods can both listen on port 29500, and pods reach the API server, S3 and the image
server at the host's bridge address, as real pods reach Services. Each pod's /etc/hosts (the
`ip netns exec` convention: /etc/netns/<name>/hosts is bind-mounted over /etc/hosts in the pod's
mount namespace) lists the pods of its namespace behind headless Services as
`<hostname>.<subdomain>[.<ns>[.svc[.cluster.local]]]`, which is what cluster DNS answers.

`host` mode (no root or no iproute2): pods share the host's network, every pod hostname maps to
127.0.0.1 (through a private mount namespace when one can be made), and two pods listening on the
same port collide. docs/local-cluster.md lists the differences.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("kubetune.dev.node.network")


@dataclass
class Sandbox:
    uid: str
    ip: str
    netns: str = ""  # empty in host mode
    hosts_path: Path = field(default_factory=Path)
    hosts_content: str = ""


def _ip(*args: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", *args], input=stdin, text=True, check=True, capture_output=True, timeout=20)


def _host_hosts() -> str:
    try:
        return Path("/etc/hosts").read_text()
    except OSError:
        return "127.0.0.1\tlocalhost\n"


class Network:
    def __init__(self, state_dir: Path, mode: str = "auto") -> None:
        self.state_dir = state_dir
        self.requested = mode
        self.mode = "host"
        self.host_ip = "127.0.0.1"
        self.bridge = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.cluster_id = uuid.uuid4().hex[:6]
        self.free_ips: list[str] = []
        self.sandboxes: dict[str, Sandbox] = {}

    def setup(self) -> None:
        if self.requested in ("auto", "netns") and netns_available():
            try:
                self._create_bridge()
                self.mode = "netns"
                return
            except (subprocess.SubprocessError, OSError) as error:
                if self.requested == "netns":
                    raise RuntimeError(
                        f"cannot create the pod network: {getattr(error, 'stderr', '') or error}"
                    ) from error
                log.warning("pod network namespaces unavailable (%s); pods share the host network", error)
        elif self.requested == "netns":
            raise RuntimeError("pod network namespaces need root and iproute2 ('ip netns')")
        self.mode, self.host_ip = "host", "127.0.0.1"

    def _create_bridge(self) -> None:
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        for _ in range(50):
            subnet = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
            if str(subnet.network_address)[:-1] not in used:
                break
        self.subnet = subnet
        hosts = [str(h) for h in subnet.hosts()]
        self.host_ip = hosts[0]
        self.free_ips = hosts[1:]
        self.bridge = f"ktb{self.cluster_id}"
        _ip(
            "-batch",
            "-",
            stdin=(
                f"link add {self.bridge} type bridge\n"
                f"addr add {self.host_ip}/24 dev {self.bridge}\n"
                f"link set {self.bridge} up\n"
            ),
        )

    def teardown(self) -> None:
        for sandbox in list(self.sandboxes.values()):
            self.destroy(sandbox.uid)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            self.bridge = ""

    def create(self, uid: str, pod_dir: Path) -> Sandbox:
        if uid in self.sandboxes:
            return self.sandboxes[uid]
        if self.mode == "host":
            sandbox = Sandbox(uid, "127.0.0.1", hosts_path=pod_dir / "hosts")
        else:
            ip = self.free_ips.pop(0)
            name = f"kt{self.cluster_id}-{uid[:8]}"
            veth = f"ktv{uid[:8]}"
            _ip("netns", "add", name)
            try:
                _ip(
                    "-batch",
                    "-",
                    stdin=(
                        f"link add {veth} type veth peer name eth0 netns {name}\n"
                        f"link set {veth} master {self.bridge} up\n"
                    ),
                )
                _ip(
                    "-n",
                    name,
                    "-batch",
                    "-",
                    stdin=(
                        f"addr add {ip}/24 dev eth0\nlink set eth0 up\nlink set lo up\n"
                        f"route add default via {self.host_ip}\n"
                    ),
                )
            except subprocess.SubprocessError:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                self.free_ips.insert(0, ip)
                raise
            hosts_dir = Path("/etc/netns") / name
            hosts_dir.mkdir(parents=True, exist_ok=True)
            sandbox = Sandbox(uid, ip, name, hosts_dir / "hosts")
        sandbox.hosts_path.parent.mkdir(parents=True, exist_ok=True)
        sandbox.hosts_path.write_text("127.0.0.1\tlocalhost\n")
        self.sandboxes[uid] = sandbox
        return sandbox

    def destroy(self, uid: str) -> None:
        sandbox = self.sandboxes.pop(uid, None)
        if sandbox is None or not sandbox.netns:
            return
        subprocess.run(["ip", "netns", "del", sandbox.netns], capture_output=True)
        shutil.rmtree(sandbox.hosts_path.parent, ignore_errors=True)
        self.free_ips.append(sandbox.ip)

    def write_hosts(self, sandbox: Sandbox, entries: list[tuple[str, list[str]]]) -> None:
        """Rewrite the pod's hosts file in place (same inode), so a running pod sees new peers, as
        DNS answers change when peers start."""
        lines = [
            "# Kubernetes-managed hosts file (kubetune local cluster).",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
        ]
        if self.mode == "host":
            lines.append(_host_hosts().rstrip())
        lines += [f"{ip}\t{' '.join(names)}" for ip, names in entries]
        content = "\n".join(lines) + "\n"
        if content == sandbox.hosts_content:
            return
        with open(sandbox.hosts_path, "r+" if sandbox.hosts_path.exists() else "w") as handle:
            handle.seek(0)
            handle.write(content)
            handle.truncate()
        sandbox.hosts_content = content

    def wrap(self, sandbox: Sandbox, argv: list[str]) -> list[str]:
        """The command line that enters the pod's namespaces, then runs podinit (see podinit.py)."""
        if sandbox.netns:
            return ["ip", "netns", "exec", sandbox.netns, *argv]
        return argv


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and Path("/proc/self/ns/net").exists()
