"""`kubetune run SPEC`: the whole FineTuneJob on one machine, no cluster.

What the original `app.py -train True` did, for people with one GPU box: collect the dataset, then
`accelerate launch` the trainer on the local GPUs (or the CPU). It runs the very commands the
operator's pods run (`kubetune collect --spec`, `python -m kubetune.launch accelerate launch ...
-m kubetune.trainer --spec`), with the same storage layout, so a job started here can continue on a
cluster and the other way round. A failed attempt is retried up to `runPolicy.backoffLimit` times
and resumes from the latest checkpoint; Ctrl-C stops after a checkpoint and a later run resumes.

Keys come from the environment as for `kubetune collect` (UNSPLASH_ACCESS_KEY, ...; Secret
references in the spec are for clusters), S3 credentials from the usual AWS variables.

It claims no storage prefix (no owner marker, layout.OWNER_FILE): a job started here can continue on a
cluster, whose FineTuneJob then claims the prefix. Set KUBETUNE_FINETUNEJOB_UID (and
KUBETUNE_FINETUNEJOB_NAMESPACE, KUBETUNE_FINETUNEJOB) in the environment to claim it under a
stable id of your own; a prefix a FineTuneJob already claimed is then refused (exit 4).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from kubetune.api import layout
from kubetune.api.load import SpecError, load_finetunejob
from kubetune.api.models import FineTuneJobSpec
from kubetune.cli_util import OneLineArgumentParser, OneLineError
from kubetune.launch import count_gpus, local_launch_command
from kubetune.storage import join, storage_env


def main(argv: Sequence[str], prog: str = "kubetune run") -> int:
    parser = OneLineArgumentParser(prog=prog, description="Run a FineTuneJob on this machine: collect, then train.")
    parser.add_argument("spec", metavar="SPEC", help="a YAML file holding a FineTuneJob")
    parser.add_argument(
        "--storage", metavar="DIR_OR_S3", help="use this instead of spec.storage.uri (a local folder works)"
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="processes' GPUs to use (default: spec.trainer.gpusPerNode, at most the GPUs present; 0 = CPU)",
    )
    parser.add_argument("--skip-collect", action="store_true", help="train on the dataset already in storage")
    args = parser.parse_args(list(argv))
    try:
        spec = load_finetunejob(args.spec).spec
    except SpecError as error:
        raise OneLineError(str(error)) from None
    if args.gpus is not None and args.gpus < 0:
        raise OneLineError(f"--gpus: must be 0 or more (got {args.gpus})")

    storage = args.storage or spec.storage.uri
    env = {**storage_env(spec.storage), **os.environ}  # what the caller's environment sets wins
    dataset = spec.dataset.imagefolder.uri if spec.dataset.imagefolder else join(storage, layout.DATASET_DIR)

    if not spec.dataset.imagefolder and not args.skip_collect:
        code = step("collect", [*kubetune(), "collect", "--spec", args.spec, "--output", dataset], env)
        if code != layout.EXIT_OK:
            return code

    gpus = choose_gpus(spec, args.gpus)
    if spec.trainer.nodes > 1:
        print(
            f"kubetune run: spec.trainer.nodes is {spec.trainer.nodes}; on one machine this runs 1 node with "
            f"{max(gpus, 1)} process(es), so the global batch is smaller than on the cluster",
            file=sys.stderr,
        )
    trainer_args = [
        "--spec",
        args.spec,
        "--output_dir",
        storage,
        "--train_data_dir",
        dataset,
        "--latent_cache_dir",
        join(storage, layout.CACHE_DIR),
        "--resume_from_checkpoint",
        "latest",
    ]
    launch = local_launch_command(trainer_args, gpus, spec.training.mixed_precision)
    attempts = spec.run_policy.backoff_limit + 1
    for attempt in range(1, attempts + 1):
        code = step(f"train (attempt {attempt} of {attempts})", launch, env)
        if code == layout.EXIT_OK:
            print(
                f"kubetune run: done. The model is at {storage} (diffusers format); samples under "
                f"{join(storage, layout.SAMPLES_DIR)}"
            )
            return code
        if code == layout.EXIT_PREEMPTED:
            print(
                "kubetune run: stopped after saving a checkpoint; run the same command again to resume", file=sys.stderr
            )
            return code
        if code in (layout.EXIT_INVALID, layout.EXIT_STORAGE_OWNED) or attempt == attempts:
            return code
        print(f"kubetune run: training failed (exit {code}); retrying from the latest checkpoint", file=sys.stderr)
    return layout.EXIT_FAILED


def step(name: str, command: list[str], env: dict[str, str]) -> int:
    print(f"kubetune run: {name}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(command, env=env).returncode
    except KeyboardInterrupt:  # the children got the same Ctrl-C and are finishing their step
        return layout.EXIT_PREEMPTED


def kubetune() -> list[str]:
    return [sys.executable, "-m", "kubetune.cli"]


def choose_gpus(spec: FineTuneJobSpec, requested: int | None) -> int:
    present = count_gpus()
    wanted = spec.trainer.gpus_per_node if requested is None else requested
    if wanted > present:
        print(
            f"kubetune run: {wanted} GPU(s) asked for, {present} present: using {present}"
            + (" (CPU)" if present == 0 else ""),
            file=sys.stderr,
        )
    return min(wanted, present)
