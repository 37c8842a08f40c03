"""The `kubetune` command: one subcommand per job, each implemented by its component.

The dispatcher imports a component only when its subcommand runs, so `kubetune --help` is instant
and the operator's image never needs torch. Each component exposes `main(argv) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from kubetune import __version__
from kubetune.cli_util import OneLineArgumentParser, OneLineError


@dataclass(frozen=True)
class Command:
    entry: str  # "module:function"; the function takes (argv, prog) and returns an exit code
    help: str
    missing: str | None = None  # the error when the entry's package is not installed (optional parts)


# Subcommand -> the module whose main(argv) runs it. Only commands that exist are listed here.
COMMANDS: dict[str, Command] = {
    "validate": Command("kubetune.api.cli:validate_main", "check FineTuneJob files against the API, offline"),
    "crd": Command("kubetune.api.cli:crd_main", "print the FineTuneJob CustomResourceDefinition"),
    "train": Command(
        "kubetune.trainer.cli:main",
        "fine-tune a Stable Diffusion model (drop-in for diffusers' train_text_to_image.py)",
    ),
    "caption": Command(
        "kubetune.trainer.captioning:main",
        "caption an imagefolder with an image-to-text model (and score it with CLIP), beside its text",
    ),
    "collect": Command("kubetune.collector.cli:main", "build a captioned image dataset (imagefolder) locally or in S3"),
    "operator": Command("kubetune.operator.cli:main", "run the FineTuneJob operator"),
    "render": Command(
        "kubetune.operator.render:main", "print the Jobs and Services the operator would create for a FineTuneJob"
    ),
    # The development tools are their own distribution (dev/, kubetune-dev): in a checkout, not in images.
    "dev": Command(
        "kubetune.dev.cli:main",
        "run a local Kubernetes stand-in with S3 (up, status, down, fixtures)",
        missing="the development tools are not installed: from a kubetune checkout run "
        "'make venv' (or pip install -e ./dev)",
    ),
    "run": Command("kubetune.run:main", "run a FineTuneJob on this machine, no cluster: collect, then train"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="kubetune",
        description="Fine-tune Stable Diffusion text-to-image models on Kubernetes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'kubetune COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args or args[0].startswith("-"):
        parser.parse_args(args)  # --help, --version, or an unknown flag (one-line error)
        parser.print_help()
        return 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        parser.error(f"unknown command '{name}' (choose from {', '.join(COMMANDS)})")
    command = COMMANDS[name]
    module_name, function_name = command.entry.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if command.missing is None or not (module_name == missing or module_name.startswith(missing + ".")):
            raise
        print(f"kubetune {name}: error: {command.missing}", file=sys.stderr)
        return 2
    run = getattr(module, function_name)
    try:
        return int(run(rest, prog=f"kubetune {name}") or 0)
    except OneLineError as error:
        print(f"kubetune {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kubetune {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
