"""Local folders and S3 (moto's real HTTP server) behave the same through kubetune.storage."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.storage import Store, join


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return Store(f"s3://{bucket}/some/prefix/")


def test_write_read_list_delete_roundtrip(store: Store, tmp_path: Path) -> None:
    store.write_json("a/manifest.json", {"step": 3})
    store.write_bytes("a/b/data.bin", b"\x00\x01")
    store.write_bytes("ab.txt", b"sibling, not inside a/")
    assert store.read_json("a/manifest.json") == {"step": 3}
    assert list(store.list("a")) == ["a/b/data.bin", "a/manifest.json"]
    assert sorted(store.list()) == ["a/b/data.bin", "a/manifest.json", "ab.txt"]
    assert store.exists("a/b/data.bin") and not store.exists("a/missing")
    store.download_tree("a", tmp_path / "copy")
    assert (tmp_path / "copy" / "b" / "data.bin").read_bytes() == b"\x00\x01"
    store.delete_prefix("a")
    assert list(store.list()) == ["ab.txt"]


def test_missing_key_is_file_not_found_naming_the_uri(store: Store) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here.json"):
        store.read_json("nothing-here.json")


def test_upload_tree_and_child(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x.txt").write_text("x")
    (src / "y.txt").write_text("y")
    store.child("ckpt").upload_tree(src)
    assert sorted(store.list("ckpt")) == ["ckpt/sub/x.txt", "ckpt/y.txt"]
    assert store.child("ckpt").read_bytes("sub/x.txt") == b"x"


def test_join() -> None:
    assert join("s3://b/p/", "x/", "/y.json") == "s3://b/p/x/y.json"
    assert join("/tmp/a", "") == "/tmp/a"


def test_explicit_credentials_are_used_instead_of_the_environment(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.storage import StorageError

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(StorageError, match="credentials"):
        Store(f"s3://{s3_bucket}/p/").write_bytes("x", b"1")
    Store(f"s3://{s3_bucket}/p/", credentials=("key-id", "secret")).write_bytes("x", b"1")
    assert Store(f"s3://{s3_bucket}/p/", credentials=("key-id", "secret")).child("").read_bytes("x") == b"1"


def test_storage_env_points_at_the_specs_endpoint_and_region_and_nothing_else() -> None:
    from kubetune.api.models import Storage
    from kubetune.storage import storage_env

    spec = Storage.model_validate({"uri": "s3://bucket/p/", "endpoint": "http://minio:9000", "region": "eu-west-1"})
    assert storage_env(spec) == {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    assert storage_env(Storage.model_validate({"uri": "s3://bucket/p/"})) == {}


def test_keys_starting_with_lists_only_the_keys_with_that_text_prefix(store: Store) -> None:
    for key in ("checkpoint-2/manifest.json", "checkpoints/step-1/manifest.json", "cache/x", "dataset/train/a.jpg"):
        store.write_bytes(key, b"x")
    assert sorted(store.keys_starting_with("checkpoint")) == [
        "checkpoint-2/manifest.json",
        "checkpoints/step-1/manifest.json",
    ]
    assert store.keys_starting_with("nothing") == []


def test_write_if_absent_writes_once(store: Store) -> None:
    assert store.write_if_absent("owner.json", b"first")
    assert not store.write_if_absent("owner.json", b"second")
    assert store.read_bytes("owner.json") == b"first"


def test_a_prefix_another_job_owns_is_refused_and_left_as_it_is(store: Store) -> None:
    from kubetune.api.contracts import StorageOwner
    from kubetune.ownership import StorageOwnedError, claim

    first = StorageOwner(namespace="team-a", name="first", uid="uid-a")
    claim(store, first)
    claim(store, first)  # its own: fine, again
    before = store.read_bytes("owner.json")
    with pytest.raises(StorageOwnedError, match=r"belongs to FineTuneJob team-a/first \(uid uid-a\)"):
        claim(store, StorageOwner(namespace="team-b", name="second", uid="uid-b"))
    assert store.read_bytes("owner.json") == before
    claim(store, None)  # no owner (a local `kubetune train`): nothing checked
