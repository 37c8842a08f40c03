"""Lists, hub datasets and folders; S3 output from a spec across shards; resume; the imagefolder
loads with `datasets`; aliases and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import layout
from kubetune.api.load import read_spec_arg
from kubetune.dev.testing.collected import fetch_flags, manifest, metadata, output_flags
from kubetune.dev.testing.webapis import Reply, StandIn, photo
from kubetune.storage import Store


def serve_photos(server: StandIn, count: int, prefix: str = "p") -> list[dict[str, str]]:
    rows = []
    for i in range(count):
        data = photo(160, 120, 100 + i)
        server.route(f"/{prefix}{i}.jpg", lambda _, data=data: Reply(200, data, "image/jpeg"))
        rows.append({"url": server.url(f"/{prefix}{i}.jpg"), "caption": f"photo number {i}"})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_url_list_in_csv_and_parquet_and_loads_as_imagefolder(collect: Any, server: StandIn, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = serve_photos(server, 6)
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("link,title\n" + "".join(f"{r['url']},{r['caption']}\n" for r in rows[:3]))
    result = collect(
        "--urls",
        str(csv_file),
        "--url-column",
        "link",
        "--caption-column",
        "title",
        *fetch_flags(server, tmp_path / "a"),
    )
    assert result.code == 0, result.stderr
    assert sorted(r["text"] for r in metadata(tmp_path / "a")) == ["photo number 0", "photo number 1", "photo number 2"]

    parquet_file = tmp_path / "list.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_file)
    out = tmp_path / "b"
    result = collect("--urls", str(parquet_file), *fetch_flags(server, out))
    assert result.code == 0, result.stderr
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert loaded.num_rows == 6
    assert sorted(loaded["text"]) == sorted(r["caption"] for r in rows)
    assert min(loaded[0]["image"].size) == 64
    card = (out / "README.md").read_text()
    assert "| urls | 6 |" in card


def test_resume_downloads_nothing_again(collect: Any, server: StandIn, tmp_path: Path) -> None:
    rows = serve_photos(server, 8)
    out = tmp_path / "out"
    first = write_jsonl(tmp_path / "first.jsonl", rows[:5])
    assert collect("--urls", str(first), *fetch_flags(server, out)).code == 0
    assert server.count() == 5
    written = manifest(out)

    again = collect("--urls", str(first), *fetch_flags(server, out))
    assert again.code == 0 and "already complete" in again.last_line
    assert server.count() == 5  # not one request
    assert manifest(out) == written

    longer = write_jsonl(tmp_path / "longer.jsonl", rows)  # the list grew: only the new ones are fetched
    assert collect("--urls", str(longer), *fetch_flags(server, out)).code == 0
    assert server.count() == 8
    assert len(metadata(out)) == 8 and manifest(out)["counts"]["kept"] == 8

    shorter = write_jsonl(tmp_path / "shorter.jsonl", rows[:2])  # and shrank: the dataset follows the list
    assert collect("--urls", str(shorter), *fetch_flags(server, out)).code == 0
    assert server.count() == 8
    assert sorted(r["text"] for r in metadata(out)) == ["photo number 0", "photo number 1"]
    assert len(list((out / "train").glob("*.jpg"))) == 2


def test_an_interrupted_run_resumes_without_downloading_kept_images(server: StandIn, tmp_path: Path) -> None:
    rows = serve_photos(server, 140)
    slow = {"n": 0}

    def slow_photo(request: Any, data: bytes = photo(160, 120, 999)) -> Reply:
        slow["n"] += 1
        return Reply(hang=True) if slow["n"] == 1 else Reply(200, data, "image/jpeg")

    server.route("/slow.jpg", slow_photo)
    rows.append({"url": server.url("/slow.jpg"), "caption": "slow"})
    urls = write_jsonl(tmp_path / "urls.jsonl", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "kubetune.cli", "collect", "--urls", str(urls), *fetch_flags(server, out)]
    command[command.index("--timeout") + 1] = "20"
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60  # the last image hangs: stop the run while it waits, as a preempted pod would be
    while time.monotonic() < deadline and process.poll() is None:
        if slow["n"] and server.count("/p") >= 140 and any((out / ".collector").rglob("part-*.jsonl")):
            break
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert not (out / "manifest.json").exists()
    recorded = {
        json.loads(line)["url"]
        for part in (out / ".collector").rglob("part-*.jsonl")
        for line in part.read_text().splitlines()
    }
    assert len(recorded) >= 64  # records are flushed in parts as the run goes
    before = [r.path for r in server.requests]

    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    again = [r.path for r in server.requests[len(before) :]]
    assert not {server.url(path) for path in again} & recorded  # nothing already kept is fetched again
    assert "/slow.jpg" in again
    assert len(metadata(out)) == 141


def test_hub_dataset_streams_a_local_parquet_dataset(collect: Any, tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    table = {
        "image": [{"bytes": photo(100, 90, i), "path": None} for i in range(6)],
        "caption": [f" hub  photo {i} " for i in range(6)],
    }
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    out = tmp_path / "out"
    result = collect(
        "--hf-dataset",
        str(tmp_path / "hub"),
        "--hf-caption-column",
        "caption",
        "--max-samples",
        "4",
        *output_flags(out),
    )
    assert result.code == 0, result.stderr
    assert sorted(r["text"] for r in metadata(out)) == [f"hub photo {i}" for i in range(4)]
    assert {r["source"] for r in metadata(out)} == {"huggingface"}


def test_hub_dataset_missing_column_is_one_line(collect: Any, tmp_path: Path) -> None:
    import datasets

    (tmp_path / "hub").mkdir()
    datasets.Dataset.from_dict(
        {"image": [{"bytes": photo(80, 80, 1), "path": None}], "text": ["x"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    ).to_parquet(str(tmp_path / "hub" / "train.parquet"))
    result = collect(
        "--hf-dataset", str(tmp_path / "hub"), "--hf-caption-column", "caption", "--output", str(tmp_path / "out")
    )
    assert result.code == 2
    assert result.stderr.strip().endswith("has no column 'caption' (columns: 'image', 'text')")


def test_spec_with_two_shards_builds_one_dataset_in_s3(
    collect: Any, server: StandIn, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = serve_photos(server, 9) + [{"url": server.url("/nothing.jpg"), "caption": "gone"}]
    Store(f"s3://{s3_bucket}/lists").write_bytes("urls.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    spec = {
        "dataset": {
            "urls": {"uri": f"s3://{s3_bucket}/lists/urls.jsonl"},
            "resolution": 64,
            "minSize": 64,
            "allowPrivateNetwork": True,
        },
        "model": {"base": "tiny"},
        "storage": {"uri": f"s3://{s3_bucket}/job"},
        "collector": {"shards": 2, "workers": 3, "timeoutSeconds": 2},
    }
    monkeypatch.setenv(layout.SPEC_ENV, json.dumps(spec))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    dataset = Store(f"s3://{s3_bucket}/job/dataset")

    first = collect("--spec", "env:KUBETUNE_SPEC")
    assert first.code == 0, first.stderr
    assert "shard 1 of 2 done" in first.last_line and not dataset.exists("manifest.json")

    second = collect("--spec", "env:KUBETUNE_SPEC", "--shard-index", "0")
    assert second.code == 0, second.stderr
    manifest = dataset.read_json("manifest.json")
    assert manifest["counts"] == {"requested": 10, "kept": 9, "skipped": {"http-404": 1}}
    assert manifest["fingerprint"] == layout.dataset_fingerprint(read_spec_arg("env:KUBETUNE_SPEC").dataset)
    assert manifest["settings"]["shards"] == 2 and manifest["contentHash"].startswith("sha256:")
    rows_out = [json.loads(line) for line in dataset.read_bytes("train/metadata.jsonl").decode().splitlines()]
    assert sorted(r["text"] for r in rows_out) == sorted(r["caption"] for r in rows[:9])
    assert all(dataset.exists(f"train/{r['file_name']}") for r in rows_out)
    assert dataset.exists("README.md")


def test_folder_in_s3_is_validated_and_normalised(collect: Any, s3_bucket: str, tmp_path: Path) -> None:
    source = Store(f"s3://{s3_bucket}/mine")
    source.write_bytes("a.png", photo(300, 200, 1, fmt="PNG"))
    source.write_bytes("b.jpg", photo(50, 50, 2))
    source.write_bytes(
        "metadata.jsonl",
        (
            json.dumps({"file_name": "a.png", "text": "first\n one"})
            + "\n"
            + json.dumps({"file_name": "b.jpg", "text": "too small"})
            + "\n"
            + json.dumps({"file_name": "c.jpg", "text": "not there"})
            + "\n"
        ).encode(),
    )
    out = tmp_path / "out"
    result = collect("--from", f"s3://{s3_bucket}/mine", *output_flags(out))
    assert result.code == 0, result.stderr
    assert [r["text"] for r in metadata(out)] == ["first one"]
    assert manifest(out)["counts"]["skipped"] == {"too-small": 1, "no-image": 1}


def test_unreachable_api_is_retryable(collect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("KUBETUNE_UNSPLASH_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("UNSPLASH_ACCESS_KEY", "k")
    result = collect("--prompts", "x", "--output", str(tmp_path / "out"), "--retries", "0")
    assert result.code == layout.EXIT_FAILED
    expected = f"Unsplash API at 127.0.0.1:{port} cannot be reached: ConnectionError (retrying may help)"
    assert result.last_line == f"kubetune collect: error: {expected}"


def test_original_spellings_still_work(
    collect: Any, server: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.dev.testing.webapis import Unsplash, make_photos

    monkeypatch.setenv("KUBETUNE_UNSPLASH_API_URL", server.base)
    monkeypatch.setenv("UNSPLASH_ACCESS_KEY", "key")
    Unsplash(server, "key", {"a cat": make_photos("cat", 5, seed=7), "a dog": make_photos("dog", 5, seed=8)})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n# not a prompt\na dog\n")
    out = tmp_path / "data"
    result = collect(
        "-prompt_file",
        str(prompts),
        "-num_imgs",
        "3",
        "-size",
        "96",
        "-data_dir",
        str(out),
        "-site",
        "unsplash",
        "-unsplash_size",
        "small",
        "-verbose",
        "--min-size",
        "64",
        "--allow-host",
        f"127.0.0.1:{server.port}",
    )
    assert result.code == 0, result.stderr
    rows = metadata(out)
    assert sorted(r["text"] for r in rows) == ["a cat"] * 3 + ["a dog"] * 3
    images = [r for r in server.requests if r.path.startswith("/unsplash-img/")]
    assert all(r.query["w"] == "400" for r in images)  # the "small" size variant


@pytest.mark.slow
def test_train_true_collects_then_fine_tunes_like_app_py(collect: Any, server: StandIn, tmp_path: Path) -> None:
    from kubetune.dev.testing.tiny_sd import build_tiny_pipeline

    model = build_tiny_pipeline(tmp_path / "tiny")
    urls = write_jsonl(tmp_path / "urls.jsonl", serve_photos(server, 4))
    out = tmp_path / "data"
    quick = "--resolution 32 --max_train_steps 2 --gradient_accumulation_steps 1 --checkpointing_steps 2"
    result = collect(
        "--urls",
        str(urls),
        *fetch_flags(server, out),
        "-train",
        "True",
        "-model_name",
        str(model),
        "--train-args",
        quick,
    )
    assert result.code == 0, result.stderr[-3000:]
    trained = tmp_path / "data-model"
    assert (trained / "model_index.json").exists() and (
        trained / "unet" / "diffusion_pytorch_model.safetensors"
    ).exists()
    progress = json.loads((trained / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["step"] == 2
    card = (trained / "README.md").read_text()
    assert "| EMA | True |" in card  # main.py's --use_ema is kept, the flags given in --train-args override


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--urls", "x.jsonl", "--output", "o", "-train", "maybe"],
            "argument --train/-train: must be True or False (got 'maybe')",
        ),
        (
            ["--urls", "x.jsonl", "--output", "o", "--size", "32"],
            "--size: Input should be greater than or equal to 64 (got 32)",
        ),
        (
            ["--urls", "x.jsonl", "--hf-dataset", "d", "--output", "o"],
            "give exactly one source: --prompts/--prompt-file, --urls, --hf-dataset, --from, or --spec (got "
            "--urls, --hf-dataset)",
        ),
        (["--urls", "x.jsonl"], "--output: required (a folder or s3://bucket/prefix), or use --spec"),
        (
            ["--urls", "x.jsonl", "--output", "o", "--num-shards", "2", "--shard-index", "2"],
            "--shard-index: must be from 0 to 1 (got 2)",
        ),
        (["--spec", "env:NOPE_NOT_SET"], "--spec env:NOPE_NOT_SET: environment variable NOPE_NOT_SET is not set"),
        (["--site", "bing", "--prompts", "x"], "argument --site/-site: invalid choice: 'bing'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "collect", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "UNSPLASH_ACCESS_KEY": "k"},
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


@pytest.mark.parametrize("near", [False, True], ids=["exact-only", "near-dedupe"])
def test_near_duplicates_are_dropped_only_when_asked(collect: Any, server: StandIn, tmp_path: Path, near: bool) -> None:
    import io

    from PIL import Image

    original = photo(200, 150, 42, quality=95)
    recompressed = io.BytesIO()
    Image.open(io.BytesIO(original)).save(recompressed, format="JPEG", quality=60)  # same picture, other bytes
    server.route("/a.jpg", lambda _: Reply(200, original, "image/jpeg"))
    server.route("/b.jpg", lambda _: Reply(200, recompressed.getvalue(), "image/jpeg"))
    urls = write_jsonl(
        tmp_path / "urls.jsonl",
        [{"url": server.url("/a.jpg"), "caption": "a"}, {"url": server.url("/b.jpg"), "caption": "b"}],
    )
    out = tmp_path / "out"
    result = collect("--urls", str(urls), *fetch_flags(server, out), *(["--near-dedupe"] if near else []))
    assert result.code == 0, result.stderr
    counts = manifest(out)["counts"]
    assert counts == (
        {"requested": 2, "kept": 1, "skipped": {"near-duplicate": 1}}
        if near
        else {"requested": 2, "kept": 2, "skipped": {}}
    )
