"""`kubetune render`: print the Kubernetes objects the operator would create for a FineTuneJob.

The objects come from the operator's own pure builders (builders.py) with the operator's
defaults applied the same way (builders.effective_spec, builders.Images), so what this prints is
what a cluster would get: review it, diff it, or feed it to a policy checker. Nothing here talks
to a cluster, and nothing imports torch, kopf or the Kubernetes client.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from kubetune.api.load import SpecError, load_finetunejob, load_job_defaults
from kubetune.api.models import FineTuneJob, JobDefaults
from kubetune.cli_util import OneLineArgumentParser, OneLineError

from . import builders as b

# The owner references of rendered objects need the FineTuneJob's uid, which only the API server
# assigns: a file without metadata.uid gets this one (an all-zero UUID, recognisably not real).
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
DEFAULT_NAMESPACE = "default"
PHASES = ("collecting", "training")
DEFAULT_IMAGES = b.Images()
NO_DEFAULTS = b.SpecDefaults()


def owner_of(job: FineTuneJob) -> b.Owner:
    """The FineTuneJob as its children's owner: the file's metadata, with the namespace `default`
    and PLACEHOLDER_UID where it has none."""
    name = job.metadata.name
    if not name:
        raise SpecError("metadata.name: required (the children's names derive from it)")
    return b.Owner(name, job.metadata.namespace or DEFAULT_NAMESPACE, job.metadata.uid or PLACEHOLDER_UID)


def render_objects(
    job: FineTuneJob,
    phases: Sequence[str] = PHASES,
    attempt: int = 0,
    images: b.Images = DEFAULT_IMAGES,
    defaults: b.SpecDefaults = NO_DEFAULTS,
) -> list[dict[str, Any]]:
    """What the operator creates in each phase: the collector Job while collecting (none for
    spec.dataset.imagefolder, which needs no collection), the headless Service and the trainer
    Job of restart `attempt` while training."""
    owner = owner_of(job)
    spec = b.effective_spec(job.spec, defaults)
    objects: list[dict[str, Any]] = []
    if "collecting" in phases:
        if spec.dataset.imagefolder:
            if list(phases) == ["collecting"]:
                raise SpecError(
                    "spec.dataset.imagefolder: an existing imagefolder is not collected (no collecting phase)"
                )
        else:
            objects.append(b.collector_job(spec, owner, images))
    if "training" in phases:
        objects.append(b.trainer_service(spec, owner))
        objects.append(b.trainer_job(spec, owner, attempt, images))
    return objects


def dump_objects(objects: Sequence[dict[str, Any]]) -> str:
    """Multi-document YAML of the objects as the API server receives them: the operator sends
    them as JSON (exit codes, an IntEnum, become plain numbers)."""
    return yaml.safe_dump_all(json.loads(json.dumps(list(objects))), sort_keys=False, width=120)


def _attempt(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0 (got {value!r})")
    return int(value)


def build_parser(prog: str, environ: Mapping[str, str]) -> argparse.ArgumentParser:
    defaults = b.SpecDefaults.from_env(environ)
    parser = OneLineArgumentParser(
        prog=prog,
        description="Print, as multi-document YAML, the objects the operator would create for a FineTuneJob "
        "(the same builders and defaults). Without metadata.namespace the namespace is 'default'; without "
        f"metadata.uid the owner references carry the placeholder uid {PLACEHOLDER_UID}.",
    )
    parser.add_argument("file", metavar="FILE", help="YAML file holding a FineTuneJob")
    parser.add_argument(
        "--phase", choices=PHASES, help="only this phase's objects (default: both; imagefolder jobs only train)"
    )
    parser.add_argument(
        "--attempt",
        type=_attempt,
        default=0,
        metavar="N",
        help="the trainer Job of the N-th restart, <name>-train-rN (default 0: the first, <name>-train)",
    )
    # the operator's flags and env, with the same names and defaults (kubetune operator --help)
    operator_settings = [  # (flag, env, default, metavar, what it is for specs that set none)
        (
            "--collector-image",
            "COLLECTOR_IMAGE",
            environ.get("KUBETUNE_COLLECTOR_IMAGE", b.DEFAULT_COLLECTOR_IMAGE),
            None,
            "collector image",
        ),
        (
            "--trainer-image",
            "TRAINER_IMAGE",
            environ.get("KUBETUNE_TRAINER_IMAGE", b.DEFAULT_TRAINER_IMAGE),
            None,
            "trainer image",
        ),
        ("--s3-endpoint", "S3_ENDPOINT", defaults.endpoint, "URL", "S3 endpoint"),
        ("--s3-region", "S3_REGION", defaults.region, None, "S3 region"),
        (
            "--s3-credentials-secret",
            "S3_CREDENTIALS_SECRET",
            defaults.credentials_secret,
            "NAME",
            "S3 credentials Secret",
        ),
        (
            "--staging-size",
            "TRAINER_STAGING_SIZE",
            defaults.staging_size,
            "SIZE",
            f"trainer /tmp size (none: {b.DEFAULT_STAGING_SIZE})",
        ),
    ]
    for flag, env, default, metavar, what in operator_settings:
        parser.add_argument(
            flag, default=default, metavar=metavar, help=f"{what} for specs that set none (env KUBETUNE_{env})"
        )
    parser.add_argument(
        "--job-defaults",
        default=environ.get("KUBETUNE_JOB_DEFAULTS", ""),
        metavar="FILE",
        help="the operator's job defaults: a YAML file {collector: ..., trainer: ...} of pod-template overlays, or a "
        "chart values file with jobDefaults (env KUBETUNE_JOB_DEFAULTS)",
    )
    return parser


def main(argv: Sequence[str], prog: str = "kubetune render", environ: Mapping[str, str] | None = None) -> int:
    args = build_parser(prog, os.environ if environ is None else environ).parse_args(list(argv))
    try:
        job_defaults = load_job_defaults(args.job_defaults) if args.job_defaults else JobDefaults()
    except SpecError as error:
        raise OneLineError(f"--job-defaults {error}") from None
    try:
        job = load_finetunejob(args.file)
        objects = render_objects(
            job,
            phases=[args.phase] if args.phase else PHASES,
            attempt=args.attempt,
            images=b.Images(args.collector_image, args.trainer_image),
            defaults=b.SpecDefaults(
                args.s3_endpoint,
                args.s3_region,
                args.s3_credentials_secret,
                args.staging_size,
                b.pod_template_defaults(job_defaults),
            ),
        )
    except SpecError as error:
        message = str(error)
        raise OneLineError(message if message.startswith(args.file) else f"{args.file}: {message}") from None
    sys.stdout.write(dump_objects(objects))
    return 0
