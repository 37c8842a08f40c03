"""A resume compares the checkpoint's recorded settings with the run's own: another method or
global batch or optimizer is refused naming them (old -> new), unless --resume_mismatch restart; a trainer of a
second FineTuneJob refuses a storage prefix the first one owns and writes nothing there."""

from __future__ import annotations

import json
from pathlib import Path

from trainer_testkit import core_flags, train

from kubetune.api import layout
from kubetune.storage import Store


def error_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "error:" in line)


def test_a_resume_with_other_settings_is_refused_then_restarts_when_asked(
    tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    first = train(core_flags(tiny_model, shapes_dataset, output, max_train_steps=2, checkpointing_steps=2))
    assert first.returncode == 0, first.stderr[-3000:]
    old = json.loads((output / "checkpoint-2" / "manifest.json").read_text())
    assert old["globalBatchSize"] == 4 and old["model"] == str(tiny_model) and old["resolution"] == 32
    assert old["optimizer"] == "adamw"

    other = core_flags(
        tiny_model,
        shapes_dataset,
        output,
        max_train_steps=3,
        checkpointing_steps=3,
        gradient_accumulation_steps=1,
        method="lora",
        optimizer="adafactor",
        resume_from_checkpoint="latest",
    )
    refused = train(other)
    assert refused.returncode == layout.EXIT_INVALID
    line = error_line(refused.stderr)
    assert "checkpoint-2" in line and "method full -> lora" in line and "global batch size 4 -> 2" in line
    assert "optimizer adamw -> adafactor" in line  # AdamW's moments cannot seed Adafactor
    assert "--resume_mismatch restart" in line
    assert json.loads((output / "checkpoint-2" / "manifest.json").read_text()) == old  # untouched

    restarted = train([*other, "--resume_mismatch", "restart"])
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "starting from step 0" in restarted.stderr
    new = json.loads((output / "checkpoint-3" / "manifest.json").read_text())
    assert new["step"] == 3 and new["method"] == "lora" and new["globalBatchSize"] == 2
    assert not (output / "checkpoint-2").exists(), "the earlier run's checkpoint goes once a new one is complete"


def test_a_second_jobs_trainer_refuses_an_owned_prefix_and_writes_nothing(
    tiny_model: Path, shapes_dataset: Path, s3_bucket: str, tmp_path: Path
) -> None:
    prefix = Store(f"s3://{s3_bucket}/job")
    marker = b'{"namespace": "team-a", "name": "first", "uid": "uid-first"}\n'
    prefix.write_bytes("owner.json", marker)
    prefix.write_bytes("checkpoint-8/manifest.json", b"{}")
    before = sorted(prefix.list())
    owner_env = {
        layout.OWNER_UID_ENV: "uid-second",
        layout.OWNER_NAMESPACE_ENV: "team-a",
        layout.OWNER_NAME_ENV: "second",
    }
    flags = core_flags(tiny_model, shapes_dataset, prefix.uri, resume_from_checkpoint="latest")
    result = train(flags, **owner_env)
    assert result.returncode == layout.EXIT_STORAGE_OWNED, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert f"storage.uri {prefix.uri} belongs to FineTuneJob team-a/first (uid uid-first)" in line
    assert sorted(prefix.list()) == before and prefix.read_bytes("owner.json") == marker
