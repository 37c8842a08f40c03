"""A URL list that is not one (say /proc/self/environ): the error names the file, a line and a
column, never the text, so no secret reaches logs or a pod's termination message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

SECRET = "hunter2-secret-value"
ENVIRON = f"PATH=/usr/bin\x00AWS_SECRET_ACCESS_KEY={SECRET}\x00HOME=/tmp\x00".encode()


@pytest.mark.parametrize(
    ("fmt", "content"),
    [
        ("csv", ENVIRON),
        # a field over the csv module's size limit
        ("csv", f'url,caption\nhttps://a/b.jpg,"{"x" * 200_000}{SECRET}"\n'.encode()),
        ("jsonl", ENVIRON),
        ("jsonl", b'{"url": "https://a/b.jpg", "caption": "ok"}\n{"url": ' + SECRET.encode() + b"}\n"),
        ("jsonl", b"\xff\xfe" + SECRET.encode()),
        ("parquet", ENVIRON),
    ],
)
def test_a_list_error_never_quotes_the_file(collect: Any, tmp_path: Path, fmt: str, content: bytes) -> None:
    listing = tmp_path / f"environ.{fmt}"
    listing.write_bytes(content)
    out = str(tmp_path / "out")
    result = collect("--urls", str(listing), "--urls-format", fmt, "--output", out)
    assert result.code == 2, result.stderr
    assert SECRET not in result.stderr and "AWS_SECRET" not in result.stderr
    assert str(listing) in result.last_line


def test_a_json_error_names_line_and_column(collect: Any, tmp_path: Path) -> None:
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"url": "https://a/b.jpg", "caption": "ok"}\n{"url": nope}\n')
    result = collect("--urls", str(listing), "--output", str(tmp_path / "out"))
    assert result.last_line == (
        f"kubetune collect: error: urls: {listing} line 2 column 9 is not valid JSON: Expecting value"
    )


def test_in_an_operator_pod_a_list_must_be_in_s3(collect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"url": "https://a/b.jpg", "caption": "ok"}\n')
    monkeypatch.setenv("KUBETUNE_FINETUNEJOB", "job")
    result = collect("--urls", str(listing), "--output", str(tmp_path / "out"))
    assert result.code == 2
    assert result.last_line == (
        "kubetune collect: error: urls: in a FineTuneJob the list must be in S3 (s3://bucket/key)"
    )
