"""Decoding untrusted image bytes into clean, resized RGB JPEGs, and the hashes used to dedupe."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from kubetune.collector.errors import Skip

# The pixel limit is enforced below as an error (Skip "too-many-pixels") before any decoding;
# Pillow's own check only warns under twice its limit, so its warning is silenced here.
ImageFile.LOAD_TRUNCATED_IMAGES = False
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageSettings:
    size: int = 512  # shorter side of stored images (never upscaled)
    min_size: int = 256  # shorter side below this: skipped
    max_pixels: int = 89_478_485  # more pixels than this: skipped as a decompression bomb
    quality: int = 95  # JPEG quality of stored images


@dataclass(frozen=True)
class CleanImage:
    jpeg: bytes
    width: int
    height: int
    pixel_hash: str  # sha256 of the decoded, resized pixels: exact duplicates
    perceptual_hash: str  # pHash, for near-duplicates


class PixelBudget:
    """Bytes of decoded pixels that all workers of a process may hold at once.

    An image's bytes say little about its pixels: a 1.4 MB PNG can decode to 81 megapixels and
    1.3 GB. Each decode holds its estimated cost here, waiting while others use the budget, so
    16 workers cannot take 16 times that; an image that costs more than the whole budget is
    skipped ("too-many-pixels")."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        if cost > self.capacity:
            needed, budget = cost >> 20, self.capacity >> 20
            raise Skip("too-many-pixels", f"needs ~{needed} MiB, over the {budget} MiB budget")
        with self._cond:
            self._cond.wait_for(lambda: self.used + cost <= self.capacity)
            self.used += cost
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= cost
                self._cond.notify_all()


CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)  # cgroup v1
UNLIMITED_BUDGET = 2 << 30  # no memory limit found: 2 GiB of pixels
MIN_BUDGET = 256 << 20


def memory_limit(paths: tuple[Path, ...] = CGROUP_LIMITS) -> int | None:
    """This container's memory limit in bytes (cgroup v2, then v1), or None when unlimited."""
    for path in paths:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # cgroup v1 writes a huge number for no limit
            return int(text)
        return None
    return None


def budget_for(limit: int | None) -> int:
    """Half the memory limit for decoded pixels (downloads, encoders and Python need the rest)."""
    return UNLIMITED_BUDGET if limit is None else max(MIN_BUDGET, limit // 2)


_default_budget: PixelBudget | None = None
_default_lock = threading.Lock()


def default_budget() -> PixelBudget:
    global _default_budget
    with _default_lock:
        if _default_budget is None:
            _default_budget = PixelBudget(budget_for(memory_limit()))
        return _default_budget


# Bytes per pixel Pillow stores for a mode (RGB is padded to 4); other modes count as 4.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}
# On top of the decoded image, at full size: the RGB result of compositing onto white and the
# alpha channel (4 + 1 bytes), or a transposed copy (4), plus slack for the resampler. Measured:
# a 36-megapixel RGBA PNG peaks at ~9 bytes a pixel (it was ~17 before the copies were cut).
_WORKING_BYTES = 8


def decode_cost(image: Image.Image) -> int:
    """Estimated peak bytes of decoding and cleaning `image` (after any draft reduction)."""
    width, height = image.size
    return width * height * (_PIXEL_BYTES.get(image.mode, 4) + _WORKING_BYTES)


def clean(
    data: bytes, settings: ImageSettings, perceptual: bool = False, budget: PixelBudget | None = None
) -> CleanImage:
    """Decode, check, orient, convert to RGB, resize (shorter side = size) and encode as JPEG."""
    budget = budget or default_budget()
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > settings.max_pixels:
                raise Skip("too-many-pixels", f"{width}x{height}")
            if min(width, height) < settings.min_size:
                raise Skip("too-small", f"{width}x{height}")
            scale = settings.size / min(width, height)
            if scale < 1 and image.format == "JPEG":
                # DCT-domain downscaling by 1/2, 1/4 or 1/8 while decoding: the biggest saving
                image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
            with budget.hold(decode_cost(image)):
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # no copy when already upright
                rgb = _resize_shorter_side(_to_rgb(image), settings.size)
    except Skip:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise Skip("too-many-pixels" if isinstance(error, Image.DecompressionBombError) else "not-an-image") from None
    except Exception as error:  # truncated or corrupt data: Pillow's decoders raise many types
        raise Skip("corrupt", f"{type(error).__name__}: {error}"[:200]) from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=settings.quality, optimize=False)
    return CleanImage(
        out.getvalue(), rgb.width, rgb.height, _pixel_hash(rgb), _perceptual_hash(rgb) if perceptual else ""
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composed onto white (not black, as convert() would)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    return image.convert("RGB")


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    if scale >= 1:
        return image
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: an integer box reduction first, then Lanczos on the small image (fast, sharp)
    return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _perceptual_hash(image: Image.Image) -> str:
    import imagehash

    return str(imagehash.phash(image))


_SPACES = re.compile(r"\s+")


def clean_caption(text: object) -> str:
    """Whitespace noise (newlines, tabs, runs of spaces, zero-width and control characters) out."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    text = "".join("" if unicodedata.category(ch) == "Cf" else ch if ch.isprintable() else " " for ch in text)
    return _SPACES.sub(" ", text).strip()
