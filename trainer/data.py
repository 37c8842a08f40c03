"""Training data: an imagefolder (local or s3://), a local dataset `datasets` reads (a folder of
parquet/arrow/json(l)/csv files, or one written by `save_to_disk`), or a hub dataset; and the image
transforms of train_text_to_image.py done with PIL and numpy (no torchvision).

Images of a `datasets` dataset are read from their embedded bytes, or from a file the row names
only when that file is inside the dataset's folder (or, for a hub dataset, inside the caches
`datasets` downloads into): a row naming `/etc/passwd` or `../../x` is refused, as an
imagefolder's `file_name` is.

Transforms match torchvision's on PIL images: Resize(resolution) scales the shorter side with
the chosen filter, CenterCrop rounds the offset like torchvision, ToTensor + Normalize([0.5],
[0.5]) map bytes to [-1, 1].
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from kubetune.api.layout import is_safe_file_name
from kubetune.cli_util import name_list
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
    _roots: tuple[Path, ...] = ()  # where a `datasets` row's image file may be (resolved)
    notes: list[str] = field(default_factory=list)  # how the data was prepared (captions, filter), for the card

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, index: int) -> Image.Image | None:
        """The decoded RGB image, or None when it cannot be read (the caller counts it)."""
        try:
            if self._hf is not None:
                image = _open_value(self._hf[index][self._image_column], self._roots)
            else:
                assert self._store is not None
                image = Image.open(io.BytesIO(self._store.read_bytes(self._files[index])))
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
        except Exception:  # truncated, not an image, too large, vanished: all mean "skip and count"
            return None


def is_imagefolder(uri: str) -> bool:
    """Whether `uri` holds metadata.jsonl (or train/metadata.jsonl): kubetune's imagefolder reader."""
    store = Store(uri)
    return store.exists("metadata.jsonl") or store.exists("train/metadata.jsonl")


def _image_key(key: str) -> str | None:
    """The column the `datasets` imagefolder loader makes of a metadata key: `file_name` and
    `image_file_name` -> image, `<column>_file_name` -> column; None for other keys."""
    if key == "file_name":
        return "image"
    if key.endswith("_file_name"):
        return key[: -len("_file_name")]
    return None


def open_imagefolder(uri: str, image_column: str, caption_column: str) -> TrainingData:
    """An imagefolder: metadata.jsonl (`file_name`, or `<column>_file_name` as the `datasets`
    loader takes it, + caption column) at `uri` or `uri/train`."""
    store = Store(uri)
    for prefix in ("", "train"):
        key = f"{prefix}/metadata.jsonl" if prefix else "metadata.jsonl"
        try:
            raw = store.read_bytes(key)
            break
        except FileNotFoundError:
            continue
    else:
        s3_note = " (an s3:// dataset must be an imagefolder; parquet/arrow datasets: a local folder)"
        raise DataError(
            f"{uri}: no metadata.jsonl (nor train/metadata.jsonl): not an imagefolder or not there"
            + (s3_note if store.is_s3 else "")
        )
    rows = []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{store.uri_of(key)} line {number}: not valid JSON") from None
            if not isinstance(row, dict):
                raise DataError(f"{store.uri_of(key)} line {number}: not a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"{store.uri_of(key)}: the dataset is empty")
    keys = list(dict.fromkeys(c for row in rows for c in row))
    image_keys = {_image_key(k): k for k in keys if _image_key(k) is not None}
    if not image_keys:
        raise DataError(
            f"{store.uri_of(key)}: no 'file_name' (nor '<column>_file_name') column (columns: {name_list(keys)})"
        )
    columns = [_image_key(k) or k for k in keys]  # as `datasets` names them
    if image_column == "file_name" and "image" in image_keys:
        image_column = "image"  # kubetune's earlier spelling
    if image_column not in image_keys:
        raise DataError(
            f"--image_column '{image_column}' is not an image column of {store.uri_of(key)} "
            f"(columns: {name_list(columns)})"
        )
    if caption_column not in keys or _image_key(caption_column) is not None:
        raise DataError(
            f"--caption_column '{caption_column}' is not a column of {store.uri_of(key)} "
            f"(columns: {name_list(columns)})"
        )
    file_key = image_keys[image_column]
    try:
        manifest = store.read_json("manifest.json")  # the collector's, beside train/
    except (FileNotFoundError, ValueError):
        manifest = None
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get(file_key), str) or not is_safe_file_name(row[file_key]):
            raise DataError(
                f"{store.uri_of(key)} row {number}: {file_key} must be a path inside "
                "the dataset (relative, without '..')"
            )
    files = [f"{prefix}/{row[file_key]}".lstrip("/") for row in rows]
    captions = [_caption(row.get(caption_column), caption_column) for row in rows]
    digest = hashlib.sha256(raw + json.dumps(manifest or {}, sort_keys=True).encode())
    if file_key != "file_name":  # the key of an imagefolder as kubetune always read it is unchanged
        digest.update(file_key.encode())
    if not _collected_content_hash(manifest):
        # not the collector's (whose manifest hashes the images): an image replaced under the same
        # name must not keep its old latents, so its size and version (ETag, mtime) join the key
        versions = store.versions(prefix)
        for file in files:
            digest.update(f"\0{file}\0{versions.get(file, '')}".encode())
    return TrainingData(uri, captions, digest.hexdigest()[:16], rows, manifest, store, files)


def _collected_content_hash(manifest: dict[str, Any] | None) -> str:
    """The collector's hash of every image it kept (DatasetManifest.content_hash), or "" for a
    manifest.json that is not the collector's."""
    from pydantic import ValidationError

    from kubetune.api.contracts import DatasetManifest

    try:
        return DatasetManifest.model_validate(manifest).content_hash if isinstance(manifest, dict) else ""
    except ValidationError:
        return ""


def open_local_dataset(
    folder: str, config_name: str | None, image_column: str, caption_column: str, cache_dir: str | None
) -> TrainingData:
    """A local folder `datasets` reads: one `save_to_disk` wrote (load_from_disk), or data files
    (parquet, arrow, json(l), csv; e.g. a hub dataset's `data/train-*.parquet`) that
    `load_dataset(folder)` reads. Its train split is used."""
    import datasets

    root = Path(folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root).as_posix()))
    if not files:
        raise DataError(
            f"{folder}: no metadata.jsonl (nor train/metadata.jsonl) and no files `datasets` reads: "
            "not a dataset or not there"
        )
    try:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            dataset = datasets.load_from_disk(str(root))
        else:  # every split is prepared anyway; the train one is used
            dataset = datasets.load_dataset(str(root), config_name, cache_dir=cache_dir)
    except Exception as error:
        raise DataError(f"--dataset_name {folder}: cannot load: {_first_line(error)}") from None
    if isinstance(dataset, datasets.DatasetDict):
        # the split comes from file names (train-*.parquet, test/...); one split alone is the data
        if "train" not in dataset and len(dataset) != 1:
            raise DataError(f"--dataset_name {folder}: no train split (splits: {name_list(list(dataset))})")
        dataset = dataset["train" if "train" in dataset else next(iter(dataset))]
    digest = hashlib.sha256(f"{config_name}|{image_column}".encode())
    for file in files:
        relative = file.relative_to(root).as_posix()
        digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
    return _from_datasets(dataset, folder, image_column, caption_column, digest.hexdigest()[:16], (root,))


def open_hub_dataset(
    name: str, config_name: str | None, image_column: str, caption_column: str, cache_dir: str | None
) -> TrainingData:
    import datasets
    from huggingface_hub import constants

    try:
        dataset = datasets.load_dataset(name, config_name, split="train", cache_dir=cache_dir)
    except Exception as error:
        raise DataError(f"--dataset_name {name}: cannot load: {_first_line(error)}") from None
    column = f"|{image_column}" if image_column != "image" else ""  # the default: the key it always had
    fingerprint = hashlib.sha256(f"{name}|{config_name}|{dataset._fingerprint}{column}".encode()).hexdigest()
    # files the loader downloaded are in its caches; a row naming any other file is refused
    roots = [Path(p) for p in (cache_dir, datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE) if p]
    return _from_datasets(dataset, name, image_column, caption_column, fingerprint[:16], tuple(roots))


def _hidden(relative: str) -> bool:
    """.cache/ of huggingface_hub's downloads, .git/: not the data."""
    return any(part.startswith(".") for part in relative.split("/"))


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:300]


def _from_datasets(
    dataset: Any, name: str, image_column: str, caption_column: str, fingerprint: str, roots: tuple[Path, ...]
) -> TrainingData:
    """Check the columns (as the stock script does) and every row's image reference."""
    import datasets

    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in dataset.column_names:
            raise DataError(f"{flag} '{column}' is not a column of {name} (columns: {name_list(dataset.column_names)})")
    if len(dataset) == 0:
        raise DataError(f"--dataset_name {name}: the dataset is empty")
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # decoded here, paths checked
    elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary")):
        raise DataError(
            f"--image_column '{image_column}' of {name} holds {str(feature)[:80]}, not images "
            "(an Image feature, bytes, or paths inside the dataset)"
        )
    roots = tuple(Path(os.path.realpath(r)) for r in roots)
    _check_image_references(dataset, image_column, name, roots)
    captions = [_caption(c, caption_column) for c in dataset[caption_column]]
    return TrainingData(name, captions, fingerprint, _hf=dataset, _image_column=image_column, _roots=roots)


def _check_image_references(dataset: Any, column: str, name: str, roots: tuple[Path, ...]) -> None:
    """Every row without embedded bytes must name a file inside `roots` (read from the Arrow
    table: the images' bytes are not copied)."""
    import pyarrow as pa

    table = dataset.with_format("arrow").select_columns([column])
    row = 0
    for batch in table.iter(batch_size=4096):
        values = batch.column(column)
        if pa.types.is_struct(values.type):
            names = [values.type.field(i).name for i in range(values.type.num_fields)]
            fields = dict(zip(names, values.flatten(), strict=True))
            paths = fields["path"].to_pylist() if "path" in fields else [None] * len(values)
            embedded = fields["bytes"].is_valid().to_pylist() if "bytes" in fields else [False] * len(values)
        elif pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            paths, embedded = [None] * len(values), [True] * len(values)
        else:
            paths, embedded = values.to_pylist(), [False] * len(values)
        for path, has_bytes in zip(paths, embedded, strict=True):
            row += 1
            if not has_bytes and path is not None and _inside(path, roots) is None:
                raise DataError(
                    f"--dataset_name {name} row {row}: image path {str(path)[:80]!r} is outside the dataset "
                    "(a row's image must be embedded bytes or a file inside the dataset's folder)"
                )


def _inside(path: str, roots: tuple[Path, ...]) -> Path | None:
    """`path` (relative to the first root, or absolute) resolved, if it is inside one of `roots`."""
    if not isinstance(path, str) or not path or "\x00" in path or not roots:
        return None
    resolved = Path(os.path.realpath(path if os.path.isabs(path) else roots[0] / path))
    return resolved if any(resolved.is_relative_to(root) for root in roots) else None


def _open_value(value: Any, roots: tuple[Path, ...]) -> Image.Image:
    """A `datasets` image value: a decoded image, {"bytes", "path"}, bytes, or a path (checked)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    resolved = _inside(value, roots)
    if resolved is None:
        raise DataError(f"image path {str(value)[:80]!r} is outside the dataset")
    return Image.open(io.BytesIO(resolved.read_bytes()))


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
    raise DataError(f"caption column '{column}' must hold strings or lists of strings (got {type(value).__name__})")


def transform(
    image: Image.Image, resolution: int, center_crop: bool, interpolation: str, rng: random.Random
) -> np.ndarray:
    """Resize the shorter side to `resolution`, crop a square (centre or random), and return a
    float32 CHW array in [-1, 1]."""
    return transform_and_crop(image, resolution, center_crop, interpolation, rng)[0]


def transform_and_crop(
    image: Image.Image,
    resolution: int | tuple[int, int],
    center_crop: bool,
    interpolation: str,
    rng: random.Random,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`transform`'s array, and where the crop is in the resized image: (top, left, and left in
    the horizontally flipped image), as SDXL's micro-conditioning takes it. `resolution` is a
    square's side, or a bucket's (height, width): the image is resized to cover it (the side that
    binds set exactly, the other scaled and truncated as torchvision's Resize does) and cropped."""
    target_h, target_w = (resolution, resolution) if isinstance(resolution, int) else resolution
    width, height = image.size
    if target_h / height >= target_w / width:  # the height binds
        size = (max(target_w, int(target_h * width / height)), target_h)
    else:
        size = (target_w, max(target_h, int(target_w * height / width)))
    if size != (width, height):
        image = image.resize(size, FILTERS[interpolation])
    width, height = image.size
    if center_crop:
        top, left = int(round((height - target_h) / 2.0)), int(round((width - target_w) / 2.0))
    else:
        top, left = rng.randint(0, height - target_h), rng.randint(0, width - target_w)
    image = image.crop((left, top, left + target_w, top + target_h))
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
    return array / 127.5 - 1.0, (top, left, width - left - target_w)
