"""`--push_to_hub`: a tiny training run pushes the model, its card and the final samples to a
stand-in of the Hugging Face Hub's HTTP API (kubetune.dev.testing.hub) over real HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from trainer_testkit import core_flags, train, write_imagefolder

from kubetune.dev.testing.hub import Hub

pytestmark = pytest.mark.slow

WRITE_TOKEN = "hf_kubetuneWriteToken0123456789"
READ_TOKEN = "hf_kubetuneReadToken0123456789"


@pytest.fixture
def hub() -> Hub:
    with Hub({WRITE_TOKEN: ("alice", True), READ_TOKEN: ("alice", False)}) as stand_in:
        yield stand_in


def hub_env(hub: Hub, token: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.base, "HF_HUB_OFFLINE": "0", "HF_TOKEN": token, "KUBETUNE_HUB_RETRY_SECONDS": "0.01"}


def push_flags(model: Path, data: Path, output: Path, **extra: object) -> list[str]:
    """Two steps, a checkpoint at the last, no EMA, pushing to the Hub."""
    return core_flags(
        model, data, output, max_train_steps=2, checkpointing_steps=2, use_ema=False, push_to_hub=True, **extra
    )


def test_a_full_fine_tune_is_pushed_with_its_card_and_samples(tiny_model: Path, hub: Hub, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    model = Path(shutil.copytree(tiny_model, tmp_path / "base"))
    (model / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [tiny]\n---\n# a tiny base model\n")
    data = write_imagefolder(tmp_path / "dataset", 4)
    output = tmp_path / "out"
    flags = push_flags(
        model, data, output, validation_prompts="a red circle", hub_model_id="alice/tiny-sd", hub_private_repo=True
    )
    result = train(flags, **hub_env(hub, WRITE_TOKEN))
    assert result.returncode == 0, result.stderr[-3000:]
    assert WRITE_TOKEN not in result.stdout + result.stderr

    repo = hub.repos["alice/tiny-sd"]
    assert repo.private and len(repo.commits) == 1, "one commit, into a private repository"
    files = hub.files("alice/tiny-sd")
    assert "model_index.json" in files and "unet/diffusion_pytorch_model.safetensors" in files
    assert (
        files["unet/diffusion_pytorch_model.safetensors"]
        == (output / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert not [name for name in files if name.startswith(("checkpoint", "cache/", "logs/", "progress"))]
    assert files["samples/step-00000002/00.png"].startswith(b"\x89PNG")
    assert files["README.md"] == (output / "README.md").read_bytes(), "the card pushed is the one published"

    card = ModelCard(files["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["license"] == "creativeml-openrail-m", "the base model's license"
    assert "base_model" not in meta, "a local folder is no model id (the Hub would refuse the card)"
    assert meta["pipeline_tag"] == "text-to-image"
    assert meta["library_name"] == "diffusers" and {"stable-diffusion", "text-to-image", "kubetune"} <= set(
        meta["tags"]
    )
    assert meta["widget"] == [{"text": "a red circle", "output": {"url": "samples/step-00000002/00.png"}}]
    assert "datasets" not in meta, "a local imagefolder is no Hub dataset"
    assert "| resolution | 32 |" in card.text and "![a red circle](samples/step-00000002/00.png)" in card.text


def test_a_refused_token_fails_in_one_line_and_keeps_the_published_model(
    tiny_model: Path, hub: Hub, tmp_path: Path
) -> None:
    data = write_imagefolder(tmp_path / "dataset", 4)
    output = tmp_path / "out"
    flags = push_flags(
        tiny_model,
        data,
        output,
        method="lora",
        hub_model_id="alice/tiny-lora",
        hub_revision="experiment",
    )
    refused = train(flags, **hub_env(hub, READ_TOKEN))
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("kubetune train: error: --hub_model_id (spec.output.hub): the Hub refused the token")
    assert "HTTP 403" in last
    assert READ_TOKEN not in refused.stdout + refused.stderr
    assert (output / "pytorch_lora_weights.safetensors").is_file(), "the published LoRA stays"
    assert not hub.repos

    # the token as a flag: a warning, and the push to a new branch goes through
    flags += ["--hub_token", WRITE_TOKEN]
    pushed = train(flags, **hub_env(hub, "hf_unknown"))
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert "--hub_token shows in process listings" in pushed.stderr
    assert WRITE_TOKEN not in pushed.stdout + pushed.stderr
    files = hub.files("alice/tiny-lora", "experiment")
    assert "pytorch_lora_weights.safetensors" in files and "README.md" in files
    assert not hub.files("alice/tiny-lora", "main"), "main untouched"


def test_push_flags_are_checked_before_training(tmp_path: Path) -> None:
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", str(tmp_path)]
    result = train([*base, "--push_to_hub"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "kubetune train: error: --push_to_hub: needs --hub_model_id ORG/NAME (spec.output.hub.repo)"
    )
    result = train([*base, "--push_to_hub", "--hub_model_id", "not a repo"])
    assert result.returncode == 2 and "--hub_model_id: a Hub repository id namespace/name" in result.stderr


def test_a_spec_job_on_s3_pushes_with_the_operator_token_variable(
    tiny_model: Path, hub: Hub, s3_bucket: str, tmp_path: Path
) -> None:
    """What the operator's trainer pod runs: `--spec` with spec.output.hub, the model in S3 (published
    through a local staging folder), and the token in KUBETUNE_HUB_TOKEN beside a read-only HF_TOKEN."""
    import yaml

    from kubetune.dev.testing.specs import tiny_training
    from kubetune.storage import Store

    storage = f"s3://{s3_bucket}/jobs/pushed"
    Store(storage).upload_tree(write_imagefolder(tmp_path / "dataset", 4), "dataset")
    spec = {
        "dataset": {"imagefolder": {"uri": f"{storage}/dataset"}},
        "model": {"base": str(tiny_model)},
        "training": tiny_training(maxTrainSteps=2, method="lora", validationPrompts=["a blue square"]),
        "storage": {"uri": storage + "/"},
        "output": {"hub": {"repo": "alice/from-spec", "tokenSecretRef": {"name": "hf", "key": "token"}}},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "spec": spec}))
    result = train(
        ["--spec", str(job), "--report_to", "none"],
        **hub_env(hub, READ_TOKEN),
        KUBETUNE_HUB_TOKEN=WRITE_TOKEN,
        KUBETUNE_WORK_DIR=str(tmp_path / "pod"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert WRITE_TOKEN not in result.stdout + result.stderr
    files = hub.files("alice/from-spec")
    assert files["pytorch_lora_weights.safetensors"] == Store(storage).read_bytes("pytorch_lora_weights.safetensors")
    assert files["README.md"] == Store(storage).read_bytes("README.md")
    assert sorted(name for name in files if name.startswith("samples/")) == [
        f"samples/step-00000002/{i:02d}.png" for i in range(4)
    ], "the LoRA default: 4 images per prompt"


def test_transient_failures_are_retried_and_then_reported_without_the_token(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.trainer import hub as push

    monkeypatch.setenv("HF_ENDPOINT", hub.base)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("KUBETUNE_HUB_RETRY_SECONDS", "0.01")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.base)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    files = [push.HubFile("README.md", b"---\nlicense: mit\n---\n"), push.HubFile("a.bin", b"\0" * 10)]

    hub.failures = [503, 502]
    url = push.push("alice/retried", files, token=WRITE_TOKEN)
    assert url.startswith(f"{hub.base}/alice/retried/commit/") and len(hub.repos["alice/retried"].commits) == 1

    hub.failures = [500] * push.ATTEMPTS
    with pytest.raises(push.HubError) as failed:
        push.push("alice/retried", files, token=WRITE_TOKEN)
    assert not failed.value.permanent and str(failed.value) == (
        "--hub_model_id (spec.output.hub): pushing to alice/retried failed: HTTP 500"
    )
    with pytest.raises(push.HubError) as refused:
        push.push("bob/theirs", files, token=WRITE_TOKEN)
    assert refused.value.permanent and "HTTP 403" in str(refused.value) and WRITE_TOKEN not in str(refused.value)


def test_a_push_that_keeps_failing_exits_1_and_the_retry_pushes(tiny_model: Path, hub: Hub, tmp_path: Path) -> None:
    """The operator's retry of a failed attempt: it resumes at the last checkpoint (the last step),
    publishes again, renders the samples again and pushes."""
    data = write_imagefolder(tmp_path / "dataset", 4)
    output = tmp_path / "out"
    flags = push_flags(
        tiny_model,
        data,
        output,
        validation_prompts="a red circle",
        hub_model_id="alice/flaky",
        resume_from_checkpoint="latest",
    )
    hub.failures = [503] * 4
    failed = train(flags, **hub_env(hub, WRITE_TOKEN))
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1] == (
        "kubetune train: error: --hub_model_id (spec.output.hub): pushing to alice/flaky failed: HTTP 503"
    )
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file(), "the published model stays"

    retried = train(flags, **hub_env(hub, WRITE_TOKEN))
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert "resuming from" in retried.stderr
    files = hub.files("alice/flaky")
    assert "unet/diffusion_pytorch_model.safetensors" in files and "samples/step-00000002/00.png" in files


def test_checkpoints_are_pushed_as_they_are_stored_keeping_the_limit(
    tiny_model: Path, hub: Hub, tmp_path: Path
) -> None:
    """`--hub_push_checkpoints`: each stored checkpoint's weights go to `checkpoint-N/` (not the
    optimizer state); the folders beyond --checkpoints_total_limit are deleted, never a folder
    kubetune did not name; a checkpoint push that keeps failing is a warning and training goes on."""
    from huggingface_hub import HfApi

    data = write_imagefolder(tmp_path / "dataset", 4)
    output = tmp_path / "out"
    HfApi(endpoint=hub.base, token=WRITE_TOKEN).create_repo("alice/ckpt")
    hub.repos["alice/ckpt"].branches["main"]["step-1/notes.txt"] = b"the user's own folder"
    hub.failures = [500] * 4  # every attempt of the first commit: checkpoint-2's
    flags = core_flags(
        tiny_model,
        data,
        output,
        max_train_steps=8,
        checkpointing_steps=2,
        checkpoints_total_limit=2,
        push_to_hub=True,
        hub_push_checkpoints=True,
        hub_model_id="alice/ckpt",
    )
    result = train(flags, **hub_env(hub, WRITE_TOKEN))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "checkpoint checkpoint-2: not pushed to the Hub: --hub_model_id (spec.output.hub): pushing to alice/ckpt "
        "failed: HTTP 500" in result.stderr
    )
    assert WRITE_TOKEN not in result.stdout + result.stderr

    files = hub.files("alice/ckpt")
    pushed = sorted(name for name in files if name.startswith("checkpoint-"))
    weights = "diffusion_pytorch_model.safetensors"
    assert pushed == [
        f"checkpoint-{step}/{part}"
        for step in (6, 8)
        for part in ("unet/config.json", f"unet/{weights}", "unet_ema/config.json", f"unet_ema/{weights}")
    ], "the newest two, weights and configs only"
    assert files[f"checkpoint-8/unet/{weights}"] == (output / f"checkpoint-8/unet/{weights}").read_bytes()
    assert files["step-1/notes.txt"] == b"the user's own folder"
    assert "model_index.json" in files and "README.md" in files, "the final push as well"
    assert len(hub.repos["alice/ckpt"].commits) == 4, "checkpoint-4, -6, -8 (deleting checkpoint-4), the model"


def test_checkpoint_weights_are_what_loads_without_the_run(tmp_path: Path) -> None:
    from kubetune.trainer.hub import checkpoint_weights, checkpoints_beyond

    for name in ("pytorch_lora_weights.safetensors", "optimizer.pt", "manifest.json", "unet_sharded/__0_0.distcp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert checkpoint_weights(tmp_path) == ["pytorch_lora_weights.safetensors"]
    stale = checkpoints_beyond(2, "checkpoint-30")
    assert stale(["checkpoint-10", "checkpoint-20", "checkpoint-5", "samples", "step-1"]) == [
        "checkpoint-10",
        "checkpoint-5",
    ]
    assert checkpoints_beyond(None, "checkpoint-30")(["checkpoint-10"]) == []
