"""What ships: the product wheel holds kubetune and its components, never the development tools
(dev/, the kubetune-dev distribution) or the tests, and the images never copy them either.

The wheel is built the way the Dockerfiles build it: from a folder holding only what they COPY.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import dockerfile
import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT_FOLDERS = ["kubetune", "operator", "trainer", "collector"]


def copied_sources(name: str) -> list[str]:
    return [
        s.rstrip("/")
        for c in dockerfile.parse_file(str(REPO / name))
        if c.cmd in ("COPY", "ADD") and not any(f.startswith("--from") for f in c.flags)
        for s in c.value[:-1]
    ]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    source = tmp_path_factory.mktemp("context")
    for path in copied_sources("Dockerfile"):
        if (REPO / path).is_dir():
            # symlinks=True: kubetune/operator stays the symlink to ../operator it is in the repository.
            shutil.copytree(REPO / path, source / path, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / path, source / path)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = out.glob("kubetune-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_the_wheel_has_the_product_modules(wheel_files: list[str]) -> None:
    names = set(wheel_files)
    for module in (
        "kubetune/cli.py",
        "kubetune/launch.py",
        "kubetune/api/models.py",
        "kubetune/api/podtemplate.schema.json",  # the models read it at import
        "kubetune/operator/kube.py",
        "kubetune/operator/builders.py",
        "kubetune/trainer/train.py",
        "kubetune/collector/collect.py",
    ):
        assert module in names, module
    # Every source file of the component folders is in it (through the symlinks in kubetune/).
    for folder in ("operator", "trainer", "collector"):
        for path in (REPO / folder).glob("*.py"):
            assert f"kubetune/{folder}/{path.name}" in names


def test_the_wheel_has_no_development_tools_or_tests(wheel_files: list[str]) -> None:
    for name in wheel_files:
        assert not name.startswith(("kubetune/dev/", "kubetune/fixtures/", "tests/", "dev/")), name
        assert "tiny_sd" not in name and "pytest" not in name and "conftest" not in name, name
    assert not any(name.startswith("kubetune_dev") for name in wheel_files)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.trainer"])
def test_the_images_copy_no_development_tools_or_tests(name: str) -> None:
    sources = copied_sources(name)
    assert sources
    for source in sources:
        assert source.split("/")[0] not in ("dev", "tests", "bench", "."), f"{name}: COPY {source}"


def test_the_product_never_imports_the_development_tools() -> None:
    """kubetune.dev is only ever named as the `kubetune dev` subcommand's entry (a string the
    dispatcher imports when asked, with a one-line error when it is not installed)."""
    for folder in PRODUCT_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if folder == "kubetune" and (REPO / "kubetune" / path.relative_to(REPO / "kubetune").parts[0]).is_symlink():
                continue  # kubetune/operator and the like: symlinks to the folders checked as themselves
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                for imported in names:
                    assert not (
                        imported == "kubetune.dev" or imported.startswith(("kubetune.dev.", "kubetune.fixtures"))
                    ), f"{path.relative_to(REPO)}:{node.lineno}: imports {imported}"
