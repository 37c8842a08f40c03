"""`kubetune collect`: build a captioned imagefolder dataset, locally or in S3."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune.api import contracts, layout, models
from kubetune.api.contracts import DatasetManifest
from kubetune.api.load import SpecError, format_validation_error, read_spec_arg
from kubetune.cli_util import OneLineArgumentParser, OneLineError
from kubetune.collector.errors import RetryableError, SourceError
from kubetune.storage import StorageError, Store, join

SITES = ("unsplash", "google", "openverse", "wikimedia")
# what each key of contracts.SOURCE_SECRET_ENV is, for the message when it is missing
KEY_MEANING = {
    "UNSPLASH_ACCESS_KEY": "an Unsplash API access key",
    "GOOGLE_API_KEY": "a Google API key",
    "GOOGLE_CSE_ID": "a Programmable Search Engine id",
    "OPENVERSE_CLIENT_ID": "an Openverse OAuth client id",
    "OPENVERSE_CLIENT_SECRET": "the matching Openverse client secret",
    "HF_TOKEN": "a Hugging Face token",
}
# model field -> the flag that sets it, so a validation error names what the user typed
FLAG_OF = {
    "resolution": "--size",
    "min_size": "--min-size",
    "images_per_prompt": "--num-images",
    "prompts": "--prompts",
    "size": "--unsplash-size",
    "uri": "--urls/--from",
    "name": "--hf-dataset",
    "max_samples": "--max-samples",
}


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=prog, description=__doc__, allow_abbrev=False)
    what = parser.add_argument_group("what to collect (one source, or --spec)")
    what.add_argument(
        "--spec",
        metavar="FILE",
        help="a FineTuneJob (file, '-' or env:KUBETUNE_SPEC): reads spec.dataset, spec.collector, spec.storage",
    )
    what.add_argument("--prompt-file", "-prompt_file", metavar="FILE", help="search prompts, one per line")
    what.add_argument("--prompts", nargs="+", metavar="PROMPT", help="search prompts")
    what.add_argument(
        "--site", "-site", choices=SITES, default="unsplash", help="image search API for prompts (default unsplash)"
    )
    what.add_argument(
        "--num-images", "-num_imgs", type=int, default=20, metavar="N", help="images to keep per prompt (default 20)"
    )
    what.add_argument(
        "--unsplash-size", "-unsplash_size", choices=("raw", "full", "regular", "small", "thumb"), default="regular"
    )
    what.add_argument(
        "--openverse-license-type", choices=("all", "all-cc", "commercial", "modification"), default="all"
    )
    what.add_argument("--openverse-licenses", nargs="+", default=[], metavar="LICENSE", help="e.g. by by-sa cc0")
    what.add_argument("--wikimedia-contact", default="", metavar="EMAIL_OR_URL", help="contact added to the User-Agent")
    what.add_argument("--no-safe-search", action="store_true", help="google: do not ask for safe=active")
    what.add_argument("--urls", metavar="FILE", help="jsonl, csv or parquet of url + caption (local or s3://)")
    what.add_argument("--urls-format", choices=("auto", "jsonl", "csv", "parquet"), default="auto")
    what.add_argument("--url-column", default="url")
    what.add_argument("--caption-column", default="caption", help="caption column of --urls (default caption)")
    what.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face dataset id or local dataset folder")
    what.add_argument("--hf-split", default="train")
    what.add_argument("--hf-revision", default="")
    what.add_argument("--hf-image-column", default="image")
    what.add_argument("--hf-caption-column", default="text")
    what.add_argument("--max-samples", type=int, default=None, metavar="N", help="read at most N rows of --hf-dataset")
    what.add_argument(
        "--from", dest="from_folder", metavar="DIR_OR_S3", help="an existing imagefolder to validate and normalise"
    )
    images = parser.add_argument_group("images")
    images.add_argument(
        "--size", "-size", type=int, default=512, help="shorter side of stored images, never upscaled (default 512)"
    )
    images.add_argument(
        "--min-size", type=int, default=256, help="skip images whose shorter side is smaller (default 256)"
    )
    images.add_argument("--no-dedupe", action="store_true", help="keep exact duplicates")
    images.add_argument("--near-dedupe", action="store_true", help="also drop near-duplicates (same perceptual hash)")
    images.add_argument(
        "--max-pixels", type=int, default=89_478_485, help="larger images are skipped as decompression bombs"
    )
    images.add_argument("--jpeg-quality", type=int, default=95, choices=range(1, 101), metavar="1-100")
    out = parser.add_argument_group("output and run")
    out.add_argument("--output", "-data_dir", metavar="DIR_OR_S3", help="dataset folder or s3://bucket/prefix")
    out.add_argument(
        "--workers", type=int, default=None, help="concurrent downloads (default 16, or spec.collector.workers)"
    )
    out.add_argument(
        "--timeout", type=float, default=None, help="seconds per request (default 30, or spec.collector.timeoutSeconds)"
    )
    out.add_argument("--retries", type=int, default=3, help="retries on 429/5xx/connection errors (default 3)")
    out.add_argument("--max-download-mb", type=float, default=50.0, help="larger downloads are skipped (default 50)")
    out.add_argument(
        "--allow-private-network", action="store_true", help="allow loopback, private and link-local addresses"
    )
    out.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="allow this one non-public host (repeatable)",
    )
    out.add_argument(
        "--shard-index", type=int, default=None, help="this pod's shard (default $JOB_COMPLETION_INDEX or 0)"
    )
    out.add_argument("--num-shards", type=int, default=None, help="shards in all (default spec.collector.shards or 1)")
    out.add_argument("--verbose", "-verbose", action="store_true", help="log every skipped item")
    then = parser.add_argument_group(
        "then train (what app.py -train True did; `kubetune run SPEC` does it from a spec)"
    )
    then.add_argument(
        "--train",
        "-train",
        type=true_or_false,
        nargs="?",
        const=True,
        default=False,
        metavar="True|False",
        help="after collecting, fine-tune --model on the dataset with the original main.py settings",
    )
    then.add_argument(
        "--model",
        "-model_name",
        default=DEFAULT_MODEL,
        metavar="NAME_OR_PATH",
        help=f"base model for --train: a hub id, folder or s3:// (default {DEFAULT_MODEL})",
    )
    then.add_argument(
        "--train-output", metavar="DIR_OR_S3", help="where --train writes the model (default: <output>-model)"
    )
    then.add_argument(
        "--train-args",
        default="",
        metavar="'FLAGS'",
        help="more `kubetune train` flags for --train, overriding the defaults, e.g. '--max_train_steps 500'",
    )
    return parser


# The original main.py's training command (diffusers' train_text_to_image.py flags).
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SEED_TRAINING_FLAGS = (
    "--use_ema",
    "--resolution",
    "512",
    "--center_crop",
    "--random_flip",
    "--train_batch_size",
    "1",
    "--gradient_accumulation_steps",
    "4",
    "--gradient_checkpointing",
    "--mixed_precision",
    "no",
    "--max_train_steps",
    "100",
    "--learning_rate",
    "1e-05",
    "--max_grad_norm",
    "1",
    "--lr_scheduler",
    "constant",
    "--lr_warmup_steps",
    "0",
)


def true_or_false(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be True or False (got {value!r})")


def main(argv: Sequence[str], prog: str = "kubetune collect") -> int:
    args = build_parser(prog).parse_args(list(argv))
    plan = make_plan(args)
    keys = read_keys(plan["dataset"])  # a missing key fails here, before any work
    training = training_command(args, plan["output"]) if args.train else None  # bad flags fail before work too
    code = run(plan, keys, verbose=args.verbose)
    if code != layout.EXIT_OK or training is None:
        return code
    print(f"{prog}: training {args.model} on {plan['output']}", file=sys.stderr, flush=True)
    return subprocess.run(training).returncode


def training_command(args: argparse.Namespace, dataset: str) -> list[str]:
    """`python -m kubetune.launch accelerate launch ... -m kubetune.trainer` with the flags of the
    original main.py script (training), on the local GPUs (or the CPU), resuming when a checkpoint
    is there."""
    from kubetune.launch import count_gpus, local_launch_command

    if args.spec:
        raise OneLineError("--train: not with --spec; `kubetune run SPEC` collects and trains a FineTuneJob")
    try:
        extra = shlex.split(args.train_args)
    except ValueError as error:
        raise OneLineError(f"--train-args: {error}") from None
    output = args.train_output or args.output.rstrip("/") + "-model"
    trainer_args = [
        "--pretrained_model_name_or_path",
        args.model,
        "--train_data_dir",
        dataset,
        "--output_dir",
        output,
        "--resume_from_checkpoint",
        "latest",
        *SEED_TRAINING_FLAGS,
        *extra,
    ]
    return local_launch_command(trainer_args, count_gpus())


# ---------------------------------------------------------------------------------------------
# flags or spec -> plan


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.spec:
        try:
            spec = read_spec_arg(args.spec)
        except SpecError as error:
            raise OneLineError(str(error)) from None
        dataset, collector = spec.dataset, spec.collector
        output = args.output or join(spec.storage.uri, layout.DATASET_DIR)
        root = spec.storage.uri
        endpoint, region = spec.storage.endpoint or None, spec.storage.region or None
        workers, timeout, shards = collector.workers, collector.timeout_seconds, collector.shards
    else:
        dataset = dataset_from_flags(args)
        if not args.output:
            raise OneLineError("--output: required (a folder or s3://bucket/prefix), or use --spec")
        output, endpoint, region, workers, timeout, shards = args.output, None, None, 16, 30.0, 1
        root = None  # the dataset folder's parent
    workers = args.workers if args.workers is not None else workers
    timeout = args.timeout if args.timeout is not None else timeout
    num_shards = args.num_shards if args.num_shards is not None else shards
    shard_index = args.shard_index
    if shard_index is None:
        index = os.environ.get("JOB_COMPLETION_INDEX", "0")
        if not index.isdigit():
            raise OneLineError(f"JOB_COMPLETION_INDEX: must be a number (got {index!r})")
        shard_index = int(index)
    checks = [
        (workers >= 1, f"--workers: must be at least 1 (got {workers})"),
        (timeout > 0, f"--timeout: must be above 0 (got {timeout})"),
        (args.retries >= 0, f"--retries: must be 0 or more (got {args.retries})"),
        (num_shards >= 1, f"--num-shards: must be at least 1 (got {num_shards})"),
        (0 <= shard_index < num_shards, f"--shard-index: must be from 0 to {num_shards - 1} (got {shard_index})"),
        (args.max_download_mb > 0, f"--max-download-mb: must be above 0 (got {args.max_download_mb})"),
        (args.max_pixels > 0, f"--max-pixels: must be above 0 (got {args.max_pixels})"),
    ]
    for ok, message in checks:
        if not ok:
            raise OneLineError(message)
    if dataset.source_name == "wikimedia":
        workers = min(workers, 2)  # Wikimedia's etiquette: be serial and polite
    fingerprint = layout.dataset_fingerprint(dataset)
    return {
        "dataset": dataset,
        "output": output,
        "root": root,
        "endpoint": endpoint,
        "region": region,
        "workers": workers,
        "timeout": timeout,
        "retries": args.retries,
        "shard": (shard_index, num_shards),
        "fingerprint": fingerprint,
        "run": f"{fingerprint}-{num_shards}",
        "max_pixels": args.max_pixels,
        "quality": args.jpeg_quality,
        "max_bytes": int(args.max_download_mb * 1024 * 1024),
        "allow_hosts": frozenset(args.allow_host),
    }


def dataset_from_flags(args: argparse.Namespace) -> models.Dataset:
    """The flags as a `Dataset`, so flags and specs share validation and the fingerprint."""
    prompts = list(args.prompts or [])
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise OneLineError(f"--prompt-file {args.prompt_file}: cannot read: {error.strerror}") from None
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise OneLineError(f"--prompt-file {args.prompt_file}: no prompts in it (one per line)")
    chosen = [
        flag
        for flag, given in (
            ("--prompts/--prompt-file", bool(prompts)),
            ("--urls", args.urls),
            ("--hf-dataset", args.hf_dataset),
            ("--from", args.from_folder),
        )
        if given
    ]
    if len(chosen) != 1:
        raise OneLineError(
            "give exactly one source: --prompts/--prompt-file, --urls, --hf-dataset, --from, or --spec"
            + (f" (got {', '.join(chosen)})" if chosen else "")
        )
    ref = {"name": "environment", "key": "value"}  # flags read keys from the environment; refs are for specs
    source: dict[str, Any]
    if prompts:
        search = {"prompts": prompts, "imagesPerPrompt": args.num_images}
        source = {
            "unsplash": {**search, "size": args.unsplash_size, "accessKeySecretRef": ref},
            "google": {
                **search,
                "apiKeySecretRef": ref,
                "searchEngineIdSecretRef": ref,
                "safeSearch": not args.no_safe_search,
            },
            "openverse": {**search, "licenseType": args.openverse_license_type, "licenses": args.openverse_licenses},
            "wikimedia": {**search, "contact": args.wikimedia_contact},
        }[args.site]
        name = args.site
    elif args.urls:
        name = "urls"
        source = {"uri": args.urls, "format": args.urls_format}
        source.update(urlColumn=args.url_column, captionColumn=args.caption_column)
    elif args.hf_dataset:
        name = "huggingface"
        source = {"name": args.hf_dataset, "split": args.hf_split, "revision": args.hf_revision}
        source.update(imageColumn=args.hf_image_column, captionColumn=args.hf_caption_column)
        if args.max_samples is not None:
            source["maxSamples"] = args.max_samples
    else:
        name, source = "imagefolder", {"uri": args.from_folder}
    try:
        return models.Dataset.model_validate(
            {
                name: source,
                "resolution": args.size,
                "minSize": args.min_size,
                "dedupe": not args.no_dedupe,
                "nearDedupe": args.near_dedupe,
                "allowPrivateNetwork": args.allow_private_network,
            }
        )
    except ValidationError as error:
        message = format_validation_error(error)
        field, _, rest = message.partition(": ")
        flag = FLAG_OF.get(field.rsplit(".", 1)[-1])
        raise OneLineError(f"{flag}: {rest}" if flag and rest else message) from None


def read_keys(dataset: models.Dataset) -> dict[str, str]:
    """The API keys the source needs, from the environment; one line naming a missing one.

    A source's keys go together: all are needed when the spec refers to any of them (the operator
    then sets them from Secrets) or when the environment holds any (an optional login)."""
    variables = contracts.SOURCE_SECRET_ENV.get(dataset.source_name, {})
    referenced = any(getattr(dataset.source, field_name) is not None for field_name in variables)
    present = {variable: os.environ.get(variable, "") for variable in variables.values()}
    if referenced or any(present.values()):
        for variable, value in present.items():
            if not value:
                raise OneLineError(
                    f"{variable} is not set: the {dataset.source_name} source needs "
                    f"{KEY_MEANING[variable]} in this environment variable"
                )
    return {variable: value for variable, value in present.items() if value}


# ---------------------------------------------------------------------------------------------
# running, progress, summary


def run(plan: dict[str, Any], keys: dict[str, str], verbose: bool = False) -> int:
    from kubetune.collector.collect import Tally, collect
    from kubetune.collector.fetch import Fetcher, NetworkPolicy
    from kubetune.collector.images import ImageSettings
    from kubetune.collector.output import DatasetOutput, Dedupe
    from kubetune.collector.sources import open_source
    from kubetune.ownership import StorageOwnedError, owner_from_env

    dataset: models.Dataset = plan["dataset"]
    images = ImageSettings(dataset.resolution, dataset.min_size, plan["max_pixels"], plan["quality"])
    processing = hashlib.sha256(
        json.dumps([images.size, images.min_size, images.max_pixels, images.quality]).encode()
    ).hexdigest()[:16]
    settings = {
        **dataset.model_dump(by_alias=True, mode="json", exclude_none=True),
        "workers": plan["workers"],
        "timeoutSeconds": plan["timeout"],
        "shards": plan["shard"][1],
        "maxPixels": images.max_pixels,
        "jpegQuality": images.quality,
    }
    for value in settings.values():  # which Secret holds a key is not the dataset's business
        if isinstance(value, dict):
            for key in [k for k in value if k.endswith("SecretRef")]:
                del value[key]
    info = {
        "fingerprint": plan["fingerprint"],
        "settings": settings,
        "dedupe": dataset.dedupe,
        "nearDedupe": dataset.near_dedupe,
    }
    store = Store(plan["output"], plan["endpoint"], plan["region"])
    shard_index, num_shards = plan["shard"]
    log = Progress(verbose)
    try:
        root = Store(plan["root"], plan["endpoint"], plan["region"]) if plan.get("root") else None
        output = DatasetOutput(
            store, plan["run"], processing, shard_index, num_shards, info, root=root, owner=owner_from_env()
        ).open()
        if output.complete:
            kept = output.summary.counts.kept
            log.line(f"dataset at {plan['output']} is already complete ({kept} images, same settings): nothing to do")
            return layout.EXIT_OK
        source = open_source(dataset, keys, plan["timeout"], plan["retries"])
        policy = NetworkPolicy(dataset.allow_private_network, plan["allow_hosts"])
        fetcher = Fetcher(policy, plan["timeout"], plan["retries"], plan["max_bytes"], pool_size=plan["workers"])
        tally = Tally(on_change=log.update)
        log.start(plan, source.name)
        try:
            manifest = collect(
                source,
                fetcher,
                images,
                Dedupe(dataset.dedupe, dataset.near_dedupe),
                output,
                plan["workers"],
                plan["shard"],
                tally,
            )
        finally:
            fetcher.close()
            log.close()
    except StorageOwnedError as error:  # another job's prefix: nothing written, nothing deleted
        print(f"kubetune collect: error: {error}", file=sys.stderr)
        return layout.EXIT_STORAGE_OWNED
    except SourceError as error:
        print(f"kubetune collect: error: {error}", file=sys.stderr)
        return layout.EXIT_INVALID
    except (RetryableError, StorageError) as error:
        print(f"kubetune collect: error: {error} (retrying may help)", file=sys.stderr)
        return layout.EXIT_FAILED
    return report(plan, output, tally, manifest, source.notes)


def report(plan: dict[str, Any], output: Any, tally: Any, manifest: DatasetManifest | None, notes: list[str]) -> int:
    """Say how it went; the exit code tells the operator (EXIT_EMPTY_DATASET: nothing kept)."""
    for note in notes:
        print(f"kubetune collect: note: {note}", file=sys.stderr)
    if manifest is not None and manifest.empty:  # every shard finished, none kept anything
        counts = manifest.counts
        print(
            "kubetune collect: error: nothing could be collected: 0 images kept of "
            f"{counts.requested} requested; {_skips(counts.skipped)}",
            file=sys.stderr,
        )
        return layout.EXIT_EMPTY_DATASET
    if manifest is not None:
        counts = manifest.counts
        print(
            f"kubetune collect: dataset complete at {plan['output']}: {counts.kept} images kept of "
            f"{counts.requested} requested; {_skips(counts.skipped)}",
            file=sys.stderr,
        )
        return layout.EXIT_OK
    shard_index, num_shards = plan["shard"]
    kept, skipped = output.shard_counts()
    print(
        f"kubetune collect: shard {shard_index} of {num_shards} done: {kept} images kept; {_skips(skipped)}; "
        "the last shard to finish merges the dataset",
        file=sys.stderr,
    )
    return layout.EXIT_OK


def _skips(skipped: dict[str, int]) -> str:
    if not sum(skipped.values()):
        return "none skipped"
    parts = ", ".join(
        f"{reason} {count}" for reason, count in sorted(skipped.items(), key=lambda item: (-item[1], item[0]))
    )
    return f"skipped {sum(skipped.values())} ({parts})"


class Progress:
    """A tqdm bar on a terminal; in a pod (no TTY), a JSON progress record every 10 seconds."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.last = 0.0
        self.started = time.monotonic()
        self.seen_skips: dict[str, int] = {}

    def line(self, text: str) -> None:
        print(f"kubetune collect: {text}", file=sys.stderr)

    def start(self, plan: dict[str, Any], source: str) -> None:
        shard_index, num_shards = plan["shard"]
        self.line(
            f"collecting from {source} into {plan['output']} (shard {shard_index} of {num_shards}, "
            f"{plan['workers']} workers)"
        )
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(unit="img", desc="collect", file=sys.stderr, dynamic_ncols=True)

    def update(self, tally: Any) -> None:
        done = tally.kept + sum(tally.skipped.values())
        if self.verbose:
            for reason, count in tally.skipped.items():
                if count > self.seen_skips.get(reason, 0):
                    self.line(f"skipped ({reason}); {count} so far")
            self.seen_skips = dict(tally.skipped)
        if self.bar is not None:
            self.bar.total = max(tally.requested, done) or None
            self.bar.n = done
            self.bar.set_postfix(kept=tally.kept, skipped=done - tally.kept, refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last >= 10:
            self.last = time.monotonic()
            elapsed = time.monotonic() - self.started
            print(
                json.dumps(
                    {
                        "event": "progress",
                        "kept": tally.kept,
                        "skipped": dict(tally.skipped),
                        "requested": tally.requested,
                        "imagesPerSecond": round(tally.kept / elapsed, 2) if elapsed else 0.0,
                    }
                ),
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
