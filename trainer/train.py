"""Fine-tuning: load -> cache -> train -> checkpoint -> publish.

`run` is the whole flow; the pieces below it are in the order it calls them. Every process
(`accelerate launch` starts one per GPU) runs it; only the main process writes progress,
checkpoints and the result.

Data order and randomness are pure functions of (seed, position in the sample stream): the
stream is the concatenation of seeded per-epoch permutations of the cached samples, step s
takes the next `global batch` positions, and each position's latent sample, noise, timestep and
flip come from a generator seeded by (seed, position). So a resumed run continues mid-epoch
exactly, and N processes at the same global batch see the same samples and noise as one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubetune import ownership
from kubetune.api import layout
from kubetune.api.contracts import CheckpointState, resume_mismatches
from kubetune.storage import StorageError, Store, join
from kubetune.trainer import cache as latent_cache
from kubetune.trainer import dreambooth, publish, trackers
from kubetune.trainer.buckets import BucketOrder, BucketSettings, StreamOrder
from kubetune.trainer.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointRef,
    background_copy_limit,
    complete_checkpoints,
    cpu_copy,
    fetch,
    find_checkpoint,
    tensor_bytes,
    write_checkpoint_files,
)
from kubetune.trainer.config import TrainConfig, fsdp_conflict
from kubetune.trainer.data import (
    DataError,
    TrainingData,
    is_imagefolder,
    open_hub_dataset,
    open_imagefolder,
    open_local_dataset,
    select,
)
from kubetune.trainer.families import FamilyError, ModelFamily, Parts, family_for
from kubetune.trainer.families.base import add_text_encoder_lora
from kubetune.trainer.progress import Progress

log = logging.getLogger("kubetune.trainer")
LOSS_EVERY = 10  # steps between loss read-outs (see Trainer._report)
TEXT_ENCODER_WEIGHTS = "model.safetensors"  # transformers' save_pretrained name


class TrainError(Exception):
    """Ends training with `code` and a one-line message (no traceback)."""

    def __init__(self, message: str, code: int = layout.EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def run(cfg: TrainConfig) -> int:
    session = Session.start(cfg)
    resume = session.resume_point()  # 0. where to continue from
    model = load_model(cfg, session)  # 1. load
    data, indices = load_data(cfg, session)
    try:
        class_data = load_class_data(cfg, session, model, data)  # DreamBooth's prior preservation, else None
    except InterruptedError:
        return session.preempted()  # stopped (SIGTERM) while generating: the images written are kept
    samples = load_cache(cfg, session, model, data, indices, class_data)  # 2. cache
    if samples is None:
        return session.preempted()
    model.release_encoders(keep_on_cpu=bool(cfg.validation_prompts))
    trainer = Trainer(cfg, session, model, samples, resume)
    for step in trainer.steps():  # 3. train
        stop = session.stopping()
        if stop or step % cfg.checkpointing_steps == 0:
            trainer.save_checkpoint()  # 4. checkpoint
        if stop:
            return session.preempted()
        if cfg.validation_prompts and step % trainer.validation_every == 0:
            trainer.render_samples()
    instances = len(samples) if samples.prior_start is None else samples.prior_start
    trainer.publish(data, instances, samples.skipped, len(samples) - instances)  # 5. publish
    session.close()
    return layout.EXIT_OK


# ---------------------------------------------------------------------------------------------
# the run's surroundings: processes, storage, signals, progress


@dataclass
class Session:
    cfg: TrainConfig
    accelerator: Any
    output: Store
    staging: Path
    progress: Progress
    stop_requested: bool = False
    seed: int = 0
    superseded: list[CheckpointRef] = field(default_factory=list)  # --resume_mismatch restart: deleted later

    @classmethod
    def start(cls, cfg: TrainConfig) -> Session:
        from accelerate import Accelerator

        # cpu=True where there is no GPU: accelerate 1.15 only picks gloo (MULTI_CPU) for several
        # processes when told so; otherwise each process silently trains alone.
        accelerator = Accelerator(
            mixed_precision=cfg.precision,
            cpu=not torch.cuda.is_available(),
            log_with=trackers.selected(cfg.report_to) or None,  # wandb, mlflow; TensorBoard is our own writer
        )
        output = Store(cfg.output_dir)
        staging = (
            Path(cfg.output_dir)
            if not output.is_s3
            else Path(
                os.environ.get(
                    "KUBETUNE_WORK_DIR", Path.home() / ".cache" / "kubetune" / "work" / _short_hash(cfg.output_dir)
                )
            )
        )
        # before anything is written: a prefix another FineTuneJob owns is refused untouched
        ownership.claim(output, ownership.owner_from_env())
        staging.mkdir(parents=True, exist_ok=True)
        progress = Progress(output if accelerator.is_main_process else None, 0, cfg.progress_interval)
        session = cls(cfg, accelerator, output, staging, progress)
        signal.signal(signal.SIGTERM, session._on_sigterm)
        progress.state("loading")
        return session

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: finishing this step, then saving a checkpoint")
        self.stop_requested = True

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def stopping(self) -> bool:
        """True on every process as soon as one of them was asked to stop."""
        if self.accelerator.num_processes == 1:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.accelerator.device)
        self.stop_requested = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return self.stop_requested

    def preempted(self) -> int:
        self.progress.state("preempted")
        return layout.EXIT_PREEMPTED

    def close(self) -> None:
        """End the process group once every process is done with it: left to interpreter exit, its
        threads (gloo's, NCCL's watchdog) can abort the process after a successful run."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def resume_point(self) -> CheckpointRef | None:
        """The checkpoint to continue from, and the seed (the checkpoint's, the flag's or a new one)."""
        ref = find_checkpoint(self.output, self.cfg.resume_from_checkpoint) if self.cfg.resume_from_checkpoint else None
        if ref is not None and ref.manifest is not None:
            ref = self.check_resume(ref, resume_mismatches(ref.manifest, self.resume_settings()))
        seed = ref.manifest.seed if ref and ref.manifest else self.cfg.seed
        if seed is None:
            from accelerate.utils import broadcast_object_list

            seed = broadcast_object_list([int.from_bytes(os.urandom(4), "little")])[0]
        self.seed = int(seed)
        if ref:
            written_by = " (written by diffusers' script)" if ref.stock else ""
            log.info("resuming from %s (step %d)%s", ref.store.uri, ref.step, written_by)
            if ref.stock:
                log.info("%s records no settings (method, batch, data): resumed without comparing them", ref.name)
        elif self.superseded:
            pass
        elif self.cfg.resume_from_checkpoint and self.cfg.resume_from_checkpoint != "latest":
            raise TrainError(
                f"--resume_from_checkpoint {self.cfg.resume_from_checkpoint}: not found", layout.EXIT_INVALID
            )
        return ref

    def resume_settings(self) -> dict[str, Any]:
        """This run's values of the settings a checkpoint records (contracts.RESUME_SETTINGS) that
        are known before loading: all but the cache key."""
        cfg = self.cfg
        processes = self.accelerator.num_processes
        return {
            "method": cfg.method,
            "model": cfg.pretrained_model_name_or_path,
            "revision": cfg.revision or "main",
            "global_batch_size": cfg.train_batch_size * processes * cfg.gradient_accumulation_steps,
            "resolution": cfg.resolution,
            "lora_rank": cfg.rank if cfg.method == "lora" else 0,
            "optimizer": cfg.optimizer,  # its state in the checkpoint is only another optimizer's
            "text_encoders": "trained" if cfg.train_text_encoder else "frozen",
        }

    def check_resume(self, ref: CheckpointRef, mismatches: list[str]) -> CheckpointRef | None:
        """`ref` when its recorded settings match this run's; otherwise refuse (TrainError, invalid
        input), or with --resume_mismatch restart: None (start from step 0; every checkpoint now in
        the output is deleted once the new run's first checkpoint is complete)."""
        if not mismatches:
            return ref
        what = f"{ref.name} in {self.output.uri} was written with other settings: {'; '.join(mismatches)}"
        if self.cfg.resume_mismatch != "restart":
            raise TrainError(
                f"--resume_from_checkpoint {self.cfg.resume_from_checkpoint}: {what}; use another --output_dir "
                "(storage.uri), or --resume_mismatch restart (training.resumeMismatch) to start again from step 0",
                layout.EXIT_INVALID,
            )
        self.superseded = complete_checkpoints(self.output)
        log.warning(
            "%s; --resume_mismatch restart: starting from step 0 (the %d old checkpoints are deleted once the "
            "first new one is complete)",
            what,
            len(self.superseded),
        )
        return None


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# 1. load


@dataclass
class Model:
    """The loaded pipeline's parts and the family that knows what to do with them."""

    path: Path
    family: ModelFamily
    parts: Parts
    fingerprint: str
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0  # the VAE's (FLUX, SD3): latents are (mean - shift) x scale
    strategy: str = "ddp"  # or "fsdp" (sharding.choose, decided before loading)
    trained_text_encoders: tuple[int, ...] = ()  # --train_text_encoder: the family's; kept in fp32 on the device

    @property
    def denoiser(self) -> Any:
        return self.parts.denoiser

    @property
    def vae(self) -> Any:
        return self.parts.vae

    @property
    def noise_scheduler(self) -> Any:
        return self.parts.noise_scheduler

    def encoders_to(
        self,
        device: Any,
        vae_dtype: torch.dtype | None = None,
        text_dtype: torch.dtype | None = None,
        frozen_only: bool = False,
    ) -> None:
        """Move the VAE and the text encoders; a trained text encoder keeps its fp32 weights (and,
        `frozen_only`, its place: the training device)."""
        self.parts.vae.to(device, vae_dtype)
        for index, encoder in enumerate(self.parts.text_encoders):
            if index not in self.trained_text_encoders:
                encoder.to(device, text_dtype)
            elif not frozen_only:
                encoder.to(device)

    def release_encoders(self, keep_on_cpu: bool) -> None:
        """Free the accelerator's memory of the VAE and the frozen text encoders once the cache is built."""
        if keep_on_cpu:
            self.encoders_to("cpu", torch.float32, torch.float32, frozen_only=True)
        else:
            trained = self.trained_text_encoders
            self.parts.text_encoders = [e if i in trained else None for i, e in enumerate(self.parts.text_encoders)]
            # a separate VAE is published with the model: keep it (on the CPU)
            self.parts.vae = self.parts.vae.to("cpu", torch.float32) if self.parts.vae_source else None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _model_family(cfg: TrainConfig, model_index: Any, where: str) -> ModelFamily:
    """The model's family from its model_index.json: refused (exit 2) before anything else is
    downloaded when no supported family trains it."""
    try:
        if not isinstance(model_index, dict):
            raise FamilyError("model_index.json is not a JSON object")
        family = family_for(model_index, cfg.model_family)
        family.configure(cfg)
        return family
    except FamilyError as error:
        raise TrainError(f"--pretrained_model_name_or_path {where}: {error}", layout.EXIT_INVALID) from None


def _read_json_file(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resolve_model(cfg: TrainConfig, session: Session) -> tuple[Path, ModelFamily]:
    """A local diffusers folder for the model (as given, downloaded from S3, or from the Hub) and
    its family; model_index.json is read first, so that an unsupported pipeline is refused before
    its weights are downloaded."""
    name = cfg.pretrained_model_name_or_path
    if Path(name).is_dir():
        index = Path(name) / "model_index.json"
        if not index.is_file():
            raise TrainError(f"--pretrained_model_name_or_path {name}: {NOT_A_PIPELINE}", layout.EXIT_INVALID)
        return Path(name), _model_family(cfg, _read_json_file(index), name)
    cache_root = Path(cfg.cache_dir or Path.home() / ".cache" / "kubetune" / "models")
    with session.accelerator.local_main_process_first():
        if name.startswith("s3://"):
            local = cache_root / _short_hash(name)
            if (local / ".complete").exists():
                return local, _model_family(cfg, _read_json_file(local / "model_index.json"), name)
            store = Store(name)
            if not store.exists("model_index.json"):
                raise TrainError(
                    f"--pretrained_model_name_or_path {name}: no model_index.json there", layout.EXIT_INVALID
                )
            try:
                index = store.read_json("model_index.json")
            except ValueError:
                index = None
            family = _model_family(cfg, index, name)
            store.download_tree("", local)
            (local / ".complete").touch()
            return local, family
        if name.startswith((".", "/")) or name.count("/") != 1:
            raise TrainError(
                f"--pretrained_model_name_or_path {name}: no such folder (nor an s3:// URI or a hub id like org/name)",
                layout.EXIT_INVALID,
            )
        from huggingface_hub import hf_hub_download, snapshot_download

        hub = {"revision": cfg.revision, "token": os.environ.get("HF_TOKEN") or None, "cache_dir": cfg.cache_dir}
        try:
            family = _model_family(cfg, _read_json_file(Path(hf_hub_download(name, "model_index.json", **hub))), name)
            path = snapshot_download(
                name,
                **hub,
                ignore_patterns=["*.ckpt", "*.msgpack", "*.onnx", "*.h5", "*.pb", "*.onnx_data"],
            )
        except TrainError:
            raise
        except Exception as error:
            raise TrainError(
                f"--pretrained_model_name_or_path {name}: cannot download: {type(error).__name__}", layout.EXIT_INVALID
            ) from None
        return Path(path), family


NOT_A_PIPELINE = "not a diffusers Stable Diffusion folder (no model_index.json)"


def load_model(cfg: TrainConfig, session: Session) -> Model:
    path, family = resolve_model(cfg, session)
    where = cfg.pretrained_model_name_or_path
    vae = cfg.pretrained_vae_model_name_or_path
    try:
        family.check_folder(path)
        strategy = choose_strategy(cfg, session, family, path)
        # FSDP: only the first process reads the denoiser's weights; the others build its shapes
        # and receive their shards from it (host memory for one copy per node, not one per GPU)
        on_meta = strategy == "fsdp" and session.accelerator.process_index != 0
        model = Model(
            path=path,
            family=family,
            parts=family.load(path, cfg.variant or None, vae, denoiser_on_meta=on_meta),
            fingerprint=_weights_fingerprint(path, family.fingerprint_folders(), vae),
            strategy=strategy,
            trained_text_encoders=family.trained_text_encoders if cfg.train_text_encoder else (),
        )
    except FamilyError as error:  # a setting this model cannot train with: the message names the flag
        raise TrainError(str(error), layout.EXIT_INVALID) from None
    except (OSError, ValueError) as error:
        raise TrainError(
            f"--pretrained_model_name_or_path {where}: cannot load: {str(error).splitlines()[0]}", layout.EXIT_INVALID
        ) from None
    model.scaling_factor, model.shift_factor = model.parts.scaling_factor, model.parts.shift_factor
    if cfg.prediction_type:
        model.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
    log.info("model family %s (%s)", family.name, family.pipeline_class)
    return model


def choose_strategy(cfg: TrainConfig, session: Session, family: ModelFamily, path: Path) -> str:
    """`ddp` or `fsdp` (sharding.choose), before the weights are read: `auto` counts the
    denoiser's parameters on the meta device (LoRA trains too few to shard)."""
    from kubetune.trainer import sharding

    if cfg.strategy != "auto":
        return cfg.strategy
    device, world = session.accelerator.device, session.accelerator.num_processes
    memory = sharding.gpu_memory(device)
    if cfg.method != "full" or memory is None or world < 2:
        return "ddp"
    count = sum(p.numel() for p in family.denoiser_on_meta(path).parameters())
    return sharding.choose("auto", count, world, memory)


def _weights_fingerprint(path: Path, folders: tuple[str, ...], vae: str | None = None) -> str:
    """What decides cached latents and text states: the VAE's and text encoders' files (a
    separate VAE's files when it is a folder, else its name)."""
    import hashlib

    digest = hashlib.sha256()
    roots = [path / sub for sub in folders if not (vae and sub == "vae")]
    if vae and Path(vae).is_dir():
        roots.append(Path(vae))
    elif vae:
        digest.update(f"vae:{vae}".encode())
    for root in roots:
        for file in sorted(root.glob("*")):
            if file.is_file():
                digest.update(file.name.encode())
                with file.open("rb") as handle:
                    while chunk := handle.read(8 << 20):
                        digest.update(chunk)
    return digest.hexdigest()[:16]


def load_data(cfg: TrainConfig, session: Session) -> tuple[TrainingData, list[int]]:
    source = cfg.instance_data_dir or (cfg.train_data_dir if not cfg.dataset_name else cfg.dataset_name)
    assert source is not None
    columns = (cfg.image_column, cfg.caption_column)
    if cfg.instance_prompt and dreambooth.is_plain_image_folder(source):
        data = dreambooth.open_image_files(source)  # DreamBooth's usual instance data: photos, no metadata
    elif source.startswith("s3://") or (Path(source).is_dir() and is_imagefolder(source)):
        data = open_imagefolder(source, *columns)  # read file by file from the store (S3: no local copy)
    elif Path(source).is_dir():
        data = open_local_dataset(source, cfg.dataset_config_name, *columns, cfg.cache_dir)
    else:
        data = open_hub_dataset(source, cfg.dataset_config_name, *columns, cfg.cache_dir)
    if cfg.instance_prompt:
        dreambooth.caption_all(data, cfg.instance_prompt)
    indices = select(data, cfg.max_train_samples, session.seed)
    return data, prepare_data(cfg, session, data, indices)


def load_class_data(cfg: TrainConfig, session: Session, model: Model, data: TrainingData) -> TrainingData | None:
    """DreamBooth's class images, the missing ones generated first (kubetune.trainer.dreambooth);
    None without --with_prior_preservation."""
    if not (cfg.instance_prompt and cfg.with_prior_preservation):
        if cfg.class_data_dir or cfg.class_prompt:  # as train_dreambooth.py, a warning rather than an error
            log.warning("--class_data_dir/--class_prompt: unused without --with_prior_preservation")
        return None
    assert cfg.class_prompt
    if not cfg.class_data_dir:  # beside the instance data (a hub dataset: in the output)
        beside = data._store.uri if data._store is not None else cfg.output_dir
        model_name = cfg.pretrained_model_name_or_path
        cfg.class_data_dir = dreambooth.default_class_dir(
            beside, model_name, cfg.revision, cfg.class_prompt, cfg.resolution
        )
    accelerator = session.accelerator
    dtype = dreambooth.generation_dtype(cfg.prior_generation_precision, accelerator.device.type == "cuda")
    vae = cfg.pretrained_vae_model_name_or_path

    def pipeline() -> Any:
        return model.family.generation_pipeline(model.path, dtype, cfg.variant or None, vae).to(accelerator.device)

    dreambooth.generate_class_images(
        Store(cfg.class_data_dir),
        cfg.num_class_images,
        cfg.class_prompt,
        cfg.sample_batch_size,
        pipeline,
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.wait_for_everyone,
        cfg.resolution,
        lambda: session.stop_requested,
    )
    return dreambooth.open_image_files(cfg.class_data_dir, cfg.class_prompt)


def prepare_data(cfg: TrainConfig, session: Session, data: TrainingData, indices: list[int]) -> list[int]:
    """Generated captions and the relevance filter (kubetune.trainer.captioning), when asked for."""
    from kubetune.trainer import captioning

    settings = captioning.from_config(cfg)
    acc = session.accelerator
    ranks = captioning.Ranks(acc.process_index, acc.num_processes, acc.wait_for_everyone, device=str(acc.device))
    indices, prep = captioning.prepare(data, indices, *settings, ranks, cfg.cache_dir)
    data.notes += prep.card_lines()
    if not indices:
        raise DataError(f"every image scored below --min_clip_score {cfg.min_clip_score}: nothing left to train on")
    return indices


# ---------------------------------------------------------------------------------------------
# 2. cache


def cache_root(cfg: TrainConfig) -> str:
    if cfg.latent_cache_dir:
        return cfg.latent_cache_dir
    data = (cfg.train_data_dir or "").rstrip("/")
    if data and not cfg.dataset_name and data.rsplit("/", 1)[-1] == layout.DATASET_DIR:
        return join(data.rsplit("/", 1)[0], layout.CACHE_DIR)  # beside <storage>/dataset
    return join(cfg.output_dir, layout.CACHE_DIR)


def load_cache(
    cfg: TrainConfig,
    session: Session,
    model: Model,
    data: TrainingData,
    indices: list[int],
    class_data: TrainingData | None = None,
) -> Any | None:
    """The latent cache of the training images; with DreamBooth's class images, one of the instance
    images followed by the class images (each set cached under its own key, so class images are
    encoded once for every job that uses them)."""
    accelerator = session.accelerator
    vae_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32  # an fp16 VAE can overflow
    text_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    settings = {
        "version": latent_cache.CACHE_VERSION,
        "model": model.fingerprint,
        "data": data.fingerprint,
        "samples": _short_hash(",".join(map(str, indices))),
        "resolution": cfg.resolution,
        "centerCrop": cfg.center_crop,
        "randomFlip": cfg.random_flip,
        "interpolation": cfg.image_interpolation_mode,
        "captionColumn": cfg.caption_column,
        "dtype": "float32" if cfg.precision == "no" else "float16",
    }
    if cfg.enable_bucket:  # (absent otherwise: the keys of square caches are unchanged)
        buckets = BucketSettings(cfg.resolution, cfg.bucket_reso_steps, cfg.min_bucket_reso, cfg.max_bucket_reso)
        settings["buckets"] = buckets.as_dict()

    if cfg.proportion_empty_prompts:
        settings["emptyCaption"] = True
    if cfg.train_text_encoder:  # the trained encoders' token ids are cached too
        settings["tokenIds"] = list(model.trained_text_encoders)
    settings.update(model.family.cache_settings())

    def encoders() -> latent_cache.Encoders:
        model.encoders_to(accelerator.device, vae_dtype, text_dtype)
        device = accelerator.device
        return latent_cache.Encoders(
            model.vae, device, vae_dtype, lambda captions: model.family.encode(model.parts, captions, device)
        )

    def build(data: TrainingData, indices: list[int], settings: dict[str, Any]) -> Any:
        return latent_cache.build_or_load(
            Store(cache_root(cfg)),
            settings,
            data,
            indices,
            encoders,
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.wait_for_everyone,
            lambda: session.stop_requested,
            session.progress.state,
            workers=max(4, cfg.dataloader_num_workers),
            empty_caption=bool(cfg.proportion_empty_prompts),
        )

    try:
        samples = build(data, indices, settings)
        if class_data is None:
            return samples
        class_indices = list(range(min(len(class_data), cfg.num_class_images)))  # as train_dreambooth.py: the first
        class_settings = {
            **settings,
            "data": class_data.fingerprint,
            "samples": _short_hash(",".join(map(str, class_indices))),
        }
        return latent_cache.with_prior(samples, build(class_data, class_indices, class_settings))
    except InterruptedError:
        return None  # stopped (SIGTERM) while caching: the chunks done so far are kept


# ---------------------------------------------------------------------------------------------
# 3. train, 4. checkpoint, 5. publish


@dataclass
class Trainer:
    cfg: TrainConfig
    session: Session
    model: Model
    samples: Any
    resume: CheckpointRef | None
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0  # non-finite steps dropped under --max_nonfinite_steps
    params: list[torch.nn.Parameter] = field(default_factory=list)
    last_render: tuple[int, list[str], list[Any]] = (-1, [], [])  # step, prompts, images

    def __post_init__(self) -> None:
        cfg, accelerator = self.cfg, self.session.accelerator
        self.device = accelerator.device
        self.nonfinite_seen = torch.zeros((), dtype=torch.bool, device=self.device)
        self.world = accelerator.num_processes
        self.global_batch = cfg.train_batch_size * self.world * cfg.gradient_accumulation_steps
        cache = self.samples
        self.order = (
            BucketOrder(self.session.seed, cache.bucket.tolist(), self.global_batch)
            if cache.bucket is not None
            else StreamOrder(self.session.seed, _stream_length(cache), self.global_batch)
        )
        if cache.bucket is not None:
            log.info("aspect-ratio buckets (height x width: images): %s", json.dumps(cache.bucket_counts()))
        steps_per_epoch = self.order.steps_per_epoch
        self.max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
        self.validation_every = cfg.validation_steps or (
            cfg.validation_epochs * steps_per_epoch if cfg.validation_epochs else cfg.checkpointing_steps
        )
        self.session.progress.max_steps = self.max_steps
        self.session.progress.update(maxSteps=self.max_steps)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        family = self.model.family
        self.denoiser = denoiser = self.model.denoiser  # the plain module; self.ddp is what runs forward
        if cfg.method == "lora":
            targets = (
                [m.strip() for m in cfg.lora_layers.split(",") if m.strip()]
                if cfg.lora_layers
                else list(family.lora_targets)
            )
            self._add_lora(denoiser, targets, self.session.seed, type(denoiser).add_adapter)
        denoiser.train()
        if cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        _trainable_in_fp32(denoiser)
        # FSDP2 moves only this process's shards to the device: no GPU ever holds the whole model
        self.sharded = self._shard(denoiser)
        if self.sharded is None:
            denoiser.to(self.device)
        # channels_last measured slower for the SD 1.5 UNet on an H100 (61 vs 68 images/s, bf16,
        # batch 16: its GroupNorms convert layouts), so it is opt-in.
        self.channels_last = self.device.type == "cuda" and os.environ.get("KUBETUNE_CHANNELS_LAST") == "1"
        if self.channels_last and self.sharded is None:
            denoiser.to(memory_format=torch.channels_last)
        self.channels_last = self.channels_last and self.sharded is None
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        self.text_encoders = self._trained_text_encoders()  # folder -> encoder; {} unless --train_text_encoder
        self.text_params = [p for e in self.text_encoders.values() for p in e.parameters() if p.requires_grad]
        self.ema = None
        if cfg.use_ema and cfg.method == "full":
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(
                self.params,
                model_cls=family.denoiser_type(),
                model_config=denoiser.config,
                foreach=cfg.foreach_ema or self.device.type == "cuda",
            )
            if cfg.offload_ema:
                self.ema.to("cpu")
        lr = cfg.learning_rate * (self.global_batch if cfg.scale_lr else 1)
        # the text encoders' weights after the denoiser's, in one group as train_dreambooth(_lora).py
        # has them; in a second group at its own learning rate with --text_encoder_lr
        groups: list[Any] = self.params + self.text_params
        if self.text_params and cfg.text_encoder_lr:
            text_lr = cfg.text_encoder_lr * (self.global_batch if cfg.scale_lr else 1)
            groups = [{"params": self.params}, {"params": self.text_params, "lr": text_lr}]
        optimizer = make_optimizer(cfg, groups, lr, self.device)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=self.max_steps,
            num_cycles=cfg.lr_num_cycles,
            power=cfg.lr_power,
        )
        runnable = torch.compile(denoiser) if cfg.compile else denoiser
        if self.sharded is None:
            self.ddp, self.optimizer = accelerator.prepare(runnable, optimizer)
        else:  # FSDP2 does the gradient reduction; accelerate's wrappers would add DDP's
            self.ddp, self.optimizer = runnable, optimizer
        self.checkpointer = Checkpointer(self.session.output, self.session.staging, cfg.checkpoints_total_limit)
        self.writer = self._tensorboard()
        trackers.start(accelerator, cfg, self.session.staging / cfg.logging_dir)
        if self.resume and self.resume.manifest:  # the data is known now
            found = resume_mismatches(self.resume.manifest, {"cache_key": self.samples.key})
            self.resume = self.session.check_resume(self.resume, found)
        self.checkpointer.superseded = list(self.session.superseded)
        if cfg.hub_push_checkpoints and self.session.is_main:
            self.checkpointer.on_stored = self._push_checkpoint_to_hub
        if self.resume:
            self._load_checkpoint(self.resume)

    def _trained_text_encoders(self) -> dict[str, Any]:
        """--train_text_encoder: the family's trained encoders (folder -> module), trainable on this
        device: all their weights in fp32, or (LoRA) adapters on their attention over frozen weights
        in the autocast dtype, as train_dreambooth(_lora).py set them up. Their gradients are
        averaged over the processes by `_reduce_text_gradients`, not by DDP."""
        cfg, family, parts = self.cfg, self.model.family, self.model.parts
        out: dict[str, Any] = {}
        for index in self.model.trained_text_encoders:
            encoder = parts.text_encoders[index]
            if cfg.method == "lora":
                seed = self.session.seed + 1 + index
                self._add_lora(encoder, list(family.text_lora_targets), seed, add_text_encoder_lora)
            else:
                encoder.requires_grad_(True)
            if cfg.gradient_checkpointing:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            _trainable_in_fp32(encoder)
            out[family.text_encoders[index].folder] = encoder.to(self.device).train()
        return out

    def _add_lora(self, module: Any, targets: list[str], seed: int, add: Callable[[Any, Any], None]) -> None:
        """Freeze `module` and `add` (module, LoraConfig) adapters of --rank on `targets`. With
        fp16/bf16 the frozen weights are in the autocast dtype, as the stock LoRA scripts keep them:
        half the memory (FLUX.1-dev: 24 GB, not 48); the adapters train in fp32."""
        from peft import LoraConfig

        cfg = self.cfg
        module.requires_grad_(False)
        if cfg.precision in ("fp16", "bf16"):
            module.to(dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
        # the adapters' gaussian init from the seed: the same run twice starts the same
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            config = LoraConfig(
                r=cfg.rank, lora_alpha=cfg.lora_alpha or cfg.rank, init_lora_weights="gaussian", target_modules=targets
            )
            add(module, config)

    def _reduce_text_gradients(self) -> None:
        """Average the trained text encoders' gradients over the processes, once per optimizer
        step (after the accumulated micro-batches). Not DDP: SDXL and SD3 read a CLIP encoder's
        penultimate layer, so its last layer gets no gradient, which DDP's reducer refuses (it
        would need find_unused_parameters and its extra pass); an unused weight has no gradient on
        any process, so the same tensors are reduced everywhere."""
        grads = [p.grad for p in self.text_params if p.grad is not None]
        if self.world == 1 or not grads:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)

    def _shard(self, denoiser: Any) -> Any:
        """kubetune.trainer.sharding.Sharded when the strategy is FSDP (the denoiser is sharded in
        place), else None (DDP through accelerate.prepare)."""
        from kubetune.trainer import sharding

        if self.model.strategy != "fsdp":
            return None
        conflict = fsdp_conflict(self.cfg)  # `auto` can pick FSDP only here, on the GPU
        if self.cfg.fsdp_cpu_offload and self.device.type != "cuda":
            conflict = "--fsdp_cpu_offload: needs GPUs (these processes already train on the CPU)"
        if conflict:
            raise TrainError(conflict, layout.EXIT_INVALID)
        return sharding.Sharded(
            denoiser,
            self.device,
            self.world,
            self.cfg.precision,
            self.cfg.fsdp_cpu_offload,
            from_first_process=True,
        )

    # -- the loop ------------------------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        """Run optimizer steps; yields after each one with the new step number."""
        session, cfg = self.session, self.cfg
        session.progress.state("training", step=self.step, epoch=self.order.epoch(self.samples_seen))
        accumulation = cfg.gradient_accumulation_steps
        first_step = self.step + 1
        started = time.monotonic()
        with torch.inference_mode(False):
            while self.step < self.max_steps:
                losses = []
                for micro in range(accumulation):
                    batch = self._batch(self._positions(micro))
                    sync = micro == accumulation - 1
                    with self._no_sync(sync):
                        loss = self._loss(batch)
                        self.session.accelerator.backward(loss / accumulation)
                    losses.append(loss.detach())
                loss = torch.stack(losses).mean()
                self._reduce_text_gradients()
                finite = torch.isfinite(loss)
                if cfg.max_grad_norm > 0:
                    norm = self._clip_grad_norm(cfg.max_grad_norm)
                    finite = finite & torch.isfinite(norm)
                if cfg.max_nonfinite_steps and not self._finite_everywhere(finite):
                    self._skip_nonfinite_step()  # a host sync per step, only with the knob set
                    continue
                self.nonfinite_seen = self.nonfinite_seen | ~finite  # on the device: no sync
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self._ema_step()
                self.step += 1
                self.samples_seen += self.global_batch
                self._report(loss)
                if cfg.compile and self.step == first_step:  # what compiling costs, once per process
                    took = time.monotonic() - started
                    log.info("--compile: the first step took %.1fs (compiling the denoiser)", took)
                yield self.step

    def _no_sync(self, sync: bool) -> Any:
        if self.sharded is not None:
            return self.sharded.no_sync(sync)
        return contextlib.nullcontext() if sync else self.session.accelerator.no_sync(self.ddp)

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        if self.sharded is not None:
            return self.sharded.clip_grad_norm(self.params, max_norm)
        return self.session.accelerator.clip_grad_norm_(self.params + self.text_params, max_norm)

    def _finite_everywhere(self, finite: torch.Tensor) -> bool:
        """Whether every process's step was finite (all processes skip or step together)."""
        if self.world > 1:
            finite = self.session.accelerator.reduce(finite.float(), reduction="mean") == 1
        return bool(finite)

    def _skip_nonfinite_step(self) -> None:
        """Drop this step's update (its data is consumed, the weights and optimizer untouched),
        or stop when more than --max_nonfinite_steps steps were skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        self.samples_seen += self.global_batch
        self.skipped_steps += 1
        log.warning(
            "step %d: non-finite loss or gradients; update skipped (%d of at most %d)",
            self.step + 1,
            self.skipped_steps,
            self.cfg.max_nonfinite_steps,
        )
        if self.skipped_steps > self.cfg.max_nonfinite_steps:
            raise self._nonfinite_error(f"after {self.skipped_steps} skipped steps")

    def check_finite(self) -> None:
        """Stop before anything non-finite is checkpointed or published. The loss flag gathered
        on the device since the last check is read here (one sync), and the weights themselves
        are checked: a huge learning rate can overflow them while every loss was still finite."""
        self._raise_if_nonfinite_seen()
        local = [p.to_local() if self.sharded is not None else p for p in self.params]  # DTensor: this shard
        local += self.text_params
        finite = torch.stack([p.detach().isfinite().all() for p in local]).all()
        if not (self._finite_everywhere(finite) if self.sharded is not None else bool(finite)):
            raise self._nonfinite_error("(weights)")

    def _raise_if_nonfinite_seen(self) -> None:
        flag = self.nonfinite_seen.float()
        if self.world > 1:  # every process stops together, or the others would wait forever
            flag = self.session.accelerator.reduce(flag, reduction="sum")
        if bool(flag > 0):
            raise self._nonfinite_error("(loss or gradients)")

    def _nonfinite_error(self, what: str) -> TrainError:
        good = self.checkpointer.latest
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint was written"
        return TrainError(
            f"training diverged: NaN or inf {what} by step {self.step}; stopped without saving or "
            f"publishing these weights ({kept}); lower --learning_rate (now {self.cfg.learning_rate:g}), "
            "keep --max_grad_norm, or use --mixed_precision bf16 rather than fp16",
            layout.EXIT_DIVERGED,
        )

    def _positions(self, micro: int) -> list[int]:
        """Stream positions of this process's micro-batch `micro` of the current step."""
        batch, rank = self.cfg.train_batch_size, self.session.accelerator.process_index
        start = self.samples_seen + micro * batch * self.world + rank * batch
        return list(range(start, start + batch))

    def _batch(self, positions: list[int]) -> dict[str, torch.Tensor]:
        """Latents sampled from the cached distributions, noise, timesteps, the cached text tensors
        (`text.<name>`) and each image's size and crop."""
        cfg, cache = self.cfg, self.samples
        family, scheduler = self.model.family, self.model.noise_scheduler
        # per slot (0: the sample; 1: its class sample with prior preservation), so that the batch
        # holds the instance examples first and the class examples after, as train_dreambooth.py's
        rows: list[list[Any]] = [[], []]
        captions: list[list[int]] = [[], []]
        geometry: list[list[Any]] = [[], []]
        for position in positions:
            g = torch.Generator().manual_seed((self.session.seed * 1_000_003 + position) % (2**63 - 1))
            for slot, index in enumerate(_members(cache, self.order.index(position))):
                flip = bool(torch.rand(1, generator=g) < 0.5) and cfg.random_flip
                mean, std = cache.distribution(index, flip)
                shape = mean.shape
                latent = mean.float() + std.float() * torch.randn(shape, generator=g)
                noise = torch.randn(shape, generator=g) + cfg.noise_offset * torch.randn((shape[0], 1, 1), generator=g)
                perturbed = noise + cfg.input_perturbation * torch.randn(shape, generator=g)
                timestep = family.draw_timestep(scheduler, g)
                rows[slot].append((latent, noise, perturbed, timestep))
                caption = int(cache.caption_index[index])
                if cfg.proportion_empty_prompts and bool(torch.rand(1, generator=g) < cfg.proportion_empty_prompts):
                    assert cache.empty_caption is not None
                    caption = cache.empty_caption
                captions[slot].append(caption)
                if cache.original_size is not None:
                    crop = cache.crop_top_left_flip if flip else cache.crop_top_left
                    assert crop is not None
                    target = torch.tensor(cache.target_size(index, cfg.resolution))
                    geometry[slot].append((cache.original_size[index], crop[index], target))
        class_examples = len(rows[1])
        rows, captions, geometry = rows[0] + rows[1], captions[0] + captions[1], geometry[0] + geometry[1]
        latents, noise, perturbed, timesteps = (torch.stack(column) for column in zip(*rows, strict=True))
        batch = {
            "latents": ((latents - self.model.shift_factor) * self.model.scaling_factor).to(self.device),
            "noise": noise.to(self.device),
            "perturbed": perturbed.to(self.device),
            "timesteps": timesteps.squeeze(1).to(self.device),
        }
        rows_of = torch.tensor(captions)
        for name, tensor in cache.text.items():
            rows = tensor[rows_of].to(self.device)
            batch[f"text.{name}"] = rows.float() if rows.is_floating_point() else rows  # token ids stay integers
        if geometry:
            sizes, crops, targets = (torch.stack(c).float().to(self.device) for c in zip(*geometry, strict=True))
            batch.update(original_size=sizes, crop_top_left=crops, target_size=targets)
        if class_examples:
            is_class = torch.zeros(len(rows), dtype=torch.bool)
            is_class[len(rows) - class_examples :] = True
            batch["is_class"] = is_class.to(self.device)
        return batch

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The family's loss with the family's conditioning for this batch; with class examples
        (DreamBooth's prior preservation) the instance loss plus --prior_loss_weight times theirs."""
        is_class = batch.pop("is_class", None)
        family, scheduler = self.model.family, self.model.noise_scheduler
        if self.text_encoders:  # run again on the token ids, with gradients, under the step's autocast
            with self.session.accelerator.autocast():
                batch.update(family.encode_trained(self.model.parts, batch))
        if is_class is None:
            return family.loss(self.ddp, scheduler, batch, self.channels_last)
        losses = family.example_losses(self.ddp, scheduler, batch, self.channels_last)
        return dreambooth.prior_preservation_loss(losses, is_class, self.cfg.prior_loss_weight)

    def _ema_step(self) -> None:
        assert self.ema is not None
        if self.cfg.offload_ema:
            self.ema.to(self.device)
        self.ema.step(self.params)
        if self.cfg.offload_ema:
            self.ema.to("cpu")

    def _report(self, loss: torch.Tensor) -> None:
        """Progress every step; the loss only every LOSS_EVERY steps, because reading it waits for
        the GPU and so stops the CPU from queueing the next step. Step-based, so every process
        joins the same all-reduces."""
        values: dict[str, Any] = {
            "epoch": self.order.epoch(self.samples_seen),
            "learningRate": self.lr_scheduler.get_last_lr()[0],
        }
        if self.step % LOSS_EVERY == 0 or self.step <= 2 or self.step == self.max_steps:
            if self.world > 1:
                loss = self.session.accelerator.reduce(loss, reduction="mean")
            values["loss"] = round(float(loss), 6)
            if not math.isfinite(values["loss"]):
                raise self._nonfinite_error("(loss)")
            self._raise_if_nonfinite_seen()
            if self.writer is not None:
                self.writer.add_scalar("train_loss", values["loss"], self.step)
                self.writer.add_scalar("lr", values["learningRate"], self.step)
        if self.session.is_main:
            # images trained: with prior preservation each sample brings its class image along
            images = self.samples_seen * (1 if self.samples.prior_start is None else 2)
            self.session.progress.step(self.step, images, **values)
            if "loss" in values and trackers.selected(self.cfg.report_to):
                rate = self.session.progress.values.get("imagesPerSecond")
                logged = {"train_loss": values["loss"], "lr": values["learningRate"]}
                self.session.accelerator.log({**logged, **({"images_per_second": rate} if rate else {})}, self.step)

    # -- 4. checkpoint -------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write this step's checkpoint (main process). The full weights, EMA and optimizer state are
        copied to CPU memory and written, hashed and uploaded in the background, so training waits
        only for the copy; when the copy would not fit in memory they are written first. When
        stopping, wait for the upload: the pod is about to go."""
        session = self.session
        self.check_finite()
        uploaded: dict[str, Any] = {}
        if session.is_main:
            session.progress.state("checkpointing")
            folder = self.checkpointer.folder(self.step)
        if self.sharded is not None:
            folder, uploaded = self._save_shards()
        if session.is_main:
            started = time.monotonic()
            files = self._checkpoint_files(folder)
            size = sum(tensor_bytes(payload) for payload in files.values())
            allowed = background_copy_limit()
            background = size <= allowed
            if background:
                files = {name: cpu_copy(payload) for name, payload in files.items()}
            else:
                write_checkpoint_files(folder, files)
                log.info(
                    "checkpoint-%d: written before training goes on (a %.1f GB copy in memory is over the %.1f GB "
                    "allowed)",
                    self.step,
                    size / 1e9,
                    allowed / 1e9,
                )
            log.info("checkpoint-%d: training paused %.2fs", self.step, time.monotonic() - started)
            epoch = self.order.epoch(self.samples_seen)
            self.checkpointer.commit(
                folder,
                CheckpointState.model_validate(
                    {
                        "step": self.step,
                        "samplesSeen": self.samples_seen,
                        "epoch": epoch,
                        "seed": session.seed,
                        **session.resume_settings(),  # what a later resume compares
                        "worldSize": self.world,
                        "cacheKey": self.samples.key,
                        "ema": {"optimizationStep": self.ema.optimization_step} if self.ema is not None else None,
                        "dataloader": {
                            "position": self.samples_seen,
                            "epoch": epoch,
                            "indexInEpoch": self.samples_seen - self.order.epoch_start(epoch),
                            "samples": len(self.samples),
                        },
                        "rng": {
                            "seed": session.seed,
                            "scheme": "torch.Generator per sample, seeded by (seed, position)",
                        },
                    }
                ),
                uploaded,
                write=(lambda: write_checkpoint_files(folder, files)) if background else None,
            )
            if session.stop_requested:  # the pod is about to go: store this checkpoint now
                try:
                    session.progress.update(latestCheckpoint=self.checkpointer.wait())
                except StorageError as error:  # still a preemption: resume from an older one
                    log.error("%s; the next attempt resumes from %s", error, self.checkpointer.latest)
            self._upload_logs()
            session.progress.state("training", latestCheckpoint=self.checkpointer.latest)
        session.accelerator.wait_for_everyone()

    def _checkpoint_files(self, folder: Path) -> dict[str, Any]:
        """What diffusers' scripts save, as `relative path -> payload` (a tensor dict for
        safetensors, any other object for torch.save), from the live tensors (no copy yet): full
        `unet/` (the family's denoiser folder: `transformer/` for FLUX and SD3) and, with EMA,
        `unet_ema/` (save_pretrained's files; the EMA's config also holds its state, as
        EMAModel.save_pretrained writes it), and `optimizer.pt`. The configs are written here, and
        LoRA's small `pytorch_lora_weights.safetensors` too."""
        import json

        files: dict[str, Any] = {}
        scaler = self.session.accelerator.scaler
        files["optimizer.pt"] = {
            "optimizer": self.optimizer.state_dict() if self.sharded is None else None,  # sharded: DCP's
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        if self.cfg.method == "lora":
            self.model.family.save_lora(self.denoiser, folder, self.text_encoders)
            return files
        for name, encoder in self.text_encoders.items():  # as train_dreambooth.py's save hook: save_pretrained's
            encoder.config.save_pretrained(folder / name)
            files[f"{name}/{TEXT_ENCODER_WEIGHTS}"] = {
                k: v.detach().contiguous() for k, v in encoder.state_dict().items()
            }
        if self.sharded is not None:
            return files  # in <denoiser>_sharded/, written by every process (_save_shards)
        weights, main = "diffusion_pytorch_model.safetensors", self.model.family.denoiser_folder
        state = {k: v.detach().contiguous() for k, v in self.denoiser.state_dict().items()}
        self.denoiser.save_config(folder / main)
        files[f"{main}/{weights}"] = state
        if self.ema is not None:
            names = [name for name, p in self.denoiser.named_parameters() if p.requires_grad]
            shadow = dict(zip(names, self.ema.shadow_params, strict=True))
            ema = folder / f"{main}_ema"
            self.denoiser.save_config(ema)
            config = json.loads((ema / "config.json").read_text())
            config.update({k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"})
            (ema / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            files[f"{main}_ema/{weights}"] = {k: shadow.get(k, v).detach().contiguous() for k, v in state.items()}
        return files

    def _ema_names(self) -> list[str]:
        return [name for name, p in self.denoiser.named_parameters() if p.requires_grad]

    def _save_shards(self) -> tuple[Path, dict[str, Any]]:
        """Every process writes its shards into `<denoiser>_sharded/` of this step's checkpoint
        (DCP: `__<rank>_0.distcp`, rank 0 also `.metadata`). A process on another node than the
        main one (whose staging folder the main process does not see) uploads its own files to S3
        before the main process writes the manifest; their entries for the manifest come back."""
        from kubetune.trainer.checkpoint import local_entries
        from kubetune.trainer.sharding import SHARDED_SUFFIX

        assert self.sharded is not None
        accelerator = self.session.accelerator
        folder = self.checkpointer.local_root / layout.checkpoint_name(self.step)
        accelerator.wait_for_everyone()  # the main process has emptied the folder
        shards = folder / f"{self.model.family.denoiser_folder}{SHARDED_SUFFIX}"
        shards.mkdir(parents=True, exist_ok=True)
        self.sharded.save(shards, self.optimizer, self.ema, self._ema_names())
        state = accelerator.state
        other_node = state.process_index != state.local_process_index
        mine: dict[str, Any] = {}
        if other_node and self.session.output.is_s3:
            rank = f"__{state.process_index}_"
            files = [p for p in shards.iterdir() if p.name.startswith(rank)]
            mine = local_entries(folder, files)
            remote = self.session.output.child(folder.name)
            for name in mine:
                remote.upload_file(folder / name, name)
            import shutil

            shutil.rmtree(folder, ignore_errors=True)  # the S3 copy counts; this node's disk is freed
        from accelerate.utils import gather_object

        uploaded: dict[str, Any] = {}
        for entries in gather_object([mine]):
            uploaded.update(entries)
        return folder, uploaded

    def _load_checkpoint(self, ref: CheckpointRef) -> None:
        accelerator = self.session.accelerator
        with accelerator.local_main_process_first():
            folder = fetch(ref, self.session.staging)
        if ref.manifest is None:
            self._load_stock_checkpoint(ref, folder)
            return
        files = ref.manifest.files  # only files the manifest lists (and fetch verified) are read
        main = self.model.family.denoiser_folder
        if self._sharded_checkpoint(ref, files):
            self._load_shards(ref, folder)
            return
        weights_file, ema_file = (f"{f}/diffusion_pytorch_model.safetensors" for f in (main, f"{main}_ema"))
        if self.cfg.method == "lora" and "pytorch_lora_weights.safetensors" in files:
            self._load_lora(folder / "pytorch_lora_weights.safetensors")
        elif self.cfg.method == "full" and weights_file in files:
            self._load_denoiser(_load_tensors(folder / weights_file))
            self._load_text_encoders(folder, ref.store.uri, lambda name: name in files)
        elif "trainable.safetensors" in files:  # the earlier layout (checkpoints/step-N)
            self._load_trainable_legacy(_load_tensors(folder / "trainable.safetensors"))
        else:
            raise CheckpointError(f"{ref.store.uri}: no {self.cfg.method} weights in this checkpoint")
        if self.ema is not None:
            ema = ref.manifest.ema
            if ema_file in files:
                self._load_ema(_load_tensors(folder / ema_file), ema.optimization_step if ema else ref.step)
            elif "ema.safetensors" in files:  # the earlier layout: by position
                shadow = _load_tensors(folder / "ema.safetensors")
                for i, p in enumerate(self.ema.shadow_params):
                    p.data.copy_(shadow[f"{i}"])
                self.ema.optimization_step = ema.optimization_step if ema else ref.step
        saved = _load_plain(folder / "optimizer.pt", ref.store.uri_of("optimizer.pt"), "optimizer state")
        self._load_optimizer(saved["optimizer"], ref)
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if saved.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        self.step, self.samples_seen = ref.step, ref.manifest.samples_seen
        self._resumed(ref)

    def _sharded_checkpoint(self, ref: CheckpointRef, files: Any) -> bool:
        """Whether `ref` holds shards (written with --strategy fsdp); refused when this run's
        strategy does not match."""
        from kubetune.trainer.sharding import SHARDED_SUFFIX

        prefix = f"{self.model.family.denoiser_folder}{SHARDED_SUFFIX}/"
        sharded = any(name.startswith(prefix) for name in files)
        if sharded != (self.sharded is not None):
            written, now = ("fsdp", "ddp") if sharded else ("ddp", "fsdp")
            raise TrainError(
                f"--strategy: {ref.name} in {self.session.output.uri} was written with --strategy {written} "
                f"({'sharded' if sharded else 'full'} weights) and this run is {now}; resume it with "
                f"--strategy {written} (trainer.strategy)",
                layout.EXIT_INVALID,
            )
        return sharded

    def _load_shards(self, ref: CheckpointRef, folder: Path) -> None:
        from kubetune.trainer.sharding import SHARDED_SUFFIX

        assert self.sharded is not None and ref.manifest is not None
        shards = folder / f"{self.model.family.denoiser_folder}{SHARDED_SUFFIX}"
        self.sharded.load(shards, self.optimizer, self.ema, self._ema_names())
        if self.ema is not None:
            ema = ref.manifest.ema
            self.ema.optimization_step = ema.optimization_step if ema else ref.step
        saved = _load_plain(folder / "optimizer.pt", ref.store.uri_of("optimizer.pt"), "optimizer state")
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        self.step, self.samples_seen = ref.step, ref.manifest.samples_seen
        self._resumed(ref)

    def _load_stock_checkpoint(self, ref: CheckpointRef, folder: Path) -> None:
        """A checkpoint diffusers' script wrote (accelerate's save_state and its save hooks): the
        UNet (or LoRA) and EMA weights, optimizer.bin, scheduler.bin, scaler.pt, the step from the
        folder name. Its random_states_0.pkl (a pickle) is not read: kubetune's randomness is a
        function of the seed and the sample position. As the stock script does, the data order
        restarts at the beginning of the step's epoch."""
        import json

        accelerator, where, main = self.session.accelerator, ref.store.uri, self.model.family.denoiser_folder
        if self.cfg.method == "lora":
            if not (folder / "pytorch_lora_weights.safetensors").is_file():
                raise CheckpointError(f"{where}: no pytorch_lora_weights.safetensors (a LoRA checkpoint has one)")
            self._load_lora(folder / "pytorch_lora_weights.safetensors")
        else:
            self._load_denoiser(self._stock_state(folder / main, where))
            self._load_text_encoders(folder, where, lambda name: (folder / name).is_file())
        if self.ema is not None:
            if (folder / f"{main}_ema").is_dir():
                config = json.loads((folder / f"{main}_ema" / "config.json").read_text())
                step = int(config.get("optimization_step", ref.step))
                self._load_ema(self._stock_state(folder / f"{main}_ema", where), step)
            else:
                log.warning(
                    "%s has no %s_ema/ (written without --use_ema): the EMA starts from its weights", where, main
                )
                self.ema.optimization_step = 0
                for shadow, p in zip(self.ema.shadow_params, self.params, strict=True):
                    shadow.data.copy_(p.data)
        for name in ("optimizer.bin", "scheduler.bin"):
            if not (folder / name).is_file():
                raise CheckpointError(f"{where}: no {name} (accelerate's save_state writes one)")
        optimizer = _load_plain(folder / "optimizer.bin", f"{where}/optimizer.bin", "optimizer state")
        self._load_optimizer(optimizer, ref)
        scheduler = _load_plain(folder / "scheduler.bin", f"{where}/scheduler.bin", "LR scheduler state")
        try:
            self.lr_scheduler.load_state_dict(scheduler)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where}/scheduler.bin: not an LR scheduler state ({error})") from None
        # the stock script counts its schedule in steps x processes; kubetune's counts steps
        self._set_schedule_step(ref.step)
        if (folder / "scaler.pt").is_file() and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(_load_plain(folder / "scaler.pt", f"{where}/scaler.pt", "scaler"))
        epoch = ref.step // self.order.steps_per_epoch
        self.step, self.samples_seen = ref.step, self.order.epoch_start(epoch)
        log.warning(
            "%s was written by diffusers' script: UNet%s, optimizer, LR schedule and step %d restored; "
            "the data order restarts at the beginning of epoch %d, as that script does (not mid-epoch); "
            "its random states are not read",
            where,
            " (LoRA)" if self.cfg.method == "lora" else (", EMA" if self.ema is not None else ""),
            ref.step,
            epoch,
        )
        self._resumed(ref)

    def _stock_state(self, folder: Path, where: str) -> dict[str, torch.Tensor]:
        denoiser_type = self.model.family.denoiser_type()

        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{where}: no {folder.name}/ in diffusers format (save_pretrained's config.json)")
        try:  # safetensors, sharded or not; a .bin is read with weights_only
            return dict(denoiser_type.from_pretrained(folder).state_dict())
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as error:
            raise CheckpointError(f"{where}/{folder.name}: cannot load ({str(error).splitlines()[0][:200]})") from None

    def _load_denoiser(self, state: dict[str, torch.Tensor]) -> None:
        try:
            self.denoiser.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(f"the checkpoint's weights do not fit this model: {str(error)[:300]}") from None

    def _load_text_encoders(self, folder: Path, where: str, exists: Callable[[str], bool]) -> None:
        """The trained text encoders' full weights (`<folder>/model.safetensors`, save_pretrained's)."""
        for name, encoder in self.text_encoders.items():
            path = f"{name}/{TEXT_ENCODER_WEIGHTS}"
            if not exists(path):
                raise CheckpointError(f"{where}: no {path} (written without --train_text_encoder)")
            try:
                encoder.load_state_dict(_load_tensors(folder / path))
            except RuntimeError as error:
                raise CheckpointError(f"{where}/{path}: does not fit this model: {str(error)[:300]}") from None

    def _load_ema(self, state: dict[str, torch.Tensor], optimization_step: int) -> None:
        assert self.ema is not None
        names = [name for name, p in self.denoiser.named_parameters() if p.requires_grad]
        for name, shadow in zip(names, self.ema.shadow_params, strict=True):
            if name not in state:
                raise CheckpointError(f"the checkpoint's EMA weights lack {name}")
            shadow.data.copy_(state[name])
        self.ema.optimization_step = optimization_step

    def _load_lora(self, path: Path) -> None:
        """diffusers' LoRA format (what save_lora_weights writes) back into the peft adapter."""
        found, unexpected = self.model.family.load_lora(self.denoiser, _load_tensors(path), self.text_encoders)
        if unexpected or not found:
            raise CheckpointError(f"{path.name}: not LoRA weights of this model and --rank ({(unexpected or [''])[0]})")

    def _load_trainable_legacy(self, state: dict[str, torch.Tensor]) -> None:
        if self.cfg.method == "lora":
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(self.denoiser, state)
        else:
            self._load_denoiser(state)

    def _load_optimizer(self, state: dict[str, Any], ref: CheckpointRef) -> None:
        # keep this run's implementation choices (fused on CUDA), take the saved state and hyperparameters
        kept = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{ref.store.uri}: the optimizer state does not fit this run ({error})") from None
        for group, settings in zip(self.optimizer.param_groups, kept, strict=True):
            group.update(settings)

    def _set_schedule_step(self, step: int) -> None:
        scheduler = self.lr_scheduler
        scheduler.last_epoch = step
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None:
            lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, lambdas, strict=True)]
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            scheduler._last_lr = lrs

    def _resumed(self, ref: CheckpointRef) -> None:
        self.checkpointer.latest = ref.name
        self.session.progress.update(step=self.step, latestCheckpoint=ref.name)

    # -- validation and 5. publish -------------------------------------------------------------

    @contextlib.contextmanager
    def _inference_pipeline(self, gathered: Any = None) -> Iterator[Any]:
        """The pipeline with the trained (EMA, when used) denoiser, on this device, for sampling;
        `gathered`: the full denoiser gathered from the shards (FSDP), its EMA weights already in."""
        denoiser = self.denoiser if gathered is None else gathered
        pipeline = self.model.family.pipeline(self.model.path, denoiser, self.model.parts)
        ema = self.ema if gathered is None else None
        if ema is not None:
            ema.store(self.params)
            ema.copy_to(self.params)
        for module in (denoiser, *self.text_encoders.values()):
            module.eval()
        pipeline.to(self.device)
        autocast = torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        try:
            with autocast:
                yield pipeline
        finally:
            self.model.encoders_to("cpu", frozen_only=True)
            for module in (denoiser, *self.text_encoders.values()):
                module.train()
            if ema is not None:
                ema.restore(self.params)

    def render_samples(self) -> None:
        gathered = self._gather_for_sampling() if self.sharded is not None else None
        if self.session.is_main:
            self._render(gathered)
        del gathered
        self.session.accelerator.wait_for_everyone()

    def _gather_for_sampling(self) -> Any:
        """FSDP: the full denoiser (EMA weights, when used) on the main process, in the training
        precision, for sampling (None elsewhere); collective: every process sends its shards."""
        assert self.sharded is not None
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        try:
            gathered = self.sharded.full_denoiser(self.model.family.denoiser_type(), self.session.is_main)
        finally:
            if self.ema is not None:
                self.ema.restore(self.params)
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        return gathered.to(low) if gathered is not None and low is not None else gathered

    def _render(self, gathered: Any = None) -> None:
        per_prompt = self.cfg.num_validation_images or (4 if self.cfg.method == "lora" else 1)
        with self._inference_pipeline(gathered) as pipeline:
            images = publish.render_samples(
                pipeline,
                self.cfg.validation_prompts,
                self.cfg.resolution,
                self.session.seed,
                self.session.output,
                self.step,
                self.cfg.validation_guidance_scale,
                per_prompt,
            )
        # kept for the model card and the Hub push (PIL images of the newest render)
        self.last_render = (self.step, [p for p in self.cfg.validation_prompts for _ in range(per_prompt)], images)
        if self.writer is not None:  # as the stock scripts log them to TensorBoard (by step here)
            np_images = np.stack([np.asarray(image) for image in images])
            self.writer.add_images("validation", np_images, self.step, dataformats="NHWC")
            self.writer.flush()
        trackers.log_images(self.session.accelerator, self.cfg.report_to, images, self.last_render[1], self.step)

    def publish(self, data: TrainingData, images: int, skipped: int, class_images: int = 0) -> None:
        session, cfg = self.session, self.cfg
        self.check_finite()
        denoiser = self.denoiser
        if self.sharded is not None:  # every process sends its shards; the main one gets the model
            if self.ema is not None:
                self.ema.copy_to(self.params)
            denoiser = self.sharded.full_denoiser(self.model.family.denoiser_type(), session.is_main)
        if session.is_main:
            latest = self.checkpointer.wait()
            session.progress.state("publishing", latestCheckpoint=latest)
            denoiser.to(memory_format=torch.contiguous_format)
            family = self.model.family
            if cfg.method == "lora":
                folder, files = publish.write_lora(
                    family, self.denoiser, session.output, session.staging, self.text_encoders
                )
            else:
                if self.ema is not None and self.sharded is None:
                    self.ema.copy_to(self.params)
                vae = self.model.vae if self.model.parts.vae_source else None
                pipeline = family.pipeline(
                    self.model.path, denoiser, variant=cfg.variant or None, vae=vae, text_encoders=self.text_encoders
                )
                folder, files = publish.write_pipeline(pipeline, session.output, session.staging)
            # also when this attempt resumed at the last step and so rendered nothing (the card shows them)
            if cfg.validation_prompts and (self.step % self.validation_every or self.last_render[0] != self.step):
                self.ema = None  # the EMA weights are in the denoiser now: sample with them as they are
                self._render(denoiser if self.sharded is not None else None)  # FSDP: the gathered one
            samples = publish.sample_files(*self.last_render) if self.last_render[0] == self.step else []
            card = publish.model_card(
                cfg,
                self.model.family,
                data,
                images,
                skipped,
                self.step,
                session.seed,
                license=publish.base_model_license(self.model.path),
                samples=samples,
                class_images=class_images,
            ).encode()
            session.output.write_bytes("README.md", card, "text/markdown")
            for tracker in session.accelerator.trackers:  # not end_training(): it ends the process group
                tracker.finish()  # the trackers' runs end before the logs are uploaded
            self._upload_logs()
            if cfg.push_to_hub:  # after the output is complete: a failed push loses nothing there
                self._push_to_hub(folder, files, card, samples)
            session.progress.state("succeeded", step=self.step)
            self.checkpointer.close()
        session.accelerator.wait_for_everyone()

    def _push_to_hub(self, folder: Path, files: list[str], card: bytes, samples: list[Any]) -> None:
        """The model files, the card and the final samples in one commit. A refused token or a
        missing namespace is not retried (exit 2); other failures exit 1, and the retry resumes
        from the latest checkpoint, publishes and pushes again."""
        from kubetune.trainer import hub

        cfg = self.cfg
        assert cfg.hub_model_id
        uploads = [hub.HubFile(name, folder / name) for name in files]
        uploads += [hub.HubFile("README.md", card)] + [hub.HubFile(s.path, s.png) for s in samples]
        log.info("pushing %d files to the Hub repository %s", len(uploads), cfg.hub_model_id)
        try:
            url = hub.push(
                cfg.hub_model_id,
                uploads,
                private=cfg.hub_private_repo,
                revision=cfg.hub_revision,
                token=cfg.hub_token,
                message=f"kubetune: {cfg.method} fine-tune of {cfg.pretrained_model_name_or_path}, step {self.step}",
            )
        except hub.HubError as error:
            raise TrainError(str(error), layout.EXIT_INVALID if error.permanent else layout.EXIT_FAILED) from None
        log.info("pushed to the Hub: %s", url)

    def _push_checkpoint_to_hub(self, folder: Path) -> None:
        """In the upload thread, once the checkpoint is stored: its trained weights to
        `checkpoint-N/` of the Hub repository, deleting the ones beyond --checkpoints_total_limit in
        the same commit. Not when the pod is stopping (its grace period is the store's)."""
        from kubetune.trainer import hub

        cfg = self.cfg
        assert cfg.hub_model_id
        if self.session.stop_requested:
            log.info("%s: not pushed to the Hub (the pod is stopping)", folder.name)
            return
        names = hub.checkpoint_weights(folder)
        if not names:
            log.info("%s: not pushed to the Hub (a sharded checkpoint loads only into its own run)", folder.name)
            return
        try:
            url = hub.push(
                cfg.hub_model_id,
                [hub.HubFile(f"{folder.name}/{name}", folder / name) for name in names],
                private=cfg.hub_private_repo,
                revision=cfg.hub_revision,
                token=cfg.hub_token,
                message=f"kubetune: {folder.name}",
                delete_folders=hub.checkpoints_beyond(cfg.checkpoints_total_limit, folder.name),
            )
        except hub.HubError as error:
            raise RuntimeError(f"not pushed to the Hub: {error}") from None
        log.info("%s pushed to the Hub: %s", folder.name, url)

    def _tensorboard(self) -> Any:
        if not self.session.is_main or self.cfg.report_to == "none":
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.session.staging / self.cfg.logging_dir))

    def _upload_logs(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            if self.session.output.is_s3:
                self.session.output.upload_tree(self.session.staging / self.cfg.logging_dir, layout.LOGS_DIR)


def _trainable_in_fp32(module: Any) -> None:
    """fp32 master weights for what trains; autocast does the low-precision math."""
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def _stream_length(cache: Any) -> int:
    """Entries of the sample stream per epoch: the samples; with prior preservation the pairs of an
    instance and a class sample, as many as the larger set (train_dreambooth.py's dataset length)."""
    if cache.prior_start is None:
        return len(cache)
    return max(cache.prior_start, len(cache) - cache.prior_start)


def _members(cache: Any, entry: int) -> list[int]:
    """The samples a stream entry trains: itself; with prior preservation its instance sample and
    its class sample (each set cycled, as train_dreambooth.py's `index % count`)."""
    start = cache.prior_start
    if start is None:
        return [entry]
    return [entry % start, start + entry % (len(cache) - start)]


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], lr: float, device: torch.device) -> Any:
    """--optimizer: torch's AdamW, bitsandbytes' AdamW8bit or transformers' Adafactor."""
    adam = {"lr": lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "weight_decay": cfg.adam_weight_decay}
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, eps=cfg.adam_epsilon, **adam)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # at --learning_rate and its schedule, as the stock scripts' --optimizer adafactor
        return Adafactor(
            params,
            lr=lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=cfg.adam_weight_decay,
        )
    return torch.optim.AdamW(params, eps=cfg.adam_epsilon, fused=device.type == "cuda", **adam)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    # onto the CPU: load_state_dict copies into the parameters' own device, and safetensors
    # rejects the indexed "cpu:0" that accelerate reports for multi-process CPU runs
    return load_file(path, device="cpu")


def _load_plain(path: Path, where: str, what: str) -> Any:
    """torch.load with weights_only: tensors and plain containers, never code (write access to
    the bucket must not mean code execution in the trainer)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{where}: not a plain {what} ({str(error).splitlines()[0][:200]}); refusing to unpickle it"
        ) from None


def cuda_oom_message(cfg: TrainConfig) -> str:
    hints = []
    if not cfg.gradient_checkpointing:
        hints.append("--gradient_checkpointing")
    if cfg.train_batch_size > 1:
        hints.append(
            f"--train_batch_size {max(1, cfg.train_batch_size // 2)} with --gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps * 2}"
        )
    if cfg.precision == "no":
        hints.append("--mixed_precision bf16")
    if cfg.method == "full":
        hints.append("--method lora")
    if cfg.use_ema and not cfg.offload_ema:
        hints.append("--offload_ema")
    return (
        f"CUDA out of memory at --resolution {cfg.resolution}, --train_batch_size {cfg.train_batch_size}; "
        f"to use less memory try: {', '.join(hints) or 'a smaller --resolution'}"
    )
