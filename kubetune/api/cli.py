"""`kubetune validate` and `kubetune crd`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kubetune.api.crd import render_crd_yaml
from kubetune.api.load import SpecError, load_finetunejob
from kubetune.cli_util import OneLineArgumentParser


def validate_main(argv: Sequence[str], prog: str = "kubetune validate") -> int:
    parser = OneLineArgumentParser(
        prog=prog, description="Check FineTuneJob files offline, with the same rules as the API server."
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="YAML files holding a FineTuneJob")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            job = load_finetunejob(path)
        except SpecError as error:
            print(f"{error}", file=sys.stderr)
            failed += 1
        else:
            print(
                f"{path}: ok ({job.metadata.name or 'unnamed'}: {job.spec.dataset.source_name} -> "
                f"{job.spec.training.method})"
            )
    return 1 if failed else 0


def crd_main(argv: Sequence[str], prog: str = "kubetune crd") -> int:
    parser = OneLineArgumentParser(prog=prog, description="Print the FineTuneJob CRD (kubectl apply -f - installs it).")
    parser.add_argument(
        "--output", "-o", type=argparse.FileType("w"), default=sys.stdout, help="write here instead of stdout"
    )
    args = parser.parse_args(argv)
    args.output.write(render_crd_yaml())
    return 0
