"""Decoding budgets: the pixels all workers decode at once are bounded by the pod's memory."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from kubetune.collector import images
from kubetune.collector.errors import Skip
from kubetune.collector.images import (
    ImageSettings,
    PixelBudget,
    budget_for,
    clean,
    decode_cost,
    memory_limit,
)

SETTINGS = ImageSettings(size=64, min_size=32)


def png(width: int, height: int, mode: str = "RGBA") -> bytes:
    out = io.BytesIO()
    color = (10, 20, 30, 128) if mode == "RGBA" else (10, 20, 30)
    Image.new(mode, (width, height), color).save(out, format="PNG")
    return out.getvalue()


def test_an_image_costing_more_than_the_whole_budget_is_a_counted_skip() -> None:
    data = png(2000, 2000)  # a few KB on the wire, ~64 MB to decode and clean
    budget = PixelBudget(32 << 20)
    with pytest.raises(Skip) as caught:
        clean(data, SETTINGS, budget=budget)
    assert caught.value.reason == "too-many-pixels"
    assert budget.used == 0 and budget.peak == 0  # refused before decoding


def test_decodes_in_flight_stay_within_the_budget() -> None:
    data = png(1000, 1000)
    with Image.open(io.BytesIO(data)) as image:
        cost = decode_cost(image)
    budget = PixelBudget(int(cost * 2.5))  # room for two at a time, not three
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: clean(data, SETTINGS, budget=budget), range(16)))
    assert len(results) == 16 and all(r.width == 64 for r in results)
    assert budget.peak <= budget.capacity and budget.used == 0
    assert budget.peak >= cost


def test_the_budget_is_released_when_decoding_fails() -> None:
    data = png(500, 500)[:2000]  # truncated
    budget = PixelBudget(64 << 20)
    with pytest.raises(Skip, match="corrupt"):
        clean(data, SETTINGS, budget=budget)
    assert budget.used == 0


def test_a_jpeg_is_costed_after_its_draft_reduction() -> None:
    out = io.BytesIO()
    Image.new("RGB", (4000, 4000), (1, 2, 3)).save(out, format="JPEG")
    with Image.open(io.BytesIO(out.getvalue())) as image:
        full = decode_cost(image)
        image.draft("RGB", (64, 64))
        assert decode_cost(image) * 60 < full
    # 4000 x 4000 costs ~256 MB at full size, but drafted to 1/8 it fits a 16 MiB budget
    assert clean(out.getvalue(), SETTINGS, budget=PixelBudget(16 << 20)).width == 64


def test_the_default_budget_is_half_the_cgroup_memory_limit(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("4294967296\n")
    assert memory_limit((v2, v1)) == 4 << 30 and budget_for(4 << 30) == 2 << 30
    v2.write_text("max\n")
    assert memory_limit((v2, v1)) is None and budget_for(None) == images.UNLIMITED_BUDGET
    v2.unlink()
    v1.write_text(str(1 << 62))  # cgroup v1: no limit
    assert memory_limit((v2, v1)) is None
    v1.write_text(str(512 << 20))
    assert memory_limit((v2, v1)) == 512 << 20 and budget_for(512 << 20) == 256 << 20
    assert budget_for(100 << 20) == images.MIN_BUDGET


def test_a_waiting_decode_proceeds_when_another_ends() -> None:
    budget = PixelBudget(100)
    order: list[str] = []
    entered = threading.Event()

    def second() -> None:
        with budget.hold(60):
            order.append("second")

    with budget.hold(60):
        thread = threading.Thread(target=second)
        thread.start()
        entered.wait(0.2)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]
