"""What the operator reads from storage (a local folder here; S3 is the same Store), and its
Kubernetes client plumbing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.operator.kube import _at_most_every, latest_complete_checkpoint
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
    diffusers = tmp_path / "checkpoints" / "checkpoint-20"  # the stock script's naming, which the trainer resumes too
    diffusers.mkdir()
    (diffusers / "manifest.json").write_text("{}")
    assert latest_complete_checkpoint(store) == "checkpoint-20"


def test_token_refresh_runs_at_most_once_per_interval_though_the_loader_reinstalls_it() -> None:
    """The kubeconfig loader's hook re-reads the whole configuration (proxies from the
    environment included) on every request and installs itself again; the operator runs it at
    most every few seconds."""
    calls: list[int] = []

    class Configuration:
        refresh_api_key_hook: Any = None

    def loader_hook(configuration: Any) -> None:
        calls.append(1)
        configuration.refresh_api_key_hook = loader_hook  # as kube_config._set_config does

    configuration = Configuration()
    configuration.refresh_api_key_hook = _at_most_every(60.0, loader_hook)
    for _ in range(5):
        configuration.refresh_api_key_hook(configuration)
    assert calls == [1]
    assert configuration.refresh_api_key_hook is not loader_hook

    configuration.refresh_api_key_hook = _at_most_every(0.0, loader_hook)
    for _ in range(3):
        configuration.refresh_api_key_hook(configuration)
    assert len(calls) == 4
