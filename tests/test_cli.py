"""The `kubetune` command line as a user meets it."""

import subprocess
import sys

import kubetune


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_existing_subcommands() -> None:
    result = run("--help")
    assert result.returncode == 0
    from kubetune.cli import COMMANDS

    for name in COMMANDS:
        assert f"    {name} " in result.stdout


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kubetune {kubetune.__version__}"


def test_unknown_subcommand_is_one_line_error() -> None:
    result = run("frobnicate")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "unknown command 'frobnicate'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_flag_is_one_line_error() -> None:
    result = run("--frobnicate")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "--frobnicate" in result.stderr


def test_unknown_flag_of_a_subcommand_is_one_line_error() -> None:
    result = run("validate", "--frobnicate", "x.yaml")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--frobnicate" in result.stderr


def test_bare_operator_is_still_the_standard_library() -> None:
    # operator/ is kubetune.operator; it must never shadow Python's own `operator` module.
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = "import operator, kubetune.operator as k; print(operator.__file__); print(k.__name__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    stdlib_file, name = result.stdout.split()
    assert "site-packages" not in stdlib_file and not stdlib_file.startswith(str(repo))
    assert name == "kubetune.operator"
