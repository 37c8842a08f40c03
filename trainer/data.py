"""Training data: an imagefolder (local or s3://) or a Hugging Face dataset, and the image
transforms of train_text_to_image.py done with PIL and numpy (no torchvision).

Transforms match torchvision's on PIL images: Resize(resolution) scales the shorter side with
the chosen filter, CenterCrop rounds the offset like torchvision, ToTensor + Normalize([0.5],
[0.5]) map bytes to [-1, 1].
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from kubetune.api.layout import is_safe_file_name
from kubetune.storage import Store

Image.MAX_IMAGE_PIXELS = 16384 * 16384  # big enough for photos; decompression bombs above it fail

FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


class DataError(ValueError):
    """Training data that cannot be used; one line naming what is wrong."""


@dataclass
class TrainingData:
    """Captions and a way to read each image; `records` keep the metadata rows (for the card)."""

    description: str
    captions: list[str]
    fingerprint: str
    records: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    _store: Store | None = None
    _files: list[str] = field(default_factory=list)
    _hf: Any = None
    _image_column: str = "image"

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, index: int) -> Image.Image | None:
        """The decoded RGB image, or None when it cannot be read (the caller counts it)."""
        try:
            if self._hf is not None:
                value = self._hf[index][self._image_column]
                image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value["bytes"]))
            else:
                assert self._store is not None
                image = Image.open(io.BytesIO(self._store.read_bytes(self._files[index])))
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
        except Exception:  # truncated, not an image, too large, vanished: all mean "skip and count"
            return None


def open_imagefolder(uri: str, image_column: str, caption_column: str) -> TrainingData:
    """An imagefolder: metadata.jsonl (`file_name` + caption column) at `uri` or `uri/train`."""
    store = Store(uri)
    for prefix in ("", "train"):
        key = f"{prefix}/metadata.jsonl" if prefix else "metadata.jsonl"
        try:
            raw = store.read_bytes(key)
            break
        except FileNotFoundError:
            continue
    else:
        raise DataError(f"{uri}: no metadata.jsonl (nor train/metadata.jsonl): not an imagefolder or not there")
    rows = []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{store.uri_of(key)} line {number}: not valid JSON") from None
    if not rows:
        raise DataError(f"{store.uri_of(key)}: the dataset is empty")
    columns = sorted({c for row in rows for c in row})
    if "file_name" not in columns:
        raise DataError(f"{store.uri_of(key)}: no 'file_name' column (columns: {', '.join(columns)})")
    if caption_column not in columns:
        raise DataError(
            f"--caption_column '{caption_column}' is not a column of {store.uri_of(key)} "
            f"(columns: {', '.join(c for c in columns if c != 'file_name')})"
        )
    if image_column not in ("image", "file_name"):
        raise DataError(f"--image_column '{image_column}': an imagefolder's images are its 'file_name' entries")
    try:
        manifest = store.read_json("manifest.json")  # the collector's, beside train/
    except (FileNotFoundError, ValueError):
        manifest = None
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("file_name"), str) or not is_safe_file_name(row["file_name"]):
            raise DataError(
                f"{store.uri_of(key)} row {number}: file_name must be a path inside "
                "the dataset (relative, without '..')"
            )
    files = [f"{prefix}/{row['file_name']}".lstrip("/") for row in rows]
    captions = [_caption(row.get(caption_column), caption_column) for row in rows]
    fingerprint = hashlib.sha256(raw + json.dumps(manifest or {}, sort_keys=True).encode()).hexdigest()[:16]
    return TrainingData(uri, captions, fingerprint, rows, manifest, store, files)


def open_hub_dataset(
    name: str, config_name: str | None, image_column: str, caption_column: str, cache_dir: str | None
) -> TrainingData:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config_name, split="train", cache_dir=cache_dir)
    except Exception as error:
        raise DataError(f"--dataset_name {name}: cannot load: {str(error).splitlines()[0]}") from None
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in dataset.column_names:
            raise DataError(f"{flag} '{column}' is not a column of {name} (columns: {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        raise DataError(f"--dataset_name {name}: the dataset is empty")
    captions = [_caption(c, caption_column) for c in dataset[caption_column]]
    fingerprint = hashlib.sha256(f"{name}|{config_name}|{dataset._fingerprint}".encode()).hexdigest()[:16]
    return TrainingData(name, captions, fingerprint, _hf=dataset, _image_column=image_column)


def select(data: TrainingData, max_samples: int | None, seed: int) -> list[int]:
    """Indices used for training: all, or `max_samples` of them chosen by a seeded shuffle."""
    indices = list(range(len(data)))
    if max_samples is not None and max_samples < len(indices):
        random.Random(seed).shuffle(indices)
        indices = sorted(indices[:max_samples])
    return indices


def _caption(value: Any, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[0]  # the cache holds one text embedding per image: the first caption
    raise DataError(f"caption column '{column}' must hold strings or lists of strings (got {value!r:.60})")


def transform(
    image: Image.Image, resolution: int, center_crop: bool, interpolation: str, rng: random.Random
) -> np.ndarray:
    """Resize the shorter side to `resolution`, crop a square (centre or random), and return a
    float32 CHW array in [-1, 1]."""
    return transform_and_crop(image, resolution, center_crop, interpolation, rng)[0]


def transform_and_crop(
    image: Image.Image, resolution: int, center_crop: bool, interpolation: str, rng: random.Random
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`transform`'s array, and where the crop is in the resized image: (top, left, and left in
    the horizontally flipped image), as SDXL's micro-conditioning takes it."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short != resolution:
        new_long = int(resolution * long / short)
        size = (resolution, new_long) if width <= height else (new_long, resolution)
        image = image.resize(size, FILTERS[interpolation])
    width, height = image.size
    if center_crop:
        top, left = int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    else:
        top, left = rng.randint(0, height - resolution), rng.randint(0, width - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    return array / 127.5 - 1.0, (top, left, width - left - resolution)
