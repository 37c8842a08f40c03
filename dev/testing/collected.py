"""Helpers for the collector's tests: the flags a test run of `kubetune collect` shares, and
readers of what it wrote (a dataset folder: `train/metadata.jsonl` and `manifest.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.dev.testing.webapis import StandIn


def metadata(out: Path) -> list[dict[str, Any]]:
    """The rows of `OUT/train/metadata.jsonl`."""
    return [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]


def manifest(out: Path) -> dict[str, Any]:
    """`OUT/manifest.json`."""
    return json.loads((out / "manifest.json").read_text())


def output_flags(out: Path | str) -> list[str]:
    """Write to OUT at 64 px, keeping images of 64 px and more."""
    return ["--output", str(out), "--size", "64", "--min-size", "64"]


def fetch_flags(server: StandIn, out: Path | str) -> list[str]:
    """`output_flags`, plus fetching from the stand-in SERVER (allowed) with short timeouts."""
    return [*output_flags(out), "--timeout", "2", "--workers", "4", "--allow-host", f"127.0.0.1:{server.port}"]
