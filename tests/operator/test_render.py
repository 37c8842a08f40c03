"""`kubetune render`: the operator's objects for a FineTuneJob file, from the operator's own builders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.load import load_finetunejob
from kubetune.cli import main as kubetune_main
from kubetune.operator import builders as b
from kubetune.operator.render import PLACEHOLDER_UID

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
OPERATOR_ENV = (
    "KUBETUNE_COLLECTOR_IMAGE",
    "KUBETUNE_TRAINER_IMAGE",
    "KUBETUNE_S3_ENDPOINT",
    "KUBETUNE_S3_REGION",
    "KUBETUNE_S3_CREDENTIALS_SECRET",
    "KUBETUNE_TRAINER_STAGING_SIZE",
    "KUBETUNE_JOB_DEFAULTS",
)


@pytest.fixture(autouse=True)
def no_operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OPERATOR_ENV:
        monkeypatch.delenv(name, raising=False)


def render(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]], str]:
    code = kubetune_main(["render", *args])
    out, err = capsys.readouterr()
    return code, [doc for doc in yaml.safe_load_all(out) if doc is not None] if code == 0 else [], err


def as_sent(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the API server receives of the builders' dicts (the operator sends JSON)."""
    return json.loads(json.dumps(objects))  # type: ignore[no-any-return]


def owner_for(path: Path) -> b.Owner:
    job = load_finetunejob(path)
    return b.Owner(job.metadata.name, job.metadata.namespace or "default", job.metadata.uid or PLACEHOLDER_UID)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_render_of_every_example_is_what_the_builders_make(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, objects, err = render(capsys, str(path))
    assert code == 0, err
    spec, owner = load_finetunejob(path).spec, owner_for(path)
    expected = [b.trainer_service(spec, owner), b.trainer_job(spec, owner, 0, b.Images())]
    if not spec.dataset.imagefolder:  # an existing imagefolder is not collected
        expected.insert(0, b.collector_job(spec, owner, b.Images()))
    assert [o["kind"] for o in objects] == [o["kind"] for o in expected]
    assert objects == as_sent(expected)
    for obj in objects:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == PLACEHOLDER_UID
        assert obj["metadata"]["namespace"] == "default"


def test_one_phase_and_a_restart_attempt(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(Path(__file__).parents[2] / "examples" / "multinode.yaml")
    code, collecting, _ = render(capsys, path, "--phase", "collecting")
    assert code == 0 and [o["kind"] for o in collecting] == ["Job"]
    assert collecting[0]["metadata"]["name"].endswith("-collect")
    code, training, _ = render(capsys, path, "--phase", "training", "--attempt", "2")
    assert code == 0 and [o["kind"] for o in training] == ["Service", "Job"]
    spec, owner = load_finetunejob(path).spec, owner_for(path)
    assert training == as_sent([b.trainer_service(spec, owner), b.trainer_job(spec, owner, 2, b.Images())])
    assert training[1]["metadata"]["name"] == b.trainer_job_name(owner.name, 2)


def test_operator_defaults_come_from_its_env_and_flags(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Path(__file__).parents[2] / "examples" / "urls.yaml"
    monkeypatch.setenv("KUBETUNE_S3_ENDPOINT", "http://minio:9000")
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "registry.local/trainer:1")
    code, objects, err = render(capsys, str(path), "--staging-size", "8Gi", "--collector-image", "registry.local/c:1")
    assert code == 0, err
    defaults = b.SpecDefaults(endpoint="http://minio:9000", staging_size="8Gi")
    spec, owner = b.effective_spec(load_finetunejob(path).spec, defaults), owner_for(path)
    images = b.Images("registry.local/c:1", "registry.local/trainer:1")
    expected = [
        b.collector_job(spec, owner, images),
        b.trainer_service(spec, owner),
        b.trainer_job(spec, owner, 0, images),
    ]
    assert objects == as_sent(expected)
    trainer = objects[2]["spec"]["template"]["spec"]
    assert trainer["containers"][0]["image"] == "registry.local/trainer:1"
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}} in trainer["volumes"]


def test_metadata_uid_and_namespace_of_the_file_are_kept(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    doc = yaml.safe_load((Path(__file__).parents[2] / "examples" / "urls.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="1234")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, objects, _ = render(capsys, str(path), "--phase", "training")
    assert code == 0
    assert {(o["metadata"]["namespace"], o["metadata"]["ownerReferences"][0]["uid"]) for o in objects} == {
        ("team-a", "1234")
    }


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (
            "kind: FineTuneJob\nmetadata: {name: x}\nspec: {model: {base: m}, storage: {uri: 's3://bucket/p/'}, "
            "dataset: {urls: {uri: 's3://bucket/l'}}, training: {mixedPrecision: no}}\n",
            "spec.training.mixedPrecision",
        ),
        (
            "kind: FineTuneJob\nspec: {model: {base: m}, storage: {uri: 's3://bucket/p/'}, dataset: {urls: {uri: 's3://bucket/l'}}}\n",
            "metadata.name",
        ),
    ],
)
def test_a_bad_file_is_one_line_naming_the_field_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, field: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = render(capsys, str(path))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"kubetune render: error: {path}: {field}: "), err


def test_render_passes_kubernetes_validate_strict(tmp_path: Path) -> None:
    """The rendered objects are valid Jobs and Services for the Kubernetes API (schemas of the
    release kubernetes-validate ships as its newest)."""
    pytest.importorskip("kubernetes_validate")
    tool = Path(sys.executable).parent / "kubernetes-validate"
    files = []
    for path in EXAMPLES:
        out = subprocess.run(
            [sys.executable, "-m", "kubetune.cli", "render", str(path)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        files.append(tmp_path / path.name)
        files[-1].write_text(out.stdout)
    # with the chart's jobDefaults (a Helm values file) under the job's own podTemplate
    job_defaults = Path(__file__).parents[2] / "tests" / "chart" / "values" / "job-defaults.yaml"
    for path in (EXAMPLES[0], Path(__file__).parents[2] / "examples" / "pod-template.yaml"):
        out = subprocess.run(
            [sys.executable, "-m", "kubetune.cli", "render", "--job-defaults", str(job_defaults), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "NCCL_SOCKET_IFNAME" in out.stdout
        files.append(tmp_path / f"defaults-{path.name}")
        files[-1].write_text(out.stdout)
    result = subprocess.run([str(tool), "--strict", *map(str, files)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_render_never_imports_torch_kopf_or_the_kubernetes_client() -> None:
    code = (
        "import sys, io, contextlib\n"
        "from kubetune.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['render', 'examples/lora.yaml']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', "
        "'accelerate', 'kopf', 'kubernetes'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2]
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
