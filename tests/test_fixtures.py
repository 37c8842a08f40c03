"""The shape fixtures' sample scorer: `make demo` reports with it whether samples follow their
prompts, so it must pass every drawn shape and catch every wrong background, colour and shape."""

from __future__ import annotations

import itertools
import random

import pytest
from PIL import Image, ImageFilter

from kubetune.dev.testing.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    caption,
    draw,
    parse_caption,
    score_sample,
)

COMBOS = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS))


@pytest.mark.parametrize("size", [32, 64, 256])
def test_every_drawn_shape_follows_its_own_caption(size: int) -> None:
    rng = random.Random(size)
    for shape, colour, background in COMBOS:
        for _ in range(3):  # the drawing jitters place and size
            score = score_sample(draw(shape, colour, background, size, rng), caption(shape, colour, background))
            assert score.follows, score


def test_a_blurred_downscaled_shape_still_follows_its_caption() -> None:
    """Samples of a tiny model come out soft: a shape drawn large, shrunk to 32 px and blurred."""
    rng = random.Random(1)
    for shape, colour, background in COMBOS:
        image = draw(shape, colour, background, 128, rng).resize((32, 32), Image.BICUBIC)
        score = score_sample(image.filter(ImageFilter.GaussianBlur(1)), caption(shape, colour, background))
        assert score.follows, score


def test_each_wrong_part_of_a_prompt_is_caught_and_only_that_part() -> None:
    rng = random.Random(2)
    for shape, colour, background in COMBOS:
        image = draw(shape, colour, background, 64, rng)
        other_shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        score = score_sample(image, caption(other_shape, colour, background))
        assert (score.shape, score.colour, score.background) == (False, True, True), score
        for other_colour in set(COLOURS) - {colour}:
            score = score_sample(image, caption(shape, other_colour, background))
            assert (score.shape, score.colour, score.background) == (True, False, True), score
        other_background = next(b for b in BACKGROUNDS if b != background)
        score = score_sample(image, caption(shape, colour, other_background))
        assert (score.shape, score.colour, score.background) == (True, True, False), score
        assert not score.follows


def test_an_empty_or_noisy_image_shows_no_shape() -> None:
    blank = Image.new("RGB", (32, 32), BACKGROUNDS["black"])
    score = score_sample(blank, "a red circle on a black background")
    assert score.seen == ("none", "none", "black") and score.background and not score.colour and not score.follows
    noise = Image.effect_noise((32, 32), 100).convert("RGB")
    assert not score_sample(noise, "a red circle on a white background").follows


def test_a_prompt_outside_the_fixtures_is_refused_in_one_line() -> None:
    assert parse_caption("A Blue Triangle on a white background") == ("triangle", "blue", "white")
    with pytest.raises(ValueError, match="'a cat' does not name a shape, a colour and a background"):
        parse_caption("a cat")
