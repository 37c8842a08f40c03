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


def test_data_errors_name_the_flag_but_show_column_names_bounded_and_no_content(tmp_path: Path) -> None:
    secret = "a caption that is private data " * 4
    row = {"file_name": "ok.jpg", "text": ["not", 3], **{f"column_{i}_{'x' * 60}": secret for i in range(12)}}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as missing:
        open_imagefolder(str(tmp_path), "image", "caption")
    message = str(missing.value)
    assert message.startswith("--caption_column 'caption' is not a column of") and "and 5 more)" in message
    assert "x" * 40 not in message and "private data" not in message
    with pytest.raises(DataError) as bad_caption:
        open_imagefolder(str(tmp_path), "image", "text")
    assert str(bad_caption.value) == "caption column 'text' must hold strings or lists of strings (got list)"
