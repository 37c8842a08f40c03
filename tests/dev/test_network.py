"""Pod networking: stable hostnames behind a headless Service resolve for pods (multi-node
rendezvous), and concurrent jobs each get their own port space (own IP per pod)."""

from __future__ import annotations

from typing import Any

from kubetune.dev.testing import Api, condition, wait_for

# Rank 0 listens on 29500 and answers once; rank 1 connects to rank 0 by hostname and retries
# until the peer is up, like torch's rendezvous does.
RENDEZVOUS = """
import os, socket, sys, time
index = int(os.environ["JOB_COMPLETION_INDEX"])
master = sys.argv[1]
if index == 0:
    server = socket.create_server(("0.0.0.0", 29500))
    conn, _ = server.accept()
    conn.sendall(("hello from " + socket.gethostname()).encode())
    conn.close()
    print("served")
else:
    for _ in range(300):
        try:
            with socket.create_connection((master, 29500), timeout=2) as conn:
                print("got", conn.recv(100).decode())
                break
        except OSError:
            time.sleep(0.1)
    else:
        sys.exit("no rendezvous with " + master)
"""


def rendezvous_job(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"clusterIP": "None", "selector": {"batch.kubernetes.io/job-name": name}},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": 2,
            "parallelism": 2,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "subdomain": name,
                    "containers": [
                        {
                            "name": "node",
                            "image": "x:1",
                            "command": ["python", "-c", RENDEZVOUS],
                            "args": [f"{name}-0.{name}"],
                        }
                    ],
                }
            },
        },
    }
    return service, job


def test_two_concurrent_jobs_rendezvous_by_hostname_on_the_same_port(api: Api, k8s_namespace: str) -> None:
    """Pods of an Indexed Job behind a headless Service reach rank 0 at `<job>-0.<service>`; two
    such jobs at once both listen on port 29500 without colliding (each pod has its own IP)."""
    ns = k8s_namespace
    for name in ("alpha", "beta"):
        service, job = rendezvous_job(name)
        api.ok(api.post(f"/api/v1/namespaces/{ns}/services", service))
        api.ok(api.post(f"/apis/batch/v1/namespaces/{ns}/jobs", job))
    for name in ("alpha", "beta"):
        job = wait_for(
            lambda n=name: (lambda j: j if condition(j, "Complete") or condition(j, "Failed") else None)(
                api.ok(api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/{n}"))
            ),
            timeout=60,
        )
        pods = api.ok(api.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=batch.kubernetes.io/job-name%3D{name}"))[
            "items"
        ]
        outputs = {
            p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: api.get(
                f"/api/v1/namespaces/{ns}/pods/{p['metadata']['name']}/log"
            ).text
            for p in pods
        }
        assert condition(job, "Complete"), outputs
        assert outputs == {"0": "served\n", "1": f"got hello from {name}-0\n"}
        ips = {p["status"]["podIP"] for p in pods}
        assert len(ips) == 2


def test_host_network_fallback_maps_hostnames_to_loopback(local_cluster_factory: Any) -> None:
    """Without network namespaces (a non-root laptop) pods share the host network and
    `<job>-<i>.<service>` resolves to 127.0.0.1, so a single rendezvous still works."""
    cluster = local_cluster_factory(network="host", s3=False, images=False)
    assert cluster.network.mode == "host"
    api = Api(cluster.api_url)
    service, job = rendezvous_job("solo")
    api.ok(api.post("/api/v1/namespaces/default/services", service))
    api.ok(api.post("/apis/batch/v1/namespaces/default/jobs", job))
    done = wait_for(
        lambda: (lambda j: j if condition(j, "Complete") or condition(j, "Failed") else None)(
            api.ok(api.get("/apis/batch/v1/namespaces/default/jobs/solo"))
        ),
        timeout=60,
    )
    assert condition(done, "Complete")
    pods = api.ok(api.get("/api/v1/namespaces/default/pods"))["items"]
    assert {p["status"]["podIP"] for p in pods} == {"127.0.0.1"}


def test_a_pod_resolves_its_own_hostname_to_its_pod_ip(api: Api, k8s_namespace: str) -> None:
    """The kubelet-managed /etc/hosts maps the pod's own hostname (and FQDN) to the pod IP, not to
    loopback: gloo and NCCL advertise the address their hostname resolves to."""
    ns = k8s_namespace
    code = "import socket; print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))"
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "who"},
        "spec": {"clusterIP": "None", "selector": {"batch.kubernetes.io/job-name": "who"}},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "who"},
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "subdomain": "who",
                    "containers": [{"name": "node", "image": "x:1", "command": ["python", "-c", code]}],
                }
            },
        },
    }
    api.ok(api.post(f"/api/v1/namespaces/{ns}/services", service))
    api.ok(api.post(f"/apis/batch/v1/namespaces/{ns}/jobs", job))
    done = wait_for(
        lambda: (lambda j: j if condition(j, "Complete") or condition(j, "Failed") else None)(
            api.ok(api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/who"))
        ),
        timeout=60,
    )
    pod = api.ok(api.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=batch.kubernetes.io/job-name%3Dwho"))["items"][0]
    log = api.get(f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/log").text
    assert condition(done, "Complete"), log
    assert log.split() == ["who-0", pod["status"]["podIP"]]
