"""The kubelet of the local cluster's single node: runs each pod's containers as local processes.

The image is not pulled: the container's `command` + `args` run in this project's environment
(the running interpreter's bin directory first on PATH, so `kubetune`, `accelerate` and `python`
are the venv's). What follows the Kubernetes documentation:
- env from values, secretKeyRef, configMapKeyRef, fieldRef (downward API, including
  `metadata.annotations['batch.kubernetes.io/job-completion-index']`), resourceFieldRef, envFrom;
  `$(VAR)` expansion in env values, command and args (`$$` escapes);
- emptyDir volumes as per-pod folders mounted at their mountPath (in the pod's mount namespace);
- restartPolicy Always / OnFailure / Never with CrashLoopBackOff delays (10 s doubling to 5 min,
  scaled by `restart_backoff_base`), init containers in order;
- phases, conditions, containerStatuses with exit codes, reasons and termination messages
  (`FallbackToLogsOnError`: the log tail, at most 80 lines / 2048 bytes, when the container failed);
- logs (stdout and stderr, with timestamps), `previous` logs after a restart;
- graceful deletion: SIGTERM to the container's process group, SIGKILL after the grace period;
  then the kubelet removes the pod object (grace period 0).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubetune.dev.cluster.errors import ApiError
from kubetune.dev.cluster.jsoncopy import clone
from kubetune.dev.cluster.status import NODE_NAME, PODS, record_event, set_condition
from kubetune.dev.cluster.store import Obj, Store, timestamp
from kubetune.dev.node.network import Network, Sandbox

log = logging.getLogger("kubetune.dev.node.kubelet")
MAX_LOG_LINES = 100_000


class ConfigError(Exception):
    """CreateContainerConfigError: a referenced Secret/ConfigMap or key is missing."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, undefined ones kept verbatim,
    `$$` is a literal `$` (https://kubernetes.io/docs/tasks/inject-data-application/define-interdependent-environment-variables/)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "$" and i + 1 < len(text):
            following = text[i + 1]
            if following == "$":
                out.append("$")
                i += 2
                continue
            if following == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env[name] if name in env else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(char)
        i += 1
    return "".join(out)


def _field_ref(pod: Obj, path: str) -> str:
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.podIPs": ",".join(p["ip"] for p in status.get("podIPs") or []),
        "status.hostIPs": ",".join(p["ip"] for p in status.get("hostIPs") or []),
    }
    if path not in simple:
        raise ConfigError(f'unsupported fieldPath "{path}"')
    return str(simple[path] or "")


def _resource_field(container: Obj, ref: Obj) -> str:
    resource = ref.get("resource", "")
    value = ((container.get("resources") or {}).get(resource.split(".")[0]) or {}).get(resource.split(".", 1)[-1])
    if value is not None:
        return str(value)
    if resource.endswith("cpu"):
        return str(os.cpu_count() or 1)
    if resource.endswith("memory"):
        return str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return "0"


@dataclass
class ContainerRun:
    name: str
    process: asyncio.subprocess.Process | None = None
    logs: list[tuple[str, str]] = field(default_factory=list)
    previous_logs: list[tuple[str, str]] | None = None
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    restart_count: int = 0
    started: bool = False
    ever_started: bool = False


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    pod_dir: Path
    sandbox: Sandbox | None = None
    containers: dict[str, ContainerRun] = field(default_factory=dict)
    init_done: bool = False
    terminating: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    phase: str = "Pending"
    start_time: str = ""
    pod_ip: str = ""
    mount_points: list[Path] = field(default_factory=list)


class Kubelet:
    def __init__(
        self,
        store: Store,
        network: Network,
        state_dir: Path,
        restart_backoff_base: float = 10.0,
        tick: float = 0.2,
        run_pods: bool = True,
    ) -> None:
        self.store = store
        self.run_pods = run_pods  # False: pods are bound to the node and stay Pending (a full cluster)
        self.network = network
        self.state_dir = state_dir
        self.restart_backoff_base = restart_backoff_base
        self.tick = tick
        self.pods: dict[str, PodRun] = {}
        self.wake = asyncio.Event()
        self.hosts_version = ""
        self.bin_dir = str(Path(sys.executable).parent)
        # The containers' "image" is this machine's filesystem: the interpreter's environment and
        # kubetune's own source folder (an editable install) stay visible under a volume mounted
        # over a folder holding them (an emptyDir at /tmp, with the checkout under /tmp).
        self.image_paths = sorted({sys.prefix, str(Path(__file__).resolve().parents[2])})
        self.api_port = 0
        store.listeners.append(lambda etype, key, obj: self.wake.set() if key in (PODS, ("", "services")) else None)

    # -- the sync loop ------------------------------------------------------------------------------------

    def register_node(self) -> None:
        rt = self.store.registry.get("", "v1", "nodes")
        assert rt is not None
        if self.store.find(rt.key, "", NODE_NAME) is not None:
            return
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{memory // 1024}Ki", "pods": "110"}
        result = self.store.create(
            rt,
            "",
            {
                "metadata": {
                    "name": NODE_NAME,
                    "labels": {
                        "kubernetes.io/hostname": NODE_NAME,
                        "kubernetes.io/os": "linux",
                        "node-role.kubernetes.io/control-plane": "",
                    },
                }
            },
        )
        node = result.obj
        node["status"] = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": timestamp(),
                    "lastTransitionTime": timestamp(),
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.network.host_ip},
                {"type": "Hostname", "address": NODE_NAME},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.37.0-kubetune-dev",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "process://kubetune-dev",
            },
        }
        self.store.internal_write(rt.key, node)

    async def run(self) -> None:
        self.register_node()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.tick)
            self.wake.clear()
            try:
                self.sync()
            except Exception:
                log.exception("kubelet sync failed")

    def sync(self) -> None:
        live: set[str] = set()
        for pod in self.store.all(PODS):
            meta, spec = pod["metadata"], pod.get("spec") or {}
            uid = meta["uid"]
            live.add(uid)
            if not spec.get("nodeName"):
                if spec.get("schedulerName", "default-scheduler") == "default-scheduler":
                    self._bind(pod)
                continue
            if spec["nodeName"] != NODE_NAME:
                continue
            run = self.pods.get(uid)
            phase = (pod.get("status") or {}).get("phase")
            if meta.get("deletionTimestamp"):
                if run is not None and run.task is not None and not run.task.done():
                    run.terminating.set()
                elif run is None and phase not in ("Succeeded", "Failed"):
                    self._fail_unstarted(pod)  # as the kubelet: a deleted pod ends in a terminal phase
                elif meta.get("deletionGracePeriodSeconds"):
                    self._final_delete(pod)
                continue
            if run is None and phase not in ("Succeeded", "Failed") and self.run_pods:
                run = PodRun(uid, meta["namespace"], meta["name"], self.state_dir / "pods" / uid)
                self.pods[uid] = run
                run.task = asyncio.get_running_loop().create_task(self._run_pod(run))
        for uid in [u for u in self.pods if u not in live]:
            run = self.pods.pop(uid)
            run.terminating.set()
            if run.task is not None and run.task.done():
                self._cleanup(run)
            elif run.task is not None:
                run.task.add_done_callback(lambda _t, r=run: self._cleanup(r))
        self._refresh_hosts()

    def _bind(self, pod: Obj) -> None:
        """The scheduler's part: one node, so every pod binds to it."""
        pod = clone(pod)
        pod["spec"]["nodeName"] = NODE_NAME
        set_condition(pod.setdefault("status", {}), "PodScheduled", "True", "", "")
        pod["status"]["conditions"][-1].pop("reason", None)
        pod["status"]["conditions"][-1].pop("message", None)
        self.store.internal_write(PODS, pod)

    def _fail_unstarted(self, pod: Obj) -> None:
        pod = clone(pod)
        pod.setdefault("status", {})["phase"] = "Failed"
        self.store.internal_write(PODS, pod)

    def _final_delete(self, pod: Obj) -> None:
        with contextlib.suppress(ApiError):
            rt = self.store.registry.get("", "v1", "pods")
            assert rt is not None
            self.store.delete(rt, pod["metadata"]["namespace"], pod["metadata"]["name"], {"gracePeriodSeconds": 0})

    def _cleanup(self, run: PodRun) -> None:
        self.network.destroy(run.uid)
        for mount_point in reversed(run.mount_points):
            with contextlib.suppress(OSError):
                mount_point.rmdir()
        import shutil

        shutil.rmtree(run.pod_dir, ignore_errors=True)

    # -- DNS (hosts files) ------------------------------------------------------------------------------------

    def _refresh_hosts(self) -> None:
        if not self.pods:
            return  # no sandbox to write /etc/hosts into
        services = {
            (s["metadata"]["namespace"], s["metadata"]["name"])
            for s in self.store.all(("", "services"))
            if (s.get("spec") or {}).get("clusterIP") == "None"
        }
        entries: dict[str, list[tuple[str, list[str]]]] = {}
        own: dict[str, tuple[str, list[str]]] = {}
        for pod in self.store.all(PODS):
            run = self.pods.get(pod["metadata"]["uid"])
            if run is None or run.sandbox is None:
                continue
            ns, spec = pod["metadata"]["namespace"], pod["spec"]
            hostname = spec.get("hostname") or pod["metadata"]["name"]
            ip = run.sandbox.ip
            names = [hostname]
            subdomain = spec.get("subdomain")
            if subdomain and (ns, subdomain) in services:
                fqdn = f"{hostname}.{subdomain}.{ns}.svc.cluster.local"
                names = [
                    fqdn,
                    f"{hostname}.{subdomain}.{ns}.svc",
                    f"{hostname}.{subdomain}.{ns}",
                    f"{hostname}.{subdomain}",
                ]
                entries.setdefault(ns, []).append((ip, names))
            # As the kubelet's managed /etc/hosts: the pod's own FQDN *and* bare hostname map to its IP
            # (gloo and NCCL advertise the address their hostname resolves to).
            own[run.uid] = (ip, [*names, hostname] if subdomain else [hostname])
        version = json.dumps([entries, own], sort_keys=True)
        if version == self.hosts_version:
            return
        self.hosts_version = version
        for run in self.pods.values():
            if run.sandbox is None:
                continue
            mine = own.get(run.uid)
            peers = [e for e in entries.get(run.namespace, []) if mine is None or not set(e[1]) <= set(mine[1])]
            self.network.write_hosts(run.sandbox, ([mine] if mine else []) + peers)

    # -- one pod ---------------------------------------------------------------------------------------------

    def _current(self, run: PodRun) -> Obj | None:
        pod = self.store.find(PODS, run.namespace, run.name)
        return clone(pod) if pod is not None and pod["metadata"]["uid"] == run.uid else None

    def _publish(self, run: PodRun) -> None:
        pod = self._current(run)
        if pod is None:
            return
        status = pod.setdefault("status", {})
        spec = pod["spec"]
        init_names = [c["name"] for c in spec.get("initContainers") or []]
        main_names = [c["name"] for c in spec["containers"]]

        def container_status(name: str, image: str) -> Obj:
            c = run.containers.get(name) or ContainerRun(name)
            out: Obj = {
                "name": name,
                "state": c.state,
                "lastState": c.last_state,
                "ready": "running" in c.state and name in main_names,
                "restartCount": c.restart_count,
                "image": image,
                "imageID": "",
                "started": "running" in c.state,
            }
            if c.process is not None:
                out["containerID"] = f"process://{c.process.pid}"
            return out

        images = {c["name"]: c.get("image", "") for c in list(spec.get("initContainers") or []) + spec["containers"]}
        if init_names:
            status["initContainerStatuses"] = [container_status(n, images[n]) for n in init_names]
        status["containerStatuses"] = [container_status(n, images[n]) for n in main_names]
        status["phase"] = run.phase
        status["hostIP"] = self.network.host_ip
        status["hostIPs"] = [{"ip": self.network.host_ip}]
        if run.pod_ip:
            status["podIP"] = run.pod_ip
            status["podIPs"] = [{"ip": run.pod_ip}]
        if run.start_time:
            status["startTime"] = run.start_time
        all_ready = all(s["ready"] for s in status["containerStatuses"])
        terminal = run.phase in ("Succeeded", "Failed")
        set_condition(status, "PodReadyToStartContainers", "True" if run.sandbox and not terminal else "False", "", "")
        set_condition(
            status,
            "Initialized",
            "True" if run.init_done else "False",
            "" if run.init_done else "ContainersNotInitialized",
            "" if run.init_done else "containers with incomplete status: [" + " ".join(init_names) + "]",
        )
        not_ready = [s["name"] for s in status["containerStatuses"] if not s["ready"]]
        reason = "PodCompleted" if terminal else ("" if all_ready else "ContainersNotReady")
        message = (
            ""
            if all_ready and not terminal
            else ("" if terminal else f"containers with unready status: [{' '.join(not_ready)}]")
        )
        set_condition(status, "ContainersReady", "True" if all_ready and not terminal else "False", reason, message)
        set_condition(status, "Ready", "True" if all_ready and not terminal else "False", reason, message)
        for condition in status["conditions"]:
            if not condition.get("reason"):
                condition.pop("reason", None)
            if not condition.get("message"):
                condition.pop("message", None)
        self.store.internal_write(PODS, pod)

    async def _run_pod(self, run: PodRun) -> None:
        pod = self._current(run)
        if pod is None:
            return
        try:
            run.pod_dir.mkdir(parents=True, exist_ok=True)
            run.sandbox = self.network.create(run.uid, run.pod_dir)
            run.pod_ip = run.sandbox.ip
            run.start_time = timestamp()
            self._refresh_hosts()
            self._publish(run)
            record_event(
                self.store,
                pod,
                "Scheduled",
                f"Successfully assigned {run.namespace}/{run.name} to {NODE_NAME}",
                component="default-scheduler",
            )
            volumes = self._volumes(run, pod)
            spec = pod["spec"]
            policy = spec.get("restartPolicy", "Always")
            for container in spec.get("initContainers") or []:
                while True:
                    code = await self._run_container(run, container, volumes)
                    if code == 0 or run.terminating.is_set() or policy == "Never":
                        break
                    await self._backoff(run, run.containers[container["name"]])
                if code != 0 or run.terminating.is_set():
                    run.phase = "Failed"
                    self._publish(run)
                    await self._finish(run)
                    return
            run.init_done = True
            run.phase = "Running"
            codes = await asyncio.gather(*(self._container_loop(run, c, volumes, policy) for c in spec["containers"]))
            run.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            self._publish(run)
            await self._finish(run)
        except Exception as error:  # never leave a pod silently stuck: report it on the pod
            log.exception("pod %s/%s failed to run", run.namespace, run.name)
            run.phase = "Failed"
            for c in run.containers.values():
                if "terminated" not in c.state:
                    c.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(error)}}
            self._publish(run)
            await self._finish(run)

    async def _finish(self, run: PodRun) -> None:
        """A terminal pod gives its network back (its IP stays in status) and, when it was being
        deleted, is removed now that its containers stopped."""
        self.network.destroy(run.uid)
        run.sandbox = None
        self.hosts_version = ""
        pod = self._current(run)
        if pod is not None and pod["metadata"].get("deletionTimestamp"):
            self._final_delete(pod)

    async def _backoff(self, run: PodRun, c: ContainerRun) -> None:
        """CrashLoopBackOff before a restart; the restart counts from here on (RESTARTS column)."""
        c.last_state = {"terminated": c.state.get("terminated", {})}
        c.restart_count += 1
        delay = min(self.restart_backoff_base * 2 ** max(0, c.restart_count - 1), self.restart_backoff_base * 30)
        c.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": (
                    f"back-off {int(delay)}s restarting failed container={c.name} "
                    f"pod={run.name}_{run.namespace}({run.uid})"
                ),
            }
        }
        self._publish(run)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.terminating.wait(), delay)

    async def _container_loop(self, run: PodRun, container: Obj, volumes: dict[str, Path], policy: str) -> int:
        while True:
            code = await self._run_container(run, container, volumes)
            if run.terminating.is_set() or policy == "Never" or (policy == "OnFailure" and code == 0):
                return code
            await self._backoff(run, run.containers[container["name"]])
            if run.terminating.is_set():
                return code

    def _volumes(self, run: PodRun, pod: Obj) -> dict[str, Path]:
        volumes: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            path = run.pod_dir / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in volume:
                volumes[volume["name"]] = path
            elif "secret" in volume or "configMap" in volume:
                self._project(run, volume, path)
                volumes[volume["name"]] = path
            elif "hostPath" in volume:
                volumes[volume["name"]] = Path(volume["hostPath"]["path"])
        return volumes

    def _project(self, run: PodRun, volume: Obj, path: Path) -> None:
        source = volume.get("secret") or volume.get("configMap") or {}
        is_secret = "secret" in volume
        name = source.get("secretName") if is_secret else source.get("name")
        obj = self.store.find(("", "secrets" if is_secret else "configmaps"), run.namespace, name or "")
        if obj is None:
            if source.get("optional"):
                return
            raise ConfigError(f'{"secret" if is_secret else "configmap"} "{name}" not found')
        data = (
            {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            if is_secret
            else {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        )
        for item in source.get("items") or [{"key": k, "path": k} for k in data]:
            target = path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data.get(item["key"], b""))

    def resolve_env(self, pod: Obj, container: Obj) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}

        def lookup(kind: str, name: str, key: str | None, optional: bool) -> Any:
            obj = self.store.find(("", "secrets" if kind == "Secret" else "configmaps"), namespace, name)
            if obj is None:
                if optional:
                    return None
                raise ConfigError(f'{kind.lower()} "{name}" not found')
            data = obj.get("data") or {}
            if key is None:
                return {k: (base64.b64decode(v).decode() if kind == "Secret" else v) for k, v in data.items()}
            if key not in data:
                if optional:
                    return None
                raise ConfigError(f"couldn't find key {key} in {kind} {namespace}/{name}")
            return base64.b64decode(data[key]).decode() if kind == "Secret" else data[key]

        for source in container.get("envFrom") or []:
            ref = source.get("secretRef") or source.get("configMapRef") or {}
            values = lookup(
                "Secret" if "secretRef" in source else "ConfigMap", ref.get("name", ""), None, bool(ref.get("optional"))
            )
            for key, value in (values or {}).items():
                env[source.get("prefix", "") + key] = value
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand(str(item.get("value", "")), env)
                continue
            source = item["valueFrom"]
            value: Any = None
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                value = lookup("Secret", ref["name"], ref["key"], bool(ref.get("optional")))
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                value = lookup("ConfigMap", ref["name"], ref["key"], bool(ref.get("optional")))
            elif "fieldRef" in source:
                value = _field_ref(pod, source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                value = _resource_field(container, source["resourceFieldRef"])
            if value is not None:
                env[name] = value
        return env

    async def _run_container(self, run: PodRun, container: Obj, volumes: dict[str, Path]) -> int:
        name = container["name"]
        c = run.containers.setdefault(name, ContainerRun(name))
        pod = self._current(run)
        if pod is None or run.terminating.is_set():
            return 137
        while True:
            try:
                pod_env = self.resolve_env(pod, container)
                break
            except ConfigError as error:
                if c.state.get("waiting", {}).get("reason") != "CreateContainerConfigError":
                    record_event(self.store, pod, "Failed", f"Error: {error}", "Warning", component="kubelet")
                c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
                self._publish(run)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(run.terminating.wait(), 1.0)
                if run.terminating.is_set():
                    return 137
                pod = self._current(run) or pod
        argv = [expand(str(a), pod_env) for a in (container.get("command") or []) + (container.get("args") or [])]
        if not argv:
            c.state = {
                "waiting": {
                    "reason": "CreateContainerError",
                    "message": "no command specified: the local cluster "
                    "does not pull images, so a container needs `command`",
                }
            }
            self._publish(run)
            await run.terminating.wait()
            return 128
        sandbox = run.sandbox
        assert sandbox is not None
        hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
        work = run.pod_dir / "containers" / name
        # A container starts with a fresh writable filesystem: its own HOME and TMPDIR stand in for
        # that, so nothing a pod caches (or half-writes) leaks into another pod or a later run.
        home, tmp = work / "home", work / "tmp"
        for folder in (home, tmp):
            folder.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}",
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "HOSTNAME": hostname,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "KUBERNETES_SERVICE_HOST": self.network.host_ip,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            **pod_env,
        }
        binds: list[tuple[str, str]] = []
        if not sandbox.netns:
            binds.append((str(sandbox.hosts_path), "/etc/hosts"))
        for mount in container.get("volumeMounts") or []:
            source = volumes.get(mount["name"])
            if source is None:
                continue
            target = Path(mount["mountPath"])
            if not target.exists():
                created = [p for p in [target, *target.parents] if not p.exists()]
                target.mkdir(parents=True, exist_ok=True)
                run.mount_points.extend(reversed(created))
            binds.append((str(source / mount.get("subPath", "")), str(target)))
        cwd = container.get("workingDir") or str(work)
        spec_file = run.pod_dir / f".podinit-{name}-{c.restart_count}.json"
        spec_file.touch(mode=0o600)
        spec_file.write_text(
            json.dumps(
                {"argv": argv, "env": env, "cwd": cwd, "hostname": hostname, "binds": binds, "image": self.image_paths}
            )
        )
        command = self.network.wrap(sandbox, [sys.executable, "-m", "kubetune.dev.node.podinit", str(spec_file)])
        if c.ever_started:
            c.previous_logs, c.logs = c.logs, []
        started_at = timestamp()
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                # No PYTHONPATH from our sys.path: started from the repo root it would put operator/
                # ahead of the standard library's `operator` (the venv interpreter finds kubetune itself).
                start_new_session=True,
                cwd=str(work),
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            )
        except OSError as error:
            c.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(error),
                    "startedAt": started_at,
                    "finishedAt": timestamp(),
                }
            }
            self._publish(run)
            return 128
        c.process = process
        c.ever_started = True
        self._track_pid(process.pid, True)
        c.state = {"running": {"startedAt": started_at}}
        self._publish(run)
        record_event(self.store, pod, "Started", f"Started container {name}", component="kubelet")
        reader = asyncio.get_running_loop().create_task(self._read_logs(process, c))
        killer = asyncio.get_running_loop().create_task(self._kill_on_delete(run, process))
        code = await process.wait()
        killer.cancel()
        await reader
        self._track_pid(process.pid, False)
        exit_code = 128 - code if code < 0 else code
        message = ""
        policy = container.get("terminationMessagePolicy", "File")
        message_path = container.get("terminationMessagePath", "/dev/termination-log")
        for mount in container.get("volumeMounts") or []:
            if message_path.startswith(mount["mountPath"].rstrip("/") + "/") and mount["name"] in volumes:
                local = volumes[mount["name"]] / message_path[len(mount["mountPath"].rstrip("/")) + 1 :]
                with contextlib.suppress(OSError):
                    message = local.read_text()[-4096:]
        if not message and policy == "FallbackToLogsOnError" and exit_code != 0:
            tail = "".join(line for _, line in c.logs[-80:])
            message = tail.encode()[-2048:].decode(errors="ignore")
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": started_at,
            "finishedAt": timestamp(),
            "containerID": f"process://{process.pid}",
        }
        if code < 0:
            terminated["signal"] = -code
        if message:
            terminated["message"] = message
        c.state = {"terminated": terminated}
        self._publish(run)
        return exit_code

    async def _read_logs(self, process: asyncio.subprocess.Process, c: ContainerRun) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # a line longer than the stream limit: take what is there
                line = await process.stdout.read(65536)
            if not line:
                return
            text = line.decode(errors="replace")
            if not text.endswith("\n"):
                text += "\n"
            c.logs.append((datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), text))
            if len(c.logs) > MAX_LOG_LINES:
                del c.logs[: len(c.logs) - MAX_LOG_LINES]

    async def _kill_on_delete(self, run: PodRun, process: asyncio.subprocess.Process) -> None:
        """Graceful deletion: SIGTERM to the process group, SIGKILL once the grace period is over."""
        await run.terminating.wait()
        pod = self._current(run)
        grace = float((pod or {}).get("metadata", {}).get("deletionGracePeriodSeconds") or 0)
        if pod is not None:
            record_event(
                self.store,
                pod,
                "Killing",
                f"Stopping container {self._container_of(run, process)}",
                component="kubelet",
            )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(process.wait()), max(grace, 0.1) if grace else 0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    @staticmethod
    def _container_of(run: PodRun, process: asyncio.subprocess.Process) -> str:
        return next((c.name for c in run.containers.values() if c.process is process), "")

    def _track_pid(self, pid: int, alive: bool) -> None:
        """Every container's process group is listed under state_dir/pids, so `dev down` can stop
        what a crashed control plane left behind."""
        marker = self.state_dir / "pids" / str(pid)
        if alive:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("")
        else:
            with contextlib.suppress(OSError):
                marker.unlink()

    # -- what the API server asks ------------------------------------------------------------------------------

    def log_lines(self, pod: Obj, container: str, previous: bool = False) -> list[tuple[str, str]] | None:
        run = self.pods.get(pod["metadata"]["uid"])
        c = run.containers.get(container) if run else None
        if c is None or not c.ever_started:
            return None
        if previous:
            if c.previous_logs is None:
                raise ApiError(
                    400,
                    "BadRequest",
                    f'previous terminated container "{container}" in pod "{pod["metadata"]["name"]}" not found',
                )
            return list(c.previous_logs)
        return list(c.logs)

    def container_running(self, uid: str, container: str) -> bool:
        run = self.pods.get(uid)
        c = run.containers.get(container) if run else None
        return c is not None and "running" in c.state

    async def shutdown(self, grace: float = 2.0) -> None:
        """Stop every container: SIGTERM, then SIGKILL after `grace` seconds."""
        processes = [
            c.process
            for run in self.pods.values()
            for c in run.containers.values()
            if c.process is not None and c.process.returncode is None
        ]
        for process in processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in processes:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), max(0.01, deadline - time.monotonic()))
        for process in processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for run in self.pods.values():
            if run.task is not None:
                run.task.cancel()
        for run in list(self.pods.values()):
            self._cleanup(run)
        self.pods.clear()


__all__ = ["Kubelet", "expand"]
