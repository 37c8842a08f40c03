"""The latent and text-embedding cache: the dataset encoded once, so that training never runs
the VAE or the text encoder.

Kept next to the dataset under `cache/<key>/`, where the key hashes everything that decides the
content (VAE and text-encoder weights, resolution, crop, flip, filter, the dataset, the chosen
samples), so resumes and later jobs with the same settings reuse it. What is stored per image
is the VAE's latent *distribution* (mean and std), so each step still samples a fresh latent as
the stock script does; with --random_flip the flipped image is encoded too. Captions are
deduplicated before encoding.

Work is split in chunks, spread over ranks; each chunk is one file written atomically, so a
build stopped by preemption resumes where it was. `manifest.json`, written last, marks the cache
complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from kubetune.api.layout import MANIFEST_FILE
from kubetune.storage import Store
from kubetune.trainer.data import DataError, TrainingData, transform

log = logging.getLogger("kubetune.trainer")

CACHE_VERSION = 1
IMAGES_PER_CHUNK = 256
CAPTIONS_PER_CHUNK = 1024


@dataclass
class LatentCache:
    key: str
    uri: str
    mean: torch.Tensor  # [N, C, h, w], scaled later by the VAE's scaling factor
    std: torch.Tensor
    mean_flip: torch.Tensor | None
    std_flip: torch.Tensor | None
    text: torch.Tensor  # [unique captions, tokens, hidden]
    caption_index: torch.Tensor  # [N] -> row of `text`
    skipped: int  # unreadable images, left out

    def __len__(self) -> int:
        return int(self.mean.shape[0])


@dataclass
class Encoders:
    vae: Any
    text_encoder: Any
    tokenizer: Any
    device: torch.device
    vae_dtype: torch.dtype
    text_dtype: torch.dtype


def cache_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def build_or_load(
    store: Store,
    settings: dict[str, Any],
    data: TrainingData,
    indices: Sequence[int],
    encoders: Callable[[], Encoders],
    rank: int,
    world: int,
    barrier: Callable[[], None],
    should_stop: Callable[[], bool],
    progress: Callable[[str], None],
    batch_size: int = 8,
    workers: int = 4,
) -> LatentCache:
    """Load the cache for `settings`, encoding what is missing first (all ranks call this)."""
    key = cache_key(settings)
    root = store.child(key)
    if not root.exists(MANIFEST_FILE):
        progress("caching")
        captions = list(dict.fromkeys(data.captions[i] for i in indices))
        tasks = [("latents", c) for c in range(_chunks(len(indices), IMAGES_PER_CHUNK))]
        tasks += [("text", c) for c in range(_chunks(len(captions), CAPTIONS_PER_CHUNK))]
        loaded: Encoders | None = None
        for kind, chunk in tasks[rank::world]:
            name = f"{kind}-{chunk:05d}.safetensors"
            if root.exists(name):
                continue  # encoded before this run was interrupted
            if should_stop():
                raise InterruptedError("stopped while caching")
            loaded = loaded or encoders()
            if kind == "latents":
                part = indices[chunk * IMAGES_PER_CHUNK : (chunk + 1) * IMAGES_PER_CHUNK]
                tensors = _encode_images(loaded, data, part, settings, batch_size, workers)
            else:
                part_captions = captions[chunk * CAPTIONS_PER_CHUNK : (chunk + 1) * CAPTIONS_PER_CHUNK]
                states = _encode_captions(loaded, part_captions, batch_size * 4)
                tensors = {"states": states.to(getattr(torch, settings["dtype"]))}
            root.write_bytes(name, save_tensors({k: v.contiguous() for k, v in tensors.items()}))
            log.info(
                "cached %s (%d of %d chunks for this process)",
                name,
                tasks[rank::world].index((kind, chunk)) + 1,
                len(tasks[rank::world]),
            )
        barrier()
        if rank == 0:
            position = {caption: row for row, caption in enumerate(captions)}
            root.write_json(
                MANIFEST_FILE,
                {
                    "key": key,
                    "version": CACHE_VERSION,
                    "settings": settings,
                    "count": len(indices),
                    "latentChunks": sum(1 for t in tasks if t[0] == "latents"),
                    "textChunks": sum(1 for t in tasks if t[0] == "text"),
                    "captionIndex": [position[data.captions[i]] for i in indices],
                },
            )
        barrier()
    return _load(root, key)


def _chunks(count: int, size: int) -> int:
    return (count + size - 1) // size


def _load(root: Store, key: str) -> LatentCache:
    manifest = root.read_json(MANIFEST_FILE)
    parts = [load_tensors(root.read_bytes(f"latents-{c:05d}.safetensors")) for c in range(manifest["latentChunks"])]
    texts = [
        load_tensors(root.read_bytes(f"text-{c:05d}.safetensors"))["states"] for c in range(manifest["textChunks"])
    ]
    valid = torch.cat([p["valid"] for p in parts]).bool()

    def joined(name: str) -> torch.Tensor | None:
        return torch.cat([p[name] for p in parts])[valid] if name in parts[0] else None

    mean, std = joined("mean"), joined("std")
    assert mean is not None and std is not None
    if len(mean) == 0:
        raise DataError(f"{root.uri}: none of the dataset's {len(valid)} images could be read")
    return LatentCache(
        key=key,
        uri=root.uri,
        mean=mean,
        std=std,
        mean_flip=joined("mean_flip"),
        std_flip=joined("std_flip"),
        text=torch.cat(texts),
        caption_index=torch.tensor(manifest["captionIndex"])[valid],
        skipped=int((~valid).sum()),
    )


@torch.no_grad()
def _encode_images(
    enc: Encoders, data: TrainingData, indices: Sequence[int], settings: dict[str, Any], batch_size: int, workers: int
) -> dict[str, torch.Tensor]:
    resolution, flip = settings["resolution"], settings["randomFlip"]

    def prepare(index: int) -> np.ndarray | None:
        image = data.image(index)
        if image is None:
            return None
        # A random crop is drawn once per image (seeded by its index), as kohya's cache does.
        return transform(image, resolution, settings["centerCrop"], settings["interpolation"], random.Random(index))

    out: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "mean_flip": [], "std_flip": []}
    valid: list[bool] = []
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes and resizes without holding the GIL
        arrays = list(pool.map(prepare, indices))
    for start in range(0, len(arrays), batch_size):
        batch = arrays[start : start + batch_size]
        valid += [a is not None for a in batch]
        blank = np.zeros((3, resolution, resolution), np.float32)
        pixels = torch.from_numpy(np.stack([a if a is not None else blank for a in batch]))
        variants = [("", pixels)] + ([("_flip", pixels.flip(-1))] if flip else [])
        for suffix, images in variants:
            dist = enc.vae.encode(images.to(enc.device, enc.vae_dtype)).latent_dist
            out["mean" + suffix].append(dist.mean.float().cpu())
            out["std" + suffix].append(dist.std.float().cpu())
    dtype = getattr(torch, settings["dtype"])
    tensors = {k: torch.cat(v).to(dtype) for k, v in out.items() if v}
    tensors["valid"] = torch.tensor(valid, dtype=torch.uint8)
    return tensors


@torch.no_grad()
def _encode_captions(enc: Encoders, captions: Sequence[str], batch_size: int) -> torch.Tensor:
    states = []
    for start in range(0, len(captions), batch_size):
        ids = enc.tokenizer(
            list(captions[start : start + batch_size]),
            max_length=enc.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        states.append(enc.text_encoder(ids.to(enc.device), return_dict=False)[0].float().cpu())
    return torch.cat(states)
