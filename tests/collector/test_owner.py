"""A collector of a second FineTuneJob on a storage prefix the first one owns refuses it: exit code
STORAGE_OWNED, one line naming storage.uri and the owner, nothing written, nothing deleted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api import layout
from kubetune.dev.testing.webapis import Reply, StandIn, photo
from kubetune.storage import Store


def job_env(monkeypatch: pytest.MonkeyPatch, spec: dict[str, Any], uid: str, name: str) -> None:
    monkeypatch.setenv(layout.SPEC_ENV, json.dumps(spec))
    monkeypatch.setenv(layout.OWNER_UID_ENV, uid)
    monkeypatch.setenv(layout.OWNER_NAMESPACE_ENV, "team-a")
    monkeypatch.setenv(layout.OWNER_NAME_ENV, name)


def test_a_second_jobs_collector_refuses_an_owned_prefix_and_deletes_nothing(
    collect: Any, server: StandIn, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = []
    for i in range(3):
        data = photo(160, 120, 100 + i)
        server.route(f"/p{i}.jpg", lambda _, data=data: Reply(200, data, "image/jpeg"))
        rows.append({"url": server.url(f"/p{i}.jpg"), "caption": f"photo number {i}"})
    lists = Store(f"s3://{s3_bucket}/lists")
    lists.write_bytes("a.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    lists.write_bytes("b.jsonl", json.dumps(rows[0]).encode() + b"\n")
    spec = {
        "dataset": {"urls": {"uri": f"s3://{s3_bucket}/lists/a.jsonl"}, "minSize": 64, "allowPrivateNetwork": True},
        "model": {"base": "tiny"},
        "storage": {"uri": f"s3://{s3_bucket}/job"},
    }
    job_env(monkeypatch, spec, "uid-first", "first")
    assert collect("--spec", "env:KUBETUNE_SPEC").code == 0
    prefix = Store(f"s3://{s3_bucket}/job")
    assert json.loads(prefix.read_bytes("owner.json"))["uid"] == "uid-first"
    before = {key: prefix.read_bytes(key) for key in prefix.list()}

    # another job, other settings: without the marker it would rewrite the dataset and delete images
    spec["dataset"]["urls"]["uri"] = f"s3://{s3_bucket}/lists/b.jsonl"
    job_env(monkeypatch, spec, "uid-second", "second")
    result = collect("--spec", "env:KUBETUNE_SPEC")
    assert result.code == layout.EXIT_STORAGE_OWNED
    assert f"storage.uri s3://{s3_bucket}/job belongs to FineTuneJob team-a/first (uid uid-first)" in result.stderr
    assert {key: prefix.read_bytes(key) for key in prefix.list()} == before
