"""The latent and text-embedding cache: the dataset encoded once, so that training never runs
the VAE or the text encoder.

Kept next to the dataset under `cache/<key>/`, where the key hashes everything that decides the
content (VAE and text-encoder weights, resolution, crop, flip, filter, the dataset, the chosen
samples), so resumes and later jobs with the same settings reuse it. What is stored per image
is the VAE's latent *distribution* (mean and std), so each step still samples a fresh latent as
the stock script does; with --random_flip the flipped image is encoded too. Each image's size
before resizing and its crop (top, left; also for the flipped image) are kept too: SDXL conditions
on them. With aspect-ratio buckets (kubetune.trainer.buckets) each image is cropped to its
bucket instead of a square, and a chunk keeps each bucket's latents apart (`mean@<bucket>`, ...)
with each image's bucket number. Captions are deduplicated before encoding; what a caption is
encoded into (named tensors) is the model family's business (kubetune.trainer.families).

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from kubetune.api.layout import MANIFEST_FILE
from kubetune.storage import Store
from kubetune.trainer.buckets import BucketSettings, bucket_for, bucket_sizes
from kubetune.trainer.data import DataError, TrainingData, transform_and_crop

log = logging.getLogger("kubetune.trainer")

CACHE_VERSION = 1
IMAGES_PER_CHUNK = 256
CAPTIONS_PER_CHUNK = 1024


@dataclass
class LatentCache:
    key: str
    uri: str
    mean: torch.Tensor | None  # [N, C, h, w] without buckets (scaled later by the VAE's factor)
    std: torch.Tensor | None
    mean_flip: torch.Tensor | None
    std_flip: torch.Tensor | None
    text: dict[str, torch.Tensor]  # name -> [unique captions, ...] (the family's encode)
    caption_index: torch.Tensor  # [N] -> row of `text`
    skipped: int  # unreadable images, left out
    original_size: torch.Tensor | None = None  # [N, 2] (height, width) before resizing
    crop_top_left: torch.Tensor | None = None  # [N, 2] (top, left) of the crop
    crop_top_left_flip: torch.Tensor | None = None  # the same in the flipped image
    empty_caption: int | None = None  # row of `text` holding the empty caption, when encoded
    bucket: torch.Tensor | None = None  # [N] -> bucket number, with buckets
    bucket_size: list[tuple[int, int]] = field(default_factory=list)  # bucket -> (height, width) in pixels
    by_bucket: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # "mean" -> bucket -> [n_b, C, h, w]
    row: torch.Tensor | None = None  # [N] -> row in its bucket's tensors
    prior_start: int | None = None  # DreamBooth: samples from this one on are class images (see `with_prior`)

    def __len__(self) -> int:
        return len(self.caption_index)

    def distribution(self, index: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached latent distribution (mean, std) of sample `index`, of its flipped image."""
        suffix = "_flip" if flip else ""
        if self.bucket is None:
            mean, std = getattr(self, "mean" + suffix), getattr(self, "std" + suffix)
            return mean[index], std[index]
        bucket, row = int(self.bucket[index]), int(self.row[index])  # type: ignore[index]
        return self.by_bucket["mean" + suffix][bucket][row], self.by_bucket["std" + suffix][bucket][row]

    def target_size(self, index: int, resolution: int) -> tuple[int, int]:
        """The (height, width) in pixels sample `index` is trained at."""
        return self.bucket_size[int(self.bucket[index])] if self.bucket is not None else (resolution, resolution)

    def bucket_counts(self) -> dict[str, int]:
        """ "HxW" -> images, for the log and the model card."""
        if self.bucket is None:
            return {}
        counts = torch.bincount(self.bucket, minlength=len(self.bucket_size)).tolist()
        return {f"{h}x{w}": n for (h, w), n in zip(self.bucket_size, counts, strict=True) if n}


def with_prior(instance: LatentCache, prior: LatentCache) -> LatentCache:
    """One cache of the instance samples followed by the class samples (DreamBooth's prior
    preservation): the class samples' caption rows follow the instance ones'. Square images only
    (--enable_bucket is refused with --with_prior_preservation)."""
    if instance.bucket is not None or prior.bucket is not None:
        raise DataError("--enable_bucket: not with --with_prior_preservation")

    def joined(name: str) -> torch.Tensor | None:
        a, b = getattr(instance, name), getattr(prior, name)
        return torch.cat([a, b]) if a is not None and b is not None else None

    rows = len(next(iter(instance.text.values())))
    return LatentCache(
        key=cache_key({"instance": instance.key, "prior": prior.key}),
        uri=instance.uri,
        mean=joined("mean"),
        std=joined("std"),
        mean_flip=joined("mean_flip"),
        std_flip=joined("std_flip"),
        text={name: torch.cat([tensor, prior.text[name]]) for name, tensor in instance.text.items()},
        caption_index=torch.cat([instance.caption_index, prior.caption_index + rows]),
        skipped=instance.skipped + prior.skipped,
        original_size=joined("original_size"),
        crop_top_left=joined("crop_top_left"),
        crop_top_left_flip=joined("crop_top_left_flip"),
        empty_caption=instance.empty_caption,
        prior_start=len(instance),
    )


@dataclass
class Encoders:
    vae: Any
    device: torch.device
    vae_dtype: torch.dtype
    encode_text: Callable[[Sequence[str]], dict[str, torch.Tensor]]
    """A batch of captions to named tensors (the model family's encode)."""


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
    empty_caption: bool = False,
) -> LatentCache:
    """Load the cache for `settings`, encoding what is missing first (all ranks call this). With
    `empty_caption`, the empty caption is encoded too (for --proportion_empty_prompts)."""
    key = cache_key(settings)
    root = store.child(key)
    if not root.exists(MANIFEST_FILE):
        progress("caching")
        captions = list(dict.fromkeys([data.captions[i] for i in indices] + ([""] if empty_caption else [])))
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
                encoded = _encode_captions(loaded, part_captions, batch_size * 4)
                dtype = getattr(torch, settings["dtype"])  # token ids stay integers
                tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in encoded.items()}
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
                    "emptyCaption": position.get("") if empty_caption else None,
                    "bucketSizes": _bucket_sizes(settings) or None,
                },
            )
        barrier()
    return _load(root, key)


def _chunks(count: int, size: int) -> int:
    return (count + size - 1) // size


def _load(root: Store, key: str) -> LatentCache:
    manifest = root.read_json(MANIFEST_FILE)
    parts = [load_tensors(root.read_bytes(f"latents-{c:05d}.safetensors")) for c in range(manifest["latentChunks"])]
    texts = [load_tensors(root.read_bytes(f"text-{c:05d}.safetensors")) for c in range(manifest["textChunks"])]
    valid = torch.cat([p["valid"] for p in parts]).bool()
    if not valid.any():
        raise DataError(f"{root.uri}: none of the dataset's {len(valid)} images could be read")

    def joined(name: str) -> torch.Tensor | None:
        return torch.cat([p[name] for p in parts])[valid] if name in parts[0] else None

    cache = LatentCache(
        key=key,
        uri=root.uri,
        mean=joined("mean"),
        std=joined("std"),
        mean_flip=joined("mean_flip"),
        std_flip=joined("std_flip"),
        text={name: torch.cat([t[name] for t in texts]) for name in texts[0]},
        caption_index=torch.tensor(manifest["captionIndex"])[valid],
        skipped=int((~valid).sum()),
        original_size=joined("original_size"),
        crop_top_left=joined("crop_top_left"),
        crop_top_left_flip=joined("crop_top_left_flip"),
        empty_caption=manifest.get("emptyCaption"),
    )
    if "bucket" in parts[0]:
        _load_buckets(cache, parts, manifest)
    return cache


def _load_buckets(cache: LatentCache, parts: list[dict[str, torch.Tensor]], manifest: dict[str, Any]) -> None:
    """Each chunk holds, per bucket, the latents of its images of that bucket in image order; so
    an image's row in its bucket's joined tensor is the number of images of that bucket before it."""
    buckets = torch.cat([p["bucket"] for p in parts]).long()
    kept = buckets[buckets >= 0]
    rows, seen = torch.empty_like(kept), [0] * len(manifest["bucketSizes"])
    for i, bucket in enumerate(kept.tolist()):
        rows[i], seen[bucket] = seen[bucket], seen[bucket] + 1
    cache.bucket, cache.row = kept, rows
    cache.bucket_size = [(int(h), int(w)) for h, w in manifest["bucketSizes"]]
    for name in ("mean", "std", "mean_flip", "std_flip"):
        stored = {}
        for bucket in range(len(cache.bucket_size)):
            pieces = [p[f"{name}@{bucket}"] for p in parts if f"{name}@{bucket}" in p]
            if pieces:
                stored[bucket] = torch.cat(pieces)
        if stored:
            cache.by_bucket[name] = stored


@torch.no_grad()
def _encode_images(
    enc: Encoders, data: TrainingData, indices: Sequence[int], settings: dict[str, Any], batch_size: int, workers: int
) -> dict[str, torch.Tensor]:
    """The latent distributions of `indices`' images (and of their flipped images), their size
    and crop. Without buckets all are `resolution` squares (an unreadable image's row is a blank,
    marked invalid); with buckets each image is cropped to its bucket and stored under it
    (`mean@<bucket>`), `bucket` saying which (-1: unreadable)."""
    resolution, flip = settings["resolution"], settings["randomFlip"]
    sizes = _bucket_sizes(settings)

    def prepare(index: int) -> tuple[np.ndarray, tuple[int, ...], int] | None:
        image = data.image(index)
        if image is None:
            return None
        bucket = sizes.index(bucket_for(image.height, image.width, sizes)) if sizes else -1
        # A random crop is drawn once per image (seeded by its index), as kohya's cache does.
        rng = random.Random(index)
        target = sizes[bucket] if sizes else resolution
        array, crop = transform_and_crop(image, target, settings["centerCrop"], settings["interpolation"], rng)
        return array, (image.height, image.width, *crop), bucket

    with ThreadPoolExecutor(workers) as pool:  # PIL decodes and resizes without holding the GIL
        prepared = list(pool.map(prepare, indices))
    # height, width, top, left, left when flipped (0 for unreadable images)
    geometry = torch.tensor([p[1] if p is not None else (0,) * 5 for p in prepared], dtype=torch.int32)
    tensors: dict[str, torch.Tensor] = {}
    if sizes:
        for bucket in sorted({p[2] for p in prepared if p is not None}):
            arrays = [p[0] for p in prepared if p is not None and p[2] == bucket]
            encoded = _encode_pixels(enc, arrays, flip, batch_size)
            tensors.update({f"{name}@{bucket}": t for name, t in encoded.items()})
        tensors["bucket"] = torch.tensor([p[2] if p is not None else -1 for p in prepared], dtype=torch.int32)
    else:
        blank = np.zeros((3, resolution, resolution), np.float32)
        tensors.update(_encode_pixels(enc, [p[0] if p is not None else blank for p in prepared], flip, batch_size))
    dtype = getattr(torch, settings["dtype"])
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors["valid"] = torch.tensor([p is not None for p in prepared], dtype=torch.uint8)
    tensors["original_size"] = geometry[:, 0:2].contiguous()
    tensors["crop_top_left"] = geometry[:, 2:4].contiguous()
    tensors["crop_top_left_flip"] = geometry[:, [2, 4]].contiguous()
    return tensors


def _bucket_sizes(settings: dict[str, Any]) -> list[tuple[int, int]]:
    """The buckets of a cache's settings; none without buckets."""
    if "buckets" not in settings:
        return []
    return bucket_sizes(BucketSettings.from_dict(settings["resolution"], settings["buckets"]))


def _encode_pixels(enc: Encoders, arrays: Sequence[np.ndarray], flip: bool, batch_size: int) -> dict[str, torch.Tensor]:
    """The VAE's latent distributions (mean, std; `_flip` of the mirrored images) of same-sized images."""
    out: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "mean_flip": [], "std_flip": []}
    for start in range(0, len(arrays), batch_size):
        pixels = torch.from_numpy(np.stack(arrays[start : start + batch_size]))
        variants = [("", pixels)] + ([("_flip", pixels.flip(-1))] if flip else [])
        for suffix, images in variants:
            dist = enc.vae.encode(images.to(enc.device, enc.vae_dtype)).latent_dist
            out["mean" + suffix].append(dist.mean.float().cpu())
            out["std" + suffix].append(dist.std.float().cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


@torch.no_grad()
def _encode_captions(enc: Encoders, captions: Sequence[str], batch_size: int) -> dict[str, torch.Tensor]:
    parts = [enc.encode_text(captions[start : start + batch_size]) for start in range(0, len(captions), batch_size)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
