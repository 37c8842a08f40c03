"""The code style the project holds itself to, checked in `make test` (not only in `make lint`):
ruff's rules with the 120-column line length enforced, `ruff format`, and mypy strict on the API
package that every component shares."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The folders, not kubetune/: kubetune/operator, trainer and collector are links to three of them.
SOURCES = [
    ".ci",
    "kubetune/api",
    "kubetune/cli.py",
    "kubetune/cli_util.py",
    "kubetune/launch.py",
    "kubetune/run.py",
    "kubetune/ownership.py",
    "kubetune/storage.py",
    "kubetune/__init__.py",
    "operator",
    "trainer",
    "collector",
    "dev",
    "tests",
    "bench",
]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_rules_and_line_length() -> None:
    done = run(str(BIN / "ruff"), "check", "--output-format", "concise", *SOURCES)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_format() -> None:
    done = run(str(BIN / "ruff"), "format", "--check", *SOURCES)
    assert done.returncode == 0, "run `ruff format` on:\n" + done.stdout[-4000:] + done.stderr[-2000:]


def test_every_python_file_is_checked() -> None:
    """A new top-level folder of Python code must join SOURCES, or the two tests above skip it."""
    listed = run("git", "ls-files", "*.py").stdout.split()
    unchecked = [f for f in listed if not any(f == s or f.startswith(s.rstrip("/") + "/") for s in SOURCES)]
    assert unchecked == []


def test_mypy_strict_on_the_api_package() -> None:
    done = run(str(BIN / "mypy"), "kubetune/api", "kubetune/cli.py", "kubetune/cli_util.py")
    assert done.returncode == 0, done.stdout[-4000:]
