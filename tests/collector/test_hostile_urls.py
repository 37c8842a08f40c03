"""A URL list full of trouble: every bad item is skipped and counted by reason, every good one
kept with its caption, and nothing reaches an address that is not allowed."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kubetune.api import layout
from kubetune.dev.testing.webapis import Reply, StandIn, photo


def jpeg_with_orientation(width: int, height: int, seed: int) -> bytes:
    """A landscape JPEG whose EXIF says 'rotate 90°': shown upright it is portrait."""
    image = Image.open(io.BytesIO(photo(width, height, seed)))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


def png_with_alpha(size: int) -> bytes:
    image = Image.new("RGBA", (size, size), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 0, 255, 255), (0, 0, size // 2, size))  # left half opaque blue
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def bomb() -> bytes:
    """A tiny PNG that decodes to 144 million pixels."""
    out = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def hostile() -> Any:
    good = photo(400, 300, 1)
    with StandIn() as host, StandIn() as private:
        attempts = {"flaky": 0}

        def flaky(_: Any) -> Reply:
            attempts["flaky"] += 1
            return (
                Reply(503, b"busy", "text/plain", {"Retry-After": "0"})
                if attempts["flaky"] == 1
                else Reply(200, photo(300, 400, 2), "image/jpeg")
            )

        host.route("/good.jpg", lambda _: Reply(200, good, "image/jpeg"))
        host.route("/copy-of-good.jpg", lambda _: Reply(200, good, "image/jpeg"))
        host.route("/rotated.jpg", lambda _: Reply(200, jpeg_with_orientation(400, 300, 3), "image/jpeg"))
        host.route("/alpha.png", lambda _: Reply(200, png_with_alpha(300), "image/png"))
        host.route("/flaky.jpg", flaky)
        host.route("/moved", lambda _: Reply(302, headers={"Location": "/target.jpg"}))
        host.route("/target.jpg", lambda _: Reply(200, photo(500, 300, 4), "image/jpeg"))
        host.route("/missing.jpg", lambda _: Reply(404, b"no", "text/plain"))
        host.route("/broken.jpg", lambda _: Reply(500, b"oops", "text/plain"))
        host.route("/truncated.jpg", lambda _: Reply(200, photo(400, 300, 5)[:3000], "image/jpeg"))
        host.route("/garbage.jpg", lambda _: Reply(200, b"\xff\xd8\xff\xe0" + bytes(range(256)) * 20, "image/jpeg"))
        host.route("/page.jpg", lambda _: Reply(200, b"<!doctype html><html><body>Login</body></html>", "text/html"))
        host.route("/bomb.png", lambda _: Reply(200, bomb(), "image/png"))
        host.route("/tiny.jpg", lambda _: Reply(200, photo(100, 80, 6), "image/jpeg"))
        host.route("/hang.jpg", lambda _: Reply(hang=True))
        host.route(
            "/to-metadata", lambda _: Reply(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        )
        private.route("/secret.jpg", lambda _: Reply(200, photo(400, 300, 7), "image/jpeg"))
        h, p = host.url, private.url
        rows = [
            ("good", h("/good.jpg"), "a  good\n photo\t"),
            ("duplicate", h("/copy-of-good.jpg"), "the same photo again"),
            ("rotated", h("/rotated.jpg"), "a rotated photo"),
            ("alpha", h("/alpha.png"), "a transparent png"),
            ("flaky", h("/flaky.jpg"), "a photo behind a busy server"),
            ("redirect", h("/moved"), "a photo that moved"),
            ("missing", h("/missing.jpg"), "gone"),
            ("broken", h("/broken.jpg"), "server error"),
            ("truncated", h("/truncated.jpg"), "cut short"),
            ("garbage", h("/garbage.jpg"), "not a jpeg"),  # JPEG magic, then noise: Pillow cannot identify it
            ("html", h("/page.jpg"), "a login page"),
            ("bomb", h("/bomb.png"), "a decompression bomb"),
            ("tiny", h("/tiny.jpg"), "too small"),
            ("hang", h("/hang.jpg"), "never answers"),
            ("other-port", p("/secret.jpg"), "loopback, other port"),
            ("localhost", f"http://localhost:{private.port}/secret.jpg", "loopback by name"),
            ("metadata", "http://169.254.169.254/latest/meta-data/iam", "cloud metadata"),
            ("redirect-to-metadata", h("/to-metadata"), "redirect to link-local"),
            ("ftp", "ftp://example.org/a.jpg", "not http"),
            ("port-too-big", "http://example.org:99999/a.jpg", "a port over 65535"),
            ("broken-bracket", "http://[::1/a.jpg", "a broken IPv6 literal"),
            ("nat64-metadata", "http://[64:ff9b::a9fe:a9fe]/latest/", "NAT64 of link-local"),
            ("no-caption", h("/good.jpg?again"), "   "),
        ]
        yield host, private, rows, attempts


def run_list(collect: Any, tmp_path: Path, rows: list[tuple[str, str, str]], port: int, *extra: str) -> Any:
    urls = tmp_path / "urls.jsonl"
    urls.write_text(
        "".join(json.dumps({"url": url, "caption": caption, "name": name}) + "\n" for name, url, caption in rows)
    )
    out = tmp_path / "out"
    result = collect(
        "--urls",
        str(urls),
        "--output",
        str(out),
        "--size",
        "128",
        "--min-size",
        "128",
        "--timeout",
        "1",
        "--retries",
        "1",
        "--workers",
        "8",
        "--allow-host",
        f"127.0.0.1:{port}",
        *extra,
    )
    return result, out


def test_every_bad_item_is_counted_and_every_good_one_kept(collect: Any, tmp_path: Path, hostile: Any) -> None:
    host, private, rows, attempts = hostile
    result, out = run_list(collect, tmp_path, rows, host.port)
    assert result.code == 0, result.stderr

    metadata = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    by_caption = {row["text"]: row for row in metadata}
    # of two identical pictures one is kept (which one depends on which download ends first)
    duplicates = {"a good photo", "the same photo again"}
    assert len(set(by_caption) & duplicates) == 1
    assert set(by_caption) - duplicates == {
        "a rotated photo",
        "a transparent png",
        "a photo behind a busy server",
        "a photo that moved",
    }
    assert by_caption["a photo that moved"]["url"] == host.url("/moved")
    assert all(row["source"] == "urls" for row in metadata)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {
        "requested": len(rows),
        "kept": 5,
        "skipped": {
            "duplicate": 1,
            "http-404": 1,
            "http-500": 1,
            "corrupt": 1,
            "not-an-image": 2,
            "too-many-pixels": 1,
            "too-small": 1,
            "timeout": 1,
            "private-address": 5,
            "bad-url": 3,
            "no-caption": 1,
        },
    }
    assert private.count() == 0  # refused before connecting, by name and by address
    assert attempts["flaky"] == 2  # one 503, then a retry that succeeded

    for row in metadata:
        with Image.open(out / "train" / row["file_name"]) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert min(image.size) == 128
            if row["text"] == "a rotated photo":
                assert image.height > image.width  # EXIF orientation applied
            if row["text"] == "a transparent png":  # left half blue, right half transparent
                assert image.getpixel((120, 64))[0] > 240 and image.getpixel((120, 64))[2] > 240  # alpha onto white
                assert image.getpixel((10, 64))[2] > 200 and image.getpixel((10, 64))[0] < 60


def test_the_opt_in_lets_private_addresses_through(collect: Any, tmp_path: Path, hostile: Any) -> None:
    host, private, rows, _ = hostile
    wanted = [row for row in rows if row[0] in ("good", "other-port", "localhost")]
    result, out = run_list(collect, tmp_path, wanted, host.port, "--allow-private-network", "--no-dedupe")
    assert result.code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    # the same picture by name and by address is one exact duplicate, kept twice with --no-dedupe
    assert manifest["counts"]["kept"] == 3 and manifest["counts"]["skipped"] == {}
    assert private.count("/secret.jpg") == 2


def test_an_image_over_the_download_limit_is_skipped(collect: Any, tmp_path: Path, hostile: Any) -> None:
    host, _, rows, _ = hostile
    result, out = run_list(collect, tmp_path, [rows[0]], host.port, "--max-download-mb", "0.001")
    assert result.code == layout.EXIT_EMPTY_DATASET
    assert (
        result.last_line
        == "kubetune collect: error: nothing could be collected: 0 images kept of 1 requested; skipped 1 (too-large 1)"
    )
    assert json.loads((out / "manifest.json").read_text())["counts"] == {
        "requested": 1,
        "kept": 0,
        "skipped": {"too-large": 1},
    }
