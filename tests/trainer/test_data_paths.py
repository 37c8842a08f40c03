"""An imagefolder's `file_name` entries must stay inside the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.trainer.data import DataError, open_imagefolder


@pytest.mark.parametrize("file_name", ["../outside.jpg", "/etc/passwd", "a/../../outside.jpg"])
def test_imagefolder_file_name_outside_the_dataset_is_refused(tmp_path: Path, file_name: str) -> None:
    (tmp_path / "outside.jpg").write_bytes(b"x")
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"file_name": "ok.jpg", "text": "a"}, {"file_name": file_name, "text": "b"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"row 2: file_name must be a path inside the dataset"):
        open_imagefolder(str(folder), "image", "text")


def test_an_imagefolder_inside_its_folder_opens(tmp_path: Path) -> None:
    row = {"file_name": "sub/ok.jpg", "text": "a"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    assert len(open_imagefolder(str(tmp_path), "image", "text")) == 1


# -- `datasets` datasets in a local folder ----------------------------------------------------


def _png(colour: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, "PNG")
    return buffer.getvalue()


def _parquet(folder: Path, images: list[dict[str, object]], texts: list[str]) -> Path:
    """A parquet file as `datasets` writes one with an Image feature (rows as given: no embedding)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = [{"bytes": i.get("bytes"), "path": i.get("path")} for i in images]
    table = pa.table({"image": rows, "text": texts}, schema=features.arrow_schema)
    pq.write_table(table, folder / "train-00000-of-00001.parquet")
    return folder


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def test_a_row_naming_a_pod_local_file_is_refused_embedded_bytes_are_read(tmp_path: Path) -> None:
    from kubetune.trainer.data import open_local_dataset

    secret = tmp_path / "secret.png"
    secret.write_bytes(_png("red"))
    bad = _parquet(
        tmp_path / "bad" / "data", [{"bytes": _png("blue"), "path": None}, {"path": str(secret)}], ["a", "b"]
    )
    with pytest.raises(DataError, match=r"row 2: image path '/.*' is outside the dataset"):
        open_local_dataset(str(bad.parent), None, "image", "text", None)
    escaping = _parquet(tmp_path / "escaping", [{"path": "../secret.png"}], ["a"])
    with pytest.raises(DataError, match=r"row 1: image path '../secret.png' is outside the dataset"):
        open_local_dataset(str(escaping), None, "image", "text", None)

    inside = tmp_path / "good"
    good = _parquet(inside, [{"bytes": _png("blue"), "path": "/abs/ignored.png"}, {"path": "b.png"}], ["a", "b"])
    (inside / "b.png").write_bytes(_png("green"))
    data = open_local_dataset(str(good), None, "image", "text", None)
    image, beside = data.image(0), data.image(1)
    assert image is not None and image.getpixel((0, 0)) == (0, 0, 255), "embedded bytes win over the path"
    assert beside is not None and beside.getpixel((0, 0)) == (0, 128, 0), "a relative path inside the folder"


def test_column_errors_name_the_flag_and_a_bounded_list(tmp_path: Path) -> None:
    import datasets

    from kubetune.trainer.data import open_local_dataset

    wide = {f"column_{i:02d}_" + "x" * 60: ["v"] for i in range(30)}
    datasets.Dataset.from_dict({"image": [_png("red")], "text": ["a"], **wide}).to_parquet(
        str(tmp_path / "train.parquet")
    )
    with pytest.raises(DataError) as error:
        open_local_dataset(str(tmp_path), None, "image", "caption", None)
    message = str(error.value)
    assert message.startswith("--caption_column 'caption' is not a column of") and "\n" not in message
    assert "column_00_xxx" in message and "and 24 more" in message and len(message) < 1200
    with pytest.raises(DataError, match=r"^--image_column 'picture' is not a column of .*\(columns: 'image', 'text', "):
        open_local_dataset(str(tmp_path), None, "picture", "text", None)


def test_imagefolder_metadata_names_the_image_in_a_column_file_name_key(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png("red"))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"image_file_name": "a.png", "text": "red"}) + "\n")
    data = open_imagefolder(str(tmp_path), "image", "text")
    assert len(data) == 1 and data.image(0) is not None
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"photo_file_name": "a.png", "text": "red"}) + "\n")
    assert open_imagefolder(str(tmp_path), "photo", "text").image(0) is not None
    with pytest.raises(
        DataError, match=r"--image_column 'image' is not an image column .*\(columns: 'photo', 'text'\)"
    ):
        open_imagefolder(str(tmp_path), "image", "text")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"photo_file_name": "../a.png", "text": "red"}) + "\n")
    with pytest.raises(DataError, match=r"row 1: photo_file_name must be a path inside the dataset"):
        open_imagefolder(str(tmp_path), "photo", "text")


def test_a_save_to_disk_folder_opens_and_the_cache_key_follows_the_files(tmp_path: Path) -> None:
    import datasets

    from kubetune.trainer.data import open_local_dataset

    rows = {"image": [{"bytes": _png("red"), "path": None}], "text": ["red"]}
    table = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "disk"))
    data = open_local_dataset(str(tmp_path / "disk"), None, "image", "text", None)
    assert data.captions == ["red"] and data.image(0) is not None

    folder = _parquet(tmp_path / "files", [{"bytes": _png("red")}], ["red"])
    before = open_local_dataset(str(folder), None, "image", "text", None).fingerprint
    assert open_local_dataset(str(folder), None, "image", "text", None).fingerprint == before
    _parquet(tmp_path / "other", [{"bytes": _png("red")}], ["red, again"])
    (tmp_path / "other" / "train-00000-of-00001.parquet").replace(folder / "train-00000-of-00001.parquet")
    assert open_local_dataset(str(folder), None, "image", "text", None).fingerprint != before


def test_data_errors_name_the_flag_but_show_column_names_bounded_and_no_content(tmp_path: Path) -> None:
    secret = "a caption that is private data " * 4
    row = {"file_name": "ok.jpg", "text": ["not", 3], **{f"column_{i}_{'x' * 60}": secret for i in range(12)}}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as missing:
        open_imagefolder(str(tmp_path), "image", "caption")
    message = str(missing.value)
    assert message.startswith("--caption_column 'caption' is not a column of") and "and 6 more)" in message
    assert "x" * 40 not in message and "private data" not in message
    with pytest.raises(DataError) as bad_caption:
        open_imagefolder(str(tmp_path), "image", "text")
    assert str(bad_caption.value) == "caption column 'text' must hold strings or lists of strings (got list)"


def test_an_image_replaced_under_its_name_changes_the_cache_key(tmp_path: Path, s3_bucket: str) -> None:
    """A hand-made imagefolder (no collector manifest): the same metadata.jsonl, other pixels."""
    from kubetune.storage import Store

    (tmp_path / "a.png").write_bytes(_png("red"))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "red"}) + "\n")
    before = open_imagefolder(str(tmp_path), "image", "text").fingerprint
    assert open_imagefolder(str(tmp_path), "image", "text").fingerprint == before, "the key is stable"
    (tmp_path / "a.png").write_bytes(_png("blue") + b"\0")
    assert open_imagefolder(str(tmp_path), "image", "text").fingerprint != before

    remote = Store(f"s3://{s3_bucket}/folder")
    remote.write_bytes("metadata.jsonl", (tmp_path / "metadata.jsonl").read_bytes())
    remote.write_bytes("a.png", _png("red"))
    before = open_imagefolder(remote.uri, "image", "text").fingerprint
    assert open_imagefolder(remote.uri, "image", "text").fingerprint == before
    remote.write_bytes("a.png", _png("green"))  # same size, another ETag
    assert open_imagefolder(remote.uri, "image", "text").fingerprint != before


def test_a_collected_dataset_is_keyed_by_its_manifest_not_by_file_versions(tmp_path: Path) -> None:
    """The collector's manifest hashes every image it kept: its key needs no listing of versions."""
    import os

    from kubetune.api.contracts import DatasetCounts, DatasetManifest

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.png").write_bytes(_png("red"))
    (tmp_path / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "red"}) + "\n")
    manifest = DatasetManifest(fingerprint="f", counts=DatasetCounts(requested=1, kept=1), content_hash="sha256:ab")
    (tmp_path / "manifest.json").write_text(manifest.model_dump_json(by_alias=True))
    before = open_imagefolder(str(tmp_path), "image", "text").fingerprint
    os.utime(tmp_path / "train" / "a.png", ns=(1, 1))  # another version of the same file
    assert open_imagefolder(str(tmp_path), "image", "text").fingerprint == before
