"""Aspect-ratio buckets: which buckets exist and where an image goes (pure functions), the order
of samples (one bucket per global batch, every image every epoch), and training on mixed-aspect
data with the tiny SD and SDXL pipelines: several buckets in the cache, exact resume, two
processes at the same global batch agreeing with one, and SDXL conditioned on each image's true
size, crop and bucket."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
from trainer_testkit import (
    core_flags,
    max_difference,
    relative_update_difference,
    resume_in_a_new_output,
    train,
    train_on_two_processes,
    unet_weights,
)

from kubetune.trainer.buckets import BucketOrder, BucketSettings, StreamOrder, bucket_for, bucket_sizes

# -- which buckets, which bucket ---------------------------------------------------------------


def test_buckets_have_sides_of_the_step_and_about_the_target_area() -> None:
    sizes = bucket_sizes(BucketSettings(1024))
    assert (1024, 1024) in sizes and (768, 1344) in sizes and (1344, 768) in sizes  # SDXL's usual buckets
    for height, width in sizes:
        assert height % 64 == 0 and width % 64 == 0
        assert min(height, width) >= 512 and max(height, width) <= 2048
        assert 0.75 * 1024**2 <= height * width <= 1024**2
    narrow = bucket_sizes(BucketSettings(512, step=32, min_side=384, max_side=640))
    assert all(384 <= side <= 640 and side % 32 == 0 for size in narrow for side in size)


def test_an_image_goes_to_the_bucket_nearest_its_aspect_ratio() -> None:
    sizes = bucket_sizes(BucketSettings(1024))
    assert bucket_for(3000, 3000, sizes) == (1024, 1024)
    assert bucket_for(1080, 1920, sizes) == (768, 1344)  # 16:9 landscape
    assert bucket_for(1920, 1080, sizes) == (1344, 768)
    assert bucket_for(100, 4000, sizes) == min(sizes, key=lambda s: s[0] / s[1])  # the widest there is


def test_an_image_is_resized_to_cover_its_bucket_and_cropped_to_it() -> None:
    import random

    from PIL import Image

    from kubetune.trainer.data import transform_and_crop

    image = Image.new("RGB", (1920, 1080))
    array, (top, left, left_flipped) = transform_and_crop(image, (768, 1344), True, "bilinear", random.Random(0))
    assert array.shape == (3, 768, 1344)
    # 1920x1080 covers 1344x768 at 1365x768: a centred crop 10 px in from the left
    assert (top, left, left_flipped) == (0, 10, 11)
    square, crop = transform_and_crop(image, 512, True, "bilinear", random.Random(0))
    assert square.shape == (3, 512, 512) and crop == (0, 199, 199)  # without buckets: as before


def test_each_global_batch_holds_one_bucket_and_every_image_is_trained_every_epoch() -> None:
    buckets = [0] * 5 + [1] * 2 + [2] * 9
    order = BucketOrder(seed=3, buckets=buckets, global_batch=4)
    assert order.steps_per_epoch == math.ceil(5 / 4) + math.ceil(2 / 4) + math.ceil(9 / 4)
    for epoch in range(3):
        start = order.epoch_start(epoch)
        trained = [order.index(p) for p in range(start, start + order.steps_per_epoch * 4)]
        groups = [trained[i : i + 4] for i in range(0, len(trained), 4)]
        assert all(len({buckets[i] for i in group}) == 1 for group in groups)
        assert set(trained) == set(range(len(buckets))), "no image is left out of an epoch"
        assert order.epoch(start) == epoch
    again = BucketOrder(seed=3, buckets=buckets, global_batch=4)
    assert [again.index(p) for p in range(200)] == [order.index(p) for p in range(200)], "a pure function"
    other_epoch = [order.index(p) for p in range(order.epoch_start(1), order.epoch_start(2))]
    assert other_epoch != [order.index(p) for p in range(order.epoch_start(1))], "reshuffled each epoch"


def test_without_buckets_the_order_is_the_one_shuffled_stream() -> None:
    import numpy as np

    order = StreamOrder(seed=7, count=10, global_batch=4)
    assert order.steps_per_epoch == 3
    assert [order.index(p) for p in range(10, 20)] == np.random.default_rng([7, 1]).permutation(10).tolist()


# -- training on mixed-aspect data -------------------------------------------------------------

SHAPES = [((64, 32), "wide"), ((32, 64), "tall"), ((48, 48), "square"), ((96, 32), "panorama")]
"""(width, height) of the test images. With resolution 32 and 8 px steps they go to the buckets
24x40, 40x24, 32x32 and 16x48 (height x width)."""
BUCKETS = {"wide": [24, 40], "tall": [40, 24], "square": [32, 32], "panorama": [16, 48]}


@pytest.fixture(scope="module")
def mixed_aspect_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight captioned images, two of each shape, with gradients so that crops differ."""
    import numpy as np
    from PIL import Image

    train_dir = tmp_path_factory.mktemp("mixed") / "train"
    train_dir.mkdir()
    rows = []
    for i, ((width, height), name) in enumerate(SHAPES * 2):
        ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
        Image.fromarray(ramp if i < 4 else 255 - ramp).save(train_dir / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {name} picture {i % 4}"})
    (train_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train_dir.parent


def bucket_flags(model: Path, data: Path, output: Path, **overrides: object) -> list[str]:
    flags = {
        "enable_bucket": True,
        "bucket_reso_steps": 8,
        "center_crop": False,
        "max_train_steps": 6,
        "checkpointing_steps": 3,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "use_ema": False,
        "latent_cache_dir": output.parent.parent / "bucket-cache",
        **overrides,
    }
    return core_flags(model, data, output, **flags)


@pytest.fixture(scope="module")
def bucketed_run(tiny_model: Path, mixed_aspect_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("bucketed") / "out"
    result = train(bucket_flags(tiny_model, mixed_aspect_data, output, validation_prompts="a wide picture"))
    assert result.returncode == 0, result.stderr[-4000:]
    (output / "stderr.log").write_text(result.stderr)
    return output


def cached_latents(run: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    cache = next(p for p in (run.parent.parent / "bucket-cache").iterdir() if (p / "manifest.json").exists())
    return {
        "manifest": json.loads((cache / "manifest.json").read_text()),
        **load_file(cache / "latents-00000.safetensors"),
    }


def test_mixed_aspect_data_is_cached_and_trained_in_several_buckets(bucketed_run: Path, tiny_model: Path) -> None:
    from diffusers import StableDiffusionPipeline

    cached = cached_latents(bucketed_run)
    sizes = [list(s) for s in cached["manifest"]["bucketSizes"]]  # type: ignore[index]
    assigned = [sizes[b] for b in cached["bucket"].tolist()]  # type: ignore[attr-defined]
    assert assigned == [BUCKETS[name] for _, name in SHAPES * 2]
    for bucket, (height, width) in enumerate(sizes):
        if f"mean@{bucket}" in cached:  # the tiny VAE halves each side
            assert tuple(cached[f"mean@{bucket}"].shape[-2:]) == (height // 2, width // 2)  # type: ignore[attr-defined]
    assert sum(f"mean@{b}" in cached for b in range(len(sizes))) == 4
    assert "aspect-ratio buckets" in (bucketed_run / "stderr.log").read_text()
    pipeline = StableDiffusionPipeline.from_pretrained(bucketed_run, safety_checker=None)
    image = pipeline("a wide picture", num_inference_steps=2, height=24, width=40, output_type="np").images[0]
    assert image.shape == (24, 40, 3)
    assert list((bucketed_run / "samples").rglob("*.png")), "validation samples rendered"


def test_bucketed_training_resumes_exactly(
    bucketed_run: Path, tiny_model: Path, mixed_aspect_data: Path, tmp_path: Path
) -> None:
    flags = functools.partial(bucket_flags, tiny_model, mixed_aspect_data, resume_from_checkpoint="latest")
    output, _ = resume_in_a_new_output(bucketed_run, "checkpoint-3", tmp_path, flags)
    assert max_difference(unet_weights(output), unet_weights(bucketed_run)) < 1e-6


def test_two_processes_agree_with_one_on_bucketed_data(
    bucketed_run: Path, tiny_model: Path, mixed_aspect_data: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    args = bucket_flags(tiny_model, mixed_aspect_data, output, train_batch_size=1)  # 2 x 1 = the run's 1 x 2
    assert train_on_two_processes(args, output / "checkpoint-6")["worldSize"] == 2
    assert relative_update_difference(output, bucketed_run, tiny_model) < 0.01


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune.dev.testing.tiny_sdxl import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


def test_sdxl_is_conditioned_on_each_images_true_size_crop_and_bucket(
    tiny_sdxl: Path, mixed_aspect_data: Path, tmp_path: Path
) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from kubetune.trainer.families.sdxl import StableDiffusionXL

    output = tmp_path / "sdxl" / "out"
    result = train(bucket_flags(tiny_sdxl, mixed_aspect_data, output, max_train_steps=2, checkpointing_steps=2))
    assert result.returncode == 0, result.stderr[-4000:]
    cached = cached_latents(output)
    assert cached["original_size"].tolist()[:4] == [[32, 64], [64, 32], [48, 48], [32, 96]]  # type: ignore[attr-defined]
    # the panorama (96x32) covers its 48x16 bucket at 48x16: no crop; the wide one 64x32 covers
    # 40x24 at 48x24, cropped somewhere in 8 px of width
    top, left = cached["crop_top_left"].tolist()[0]  # type: ignore[attr-defined]
    assert top == 0 and 0 <= left <= 8 and cached["crop_top_left"].tolist()[3] == [0, 0]  # type: ignore[attr-defined]
    batch = {
        "text.states": torch.zeros(1, 77, 64),
        "text.pooled": torch.zeros(1, 32),
        "original_size": torch.tensor([[32.0, 64.0]]),
        "crop_top_left": torch.tensor([[0.0, 5.0]]),
        "target_size": torch.tensor([[24.0, 40.0]]),
    }
    time_ids = StableDiffusionXL().condition(batch)["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[32, 64, 0, 5, 24, 40]]
    pipeline = StableDiffusionXLPipeline.from_pretrained(output)
    assert pipeline("a tall picture", num_inference_steps=2, height=40, width=24).images[0].size == (24, 40)
