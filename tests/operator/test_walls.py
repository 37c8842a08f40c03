"""The operator's image has no torch: importing it must not pull torch or diffusers in."""

from __future__ import annotations

import subprocess
import sys


def test_the_operator_never_imports_torch_or_diffusers() -> None:
    code = (
        "import sys\n"
        "import kubetune.operator.cli, kubetune.operator.controller, kubetune.operator.kube, "
        "kubetune.operator.builders\n"
        "kubetune.operator.cli.register(None)\n"
        "kubetune.operator.builders.trainer_command  # the launch module it renders with\n"
        "import kubetune.launch\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', "
        "'accelerate'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_no_bare_operator_module_is_shadowed() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import operator; print(operator.__file__ if hasattr(operator, '__file__') else 'builtin', "
            "hasattr(operator, 'itemgetter'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("True")
