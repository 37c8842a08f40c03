"""What the operator reads from storage (a local folder here; S3 is the same Store)."""

from __future__ import annotations

from pathlib import Path

from kubetune.operator.kube import latest_complete_checkpoint
from kubetune.storage import Store


def test_the_latest_checkpoint_is_the_newest_one_with_its_manifest(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    assert latest_complete_checkpoint(store) == ""
    for step, complete in ((4, True), (12, True), (16, False)):  # step 16 was cut off mid-upload
        folder = tmp_path / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "trainable.safetensors").write_bytes(b"x")
        if complete:
            (folder / "manifest.json").write_text("{}")
    assert latest_complete_checkpoint(store) == "step-00000012"
