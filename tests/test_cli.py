"""The `kubetune` command line as a user meets it."""

import subprocess
import sys
from pathlib import Path

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


def test_the_installed_command_works_from_any_folder(tmp_path: Path) -> None:
    # Outside the checkout: kubetune/__init__.py still runs (no `kubetune` namespace portion, such as
    # the editable kubetune-dev installs, may win over the package), and the development tools load.
    kubetune_command = Path(sys.executable).parent / "kubetune"
    result = subprocess.run([kubetune_command, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == f"kubetune {kubetune.__version__}", result.stderr
    code = (
        "import kubetune, kubetune.dev.cli, kubetune.operator.kube, kubetune.trainer, kubetune.collector; "
        "print(kubetune.__version__)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == kubetune.__version__, result.stderr


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
    # operator/ is kubetune.operator; it must never shadow Python's own `operator` module, not even
    # for a Python started in the repository root (the current folder comes first on sys.path).
    # `collections` imports `operator` and uses it at once.
    repo = Path(__file__).resolve().parents[1]
    code = (
        "import collections, operator, kubetune.operator.kube as k; operator.eq;"
        " print(operator.__file__); print(k.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    stdlib_file, name = result.stdout.split()
    assert "site-packages" not in stdlib_file and not stdlib_file.startswith(str(repo))
    assert name == "kubetune.operator.kube"
    # Without site (no .pth file importing `operator` early) a shadowing operator/__init__.py wins.
    bare = "import collections, operator; operator.eq; print(operator.__file__)"
    result = subprocess.run([sys.executable, "-S", "-c", bare], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not result.stdout.startswith(str(repo))


def test_dev_without_the_development_tools_says_how_to_get_them() -> None:
    # kubetune.dev is its own distribution (dev/); the product's `kubetune dev` names it when absent.
    code = (
        "import sys; sys.modules['kubetune.dev'] = None; from kubetune.cli import main; sys.exit(main(['dev', 'up']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "kubetune dev: error: the development tools are not installed: from a kubetune checkout run"
        " 'make venv' (or pip install -e ./dev)"
    ]
