"""Paths from data never leave the dataset: `file_name` entries of an imagefolder and `path`
values of Hugging Face rows are skipped (counted) when absolute or climbing out with `..`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import models
from kubetune.collector.errors import Skip
from kubetune.collector.sources import HubDataset
from kubetune.dev.testing.webapis import photo


def test_imagefolder_entries_outside_the_folder_are_skipped(collect: Any, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(photo(100, 100, 1))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(photo(100, 100, 2))
    rows = [
        ("good.jpg", "inside"),
        ("../outside.jpg", "climbs out"),
        (str(outside), "absolute"),
        ("sub/../../outside.jpg", "climbs out later"),
    ]
    lines = [json.dumps({"file_name": name, "text": text}) + "\n" for name, text in rows]
    (folder / "metadata.jsonl").write_text("".join(lines))
    out = tmp_path / "out"
    result = collect("--from", str(folder), "--output", str(out), "--size", "64", "--min-size", "64")
    assert result.code == 0, result.stderr
    metadata = (out / "train" / "metadata.jsonl").read_text().splitlines()
    kept = [json.loads(line)["text"] for line in metadata]
    assert kept == ["inside"]
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["skipped"] == {"unsafe-path": 3}


def hub(name: str) -> HubDataset:
    return HubDataset(models.HuggingFaceSource(name=name, caption_column="text"))


def test_a_hub_row_path_outside_a_local_dataset_is_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(photo(100, 100, 1))
    for name in ("org/remote-dataset", str(tmp_path / "dataset")):
        (tmp_path / "dataset").mkdir(exist_ok=True)
        climbing = str(tmp_path / "dataset" / ".." / "secret.jpg")
        for path in (str(secret), "/proc/self/environ", climbing):
            candidate = hub(name)._candidate({"image": {"bytes": None, "path": path}, "text": "x"})
            assert candidate.load is not None
            with pytest.raises(Skip) as caught:
                candidate.load()
            assert caught.value.reason == "unsafe-path"


def test_a_hub_row_path_inside_a_local_dataset_is_read(tmp_path: Path) -> None:
    (tmp_path / "dataset").mkdir()
    image = tmp_path / "dataset" / "a.jpg"
    image.write_bytes(b"jpeg bytes")
    row = {"image": {"bytes": None, "path": str(image)}, "text": "x"}
    candidate = hub(str(tmp_path / "dataset"))._candidate(row)
    assert candidate.load is not None and candidate.load() == b"jpeg bytes"
