"""The Job controller and the kubelet, against the documented behaviour
(https://kubernetes.io/docs/concepts/workloads/controllers/job/, .../pods/pod-lifecycle/).
Pods are real processes; the test cluster's backoffs are 0.5 s instead of 10 s."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from kubetune.dev.testing import Api, condition, job_manifest, pod_manifest, wait_for


def jobs(ns: str) -> str:
    return f"/apis/batch/v1/namespaces/{ns}/jobs"


def pods_of(api: Api, ns: str, job: str) -> list[dict[str, Any]]:
    return api.ok(api.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=batch.kubernetes.io/job-name%3D{job}"))["items"]


def finished(api: Api, ns: str, name: str, ctype: str = "Complete", timeout: float = 60) -> dict[str, Any]:
    return wait_for(
        lambda: (lambda j: j if condition(j, ctype) else None)(api.ok(api.get(f"{jobs(ns)}/{name}"))), timeout
    )


def logs(api: Api, ns: str, pod: str, **query: str) -> str:
    response = api.get(f"/api/v1/namespaces/{ns}/pods/{pod}/log", params=query)
    assert response.status_code == 200, response.text
    return response.text


def test_plain_job_runs_to_complete_with_logs_and_events(api: Api, k8s_namespace: str) -> None:
    """A Job's pod runs its command; on exit 0 the pod is Succeeded with exit code 0, the Job gets
    SuccessCriteriaMet then Complete with completionTime, and events record it."""
    api.ok(api.post(jobs(k8s_namespace), job_manifest("plain", "print('hello from a pod')")))
    job = finished(api, k8s_namespace, "plain")
    assert job["status"]["succeeded"] == 1 and job["status"]["completionTime"] and condition(job, "SuccessCriteriaMet")
    (pod,) = pods_of(api, k8s_namespace, "plain")
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert logs(api, k8s_namespace, pod["metadata"]["name"]) == "hello from a pod\n"
    stamped = logs(api, k8s_namespace, pod["metadata"]["name"], timestamps="true")
    assert stamped.split(" ", 1)[1] == "hello from a pod\n" and stamped[:4].isdigit()
    reasons = {e["reason"] for e in api.ok(api.get(f"/api/v1/namespaces/{k8s_namespace}/events"))["items"]}
    assert {"SuccessfulCreate", "Completed", "Started"} <= reasons


def test_indexed_job_pods_see_their_index(api: Api, k8s_namespace: str) -> None:
    """An Indexed Job of 2 runs pods with indices 0 and 1: JOB_COMPLETION_INDEX, the
    completion-index annotation (downward API), and the hostname <job>-<index>."""
    code = (
        "import os, socket; "
        "print(os.environ['JOB_COMPLETION_INDEX'], os.environ['FROM_ANNOTATION'], socket.gethostname())"
    )
    manifest = job_manifest(
        "indexed",
        code,
        completions=2,
        parallelism=2,
        completionMode="Indexed",
        container={
            "env": [
                {
                    "name": "FROM_ANNOTATION",
                    "valueFrom": {
                        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                    },
                }
            ]
        },
    )
    api.ok(api.post(jobs(k8s_namespace), manifest))
    job = finished(api, k8s_namespace, "indexed")
    assert job["status"]["completedIndexes"] == "0-1"
    outputs = sorted(
        logs(api, k8s_namespace, p["metadata"]["name"]).split() for p in pods_of(api, k8s_namespace, "indexed")
    )
    assert outputs == [["0", "0", "indexed-0"], ["1", "1", "indexed-1"]]


def test_failed_pods_are_retried_up_to_backoff_limit(api: Api, k8s_namespace: str) -> None:
    """Each failed pod is replaced until failures exceed backoffLimit; then the Job is Failed
    with reason BackoffLimitExceeded (after FailureTarget)."""
    api.ok(api.post(jobs(k8s_namespace), job_manifest("retry", "import sys; sys.exit(1)", backoffLimit=2)))
    job = finished(api, k8s_namespace, "retry", "Failed")
    assert condition(job, "Failed")["reason"] == "BackoffLimitExceeded" and condition(job, "FailureTarget")
    assert job["status"]["failed"] == 3
    pods = pods_of(api, k8s_namespace, "retry")
    assert len(pods) == 3 and all(p["status"]["phase"] == "Failed" for p in pods)


def test_pod_failure_policy_ignore_and_fail_job(api: Api, k8s_namespace: str, tmp_path: Path) -> None:
    """podFailurePolicy: exit code 75 matches an Ignore rule (not counted against backoffLimit,
    the pod is replaced); exit code 2 matches FailJob (the Job fails at once, reason PodFailurePolicy)."""
    policy = {
        "rules": [
            {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [75]}},
            {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]}},
        ]
    }
    marker = tmp_path / f"preempted-{uuid.uuid4().hex}"
    code = (
        f"import os, sys, pathlib; p = pathlib.Path({str(marker)!r}); first = not p.exists(); p.touch(); "
        "sys.exit(75 if first else 0)"
    )
    api.ok(api.post(jobs(k8s_namespace), job_manifest("ignored", code, backoffLimit=0, podFailurePolicy=policy)))
    job = finished(api, k8s_namespace, "ignored")
    assert job["status"]["succeeded"] == 1 and "failed" not in job["status"]
    assert len(pods_of(api, k8s_namespace, "ignored")) == 2
    api.ok(
        api.post(
            jobs(k8s_namespace),
            job_manifest("invalid", "import sys; sys.exit(2)", backoffLimit=5, podFailurePolicy=policy),
        )
    )
    job = finished(api, k8s_namespace, "invalid", "Failed")
    failed = condition(job, "Failed")
    assert (
        failed["reason"] == "PodFailurePolicy" and "exit code 2 matching FailJob rule at index 1" in failed["message"]
    )
    assert len(pods_of(api, k8s_namespace, "invalid")) == 1


def test_evicted_pod_gets_disruption_target_and_is_ignored(api: Api, k8s_namespace: str, tmp_path: Path) -> None:
    """An evicted pod gets the DisruptionTarget condition (reason EvictionByEvictionAPI) and is
    terminated; a podFailurePolicy rule on that condition can Ignore it, so the replacement pod
    runs without using up backoffLimit."""
    marker = tmp_path / f"evicted-{uuid.uuid4().hex}"
    code = (
        f"import pathlib, time; p = pathlib.Path({str(marker)!r}); first = not p.exists(); p.touch(); "
        "time.sleep(60 if first else 0)"
    )
    policy = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    api.ok(api.post(jobs(k8s_namespace), job_manifest("evict", code, backoffLimit=0, podFailurePolicy=policy)))
    pod = wait_for(
        lambda: next((p for p in pods_of(api, k8s_namespace, "evict") if p["status"].get("phase") == "Running"), None)
    )
    name = pod["metadata"]["name"]
    wait_for(marker.exists)  # the first run is in its sleep (evicted earlier, the replacement would sleep instead)
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": k8s_namespace}}
    assert api.post(f"/api/v1/namespaces/{k8s_namespace}/pods/{name}/eviction", eviction).status_code == 201
    evicted = api.ok(api.get(f"/api/v1/namespaces/{k8s_namespace}/pods/{name}"))
    assert condition(evicted, "DisruptionTarget")["reason"] == "EvictionByEvictionAPI"
    job = finished(api, k8s_namespace, "evict")
    assert job["status"]["succeeded"] == 1 and "failed" not in job["status"]


def test_suspend_and_resume(api: Api, k8s_namespace: str) -> None:
    """A suspended Job creates no pods and has Suspended=True; resuming sets it False (JobResumed)
    and the Job runs to completion."""
    api.ok(api.post(jobs(k8s_namespace), job_manifest("paused", "print('ran')", suspend=True)))
    job = wait_for(
        lambda: (lambda j: j if condition(j, "Suspended") else None)(api.ok(api.get(f"{jobs(k8s_namespace)}/paused")))
    )
    assert condition(job, "Suspended")["reason"] == "JobSuspended"
    time.sleep(0.5)
    assert pods_of(api, k8s_namespace, "paused") == []
    api.ok(api.patch(f"{jobs(k8s_namespace)}/paused", {"spec": {"suspend": False}}))
    job = finished(api, k8s_namespace, "paused")
    resumed = next(c for c in job["status"]["conditions"] if c["type"] == "Suspended")
    assert resumed["status"] == "False" and resumed["reason"] == "JobResumed"


def test_active_deadline_fails_job_and_stops_pods(api: Api, k8s_namespace: str) -> None:
    """Past activeDeadlineSeconds the Job fails with reason DeadlineExceeded and its running pods
    are terminated."""
    api.ok(
        api.post(
            jobs(k8s_namespace),
            job_manifest(
                "slow",
                "import time; time.sleep(60)",
                activeDeadlineSeconds=1,
                podSpec={"terminationGracePeriodSeconds": 1},
            ),
        )
    )
    job = finished(api, k8s_namespace, "slow", "Failed", timeout=30)
    assert condition(job, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(
        lambda: all(
            p["metadata"].get("deletionTimestamp") or p["status"]["phase"] == "Failed"
            for p in pods_of(api, k8s_namespace, "slow")
        )
    )


def test_ttl_after_finished_deletes_job_and_pods(api: Api, k8s_namespace: str) -> None:
    """ttlSecondsAfterFinished: the finished Job is deleted after the TTL, its pods with it."""
    api.ok(api.post(jobs(k8s_namespace), job_manifest("short-lived", "pass", ttlSecondsAfterFinished=1)))
    finished(api, k8s_namespace, "short-lived")
    wait_for(lambda: api.get(f"{jobs(k8s_namespace)}/short-lived").status_code == 404, timeout=20)
    wait_for(lambda: pods_of(api, k8s_namespace, "short-lived") == [], timeout=20)


def test_env_sources_and_variable_expansion(api: Api, k8s_namespace: str) -> None:
    """Env comes from values, secretKeyRef, configMapKeyRef and fieldRef; $(VAR) in env, command
    and args expands defined variables, keeps undefined ones, and $$ escapes."""
    ns = k8s_namespace
    api.ok(
        api.post(
            f"/api/v1/namespaces/{ns}/secrets",
            {"metadata": {"name": "creds"}, "data": {"key": base64.b64encode(b"s3cr3t").decode()}},
        )
    )
    api.ok(
        api.post(f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "settings"}, "data": {"mode": "fast"}})
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "envy", "labels": {"app": "envy"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11",
                    "command": [
                        "python",
                        "-c",
                        "import json, os, sys; "
                        "names = ['SECRET', 'MODE', 'POD', 'NS', 'APP', 'COMBINED', 'PATH']; "
                        "print(json.dumps({'argv': sys.argv[1:], 'env': {k: os.environ.get(k) for k in names}}))",
                    ],
                    "args": ["--rank", "$(POD)", "$(UNDEFINED)", "$$(POD)"],
                    "env": [
                        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
                        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                        {"name": "COMBINED", "value": "$(MODE)-$(POD)"},
                    ],
                }
            ],
        },
    }
    api.ok(api.post(f"/api/v1/namespaces/{ns}/pods", pod))
    wait_for(lambda: api.ok(api.get(f"/api/v1/namespaces/{ns}/pods/envy"))["status"].get("phase") == "Succeeded")
    seen = json.loads(logs(api, ns, "envy"))
    assert seen["argv"] == ["--rank", "envy", "$(UNDEFINED)", "$(POD)"]
    env = seen["env"]
    assert (env["SECRET"], env["MODE"], env["POD"], env["NS"], env["APP"], env["COMBINED"]) == (
        "s3cr3t",
        "fast",
        "envy",
        ns,
        "envy",
        "fast-envy",
    )
    import sys

    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_missing_secret_is_create_container_config_error(api: Api, k8s_namespace: str) -> None:
    """A container whose secretKeyRef points at a missing Secret waits with reason
    CreateContainerConfigError, and starts once the Secret exists."""
    ns = k8s_namespace
    pod = pod_manifest(
        "waiting",
        [
            {
                "name": "main",
                "image": "x:1",
                "command": ["python", "-c", "import os; print(os.environ['K'])"],
                "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "late", "key": "k"}}}],
            }
        ],
        restartPolicy="Never",
    )
    api.ok(api.post(f"/api/v1/namespaces/{ns}/pods", pod))
    waiting = wait_for(
        lambda: (
            api.ok(api.get(f"/api/v1/namespaces/{ns}/pods/waiting"))["status"]
            .get("containerStatuses", [{}])[0]
            .get("state", {})
            .get("waiting", {})
            .get("reason")
            == "CreateContainerConfigError"
        )
    )
    assert waiting
    api.ok(api.post(f"/api/v1/namespaces/{ns}/secrets", {"metadata": {"name": "late"}, "stringData": {"k": "now"}}))
    wait_for(lambda: api.ok(api.get(f"/api/v1/namespaces/{ns}/pods/waiting"))["status"].get("phase") == "Succeeded")
    assert logs(api, ns, "waiting") == "now\n"


def test_empty_dir_is_shared_by_containers_and_on_failure_restarts(
    api: Api, k8s_namespace: str, tmp_path: Path
) -> None:
    """An emptyDir volume is one folder for all the pod's containers at their mountPath;
    restartPolicy OnFailure restarts a failed container (restartCount, lastState, previous logs)."""
    ns = k8s_namespace
    mount = str(tmp_path / "shared")
    writer = f"import pathlib; pathlib.Path({mount!r} + '/note').write_text('from writer')"
    reader = (
        f"import pathlib, sys, time\nfor _ in range(100):\n    p = pathlib.Path({mount!r} + '/note')\n"
        "    if p.exists(): break\n    time.sleep(0.05)\n"
        f"first = not pathlib.Path({mount!r} + '/tried').exists()\npathlib.Path({mount!r} + '/tried').touch()\n"
        "print('attempt', 'one' if first else 'two', p.read_text())\nsys.exit(3 if first else 0)"
    )
    pod = pod_manifest(
        "vol",
        [
            {
                "name": name,
                "image": "x:1",
                "command": ["python", "-c", code],
                "volumeMounts": [{"name": "scratch", "mountPath": mount}],
            }
            for name, code in (("writer", writer), ("reader", reader))
        ],
        restartPolicy="OnFailure",
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    api.ok(api.post(f"/api/v1/namespaces/{ns}/pods", pod))
    done = wait_for(
        lambda: (lambda p: p if p["status"].get("phase") == "Succeeded" else None)(
            api.ok(api.get(f"/api/v1/namespaces/{ns}/pods/vol"))
        )
    )
    reader_status = next(s for s in done["status"]["containerStatuses"] if s["name"] == "reader")
    assert reader_status["restartCount"] == 1 and reader_status["lastState"]["terminated"]["exitCode"] == 3
    assert logs(api, ns, "vol", container="reader") == "attempt two from writer\n"
    assert logs(api, ns, "vol", container="reader", previous="true") == "attempt one from writer\n"
    assert not Path(mount, "note").exists()  # the volume lived in the pod's mount namespace only


def test_termination_message_falls_back_to_log_tail(api: Api, k8s_namespace: str) -> None:
    """terminationMessagePolicy FallbackToLogsOnError: a failed container's message is its log tail."""
    api.ok(
        api.post(
            jobs(k8s_namespace),
            job_manifest(
                "crash",
                "import sys; print('loading'); print('bad spec: field x', file=sys.stderr); sys.exit(2)",
                backoffLimit=0,
                container={"terminationMessagePolicy": "FallbackToLogsOnError"},
            ),
        )
    )
    finished(api, k8s_namespace, "crash", "Failed")
    (pod,) = pods_of(api, k8s_namespace, "crash")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2 and terminated["reason"] == "Error"
    assert "bad spec: field x\n" in terminated["message"] and "loading" in terminated["message"]


def _watch_pod_until_deleted(api: Api, ns: str, name: str, since: str) -> list[dict[str, Any]]:
    events = []
    with requests.get(
        f"{api.base}/api/v1/namespaces/{ns}/pods?watch=1&resourceVersion={since}&fieldSelector=metadata.name%3D{name}",
        stream=True,
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if line:
                events.append(json.loads(line))
                if events[-1]["type"] == "DELETED":
                    return events
    return events


def test_graceful_deletion_sigterm_then_sigkill(api: Api, k8s_namespace: str) -> None:
    """Deleting a running pod sends SIGTERM to its processes; one that ignores it gets SIGKILL
    after terminationGracePeriodSeconds (exit code 137); one that exits on SIGTERM reports 143."""
    ns = k8s_namespace
    stubborn = (
        "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: print('got SIGTERM', flush=True))\n"
        "print('ready', flush=True)\ntime.sleep(120)"
    )
    for name, code, expected in (
        ("stubborn", stubborn, 137),
        ("polite", "import time; print('ready', flush=True); time.sleep(120)", 143),
    ):
        pod = pod_manifest(
            name,
            [{"name": "main", "image": "x:1", "command": ["python", "-c", code]}],
            restartPolicy="Never",
            terminationGracePeriodSeconds=2,
        )
        api.ok(api.post(f"/api/v1/namespaces/{ns}/pods", pod))
        wait_for(lambda n=name: api.get(f"/api/v1/namespaces/{ns}/pods/{n}/log").text.startswith("ready"))
        deleting = api.ok(api.delete(f"/api/v1/namespaces/{ns}/pods/{name}"))
        assert deleting["metadata"]["deletionGracePeriodSeconds"] == 2
        started = time.monotonic()
        if name == "stubborn":
            wait_for(lambda: "got SIGTERM" in api.get(f"/api/v1/namespaces/{ns}/pods/stubborn/log").text, timeout=5)
        events = _watch_pod_until_deleted(api, ns, name, deleting["metadata"]["resourceVersion"])
        elapsed = time.monotonic() - started
        assert events[-1]["type"] == "DELETED"
        terminated = events[-1]["object"]["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == expected
        if name == "stubborn":
            assert 1.0 < elapsed < 10  # waited for the grace period, then killed


def test_each_container_starts_with_its_own_writable_filesystem(api: Api, k8s_namespace: str) -> None:
    """What one pod writes to its HOME or temp folder is not there for the next pod (a container
    gets a fresh writable layer), so no state leaks between pods or runs."""
    code = (
        "import os, pathlib, tempfile; home = pathlib.Path.home() / 'state'; "
        "print(home.exists(), pathlib.Path(tempfile.gettempdir(), 'state').exists()); "
        "home.write_text('x'); pathlib.Path(tempfile.gettempdir(), 'state').write_text('x')"
    )
    for name in ("first", "second"):
        api.ok(api.post(jobs(k8s_namespace), job_manifest(name, code)))
        finished(api, k8s_namespace, name)
        (pod,) = pods_of(api, k8s_namespace, name)
        assert logs(api, k8s_namespace, pod["metadata"]["name"]) == "False False\n"


def test_restricted_pod_with_an_empty_dir_over_tmp(api: Api, k8s_namespace: str) -> None:
    """A pod as the restricted Pod Security Standard wants it (non-root user, no privilege
    escalation, all capabilities dropped, seccomp RuntimeDefault, read-only root filesystem) with
    an emptyDir at /tmp is admitted and runs: /tmp, HOME and the temp folder are writable, other
    volumes still mount, and the host's /tmp is untouched (the security fields are not enforced)."""
    marker = f"kubetune-dev-tmp-{uuid.uuid4().hex[:8]}"
    code = (
        "import os, pathlib, tempfile\n"
        f"pathlib.Path('/tmp/{marker}').write_text('x')\n"
        "(pathlib.Path.home() / 'state').write_text('x')\n"
        "pathlib.Path(tempfile.gettempdir(), 'state').write_text('x')\n"
        "pathlib.Path('/dev/shm/state').write_text('x')\n"
        f"print(pathlib.Path('/tmp/{marker}-host').exists(), pathlib.Path('/tmp/{marker}').exists())\n"
    )
    manifest = job_manifest(
        "restricted",
        code,
        podSpec={
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        },
        container={
            "securityContext": {
                "runAsNonRoot": True,
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}],
            "terminationMessagePolicy": "FallbackToLogsOnError",
        },
        backoffLimit=0,
    )
    Path("/tmp", f"{marker}-host").write_text("on the host")  # not in the pod's /tmp
    api.ok(api.post(jobs(k8s_namespace), manifest))
    job = wait_for(
        lambda: (lambda j: j if condition(j, "Complete") or condition(j, "Failed") else None)(
            api.ok(api.get(f"{jobs(k8s_namespace)}/restricted"))
        ),
        60,
    )
    (pod,) = pods_of(api, k8s_namespace, "restricted")
    assert condition(job, "Complete"), logs(api, k8s_namespace, pod["metadata"]["name"])
    assert logs(api, k8s_namespace, pod["metadata"]["name"]) == "False True\n"
    assert not Path("/tmp", marker).exists()
    Path("/tmp", f"{marker}-host").unlink()


def test_a_volume_over_the_folder_holding_the_checkout_keeps_kubetune_runnable(api: Api, k8s_namespace: str) -> None:
    """The containers' "image" is this machine's filesystem. An emptyDir mounted over the folder
    that holds the kubetune checkout and its .venv (e.g. /tmp, where a CI clone may live) hides
    that folder, as a volume hides an image's files, but python, `kubetune` and the package keep
    working: a real image has them outside any volume."""
    import kubetune

    checkout = Path(kubetune.__file__).resolve().parents[1]
    covered = str(checkout.parent)
    beside = Path(covered, f"kubetune-dev-beside-{uuid.uuid4().hex[:8]}")  # on the host, next to the checkout
    code = (
        "import os, subprocess, sys, kubetune.collector, kubetune.trainer\n"
        "print(subprocess.run(['kubetune', '--version'], capture_output=True, text=True).stdout.split()[0])\n"
        f"listing = os.listdir({covered!r})\n"
        f"print({checkout.name!r} in listing, {beside.name!r} in listing)\n"
    )
    beside.write_text("hidden by the volume")
    manifest = job_manifest(
        "covered",
        code,
        podSpec={"volumes": [{"name": "scratch", "emptyDir": {}}]},
        container={
            "volumeMounts": [{"name": "scratch", "mountPath": covered}],
            "terminationMessagePolicy": "FallbackToLogsOnError",
        },
        backoffLimit=0,
    )
    try:
        api.ok(api.post(jobs(k8s_namespace), manifest))
        job = wait_for(
            lambda: (lambda j: j if condition(j, "Complete") or condition(j, "Failed") else None)(
                api.ok(api.get(f"{jobs(k8s_namespace)}/covered"))
            ),
            60,
        )
    finally:
        beside.unlink()
    (pod,) = pods_of(api, k8s_namespace, "covered")
    output = logs(api, k8s_namespace, pod["metadata"]["name"])
    assert condition(job, "Complete"), output
    assert output == "kubetune\nTrue False\n"  # the checkout shows through the volume, its neighbours do not


def test_cluster_without_running_pods(local_cluster_factory: Any, tmp_path: Path) -> None:
    """`LocalCluster(run_pods=False)` (for control-plane benchmarks): a Job's pod is created and
    scheduled but its container never starts, so it stays Pending; deleting the Job removes it."""
    cluster = local_cluster_factory(run_pods=False, s3=False, images=False)
    api = Api(cluster.api_url)
    marker = tmp_path / "ran"
    api.ok(api.post(jobs("default"), job_manifest("idle", f"open({str(marker)!r}, 'w').write('ran')")))
    scheduled = wait_for(lambda: [p for p in pods_of(api, "default", "idle") if condition(p, "PodScheduled")])
    assert len(scheduled) == 1
    time.sleep(1.0)  # several kubelet syncs: a running cluster would have started the container by now
    (pod,) = pods_of(api, "default", "idle")
    assert pod["status"]["phase"] == "Pending" and "containerStatuses" not in pod["status"]
    assert not marker.exists()
    api.ok(api.delete(f"{jobs('default')}/idle", {"propagationPolicy": "Foreground"}))
    wait_for(lambda: not pods_of(api, "default", "idle") and api.get(f"{jobs('default')}/idle").status_code == 404)
