"""The results: validation samples, the diffusers pipeline (or LoRA weights) at the root of the
output, and a model card with the training settings and the dataset's sources and licenses."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from kubetune.api.contracts import DatasetManifest
from kubetune.api.layout import SAMPLES_DIR
from kubetune.storage import Store
from kubetune.trainer.config import TrainConfig
from kubetune.trainer.data import TrainingData
from kubetune.trainer.families import ModelFamily

log = logging.getLogger("kubetune.trainer")


@torch.no_grad()
def render_samples(
    pipeline: Any,
    prompts: list[str],
    resolution: int,
    seed: int,
    output: Store,
    step: int,
    guidance_scale: float,
    per_prompt: int = 1,
) -> list[Any]:
    """`per_prompt` PNGs for each of `prompts` and a grid under samples/step-NNNNNNNN/ (prompts.json:
    each image's prompt); returns the images (PIL), in that order."""
    import io

    from diffusers.utils import make_image_grid

    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = [
        pipeline(
            p,
            num_inference_steps=20,
            height=resolution,
            width=resolution,
            guidance_scale=guidance_scale,
            generator=generator,
        ).images[0]
        for p in prompts
        for _ in range(per_prompt)
    ]
    folder = f"{SAMPLES_DIR}/step-{step:08d}"
    for index, image in enumerate(images):
        output.write_bytes(f"{folder}/{index:02d}.png", _png(image, io), "image/png")
    columns = min(len(images), 4)
    grid = make_image_grid(
        images + [images[-1].copy().point(lambda _: 0)] * (-len(images) % columns),
        rows=(len(images) + columns - 1) // columns,
        cols=columns,
    )
    output.write_bytes(f"{folder}/grid.png", _png(grid, io), "image/png")
    output.write_json(f"{folder}/prompts.json", [p for p in prompts for _ in range(per_prompt)])
    return images


def _png(image: Any, io: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return bytes(buffer.getvalue())


def write_pipeline(pipeline: Any, output: Store, staging: Path) -> tuple[Path, list[str]]:
    """save_pretrained into the output root; for S3 via a local folder, model_index.json last.
    Returns the local folder and the model's files in it (relative paths), for the Hub push."""
    if not output.is_s3:
        pipeline.save_pretrained(output.uri, safe_serialization=True)
        return Path(output.uri), _pipeline_files(Path(output.uri))
    folder = staging / "publish"
    shutil.rmtree(folder, ignore_errors=True)
    pipeline.save_pretrained(folder, safe_serialization=True)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "model_index.json":
            output.upload_file(path, path.relative_to(folder).as_posix())
    output.upload_file(folder / "model_index.json", "model_index.json")
    return folder, _pipeline_files(folder)


def _pipeline_files(folder: Path) -> list[str]:
    """model_index.json and the files of the components it names (the output root holds more)."""
    import json

    index = json.loads((folder / "model_index.json").read_text())
    files = ["model_index.json"]
    for name in sorted(k for k in index if not k.startswith("_") and (folder / k).is_dir()):
        files += sorted(p.relative_to(folder).as_posix() for p in (folder / name).rglob("*") if p.is_file())
    return files


def write_lora(
    family: ModelFamily, denoiser: Any, output: Store, staging: Path, text_encoders: dict[str, Any] | None = None
) -> tuple[Path, list[str]]:
    """pytorch_lora_weights.safetensors (with `text_encoders`' adapters, when trained), loadable
    with `pipe.load_lora_weights(output)`, and the family's extra formats. Returns the local folder
    and those files' names."""
    folder = Path(output.uri) if not output.is_s3 else staging / "publish-lora"
    family.save_lora(denoiser, folder, text_encoders)
    extras = family.publish_lora_extras(denoiser, folder) if not text_encoders else []
    if text_encoders:  # a kohya file of the denoiser's adapters alone would load as another LoRA
        log.info("no kohya-format LoRA file: the text encoders' adapters are only in %s", LORA_WEIGHTS)
    if output.is_s3:
        output.upload_tree(folder)
    return folder, [LORA_WEIGHTS, *extras]


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Sample:
    """A published validation image: its prompt and its path in the output (and the Hub repo)."""

    prompt: str
    path: str
    png: bytes


def sample_files(step: int, prompts: list[str], images: list[Any]) -> list[Sample]:
    """The samples render_samples wrote for `step`, as the model card and the Hub push use them."""
    import io

    folder = f"{SAMPLES_DIR}/step-{step:08d}"
    return [
        Sample(p, f"{folder}/{i:02d}.png", _png(image, io))
        for i, (p, image) in enumerate(zip(prompts, images, strict=True))
    ]


def base_model_license(model_path: Path) -> str | None:
    """The `license` of the base model's own card (README.md front matter), when it has one."""
    readme = model_path / "README.md"
    if not readme.is_file():
        return None
    try:
        text = readme.read_text(errors="replace")
        if not text.startswith("---"):
            return None
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (OSError, yaml.YAMLError, IndexError):
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if isinstance(value, str | int) and str(value).strip() else None


def hub_model_id(name: str) -> bool:
    """Whether `name` is a Hub repository id (not a local folder or s3://)."""
    import re

    from kubetune.api.models import HUB_REPO

    return bool(re.fullmatch(HUB_REPO, name)) and not Path(name).exists()


def hub_dataset_id(cfg: TrainConfig) -> str | None:
    """The Hub dataset trained on, when --dataset_name is one (not a local folder or s3://)."""
    name = cfg.dataset_name
    return name if name and hub_model_id(name) else None


def model_card(
    cfg: TrainConfig,
    family: ModelFamily,
    data: TrainingData,
    images: int,
    skipped: int,
    steps: int,
    seed: int,
    license: str | None = None,
    samples: list[Sample] | None = None,
    class_images: int = 0,
) -> str:
    """README.md: what was trained, with which settings, on whose images under which licenses;
    its front matter is the Hub's model card metadata."""
    pipeline = family.pipeline_class
    what = f"LoRA rank {cfg.rank}" if cfg.method == "lora" else f"full fine-tune of the {family.denoiser_folder}"
    if cfg.train_text_encoder:
        encoders = " and ".join(family.text_encoders[i].folder for i in family.trained_text_encoders)
        what += f", with the {encoders}" if cfg.method == "full" else f", also on the {encoders}"
    tags = [*family.tags, "text-to-image", "diffusers", "kubetune", *(["lora"] if cfg.method == "lora" else [])]
    if cfg.instance_prompt:
        tags.append("dreambooth")
    meta: dict[str, Any] = {}
    if license:
        meta["license"] = license
    if hub_model_id(cfg.pretrained_model_name_or_path):  # the Hub refuses a card whose base_model is no model id
        meta["base_model"] = cfg.pretrained_model_name_or_path
    meta.update(library_name="diffusers", pipeline_tag="text-to-image")
    dataset = hub_dataset_id(cfg)
    if dataset:
        meta["datasets"] = [dataset]
    meta["tags"] = tags
    if samples:
        meta["widget"] = [{"text": s.prompt, "output": {"url": s.path}} for s in samples]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    lines = [
        "---",
        front.rstrip("\n"),
        "---",
        "",
        f"# Fine-tuned {cfg.pretrained_model_name_or_path}",
        "",
        f"Trained with kubetune ({what}) "
        f"on {images} images from `{data.description}`"
        + (f" ({skipped} unreadable images skipped)." if skipped else "."),
        "",
    ]
    if cfg.instance_prompt:
        lines += _dreambooth_lines(cfg, images, class_images)
    if cfg.method == "lora":
        lines += [
            "```python",
            f"from diffusers import {pipeline}",
            f'pipe = {pipeline}.from_pretrained("{cfg.pretrained_model_name_or_path}")',
            'pipe.load_lora_weights("<this folder>")',
            "```",
            "",
        ]
        if cfg.train_text_encoder:
            lines += [
                "The file holds the text encoders' adapters too; with transformers 5, loading them needs "
                "peft 0.22 or newer.",
                "",
            ]
    else:
        lines += [
            "```python",
            f"from diffusers import {pipeline}",
            f'pipe = {pipeline}.from_pretrained("<this folder>")',
            "```",
            "",
        ]
    settings = {
        "model family": f"{family.name} ({pipeline})",
        "steps": steps,
        "resolution": cfg.resolution,
        "center crop": cfg.center_crop,
        "random flip": cfg.random_flip,
        "aspect-ratio buckets": (
            f"{cfg.bucket_reso_steps} px steps, sides {cfg.min_bucket_reso or 'auto'}-{cfg.max_bucket_reso or 'auto'}"
            if cfg.enable_bucket
            else "off"
        ),
        "batch size per process": cfg.train_batch_size,
        "gradient accumulation": cfg.gradient_accumulation_steps,
        "learning rate": cfg.learning_rate,
        "text encoders": (
            f"trained, learning rate {cfg.text_encoder_lr or cfg.learning_rate}" if cfg.train_text_encoder else "frozen"
        ),
        "lr scheduler": cfg.lr_scheduler,
        "warm-up steps": cfg.lr_warmup_steps,
        "max grad norm": cfg.max_grad_norm,
        "mixed precision": cfg.precision,
        "EMA": cfg.use_ema,
        "gradient checkpointing": cfg.gradient_checkpointing,
        "SNR gamma": cfg.snr_gamma,
        "noise offset": cfg.noise_offset,
        "prediction type": cfg.prediction_type or "scheduler default",
        "seed": seed,
    }
    if samples:
        lines += ["## Samples", "", f"At step {steps}, seed {seed}:", ""]
        lines += [f"![{_alt(s.prompt)}]({s.path})" for s in samples] + [""]
    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    lines += ["", "## Dataset", ""]
    if cfg.spec_dataset:
        source = next((k for k, v in cfg.spec_dataset.items() if isinstance(v, dict)), "")
        prompts = cfg.spec_dataset.get(source, {}).get("prompts", [])
        lines.append(
            f"Collected by kubetune from **{source}**"
            + (f" for the prompts: {', '.join(prompts)}." if prompts else ".")
        )
    lines += _dataset_manifest_lines(data.manifest)
    if data.notes:
        lines += ["", "Prepared for training:", "", *data.notes]
    licenses = Counter(str(r.get("license") or "unknown") for r in data.records)
    sources = Counter(str(r["source"]) for r in data.records if r.get("source"))
    if sources:
        lines += ["", "Sources: " + ", ".join(f"{name} ({count})" for name, count in sources.most_common())]
    if data.records:
        lines += ["", "| license | images |", "|---|---|"] + [f"| {k} | {v} |" for k, v in licenses.most_common()]
        credited = [r for r in data.records if r.get("url") or r.get("author")]
        if credited:
            lines += ["", "### Credits", ""]
            for record in credited[:500]:
                lines.append(
                    f"- {record.get('file_name', '')}: {record.get('author') or 'unknown author'}"
                    f"{', ' + str(record['license']) if record.get('license') else ''}"
                    f"{', <' + str(record['url']) + '>' if record.get('url') else ''}"
                )
            if len(credited) > 500:
                lines.append(f"- ... and {len(credited) - 500} more (see the dataset's metadata.jsonl)")
    return "\n".join(lines) + "\n"


def _dreambooth_lines(cfg: TrainConfig, images: int, class_images: int) -> list[str]:
    """What a DreamBooth run learnt and how: the subject's prompt, and the prior preservation."""
    lines = [
        "## DreamBooth",
        "",
        f"DreamBooth-trained on {images} images of the subject, each with the instance prompt "
        f"`{cfg.instance_prompt}`: use it (or its rare token) in prompts.",
        "",
    ]
    if cfg.with_prior_preservation:
        lines += [
            "| prior preservation | |",
            "|---|---|",
            f"| class prompt | `{cfg.class_prompt}` |",
            f"| class images | {class_images} (`{cfg.class_data_dir}`) |",
            f"| prior loss weight | {cfg.prior_loss_weight:g} |",
            "",
        ]
    else:
        lines += ["Without prior preservation (no class images).", ""]
    return lines


def _alt(prompt: str) -> str:
    return prompt.replace("[", "(").replace("]", ")").replace("\n", " ")


def _dataset_manifest_lines(manifest: dict[str, Any] | None) -> list[str]:
    """What the collector's manifest says about the dataset; a manifest beside an imagefolder
    that kubetune did not collect is shown by the keys such files commonly have."""
    if not manifest:
        return []
    try:
        collected = DatasetManifest.model_validate(manifest)
    except ValidationError:
        return [
            f"- {key}: {manifest[key]}" for key in ("source", "fingerprint", "kept", "createdAt") if key in manifest
        ]
    counts = collected.counts
    lines = [f"- fingerprint: {collected.fingerprint}", f"- kept: {counts.kept} of {counts.requested} requested"]
    if collected.timing.finished_at is not None:
        lines.append(f"- collected: {collected.timing.finished_at.isoformat().replace('+00:00', 'Z')}")
    return lines
