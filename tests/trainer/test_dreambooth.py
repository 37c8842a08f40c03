"""DreamBooth (kubetune.trainer.dreambooth): train_dreambooth.py's flags, flag for flag; exactly
the missing class images are generated, split over the ranks; the prior-preservation loss; LoRA
and full fine-tunes of the tiny SD pipeline that load and generate, and a LoRA smoke of every
other family."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from trainer_testkit import core_flags, relative_lora_difference, train, train_on_two_processes

from kubetune.cli_util import OneLineError
from kubetune.storage import Store
from kubetune.trainer import dreambooth
from kubetune.trainer.config import parse_config
from kubetune.trainer.options import UNSUPPORTED

# Every option of the parser of diffusers' examples/dreambooth/train_dreambooth.py (its `--help`,
# read from the diffusers repository), with a value for those that take one.
TRAIN_DREAMBOOTH_FLAGS: list[tuple[str, str | None]] = [
    ("--pretrained_model_name_or_path", "org/model"),
    ("--revision", "main"),
    ("--variant", "fp16"),
    ("--tokenizer_name", "org/tokenizer"),
    ("--instance_data_dir", "./dog"),
    ("--class_data_dir", "./class"),
    ("--instance_prompt", "a photo of sks dog"),
    ("--class_prompt", "a photo of dog"),
    ("--with_prior_preservation", None),
    ("--prior_loss_weight", "0.5"),
    ("--num_class_images", "50"),
    ("--output_dir", "./out"),
    ("--seed", "3"),
    ("--resolution", "512"),
    ("--center_crop", None),
    ("--train_text_encoder", None),
    ("--train_batch_size", "1"),
    ("--sample_batch_size", "2"),
    ("--num_train_epochs", "1"),
    ("--max_train_steps", "400"),
    ("--checkpointing_steps", "100"),
    ("--checkpoints_total_limit", "2"),
    ("--resume_from_checkpoint", "latest"),
    ("--gradient_accumulation_steps", "1"),
    ("--gradient_checkpointing", None),
    ("--learning_rate", "5e-6"),
    ("--scale_lr", None),
    ("--lr_scheduler", "cosine_with_restarts"),
    ("--lr_warmup_steps", "0"),
    ("--lr_num_cycles", "3"),
    ("--lr_power", "2.0"),
    ("--use_8bit_adam", None),
    ("--dataloader_num_workers", "0"),
    ("--adam_beta1", "0.9"),
    ("--adam_beta2", "0.999"),
    ("--adam_weight_decay", "1e-2"),
    ("--adam_epsilon", "1e-08"),
    ("--max_grad_norm", "1.0"),
    ("--push_to_hub", None),
    ("--hub_token", "hf_x"),
    ("--hub_model_id", "org/dog"),
    ("--logging_dir", "logs"),
    ("--allow_tf32", None),
    ("--report_to", "tensorboard"),
    ("--validation_prompt", "a photo of sks dog in a bucket"),
    ("--num_validation_images", "4"),
    ("--validation_steps", "100"),
    ("--mixed_precision", "fp16"),
    ("--prior_generation_precision", "fp16"),
    ("--local_rank", "-1"),
    ("--enable_xformers_memory_efficient_attention", None),
    ("--set_grads_to_none", None),
    ("--offset_noise", None),
    ("--snr_gamma", "5.0"),
    ("--pre_compute_text_embeddings", None),
    ("--tokenizer_max_length", "77"),
    ("--text_encoder_use_attention_mask", None),
    ("--skip_save_text_encoder", None),
    ("--validation_images", "a.png"),
    ("--class_labels_conditioning", "timesteps"),
    ("--validation_scheduler", "DDPMScheduler"),
]


def _argv(flag: str, value: str | None) -> list[str]:
    return [flag] if value is None else [flag, value]


def test_every_train_dreambooth_flag_parses_or_is_refused_with_its_reason() -> None:
    refused = {name for name in UNSUPPORTED if f"--{name}" in dict(TRAIN_DREAMBOOTH_FLAGS)}
    assert refused == {
        "tokenizer_name",
        "tokenizer_max_length",
        "text_encoder_use_attention_mask",
        "validation_images",
        "class_labels_conditioning",
        "validation_scheduler",
    }
    accepted: list[str] = []
    for flag, value in TRAIN_DREAMBOOTH_FLAGS:
        if flag[2:] in refused:
            with pytest.raises(OneLineError) as error:
                parse_config([*_argv("--instance_data_dir", "d"), "--instance_prompt", "p", *_argv(flag, value)], "x")
            assert str(error.value) == f"{flag}: {UNSUPPORTED[flag[2:]]}"
        elif flag != "--use_8bit_adam":  # needs bitsandbytes: below
            accepted += _argv(flag, value)
    cfg = parse_config(accepted, "kubetune train")  # all at once, as one stock command line
    assert (cfg.instance_data_dir, cfg.instance_prompt) == ("./dog", "a photo of sks dog")
    assert (cfg.class_data_dir, cfg.class_prompt, cfg.with_prior_preservation) == ("./class", "a photo of dog", True)
    assert (cfg.prior_loss_weight, cfg.num_class_images, cfg.sample_batch_size) == (0.5, 50, 2)
    assert (cfg.lr_num_cycles, cfg.lr_power, cfg.prior_generation_precision) == (3, 2.0, "fp16")
    assert cfg.noise_offset == 0.1, "--offset_noise is train_dreambooth.py's offset of 0.1"
    assert cfg.validation_prompts == ["a photo of sks dog in a bucket"]
    assert cfg.train_text_encoder, "--train_text_encoder trains the text encoders (tests/trainer/test_text_encoder.py)"
    try:
        eight_bit = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]
        assert parse_config([*eight_bit, "--use_8bit_adam"], "x").optimizer == "adamw_8bit"
    except OneLineError as error:
        assert "bitsandbytes" in str(error)

    defaults = parse_config(
        ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"], "x"
    )
    assert (defaults.prior_loss_weight, defaults.num_class_images, defaults.sample_batch_size) == (1.0, 100, 4)
    assert not defaults.with_prior_preservation and defaults.class_data_dir is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--instance_data_dir", "d"], "--instance_data_dir: needs --instance_prompt"),
        (["--instance_data_dir", "d", "--instance_prompt", "p", "--with_prior_preservation"], "needs --class_prompt"),
        (
            ["--train_data_dir", "d", "--instance_prompt", "p", "--caption_model", "m/n"],
            "--caption_model: not with --instance_prompt",
        ),
        (
            [
                "--train_data_dir",
                "d",
                "--instance_prompt",
                "p",
                "--with_prior_preservation",
                "--class_prompt",
                "c",
                "--enable_bucket",
            ],
            "--enable_bucket: not with --with_prior_preservation",
        ),
        (["--instance_data_dir", "d", "--instance_prompt", "p", "--prior_loss_weight", "-1"], "--prior_loss_weight"),
        (["--instance_data_dir", "d", "--instance_prompt", "p", "--num_class_images", "0"], "--num_class_images"),
    ],
)
def test_bad_dreambooth_flags_are_refused_in_one_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises((OneLineError, SystemExit)) as error:
        parse_config(["--pretrained_model_name_or_path", "m", *flags], "kubetune train")
    text = str(error.value) if isinstance(error.value, OneLineError) else capsys.readouterr().err
    assert message in text and text.strip().count("\n") <= 1, text


# -- which class images are generated -----------------------------------------------------------


def test_only_the_missing_class_images_are_generated_at_the_lowest_free_indices() -> None:
    assert dreambooth.missing_class_indices(["dog1.jpg", "dog2.png"], 5) == [0, 1, 2]
    assert dreambooth.missing_class_indices(["dog1.jpg", "class-00001.png"], 5) == [0, 2, 3]
    assert dreambooth.missing_class_indices(["a.png"] * 5, 5) == []
    assert dreambooth.missing_class_indices(["a.png"] * 7, 5) == []


def test_the_ranks_shares_are_disjoint_and_together_all() -> None:
    missing = dreambooth.missing_class_indices([], 11)
    shares = [dreambooth.rank_share(missing, rank, 3) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == missing
    assert all(set(a).isdisjoint(b) for n, a in enumerate(shares) for b in shares[n + 1 :])
    assert dreambooth.rank_share(missing, 2, 3) == [2, 5, 8]


class PictureMaker:
    """A stand-in pipeline: one flat picture per prompt, its colour from the image's generator."""

    def __init__(self, calls: list[int]) -> None:
        self.calls = calls

    def __call__(self, prompt: list[str], generator: list[torch.Generator], height: int, width: int) -> Any:
        from PIL import Image

        self.calls.append(len(prompt))
        colours = [tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g)) for g in generator]
        return SimpleNamespace(images=[Image.new("RGB", (width, height), c) for c in colours])


def test_two_ranks_complete_the_class_images_without_duplicates_and_a_rerun_generates_none(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "dog1.jpg")
    Image.new("RGB", (8, 8), "blue").save(folder / "dog2.png")
    barrier = threading.Barrier(2)
    made: dict[int, int] = {}
    calls: list[int] = []

    def rank(number: int) -> None:
        made[number] = dreambooth.generate_class_images(
            Store(str(folder)), 5, "a dog", 2, lambda: PictureMaker(calls), number, 2, barrier.wait, 16
        )

    threads = [threading.Thread(target=rank, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert made == {0: 2, 1: 1}  # indices 0, 2 and 1
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["class-00000.png", "class-00001.png", "class-00002.png", "dog1.jpg", "dog2.png"]
    first = (folder / "class-00001.png").read_bytes()

    (folder / "class-00001.png").unlink()  # one lost: exactly it comes back, the same picture
    calls.clear()
    assert (
        dreambooth.generate_class_images(
            Store(str(folder)), 5, "a dog", 4, lambda: PictureMaker(calls), 0, 1, lambda: None, 16
        )
        == 1
    )
    assert (folder / "class-00001.png").read_bytes() == first and calls == [1]

    def no_pipeline() -> Any:
        raise AssertionError("nothing is missing: no pipeline is loaded")

    assert dreambooth.generate_class_images(Store(str(folder)), 5, "a dog", 4, no_pipeline, 0, 1, lambda: None, 16) == 0


# -- the loss ------------------------------------------------------------------------------------


def test_the_prior_loss_is_the_instance_loss_plus_the_weighted_class_loss() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0, 5.0])
    is_class = torch.tensor([False, False, True, True])
    assert float(dreambooth.prior_preservation_loss(losses, is_class, 0.5)) == pytest.approx(1.5 + 0.5 * 4.0)
    assert float(dreambooth.prior_preservation_loss(losses, is_class, 0.0)) == pytest.approx(1.5)


def test_each_batch_entry_pairs_an_instance_with_a_class_sample_cycling_the_smaller_set() -> None:
    from kubetune.trainer.train import _members, _stream_length

    cache = type("Cache", (), {"prior_start": 3, "__len__": lambda self: 8})()  # 3 instance, 5 class samples
    assert _stream_length(cache) == 5
    assert [_members(cache, entry) for entry in range(5)] == [[0, 3], [1, 4], [2, 5], [0, 6], [1, 7]]
    plain = type("Cache", (), {"prior_start": None, "__len__": lambda self: 8})()
    assert _stream_length(plain) == 8 and _members(plain, 6) == [6]


# -- end to end on tiny pipelines --------------------------------------------------------------------

INSTANCE_PROMPT = "a photo of sks shape"
CLASS_PROMPT = "a photo of a shape"


@pytest.fixture(scope="module")
def instance_images(shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain folder of the shapes' images: no metadata.jsonl."""
    folder = tmp_path_factory.mktemp("instance") / "dog"
    folder.mkdir()
    for image in sorted((shapes_dataset / "train").glob("*.jpg"))[:4]:
        shutil.copy(image, folder / image.name)
    return folder


def class_folder(root: Path, shapes_dataset: Path) -> Path:
    """Two class images of one's own, as a user brings them."""
    folder = root / "class"
    folder.mkdir(parents=True)
    for image in sorted((shapes_dataset / "train").glob("*.jpg"))[-2:]:
        shutil.copy(image, folder / f"mine-{image.name}")
    return folder


def dreambooth_flags(model: Path, data: Path | str, output: Path, **overrides: Any) -> list[str]:
    flags: dict[str, Any] = {
        "train_data_dir": None,
        "instance_data_dir": data,
        "instance_prompt": INSTANCE_PROMPT,
        "use_ema": False,
        "random_flip": False,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
        "gradient_accumulation_steps": 1,
        **overrides,
    }
    return core_flags(model, data, output, **flags)


PRIOR = {"with_prior_preservation": True, "class_prompt": CLASS_PROMPT, "sample_batch_size": 2}
LORA = {"method": "lora", "rank": 4}


@pytest.fixture(scope="module")
def sd_lora(
    tiny_model: Path, instance_images: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, str]:
    """A DreamBooth LoRA with prior preservation: 2 class images there, 5 wanted."""
    root = tmp_path_factory.mktemp("sd-lora")
    classes = class_folder(root, shapes_dataset)
    output = root / "out"
    flags = dreambooth_flags(
        tiny_model,
        instance_images,
        output,
        class_data_dir=classes,
        num_class_images=5,
        prior_loss_weight=0.5,
        **PRIOR,
        **LORA,
    )
    result = train(flags)
    assert result.returncode == 0, result.stderr[-4000:]
    return output, classes, result.stderr


def test_a_dreambooth_lora_with_prior_preservation_generates_the_missing_class_images_and_loads(
    sd_lora: tuple[Path, Path, str], tiny_model: Path
) -> None:
    import numpy as np
    from diffusers import StableDiffusionPipeline

    output, classes, log = sd_lora
    assert sorted(p.name for p in classes.iterdir()) == [
        "class-00000.png",
        "class-00001.png",
        "class-00002.png",
        *sorted(f"mine-{p.name[5:]}" for p in classes.iterdir() if p.name.startswith("mine-")),
    ]
    assert "generating 3 (of 5 wanted)" in log

    def render(pipeline: Any) -> Any:
        image = pipeline(
            INSTANCE_PROMPT, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)
        ).images[0]
        return np.asarray(image, dtype=np.float32)

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    before = render(pipeline)
    pipeline.load_lora_weights(output)
    assert abs(render(pipeline) - before).max() > 1e-4, "the adapter changes images"
    card = (output / "README.md").read_text()
    assert "## DreamBooth" in card and f"`{INSTANCE_PROMPT}`" in card and "- dreambooth" in card
    assert f"| class prompt | `{CLASS_PROMPT}` |" in card and "| class images | 5 (" in card
    assert "| prior loss weight | 0.5 |" in card


def test_a_rerun_reuses_the_class_images(
    sd_lora: tuple[Path, Path, str], tiny_model: Path, instance_images: Path, tmp_path: Path
) -> None:
    _, classes, _ = sd_lora
    before = {p.name: p.read_bytes() for p in classes.iterdir()}
    flags = dreambooth_flags(
        tiny_model,
        instance_images,
        tmp_path / "out",
        class_data_dir=classes,
        num_class_images=5,
        **PRIOR,
        **LORA,
        max_train_steps=1,
    )
    result = train(flags)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "generat" not in result.stderr and {p.name: p.read_bytes() for p in classes.iterdir()} == before


def test_a_full_dreambooth_fine_tune_of_an_imagefolder_trains_on_the_instance_prompt_alone(
    tiny_model: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    output = tmp_path / "out"
    cache = tmp_path / "cache"
    result = train(dreambooth_flags(tiny_model, shapes_dataset, output, max_train_steps=2, latent_cache_dir=cache))
    assert result.returncode == 0, result.stderr[-4000:]
    StableDiffusionPipeline.from_pretrained(output)(INSTANCE_PROMPT, num_inference_steps=2, height=32, width=32)
    (key,) = [p for p in cache.iterdir() if (p / "manifest.json").exists()]
    assert len(load_file(key / "text-00000.safetensors")["states"]) == 1, "the captions are replaced by one prompt"
    card = (output / "README.md").read_text()
    assert "## DreamBooth" in card and "Without prior preservation" in card


def test_a_full_dreambooth_fine_tune_with_prior_preservation_caches_the_class_images_as_their_own_set(
    tiny_model: Path, instance_images: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    output, cache, classes = tmp_path / "out", tmp_path / "cache", tmp_path / "class"
    flags = dreambooth_flags(
        tiny_model,
        instance_images,
        output,
        max_train_steps=2,
        latent_cache_dir=cache,
        class_data_dir=classes,
        num_class_images=2,
        **PRIOR,
    )
    result = train(flags)
    assert result.returncode == 0, result.stderr[-4000:]
    StableDiffusionPipeline.from_pretrained(output)(INSTANCE_PROMPT, num_inference_steps=2, height=32, width=32)
    sets = [p for p in cache.iterdir() if (p / "manifest.json").exists()]
    assert sorted(len(load_file(p / "latents-00000.safetensors")["mean"]) for p in sets) == [2, 4]  # class, instance
    assert "| class images | 2 (" in (output / "README.md").read_text()


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd3"])
def test_a_dreambooth_lora_with_prior_preservation_trains_every_family(
    family: str, request: pytest.FixtureRequest, instance_images: Path, tmp_path: Path
) -> None:
    model = request.getfixturevalue({"sdxl": "tiny_sdxl", "flux": "tiny_flux", "sd3": "tiny_sd3"}[family])
    extra = {"max_sequence_length": 16} if family != "sdxl" else {}
    flags = dreambooth_flags(
        model, instance_images, tmp_path / "out", num_class_images=2, max_train_steps=2, **PRIOR, **LORA, **extra
    )
    result = train(flags)
    assert result.returncode == 0, result.stderr[-4000:]
    classes = list((instance_images / ".kubetune" / "class-images").glob("*/class-*.png"))
    assert len(classes) >= 2 and (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert f"| model family | {family} (" in (tmp_path / "out" / "README.md").read_text()


def test_two_processes_generate_their_shares_and_train_as_one_does(
    sd_lora: tuple[Path, Path, str], tiny_model: Path, instance_images: Path, shapes_dataset: Path, tmp_path: Path
) -> None:
    classes = class_folder(tmp_path, shapes_dataset)
    output = tmp_path / "out"
    # 2 processes x batch 1 = sd_lora's 1 x 2: each process weighs its own pair, DDP averages them
    args = dreambooth_flags(
        tiny_model,
        instance_images,
        output,
        class_data_dir=classes,
        num_class_images=5,
        prior_loss_weight=0.5,
        train_batch_size=1,
        **PRIOR,
        **LORA,
    )
    assert train_on_two_processes(args, output / "checkpoint-4")["worldSize"] == 2
    assert sorted(p.name for p in classes.glob("class-*")) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert not [p for p in classes.iterdir() if p.name.startswith(".tmp-")]
    assert relative_lora_difference(output, sd_lora[0]) < 0.01


# -- the FineTuneJob's spec.training.dreambooth ------------------------------------------------------


def _spec_file(tmp_path: Path, dataset: dict[str, Any], training: dict[str, Any]) -> str:
    import json

    spec = {
        "dataset": dataset,
        "model": {"base": "org/m"},
        "training": training,
        "storage": {"uri": "s3://bucket/job/"},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_the_spec_maps_to_the_dreambooth_flags_and_the_dataset_is_the_instance_data(tmp_path: Path) -> None:
    block = {
        "instancePrompt": "a photo of sks dog",
        "classPrompt": "a photo of dog",
        "priorPreservation": True,
        "priorLossWeight": 0.7,
        "numClassImages": 12,
        "sampleBatchSize": 3,
    }
    collected = {"unsplash": {"prompts": ["a dog"], "accessKeySecretRef": {"name": "u", "key": "k"}}}
    cfg = parse_config(["--spec", _spec_file(tmp_path, collected, {"dreambooth": block})], "kubetune train")
    assert cfg.instance_data_dir == "s3://bucket/job/dataset"  # the collector's images are the subject
    assert (cfg.instance_prompt, cfg.class_prompt, cfg.with_prior_preservation) == (
        "a photo of sks dog",
        "a photo of dog",
        True,
    )
    assert (cfg.prior_loss_weight, cfg.num_class_images, cfg.sample_batch_size) == (0.7, 12, 3)
    assert cfg.class_data_dir is None  # generated beside the dataset, under .kubetune/class-images/

    folder = {"imagefolder": {"uri": "s3://bucket/dog/"}}
    cfg = parse_config(["--spec", _spec_file(tmp_path, folder, {"dreambooth": {"instancePrompt": "sks"}})], "x")
    assert (cfg.instance_data_dir, cfg.instance_prompt) == ("s3://bucket/dog/", "sks")
    assert not cfg.with_prior_preservation
    assert (cfg.prior_loss_weight, cfg.num_class_images, cfg.class_prompt) == (1.0, 100, None)

    plain = parse_config(["--spec", _spec_file(tmp_path, folder, {})], "x")
    assert (plain.instance_data_dir, plain.instance_prompt) == (None, None)


def test_class_images_of_s3_instance_data_are_kept_in_s3_and_reused_by_a_later_job(
    tiny_model: Path, instance_images: Path, s3_bucket: str, tmp_path: Path
) -> None:
    data = f"s3://{s3_bucket}/dog"
    Store(data).upload_tree(instance_images)
    Store(data).delete_prefix(".kubetune")  # the other tests' class images, if any
    runs = []
    for job in ("first", "later"):
        flags = dreambooth_flags(
            tiny_model, data, tmp_path / job, num_class_images=3, max_train_steps=1, **PRIOR, **LORA
        )
        result = train(flags)
        assert result.returncode == 0, result.stderr[-4000:]
        runs.append(result.stderr)
    generated = [k for k in Store(data).list(".kubetune/class-images") if k.endswith(".png")]
    assert [k.rsplit("/", 1)[-1] for k in sorted(generated)] == [
        "class-00000.png",
        "class-00001.png",
        "class-00002.png",
    ]
    assert "generating 3 (of 3 wanted)" in runs[0] and "generat" not in runs[1]
    assert "| class images | 3 (`s3://" in (tmp_path / "later" / "README.md").read_text()
