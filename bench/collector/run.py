"""Collector throughput against img2dataset, on the same loopback corpus, in one run.

A corpus of large generated photos (default 240 JPEGs of 2400x1600, grain included so they
compress like photos) is served over HTTP on 127.0.0.1 by a separate process. Both tools get the
same URL list (parquet), the same target (shorter side 512, aspect kept, no upscaling, JPEG
quality 95), the same cores and no retries; each is timed from process start to exit, and its
output is checked (count and size). The anchor, img2dataset, runs from its own virtualenv
(`bench/collector/.venv-img2dataset`, created here on first use) because its pins conflict
with ours.

    .venv/bin/python bench/collector/run.py [--images 240] [--size 512] [--repeat 1]

Prints images/s of both and the ratio (floor 1.0x, goal 1.5x) and writes
bench/results/collector.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
ANCHOR_VENV = Path(__file__).resolve().parent / ".venv-img2dataset"
ANCHOR_VERSION = "img2dataset==1.47.0"


def corpus(count: int, width: int, height: int) -> Path:
    """Generated photos, cached under bench/results (ignored by git)."""
    from kubetune.dev.testing.webapis import photo

    folder = RESULTS / f"collector-corpus-{width}x{height}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = folder / f"{index:05d}.jpg"
        if not path.exists():
            path.write_bytes(photo(width, height, index, quality=90, noise=True))
    return folder


def serve(folder: Path, ready: Any, port: Any) -> None:
    files = {f"/{p.name}": p.read_bytes() for p in folder.glob("*.jpg")}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = files.get(self.path.split("?")[0])
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port.value = server.server_address[1]
    ready.set()
    server.serve_forever()


def anchor_python() -> Path:
    python = ANCHOR_VENV / "bin" / "python"
    if not (ANCHOR_VENV / "bin" / "img2dataset").exists():
        print(f"installing {ANCHOR_VERSION} into {ANCHOR_VENV} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(ANCHOR_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", ANCHOR_VERSION], check=True)
    return python


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    # cwd outside the repository: img2dataset's worker processes put the cwd on sys.path, and the
    # repository's operator/ folder would shadow the standard library's operator module there
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=1800)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed


def check(folder: Path, pattern: str, expected: int, size: int) -> None:
    from PIL import Image

    files = sorted(folder.rglob(pattern))
    if len(files) != expected:
        raise SystemExit(f"{folder}: {len(files)} images, expected {expected}")
    for path in files[:: max(1, len(files) // 10)]:
        with Image.open(path) as image:
            if min(image.size) != size:
                raise SystemExit(f"{path}: {image.size}, expected shorter side {size}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--width", type=int, default=2400)
    parser.add_argument("--height", type=int, default=1600)
    parser.add_argument("--workers", type=int, default=16, help="download threads (per process for img2dataset)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each tool; the best counts")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    folder = corpus(args.images, args.width, args.height)
    ready, port = multiprocessing.Event(), multiprocessing.Value("i", 0)
    server = multiprocessing.Process(target=serve, args=(folder, ready, port), daemon=True)
    server.start()
    ready.wait(30)
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-collector-"))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [
            {"url": f"http://127.0.0.1:{port.value}/{i:05d}.jpg", "caption": f"generated photo {i}"}
            for i in range(args.images)
        ]
        urls = work / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), urls)
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
        anchor = anchor_python()
        kubetune_times, anchor_times = [], []
        for _ in range(args.repeat):
            out = work / "kubetune"
            shutil.rmtree(out, ignore_errors=True)
            kubetune_times.append(
                timed(
                    [
                        sys.executable,
                        "-m",
                        "kubetune.cli",
                        "collect",
                        "--urls",
                        str(urls),
                        "--output",
                        str(out),
                        "--size",
                        str(args.size),
                        "--min-size",
                        "1",
                        "--workers",
                        str(args.workers),
                        "--retries",
                        "0",
                        "--allow-host",
                        f"127.0.0.1:{port.value}",
                        "--jpeg-quality",
                        "95",
                    ],
                    env,
                    work,
                )
            )
            check(out / "train", "*.jpg", args.images, args.size)

            out = work / "img2dataset"
            shutil.rmtree(out, ignore_errors=True)
            per_shard = math.ceil(args.images / (cores * 2))  # two shards per process: all cores busy
            anchor_times.append(
                timed(
                    [
                        str(anchor.parent / "img2dataset"),
                        "--url_list",
                        str(urls),
                        "--input_format",
                        "parquet",
                        "--url_col",
                        "url",
                        "--caption_col",
                        "caption",
                        "--output_format",
                        "files",
                        "--output_folder",
                        str(out),
                        "--image_size",
                        str(args.size),
                        "--resize_mode",
                        "keep_ratio",
                        "--resize_only_if_bigger",
                        "True",
                        "--encode_quality",
                        "95",
                        "--processes_count",
                        str(cores),
                        "--thread_count",
                        str(args.workers),
                        "--number_sample_per_shard",
                        str(per_shard),
                        "--retries",
                        "0",
                        "--timeout",
                        "30",
                        "--extract_exif",
                        "False",
                        "--enable_wandb",
                        "False",
                    ],
                    env,
                    work,
                )
            )
            check(out, "*.jpg", args.images, args.size)
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)

    ours, theirs = args.images / min(kubetune_times), args.images / min(anchor_times)
    result = {
        "images": args.images,
        "source": f"{args.width}x{args.height} JPEG",
        "size": args.size,
        "cores": cores,
        "workers": args.workers,
        "kubetune_images_per_s": round(ours, 1),
        "img2dataset_images_per_s": round(theirs, 1),
        "ratio": round(ours / theirs, 2),
        "kubetune_seconds": kubetune_times,
        "img2dataset_seconds": anchor_times,
        "anchor": ANCHOR_VERSION,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "collector.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"corpus: {args.images} JPEGs of {args.width}x{args.height} on loopback; target shorter side "
        f"{args.size}; {cores} cores"
    )
    print(f"kubetune collect: {ours:7.1f} images/s")
    print(f"img2dataset:      {theirs:7.1f} images/s  ({ANCHOR_VERSION})")
    print(f"ratio:            {ours / theirs:7.2f}x  (floor 1.0x, goal 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
