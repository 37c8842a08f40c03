"""`--strategy fsdp` on a tiny FLUX.1 over gloo, with real processes: two sharded processes agree
with one unsharded process at the same global batch; each rank writes its own shards of the
checkpoint, which resumes to the uninterrupted run's weights (also on another world size: DCP
reshards); the published model is an ordinary FLUX folder that FluxPipeline loads; what cannot
run sharded is refused with one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from trainer_testkit import core_flags, launch, max_difference, relative_update_difference, train, unet_weights

from kubetune.api.layout import EXIT_INVALID
from kubetune.launch import accelerate_launch_command, free_port

T5_TOKENS = 16
SHARDS = "transformer_sharded"


def flags(model: Path, data: Path, output: Path, **overrides: object) -> list[str]:
    """4 steps at a global batch of 2, EMA, gradient checkpointing, a checkpoint every 2 steps."""
    settings = {
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "gradient_accumulation_steps": 1,
        "max_sequence_length": T5_TOKENS,
        "weighting_scheme": "logit_normal",
        "gradient_checkpointing": True,
        "latent_cache_dir": output.parent.parent / "flux-cache",
        **overrides,
    }
    return core_flags(model, data, output, **settings)


def launch_run(processes: int, args: list[str]) -> str:
    command = accelerate_launch_command(1, processes, 0, "127.0.0.1", free_port(), args, python=sys.executable)
    process = launch(command)
    log = process.communicate(timeout=300)[0]
    assert process.returncode == 0, log[-4000:]
    return log


@pytest.fixture(scope="module")
def one_process(tiny_flux: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("ddp") / "out"
    result = train(flags(tiny_flux, shapes_dataset, output, train_batch_size=2, strategy="ddp"))
    assert result.returncode == 0, result.stderr[-4000:]
    return output


@pytest.fixture(scope="module")
def sharded(tiny_flux: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("fsdp") / "out"
    settings = {"train_batch_size": 1, "strategy": "fsdp", "validation_prompts": "a red circle"}
    log = launch_run(2, flags(tiny_flux, shapes_dataset, output, num_validation_images=1, **settings))
    assert "--strategy fsdp:" in log and "sharded across 2 processes" in log
    # process 1 built the transformer on the meta device and got its shards from process 0
    assert "weights read by process 0 only" in log
    return output


def test_two_sharded_processes_agree_with_one_process(sharded: Path, one_process: Path, tiny_flux: Path) -> None:
    # 2 processes x batch 1, sharded = 1 process x batch 2, unsharded (the published weights are the EMA's)
    assert relative_update_difference(sharded, one_process, tiny_flux, "transformer") < 0.01


def test_validation_samples_are_rendered_from_the_gathered_shards(sharded: Path) -> None:
    # every 2 steps (at each checkpoint) of 4: the full model gathered on process 0, with its EMA weights
    samples = sharded / "samples"
    rendered = sorted(path.relative_to(samples).as_posix() for path in samples.rglob("00.png"))
    assert rendered == ["step-00000002/00.png", "step-00000004/00.png"]
    assert "![a red circle](samples/step-00000004/00.png)" in (sharded / "README.md").read_text()


def test_each_rank_writes_its_shards_and_the_manifest_lists_them(sharded: Path) -> None:
    checkpoint = sharded / "checkpoint-2"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["worldSize"] == 2 and manifest["ema"] is not None
    shards = {name for name in manifest["files"] if name.startswith(f"{SHARDS}/")}
    assert {f"{SHARDS}/__0_0.distcp", f"{SHARDS}/__1_0.distcp", f"{SHARDS}/.metadata"} <= shards
    assert not (checkpoint / "transformer").exists(), "no full copy of the weights in a sharded checkpoint"
    for name, entry in manifest["files"].items():
        assert (checkpoint / name).stat().st_size == entry["size"]


def test_the_published_model_is_a_flux_pipeline_that_generates(sharded: Path, tiny_flux: Path) -> None:
    import numpy as np
    import torch
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(sharded)
    base = FluxPipeline.from_pretrained(tiny_flux).transformer.state_dict()
    trained = pipeline.transformer.state_dict()
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)
    image = pipeline(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=T5_TOKENS,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32) and np.isfinite(np.asarray(image, dtype=np.float32)).all()


def resumed_output(sharded: Path, tmp_path: Path) -> Path:
    output = tmp_path / "out"
    output.mkdir()
    shutil.copytree(sharded / "checkpoint-2", output / "checkpoint-2")
    return output


def test_a_sharded_checkpoint_resumes_to_the_uninterrupted_runs_weights(
    sharded: Path, tiny_flux: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    output = resumed_output(sharded, tmp_path)
    args = flags(
        tiny_flux, shapes_dataset, output, train_batch_size=1, strategy="fsdp", resume_from_checkpoint="latest"
    )
    log = launch_run(2, args)
    assert "resuming from" in log
    assert max_difference(unet_weights(output, "transformer"), unet_weights(sharded, "transformer")) < 1e-6


def test_a_sharded_checkpoint_resumes_on_another_world_size(
    sharded: Path, tiny_flux: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    output = resumed_output(sharded, tmp_path)
    # one process at batch 2: the same global batch; DCP reshards the two ranks' shards into one
    result = train(
        flags(tiny_flux, shapes_dataset, output, train_batch_size=2, strategy="fsdp", resume_from_checkpoint="latest")
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert relative_update_difference(output, sharded, tiny_flux, "transformer") < 0.01


def test_a_sharded_checkpoint_is_not_resumed_unsharded(
    sharded: Path, tiny_flux: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    output = resumed_output(sharded, tmp_path)
    result = train(
        flags(tiny_flux, shapes_dataset, output, train_batch_size=2, strategy="ddp", resume_from_checkpoint="latest")
    )
    assert result.returncode == EXIT_INVALID
    assert "was written with --strategy fsdp" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"method": "lora"}, "--strategy fsdp: full fine-tunes only"),
        ({"mixed_precision": "fp16"}, "--mixed_precision fp16: not with --strategy fsdp"),
        ({"strategy": "ddp", "fsdp_cpu_offload": True}, "--fsdp_cpu_offload: needs --strategy fsdp"),
        ({"fsdp_cpu_offload": True}, "--fsdp_cpu_offload: needs GPUs"),
        (
            {"optimizer": "adafactor"},
            "--optimizer adafactor: not with --strategy fsdp",
        ),  # refused once the processes start
    ],
)
def test_what_cannot_run_sharded_is_refused_in_one_line(
    extra: dict[str, object], message: str, tiny_flux: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    result = train(flags(tiny_flux, shapes_dataset, tmp_path / "out", **{"strategy": "fsdp", **extra}))
    assert result.returncode == EXIT_INVALID
    assert message in result.stderr.splitlines()[-1]


def test_shards_another_node_stored_are_in_the_manifest_and_fetched_on_resume(s3_bucket: str, tmp_path: Path) -> None:
    from kubetune.api.contracts import CheckpointState, DataloaderPosition, RngState
    from kubetune.storage import Store
    from kubetune.trainer.checkpoint import Checkpointer, fetch, find_checkpoint, local_entries

    output = Store(f"s3://{s3_bucket}/run")
    checkpointer = Checkpointer(output, tmp_path / "node-0", keep=None)
    folder = checkpointer.folder(2)  # the main process's staging: ranks 0-7 and the metadata
    (folder / SHARDS).mkdir()
    for name, data in ((".metadata", b"plan"), ("__0_0.distcp", b"rank 0")):
        (folder / SHARDS / name).write_bytes(data)
    (folder / "optimizer.pt").write_bytes(b"schedule")
    # a process of the second node stores its own shard and hands over its manifest entry
    other = tmp_path / "node-1" / "checkpoint-2"
    (other / SHARDS).mkdir(parents=True)
    (other / SHARDS / "__8_0.distcp").write_bytes(b"rank 8")
    entries = local_entries(other, [other / SHARDS / "__8_0.distcp"])
    output.child("checkpoint-2").upload_file(other / SHARDS / "__8_0.distcp", f"{SHARDS}/__8_0.distcp")
    state = CheckpointState(
        step=2,
        samples_seen=4,
        epoch=0,
        seed=0,
        method="full",
        global_batch_size=2,
        world_size=16,
        cache_key="k",
        dataloader=DataloaderPosition(position=4, epoch=0, index_in_epoch=4, samples=8),
        rng=RngState(seed=0, scheme="test"),
    )
    checkpointer.commit(folder, state, entries)
    assert checkpointer.wait() == "checkpoint-2"
    checkpointer.close()
    ref = find_checkpoint(output, "latest")
    assert ref is not None and ref.manifest is not None
    assert {f"{SHARDS}/.metadata", f"{SHARDS}/__0_0.distcp", f"{SHARDS}/__8_0.distcp"} <= set(ref.manifest.files)
    local = fetch(ref, tmp_path / "resuming-node")  # a node resuming gets (and verifies) every shard
    assert (local / SHARDS / "__8_0.distcp").read_bytes() == b"rank 8"


@pytest.mark.parametrize(
    ("strategy", "params", "world", "gpu", "picked"),
    [
        ("auto", 11_900_000_000, 16, 80 * 2**30, "fsdp"),  # FLUX.1's transformer: ~190 GB on 80 GB GPUs
        ("auto", 2_570_000_000, 8, 80 * 2**30, "ddp"),  # SDXL's UNet: ~41 GB
        ("auto", 2_570_000_000, 8, 24 * 2**30, "fsdp"),  # ... on 24 GB GPUs
        ("auto", 11_900_000_000, 1, 80 * 2**30, "ddp"),  # one process: nothing to shard across
        ("auto", 11_900_000_000, 16, None, "ddp"),  # CPU processes
        ("fsdp", 1000, 2, None, "fsdp"),
        ("ddp", 11_900_000_000, 16, 80 * 2**30, "ddp"),
    ],
)
def test_auto_shards_when_the_adamw_training_state_does_not_fit_one_gpu(
    strategy: str, params: int, world: int, gpu: int | None, picked: str
) -> None:
    from kubetune.trainer.sharding import choose

    assert choose(strategy, params, world, gpu) == picked


def launch_nodes(args: list[str], work: Path) -> list[str]:
    """Two "nodes" of one process each on this machine, each with its own staging folder (as two
    pods have), over one rendezvous."""
    port = free_port()
    nodes = [
        launch(
            accelerate_launch_command(2, 0, rank, "127.0.0.1", port, args, python=sys.executable),
            KUBETUNE_WORK_DIR=str(work / f"node-{rank}"),
        )
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return logs


def test_two_nodes_store_their_own_shards_in_s3_and_resume_from_them(
    sharded: Path, tiny_flux: Path, shapes_dataset: Path, s3_bucket: str, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from kubetune.storage import Store

    uri = f"s3://{s3_bucket}/run"
    args = flags(tiny_flux, shapes_dataset, tmp_path / "x" / "out", train_batch_size=1, strategy="fsdp", output_dir=uri)
    launch_nodes([*args, "--max_train_steps", "2"], tmp_path / "first")
    output = Store(uri)
    manifest = json.loads(output.read_bytes("checkpoint-2/manifest.json"))
    assert {f"{SHARDS}/__0_0.distcp", f"{SHARDS}/__1_0.distcp", f"{SHARDS}/.metadata"} <= set(manifest["files"])
    # the second node uploaded its shard itself and kept no copy; the main node never had it
    assert not list((tmp_path / "first" / "node-1").rglob("*.distcp"))
    assert not list((tmp_path / "first" / "node-0").rglob("__1_0.distcp"))

    logs = launch_nodes([*args, "--resume_from_checkpoint", "latest"], tmp_path / "second")
    assert "resuming from" in logs[0]
    published = tmp_path / "published.safetensors"
    output.download_file("transformer/diffusion_pytorch_model.safetensors", published)
    assert max_difference(load_file(published), unet_weights(sharded, "transformer")) < 1e-6
