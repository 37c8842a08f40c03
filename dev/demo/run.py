"""`make demo`: the main job end to end on the local cluster, as a user would run it on a real one.

    kubetune dev up  ->  apply examples/demo.yaml  ->  watch status  ->  copy results  ->  dev down

It talks to the cluster only through the Kubernetes API (the kubeconfig `dev up` wrote) and to S3,
like `kubectl` and `aws s3 cp` would. On failure it prints the FineTuneJob's status and the tail of
the failing pod's log, and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.api.load import load_yaml_documents
from kubetune.api.models import GROUP, PLURAL, VERSION
from kubetune.dev.demo.seed import tiny_model_dir
from kubetune.storage import StorageError, Store

REPO = Path(__file__).resolve().parents[2]
LABEL_JOB = "kubetune.dev/finetunejob"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "demo.yaml")
    parser.add_argument("--output", type=Path, default=REPO / "demo-output")
    parser.add_argument("--state-dir", type=Path, default=REPO / ".kubetune" / "dev")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for Succeeded")
    parser.add_argument("--keep-cluster", action="store_true", help="leave the cluster running afterwards")
    args = parser.parse_args(argv)

    job = next(d for d in load_yaml_documents(args.spec.read_text()) if d.get("kind") == "FineTuneJob")
    namespace, name = job["metadata"].get("namespace", "default"), job["metadata"]["name"]
    started = time.monotonic()
    kubetune(["dev", "down", "--state-dir", str(args.state_dir)], check=False, quiet=True)  # a stale one from before
    if not (tiny_model_dir(args.state_dir.parent / "cache") / "model_index.json").exists():
        say("first run: `dev up` also builds the tiny model and pre-trains its VAE on shapes (about 2 minutes, cached)")
    kubetune(["dev", "up", "--state-dir", str(args.state_dir), "--timeout", "900"])
    try:
        info = json.loads((args.state_dir / "cluster.json").read_text())
        api = custom_objects(info["kubeconfig"])
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        say(f"applied {args.spec.relative_to(REPO)}: FineTuneJob {namespace}/{name}")
        final = watch(api, namespace, name, args.timeout)
        if final.get("status", {}).get("phase") != "Succeeded":
            explain_failure(info, final)
            return 1
        copy_results(final, info, args.output)
        say(f"done in {time.monotonic() - started:.0f} s")
        return 0
    finally:
        if not args.keep_cluster:
            kubetune(["dev", "down", "--state-dir", str(args.state_dir)], check=False)


def kubetune(args: list[str], check: bool = True, quiet: bool = False) -> int:
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", *args],
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
    )
    if check and result.returncode != 0:
        raise SystemExit(f"make demo: `kubetune {' '.join(args)}` failed with exit code {result.returncode}")
    return result.returncode


def custom_objects(kubeconfig: str) -> Any:
    from kubernetes import client, config

    return client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig))


def say(line: str) -> None:
    print(f"[demo] {line}", flush=True)


def watch(api: Any, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """Print a `kubectl get ftj` line whenever it changes; return the FineTuneJob once finished."""
    deadline, last, obj = time.monotonic() + timeout, "", {}
    say("PHASE        PROGRESS  STEP        LOSS      IMG/S   ETA")
    while time.monotonic() < deadline:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = obj.get("status") or {}
        training = status.get("training") or {}
        step_of_steps = str(training.get("step", "")) + (f"/{training['maxSteps']}" if training.get("maxSteps") else "")
        line = (
            f"{status.get('phase', 'Pending'):<12} {training.get('progress', ''):<9} "
            f"{step_of_steps:<11} "
            f"{training.get('loss', ''):<9} {training.get('imagesPerSecond', ''):<7} "
            f"{training.get('eta', '')}"
        )
        if line != last:
            say(
                line
                + (f"   {status['message']}" if status.get("message") and status.get("phase") != "Training" else "")
            )
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            return obj  # type: ignore[no-any-return]
        time.sleep(2)
    say(f"timed out after {timeout:.0f} s")
    return obj  # type: ignore[no-any-return]


def explain_failure(info: dict[str, Any], obj: dict[str, Any]) -> None:
    status = obj.get("status") or {}
    say(f"FAILED: phase {status.get('phase', 'unknown')}: {status.get('message', '')}")
    for condition in status.get("conditions", []):
        say(
            f"  condition {condition['type']}={condition['status']} {condition.get('reason', '')}: "
            f"{condition.get('message', '')}"
        )
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(config_file=info["kubeconfig"]))
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    pods = core.list_namespaced_pod(namespace).items
    mine = [p for p in pods if p.metadata.name.startswith(name + "-")]
    failing = (
        [p for p in mine if p.status.phase == "Failed"] or [p for p in mine if p.status.phase != "Succeeded"] or mine
    )
    for pod in failing[-2:]:
        say(f"log tail of pod {pod.metadata.name} ({pod.status.phase}):")
        try:
            print(core.read_namespaced_pod_log(pod.metadata.name, namespace, tail_lines=30), flush=True)
        except client.exceptions.ApiException as error:
            say(f"  (no log: {error.reason})")
    say(f"cluster log: {Path(info['state_dir']) / 'cluster.log'}")


def copy_results(obj: dict[str, Any], info: dict[str, Any], output: Path) -> None:
    """The model, the sample grids and a loss curve into `output`."""
    status = obj["status"]
    store = Store(
        status["modelUri"], endpoint=info["s3_endpoint"], credentials=(info["s3_access_key"], info["s3_secret_key"])
    )
    if output.exists():
        shutil.rmtree(output)
    model = output / "model"
    for key in store.list():
        top = key.split("/", 1)[0]
        if top in ("dataset", "cache", "checkpoints", "logs", "samples") or key == "progress.json":
            continue
        store.download_file(key, model / key)
    grids, scores = [], {}
    for key in store.list("samples"):
        if key.endswith("grid.png"):
            step = key.split("/")[1]
            target = output / f"samples-{step}.png"
            store.download_file(key, target)
            grids.append(target)
            scores[step] = score_samples(store, key.rsplit("/", 1)[0])
    store.download_tree("logs", output / "logs")
    curve = plot_loss(output / "logs", output / "loss.png")
    say(f"results in {output.relative_to(REPO) if output.is_relative_to(REPO) else output}/:")
    say(f"  {'model/':<26}the fine-tuned diffusers pipeline (StableDiffusionPipeline.from_pretrained('{model}'))")
    for grid in grids:
        say(f"  {grid.name:<26}validation samples at {grid.stem.split('-', 1)[1]} for: {', '.join(prompts(obj))}")
    if curve:
        say(f"  {curve.name:<26}training loss by step")
    say(f"  S3 keeps everything under {status['modelUri']} (checkpoints, dataset, cache) until the cluster stops")
    for step, line in scores.items():
        if line:
            say(f"samples at {step} follow their prompts: {line}")


def score_samples(store: Store, folder: str) -> str:
    """ "backgrounds 4/4, colours 4/4, shapes 3/4": how many of a step's samples show what their
    prompts name (kubetune.dev.testing.shapes.score_sample); empty for prompts that are not shapes'."""
    import io

    from PIL import Image

    from kubetune.dev.testing.shapes import score_sample

    try:
        texts = store.read_json(f"{folder}/prompts.json")
        scores = [
            score_sample(Image.open(io.BytesIO(store.read_bytes(f"{folder}/{index:02d}.png"))), text)
            for index, text in enumerate(texts)
        ]
    except (ValueError, OSError, StorageError):
        return ""
    count = len(scores)
    return (
        f"backgrounds {sum(s.background for s in scores)}/{count}, colours {sum(s.colour for s in scores)}/{count}, "
        f"shapes {sum(s.shape for s in scores)}/{count}"
    )


def prompts(obj: dict[str, Any]) -> list[str]:
    return list(obj["spec"].get("training", {}).get("validationPrompts", []))


def plot_loss(logs: Path, target: Path) -> Path | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs))
    events.Reload()
    if "train_loss" not in events.Tags().get("scalars", []):
        return None
    # Logs uploaded at each checkpoint and at the end can repeat steps: keep the latest value per step.
    by_step = {p.step: p.value for p in sorted(events.Scalars("train_loss"), key=lambda p: p.wall_time)}
    steps = sorted(by_step)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot(steps, [by_step[s] for s in steps], linewidth=1)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title("kubetune demo: tiny Stable Diffusion on 2 CPU nodes")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(target)
    plt.close(figure)
    return target


if __name__ == "__main__":
    sys.exit(main())
