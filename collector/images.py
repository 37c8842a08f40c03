"""Decoding untrusted image bytes into clean, resized RGB JPEGs, and the hashes used to dedupe."""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from kubetune.collector.errors import Skip

# The pixel limit is enforced below as an error (Skip "too-many-pixels") before any decoding;
# Pillow's own check only warns under twice its limit, so its warning is silenced here.
ImageFile.LOAD_TRUNCATED_IMAGES = False
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageSettings:
    size: int = 512                  # shorter side of stored images (never upscaled)
    min_size: int = 256              # shorter side below this: skipped
    max_pixels: int = 89_478_485     # more pixels than this: skipped as a decompression bomb
    quality: int = 95                # JPEG quality of stored images


@dataclass(frozen=True)
class CleanImage:
    jpeg: bytes
    width: int
    height: int
    pixel_hash: str       # sha256 of the decoded, resized pixels: exact duplicates
    perceptual_hash: str  # pHash, for near-duplicates


def clean(data: bytes, settings: ImageSettings, perceptual: bool = False) -> CleanImage:
    """Decode, check, orient, convert to RGB, resize (shorter side = size) and encode as JPEG."""
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
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
    except Skip:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise Skip("too-many-pixels" if isinstance(error, Image.DecompressionBombError) else "not-an-image") from None
    except Exception as error:  # truncated or corrupt data: Pillow's decoders raise many types
        raise Skip("corrupt", f"{type(error).__name__}: {error}"[:200]) from None
    rgb = _resize_shorter_side(rgb, settings.size)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=settings.quality, optimize=False)
    return CleanImage(out.getvalue(), rgb.width, rgb.height, _pixel_hash(rgb), _perceptual_hash(rgb) if perceptual else "")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composed onto white (not black, as convert() would)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
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
