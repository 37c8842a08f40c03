"""The operator process with --job-defaults (the chart's jobDefaults file) and a FineTuneJob with a
podTemplate, on the local cluster: the Jobs the API server accepted carry both, the job's own
overlay over the defaults and the operator's fields over both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

DEFAULTS = {
    "collector": {
        "metadata": {"labels": {"cost-center": "platform"}},
        "spec": {
            "containers": [{"name": "collector", "env": [{"name": "HTTPS_PROXY", "value": "http://default:3128"}]}],
            "tolerations": [{"key": "pool", "operator": "Equal", "value": "batch", "effect": "NoSchedule"}],
        },
    }
}


def test_job_defaults_and_the_jobs_overlay_reach_the_collector_job(bare_e2e: Any, tmp_path: Path) -> None:
    e2e = bare_e2e
    defaults = tmp_path / "job-defaults.yaml"
    defaults.write_text(yaml.safe_dump(DEFAULTS))
    e2e.start_operator("--job-defaults", str(defaults))
    overlay = {
        "metadata": {"labels": {"cost-center": "research"}, "annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": {
            "containers": [
                {
                    "name": "collector",
                    "env": [{"name": "HTTPS_PROXY", "value": "http://job:3128"}],
                }
            ],
            "imagePullSecrets": [{"name": "regcred"}],
        },
    }
    e2e.create("overlay", e2e.spec("overlay", collector={"workers": 4, "podTemplate": overlay}))
    e2e.wait_phase("overlay", "Collecting", timeout=60)
    (job,) = [j for j in e2e.list("jobs") if j["metadata"]["name"] == "overlay-collect"]
    template = job["spec"]["template"]
    assert template["metadata"]["labels"]["cost-center"] == "research"
    assert template["metadata"]["labels"]["kubetune.dev/finetunejob"] == "overlay"
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert template["spec"]["tolerations"] == DEFAULTS["collector"]["spec"]["tolerations"]
    assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    assert env["HTTPS_PROXY"] == "http://job:3128"
    assert '"podTemplate"' not in env["KUBETUNE_SPEC"]
    # an env name the operator keeps for itself is refused by the API server, naming the rule
    reserved = e2e.spec(
        "reserved",
        collector={
            "podTemplate": {
                "spec": {
                    "containers": [
                        {"name": "collector", "env": [{"name": "AWS_ENDPOINT_URL", "value": "http://elsewhere"}]}
                    ]
                }
            }
        },
    )
    response = e2e.api.post(
        e2e.path("finetunejobs"),
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "reserved"},
            "spec": reserved,
        },
    )
    assert response.status_code == 422, response.text
    assert "spec.collector.podTemplate.spec.containers[0].env" in response.json()["message"]
    assert "reserved" in response.json()["message"]
