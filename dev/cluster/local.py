"""LocalCluster: the API server, controllers and kubelet on one asyncio loop in a thread, plus S3
(moto's server, in a child process) and an HTTP server for fixture images, all on this machine.

Used in-process by the pytest plugin and in the background by `kubetune dev up` (cli.py).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import yaml
from aiohttp import web

from kubetune.dev.cluster.apiserver import ADMIN_TOKEN, ApiServer
from kubetune.dev.cluster.resources import Registry
from kubetune.dev.cluster.store import Store
from kubetune.dev.controllers.manager import Controllers
from kubetune.dev.node.kubelet import Kubelet
from kubetune.dev.node.network import Network
from kubetune.launch import free_port

log = logging.getLogger("kubetune.dev")

S3_SECRET = "kubetune-dev-s3"
S3_BUCKET = "kubetune-dev"
S3_ACCESS_KEY = "kubetune-dev"
S3_SECRET_KEY = "kubetune-dev-secret"  # moto accepts any credentials; these only have to match
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass
class ClusterInfo:
    """What a client needs to reach the cluster (also written to <state_dir>/cluster.json)."""

    kubeconfig: str
    api_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    bucket: str
    host_ip: str
    network: str
    images_url: str
    state_dir: str
    pid: int = 0

    def env(self) -> dict[str, str]:
        """Environment for a host process (the operator, a test's subprocess) using this cluster."""
        return {
            "KUBECONFIG": self.kubeconfig,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def api_client(self) -> Any:
        """An official kubernetes-client ApiClient for this cluster (not the global default)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)

    def kubeconfig_for(self, user: str) -> str:
        """A kubeconfig like this cluster's, whose token is `user`: the API server records that
        user's requests in the audit log (see `audit`), e.g. a process tested against RBAC rules."""
        config = yaml.safe_load(Path(self.kubeconfig).read_text())
        config["users"] = [{"name": "kubetune-dev", "user": {"token": user}}]
        path = Path(self.state_dir) / f"kubeconfig-{user}"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return str(path)

    def audit(self, user: str) -> list[dict[str, Any]]:
        """The requests made as `user` (a kubeconfig from `kubeconfig_for`), oldest first: verb,
        apiGroup, resource, subresource, namespace, name (or nonResourceURL) and code."""
        try:
            lines = (Path(self.state_dir) / "audit.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        records = [json.loads(line) for line in lines if line.strip()]
        return [r for r in records if r.get("user") == user]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class LocalCluster:
    def __init__(
        self,
        state_dir: Path,
        *,
        network: str = "auto",
        api_port: int = 0,
        s3: bool = True,
        images: bool = True,
        job_backoff_base: float = 10.0,
        restart_backoff_base: float = 10.0,
        bookmark_interval: float = 30.0,
        run_pods: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.registry = Registry()
        self.store = Store(self.registry)
        self.network = Network(self.state_dir, network)
        self.controllers = Controllers(self.store, self.registry, job_backoff_base=job_backoff_base)
        self.kubelet = Kubelet(
            self.store, self.network, self.state_dir, restart_backoff_base=restart_backoff_base, run_pods=run_pods
        )
        self.api = ApiServer(
            self.store, self.registry, bookmark_interval=bookmark_interval, audit_path=self.state_dir / "audit.jsonl"
        )
        self.api.kubelet = self.kubelet
        self.api_port = api_port
        self.with_s3, self.with_images = s3, images
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._s3_servers: list[subprocess.Popen[bytes]] = []
        self._image_server: http.server.ThreadingHTTPServer | None = None
        self.info: ClusterInfo | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> ClusterInfo:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.network.setup()
        try:
            self._thread = threading.Thread(target=self._thread_main, name="kubetune-dev-cluster", daemon=True)
            self._thread.start()
            self._ready.wait(60)
            if self._error is not None or not self._ready.is_set():
                raise RuntimeError(f"the local cluster did not start: {self._error!r}")
            s3_endpoint = self._start_s3() if self.with_s3 else ""
            images_url = self._start_images() if self.with_images else ""
            kubeconfig = self._write_kubeconfig()
            self.info = ClusterInfo(
                str(kubeconfig),
                self.api_url,
                s3_endpoint,
                S3_ACCESS_KEY,
                S3_SECRET_KEY,
                S3_BUCKET,
                self.network.host_ip,
                self.network.mode,
                images_url,
                str(self.state_dir),
            )
            self._bootstrap()
        except BaseException:
            self.stop()
            raise
        return self.info

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:  # reported to start()
            self._error = error
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.api.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.api_port)
        await site.start()
        self.api_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if self.network.host_ip != "127.0.0.1":
            await web.TCPSite(runner, self.network.host_ip, self.api_port).start()
        self.api.server_addresses = [f"127.0.0.1:{self.api_port}"]
        self.kubelet.api_port = self.api_port
        for name in SYSTEM_NAMESPACES:
            rt = self.registry.get("", "v1", "namespaces")
            assert rt is not None
            self.store.create(rt, "", {"metadata": {"name": name}})
        tasks = [
            asyncio.get_running_loop().create_task(self.controllers.run()),
            asyncio.get_running_loop().create_task(self.kubelet.run()),
        ]
        self._ready.set()
        await self._stop.wait()
        await self.kubelet.shutdown()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()

    def stop(self) -> None:
        """Stop pods (SIGTERM, then SIGKILL), the API, S3 and the image server; remove the network."""
        if self.loop is not None and self._stop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        for process in self._s3_servers:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._s3_servers.clear()
        if self._image_server is not None:
            self._image_server.shutdown()
            self._image_server.server_close()
            self._image_server = None
        self.network.teardown()

    def __enter__(self) -> ClusterInfo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the cluster's loop (the store is single-threaded) and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    # -- side services --------------------------------------------------------------------------------------

    def _start_s3(self) -> str:
        """moto's server in a process of its own (s3server.py), so it does not share this process's
        interpreter lock with the API server."""
        port = free_port(self.network.host_ip)
        with open(self.state_dir / "s3.log", "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "kubetune.dev.s3.server", self.network.host_ip, str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self._s3_servers.append(process)
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                probe.settimeout(1.0)
                if probe.connect_ex((self.network.host_ip, port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (self.state_dir / "s3.log").read_text(errors="replace").strip().splitlines()[-1:] or [
                    "no output"
                ]
                raise RuntimeError(f"the S3 server (moto) did not start: {tail[0]}")
            time.sleep(0.05)
        endpoint = f"http://{self.network.host_ip}:{port}"
        client = s3_client_for(endpoint)
        client.create_bucket(Bucket=S3_BUCKET)
        return endpoint

    def _start_images(self) -> str:
        folder = self.state_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self._image_server = http.server.ThreadingHTTPServer((self.network.host_ip, 0), handler)
        threading.Thread(target=self._image_server.serve_forever, name="kubetune-dev-images", daemon=True).start()
        return f"http://{self.network.host_ip}:{self._image_server.server_address[1]}"

    def _write_kubeconfig(self) -> Path:
        path = self.state_dir / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": "kubetune-dev", "cluster": {"server": self.api_url}}],
            "users": [{"name": "kubetune-dev", "user": {"token": ADMIN_TOKEN}}],
            "contexts": [
                {
                    "name": "kubetune-dev",
                    "context": {"cluster": "kubetune-dev", "user": "kubetune-dev", "namespace": "default"},
                }
            ],
            "current-context": "kubetune-dev",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    def _bootstrap(self) -> None:
        """The S3 credentials Secret, the FineTuneJob CRD and Kueue's CRDs."""
        if self.with_s3:
            self.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": S3_SECRET, "namespace": "default"},
                    "type": "Opaque",
                    "data": {
                        "AWS_ACCESS_KEY_ID": base64.b64encode(S3_ACCESS_KEY.encode()).decode(),
                        "AWS_SECRET_ACCESS_KEY": base64.b64encode(S3_SECRET_KEY.encode()).decode(),
                    },
                }
            )
        from kubetune.api.crd import finetunejob_crd
        from kubetune.dev.controllers.kueue import kueue_crds

        self.apply(finetunejob_crd())
        for crd in kueue_crds():  # the controllers' Kueue admits Jobs labelled with a LocalQueue
            self.apply(crd)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create `obj` over HTTP (as a client would), replacing nothing that exists."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        rt = self.registry.by_kind(api_version, kind)
        if rt is None:
            raise ValueError(f"unknown kind {api_version}/{kind}")
        prefix = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        namespace = obj["metadata"].get("namespace", "default")
        url = (
            f"{self.api_url}{prefix}/namespaces/{namespace}/{rt.plural}"
            if rt.namespaced
            else f"{self.api_url}{prefix}/{rt.plural}"
        )
        response = requests.post(url, json=obj, timeout=30)
        if response.status_code == 409:
            return dict(requests.get(f"{url}/{obj['metadata']['name']}", timeout=30).json())
        response.raise_for_status()
        return dict(response.json())


def s3_client_for(endpoint: str) -> Any:
    """A boto3 client with the cluster's credentials (explicit: the caller's environment may have
    none, or another endpoint's)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass
