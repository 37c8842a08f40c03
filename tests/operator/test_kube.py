"""What the operator reads from storage (a local folder here; S3 is the same Store), and its
Kubernetes client plumbing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.operator.kube import _at_most_every, latest_complete_checkpoint
from kubetune.storage import Store


def test_the_latest_checkpoint_is_the_newest_one_with_its_manifest(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    assert latest_complete_checkpoint(store) == ""
    for step, complete in ((4, True), (12, True), (16, False)):  # step 16 was cut off mid-upload
        folder = tmp_path / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "trainable.safetensors").write_bytes(b"x")
        if complete:
            (folder / "manifest.json").write_text("{}")
    assert latest_complete_checkpoint(store) == "step-00000012"
    diffusers = tmp_path / "checkpoints" / "checkpoint-20"  # the stock script's naming, which the trainer resumes too
    diffusers.mkdir()
    (diffusers / "manifest.json").write_text("{}")
    assert latest_complete_checkpoint(store) == "checkpoint-20"


def test_token_refresh_runs_at_most_once_per_interval_though_the_loader_reinstalls_it() -> None:
    """The kubeconfig loader's hook re-reads the whole configuration (proxies from the
    environment included) on every request and installs itself again; the operator runs it at
    most every few seconds."""
    calls: list[int] = []

    class Configuration:
        refresh_api_key_hook: Any = None

    def loader_hook(configuration: Any) -> None:
        calls.append(1)
        configuration.refresh_api_key_hook = loader_hook  # as kube_config._set_config does

    configuration = Configuration()
    configuration.refresh_api_key_hook = _at_most_every(60.0, loader_hook)
    for _ in range(5):
        configuration.refresh_api_key_hook(configuration)
    assert calls == [1]
    assert configuration.refresh_api_key_hook is not loader_hook

    configuration.refresh_api_key_hook = _at_most_every(0.0, loader_hook)
    for _ in range(3):
        configuration.refresh_api_key_hook(configuration)
    assert len(calls) == 4


class _ApiError(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def _kube(**overrides: Any) -> Any:
    from kubernetes import client

    from kubetune.operator.kube import Kube

    kube = Kube(client.ApiClient())
    for name, value in overrides.items():
        setattr(kube, name, value)
    return kube


def test_a_secret_found_is_reused_for_its_ttl_and_a_missing_one_is_asked_for_on_every_pass(monkeypatch: Any) -> None:
    """Hundreds of jobs share one S3 Secret: it is read once per TTL, not on every pass of each; a
    Secret the user has yet to create is noticed on the next pass."""
    from kubetune.operator import kube as kube_module

    existing: dict[str, dict[str, str]] = {}
    reads: list[str] = []

    def request(method: str, path: str, missing_ok: bool = False, **_: Any) -> dict[str, Any] | None:
        name = path.rsplit("/", 1)[1]
        reads.append(name)
        return {"data": existing[name]} if name in existing else None

    clock = [1000.0]
    monkeypatch.setattr(kube_module.time, "monotonic", lambda: clock[0])
    kube = _kube(request=request)
    assert kube.secret_data("team", "s3") is None
    assert kube.secret_data("team", "s3") is None
    assert reads == ["s3", "s3"]
    existing["s3"] = {"AWS_ACCESS_KEY_ID": "a2V5"}
    for _ in range(3):
        assert kube.secret_data("team", "s3") == {"AWS_ACCESS_KEY_ID": "a2V5"}
    assert reads == ["s3"] * 3
    assert kube.secret_data("other-team", "s3") is not None  # per namespace
    existing["s3"] = {"AWS_ACCESS_KEY_ID": "bmV3"}  # rotated
    clock[0] += kube_module.SECRET_TTL_SECONDS + 1
    assert kube.secret_data("team", "s3") == {"AWS_ACCESS_KEY_ID": "bmV3"}
    del existing["s3"]
    clock[0] += kube_module.SECRET_TTL_SECONDS + 1
    assert kube.secret_data("team", "s3") is None


def test_a_pass_reads_pods_only_where_decide_looks_at_them(tmp_path: Path) -> None:
    """A new job's first pass lists nothing (it has no children yet); a running collector needs no
    pods; a failed collector's pods are read (their termination message is the job's failure
    message), and so are a training job's."""
    from kubetune.operator.decide import decide
    from kubetune.operator.kube import observe

    jobs: list[dict[str, Any]] = []
    calls: list[str] = []

    def children(namespace: str, name: str, uid: str, kind: str) -> list[dict[str, Any]]:
        calls.append(kind)
        if kind == "Pod":
            return [
                {
                    "metadata": {"name": "shapes-collect-x", "uid": "p1", "labels": {"job-name": "shapes-collect"}},
                    "status": {
                        "containerStatuses": [
                            {
                                "name": "collector",
                                "state": {"terminated": {"exitCode": 1, "message": "cannot read s3://data/urls.jsonl"}},
                            }
                        ]
                    },
                }
            ]
        return jobs

    kube = _kube(
        children=children,
        secret_data=lambda namespace, name: {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
        store=lambda spec, secrets: Store(str(tmp_path)),
    )
    ftj: dict[str, Any] = {
        "metadata": {"name": "shapes", "namespace": "team", "uid": "u1", "generation": 1},
        "spec": {
            "dataset": {"urls": {"uri": "s3://data/urls.jsonl"}},
            "model": {"base": "s3://models/tiny/"},
            "storage": {"uri": "s3://out/shapes/", "credentialsSecretRef": {"name": "s3"}},
        },
    }

    first = decide(observe(kube, ftj, []))
    assert calls == []
    assert [o["metadata"]["name"] for o in first.create] == ["shapes-collect"]

    ftj["status"] = first.status
    jobs.append({**first.create[0], "status": {"active": 1}})
    running = decide(observe(kube, ftj, []))
    assert calls == ["Job"]
    assert running.phase == "Collecting" and not running.create

    calls.clear()
    jobs[0]["status"] = {
        "failed": 1,
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
    }
    failed = decide(observe(kube, ftj, []))
    assert calls == ["Job", "Pod"]
    assert failed.phase == "Failed" and "cannot read s3://data/urls.jsonl" in failed.status["message"]


def test_a_secret_read_answered_403_is_reported_as_forbidden_not_missing() -> None:
    import pytest
    from kubernetes.client.exceptions import ApiException

    from kubetune.operator.kube import SecretForbidden

    def request(method: str, path: str, missing_ok: bool = False, **_: Any) -> Any:
        raise ApiException(status=403, reason="Forbidden")

    kube = _kube(request=request)
    with pytest.raises(SecretForbidden):
        kube.secret_data("team", "s3")


# -- whose identity reads a job's storage (#13 item 11) ----------------------------------------

KEYS = ("AKIA", "secret")


def test_storage_is_read_with_the_jobs_secret_or_the_operators_identity_only_where_no_job_chose_the_host() -> None:
    from kubetune.operator.kube import storage_access

    minio = "http://minio.team:9000"
    # the job's own Secret: read, at any endpoint while there is no allowlist
    assert storage_access(minio, True, KEYS, False, ()).mode == "secret"
    assert storage_access("", True, KEYS, False, ()).mode == "secret"
    # a Secret named but missing: nothing read (never the operator's identity instead)
    assert storage_access("", True, None, True, ()).mode == "none"
    # no Secret at an endpoint the job chose: never signed with the operator's identity
    access = storage_access("http://169.254.169.254", False, None, True, ())
    assert access.mode == "none" and "own identity" in access.why
    # no Secret, no endpoint (AWS, or the chart's endpoint): the operator's identity if the chart allows it
    assert storage_access("", False, None, True, ()).mode == "own"
    assert storage_access("", False, None, False, ()).mode == "none"


def test_an_endpoint_outside_the_allowlist_is_refused_naming_the_field() -> None:
    from kubetune.operator.kube import normalize_endpoint, storage_access

    allowed = ("https://S3.internal/", "http://minio.team:9000")
    assert storage_access("https://s3.internal:443", True, KEYS, False, allowed).mode == "secret"
    assert storage_access("http://minio.team:9000/", True, KEYS, False, allowed).mode == "secret"
    assert storage_access("", False, None, True, allowed).mode == "own"  # no endpoint chosen by the job
    refused = storage_access("http://evil.example:9000", True, KEYS, False, allowed)
    assert refused.mode == "refused" and "spec.storage.endpoint http://evil.example:9000" in refused.why
    assert normalize_endpoint("HTTP://Minio:80/") == "http://minio"


def test_observe_never_builds_a_store_for_a_job_the_operator_may_not_read(tmp_path: Path) -> None:
    """A job naming an endpoint and no Secret: the operator neither signs requests there with its
    own identity nor fails the job for it; decide starts the collector and says progress is not read."""
    from kubetune.operator.decide import decide
    from kubetune.operator.kube import observe

    stores: list[Any] = []
    kube = _kube(
        children=lambda namespace, name, uid, kind: [],
        secret_data=lambda namespace, name: None,
        store=lambda spec, secrets: stores.append(spec) or Store(str(tmp_path)),
        storage_own_identity=True,
    )
    ftj: dict[str, Any] = {
        "metadata": {"name": "shapes", "namespace": "team", "uid": "u1", "generation": 1},
        "spec": {
            "dataset": {"urls": {"uri": "s3://data/urls.jsonl"}},
            "model": {"base": "s3://models/tiny/"},
            "storage": {"uri": "s3://any-bucket/x/", "endpoint": "http://attacker.example"},
        },
    }
    observed = observe(kube, ftj, [])
    assert stores == [] and "own identity" in observed.storage_unreadable
    assert [o["metadata"]["name"] for o in decide(observed).create] == ["shapes-collect"]

    kube.allowed_storage_endpoints = ("http://minio:9000",)
    observed = observe(kube, ftj, [])
    assert stores == []
    decision = decide(observed)
    assert decision.phase == "Failed" and decision.create == []
    summary = next(c for c in decision.status["conditions"] if c["type"] == "Succeeded")
    assert summary["reason"] == "StorageEndpointNotAllowed" and "spec.storage.endpoint" in summary["message"]
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "StorageEndpointNotAllowed")]


def test_s3_clients_are_bounded_and_share_one_session() -> None:
    """Jobs with distinct endpoints or rotated keys: the operator keeps a bounded number of S3
    clients (least recently used dropped and closed), all from one botocore session."""
    from kubetune.api.load import parse_spec
    from kubetune.operator.kube import S3_CLIENTS_CACHED

    kube = _kube()
    base = {"dataset": {"imagefolder": {"uri": "s3://data/x/"}}, "model": {"base": "m"}}

    def store_at(i: int) -> Any:
        spec = parse_spec({**base, "storage": {"uri": "s3://bucket/p/", "endpoint": f"http://minio-{i}.example:9000"}})
        return kube.store(spec, {})

    first = store_at(0).client
    assert store_at(0).client is first, "a client is reused for the same endpoint"
    clients = [store_at(i).client for i in range(1, 3 * S3_CLIENTS_CACHED)]
    assert len(kube._clients) == S3_CLIENTS_CACHED
    assert store_at(0).client is not first, "the least recently used client was dropped"
    loaders = {id(c._loader) for c in clients}
    assert len(loaders) == 1, "one botocore session (service models loaded once)"


def test_forty_s3_clients_cost_far_less_than_forty_sessions() -> None:
    """A session per client cost about 12 MiB each; with one shared session they cost well under one."""
    import subprocess
    import sys

    code = (
        "import resource, sys\n"
        "from kubetune.storage import s3_client\n"
        "s3_client('http://warm.example:9000')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "clients = [s3_client(f'http://minio-{i}.example:9000', credentials=(f'k{i}', 's')) for i in range(40)]\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mib = float(done.stdout.strip())
    assert grown_mib < 80, f"40 S3 clients grew the process by {grown_mib:.0f} MiB"
