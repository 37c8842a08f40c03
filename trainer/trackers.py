"""Experiment trackers besides TensorBoard (`--report_to wandb|mlflow|all`), through accelerate's
`log_with`: the run's settings, the loss, learning rate and images/s, and the validation images.

TensorBoard keeps its own SummaryWriter (logs/ in the output, as before). wandb and mlflow are
optional (`pip install 'kubetune[trackers]'`); each reads its usual environment (WANDB_API_KEY,
WANDB_MODE, WANDB_DIR; MLFLOW_TRACKING_URI, ...). No torch here: config checks import it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path
from typing import Any

TRACKERS = ("wandb", "mlflow")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny"}


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# `all` takes a tracker only when it is configured too: the trainer image has both installed, and an
# unconfigured wandb would stop to ask for a login (mlflow would write ./mlruns in the pod)
CONFIGURED_BY = {"wandb": ("WANDB_API_KEY", "WANDB_MODE"), "mlflow": ("MLFLOW_TRACKING_URI",)}


def selected(report_to: str) -> list[str]:
    """The trackers (besides TensorBoard) `--report_to` asks for; `all`: those installed and configured."""
    import os

    if report_to in TRACKERS:
        return [report_to]
    if report_to == "all":
        return [
            name
            for name in TRACKERS
            if installed(name) and any(os.environ.get(variable) for variable in CONFIGURED_BY[name])
        ]
    return []


def missing(report_to: str) -> str | None:
    """A one-line error when `--report_to` names a tracker that is not installed."""
    if report_to in TRACKERS and not installed(report_to):
        return (
            f"--report_to {report_to}: the {PACKAGES[report_to]} package is not installed "
            f"(pip install 'kubetune[trackers]' or pip install {PACKAGES[report_to]})"
        )
    return None


def run_config(cfg: Any) -> dict[str, Any]:
    """The settings as a tracker records them: plain values only, credentials left out."""
    from kubetune.trainer.options import OPTION

    out: dict[str, Any] = {}
    for f in fields(cfg):
        option = f.metadata.get(OPTION)
        value = getattr(cfg, f.name)
        if option is not None and option.secret:
            continue
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        if value is None or isinstance(value, bool | int | float | str):
            out[f.name] = value
    return out


def start(accelerator: Any, cfg: Any, logs: Path) -> None:
    names = selected(cfg.report_to)
    if not names:
        return
    init: dict[str, Any] = {}
    if "wandb" in names:
        import os

        init["wandb"] = {} if os.environ.get("WANDB_DIR") else {"dir": str(logs)}
    logs.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(cfg.tracker_project_name, config=run_config(cfg), init_kwargs=init)


def log_images(accelerator: Any, report_to: str, images: list[Any], prompts: list[str], step: int) -> None:
    names = selected(report_to)
    if "wandb" in names:
        import wandb

        run = accelerator.get_tracker("wandb", unwrap=True)
        run.log(
            {"validation": [wandb.Image(image, caption=p) for image, p in zip(images, prompts, strict=True)]}, step=step
        )
    if "mlflow" in names:
        import mlflow

        for index, image in enumerate(images):
            mlflow.log_image(image, key=f"validation_{index:02d}", step=step)
