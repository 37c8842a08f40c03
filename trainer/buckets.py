"""Aspect-ratio buckets, and the order in which the cached samples are trained.

Without buckets every image is resized and cropped to a `resolution` square. With
`--enable_bucket` each image goes to the bucket (height x width, sides multiples of
`--bucket_reso_steps`, area at most `resolution`^2) whose aspect ratio is nearest its own, is
resized to cover it and cropped to it: a portrait keeps its head and its feet. A batch holds one
bucket (the UNet takes one latent shape per forward).

The order is a pure function of the seed and the number of samples already trained, so a resumed
run continues exactly where it stopped, and N processes at the same global batch train what one
process trains: with buckets one *global* batch (every process, every accumulated micro-batch)
comes from one bucket, and process `r`'s micro-batch `m` is its slice of that group, as without
buckets it is its slice of the stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class BucketSettings:
    """Which buckets exist: sides from `min_side` to `max_side` in steps of `step`, area at most
    `resolution`^2."""

    resolution: int
    step: int = 64
    min_side: int | None = None  # default: resolution / 2, rounded to `step`
    max_side: int | None = None  # default: resolution * 2

    def sides(self) -> tuple[int, int]:
        low = self.min_side or max(self.step, _round_down(self.resolution // 2, self.step))
        high = self.max_side or self.resolution * 2
        return low, _round_down(high, self.step)

    def as_dict(self) -> dict[str, int]:
        """The settings as the cache key records them (`from_dict` reads them back)."""
        low, high = self.sides()
        return {"step": self.step, "minSide": low, "maxSide": high}

    @classmethod
    def from_dict(cls, resolution: int, recorded: dict[str, int]) -> BucketSettings:
        return cls(resolution, recorded["step"], recorded["minSide"], recorded["maxSide"])


def _round_down(value: int, step: int) -> int:
    return max(step, value // step * step)


def bucket_sizes(settings: BucketSettings) -> list[tuple[int, int]]:
    """Every (height, width): both sides multiples of `step` within [min_side, max_side], the
    largest height for each width with height x width <= resolution^2, and each one turned on
    its side; the square always."""
    low, high = settings.sides()
    area, step = settings.resolution**2, settings.step
    square = _round_down(settings.resolution, step)
    sizes = {(square, square)}
    for width in range(_round_up(low, step), high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes |= {(height, width), (width, height)}  # landscape and portrait alike
    return sorted(sizes)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def bucket_for(height: int, width: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (compared as log ratios, so 1:2 and
    2:1 are as far from 1:1); of equally near ones, the largest."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda size: (round(abs(math.log(size[1] / size[0]) - ratio), 9), -size[0] * size[1]))


# ---------------------------------------------------------------------------------------------
# the order of samples


class StreamOrder:
    """Without buckets: one seeded permutation of the samples per epoch, read as one stream, so
    a global batch may span two epochs (as the stock script's sampler with drop_last=False does
    not, but over the run every sample is seen equally often)."""

    def __init__(self, seed: int, count: int, global_batch: int) -> None:
        self.seed, self.count = seed, count
        self.steps_per_epoch = math.ceil(count / global_batch)

    def index(self, position: int) -> int:
        """The sample trained at stream `position` (samples trained before it, all processes)."""
        return int(_permutation(self.seed, position // self.count, self.count)[position % self.count])

    def epoch(self, position: int) -> int:
        return position // self.count

    def epoch_start(self, epoch: int) -> int:
        """The stream position where `epoch` begins."""
        return epoch * self.count


class BucketOrder:
    """With buckets: each epoch, every bucket's samples in a seeded order, cut into groups of one
    global batch (the last group of a bucket filled up with its own first samples again, so no
    image is left out and every batch is full), and the groups shuffled."""

    def __init__(self, seed: int, buckets: Sequence[int], global_batch: int) -> None:
        self.seed, self.global_batch = seed, global_batch
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(buckets):
            members.setdefault(int(bucket), []).append(index)
        self.members = tuple(tuple(members[b]) for b in sorted(members))
        self.steps_per_epoch = sum(math.ceil(len(m) / global_batch) for m in self.members)

    def index(self, position: int) -> int:
        batch, slot = divmod(position, self.global_batch)
        epoch, group = divmod(batch, self.steps_per_epoch)
        return self._groups(epoch)[group][slot]

    def epoch(self, position: int) -> int:
        return position // self.global_batch // self.steps_per_epoch

    def epoch_start(self, epoch: int) -> int:
        return epoch * self.steps_per_epoch * self.global_batch

    def _groups(self, epoch: int) -> list[list[int]]:
        return _bucket_groups(self.seed, epoch, self.members, self.global_batch)


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


@lru_cache(maxsize=2)
def _bucket_groups(seed: int, epoch: int, members: tuple[tuple[int, ...], ...], global_batch: int) -> list[list[int]]:
    rng = np.random.default_rng([seed, epoch, 1])
    groups: list[list[int]] = []
    for bucket in members:
        order = [bucket[i] for i in rng.permutation(len(bucket))]
        filled = math.ceil(len(order) / global_batch) * global_batch
        order = [order[i % len(order)] for i in range(filled)]
        groups += [order[start : start + global_batch] for start in range(0, filled, global_batch)]
    return [groups[i] for i in rng.permutation(len(groups))]
