"""The collector's main flow: source -> fetch -> decode/clean -> dedupe -> write."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.contracts import DatasetManifest
from kubetune.collector.errors import Skip
from kubetune.collector.fetch import Fetcher
from kubetune.collector.images import ImageSettings, clean
from kubetune.collector.output import DatasetOutput, Dedupe
from kubetune.collector.sources import Candidate, Group, Source


@dataclass
class Tally:
    """Live counts of this shard, read by the progress display."""

    requested: int = 0
    kept: int = 0
    reused: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    on_change: Callable[[Tally], None] = lambda tally: None


def collect(
    source: Source,
    fetcher: Fetcher,
    images: ImageSettings,
    dedupe: Dedupe,
    output: DatasetOutput,
    workers: int,
    shard: tuple[int, int],
    tally: Tally,
) -> DatasetManifest | None:
    """Collect this shard's part of the dataset; returns the manifest once every shard is done."""

    def process(candidate: Candidate) -> None:
        data = candidate.load() if candidate.load else fetcher.get(candidate.url)  # fetch
        image = clean(data, images, perceptual=dedupe.near)  # decode/clean
        dedupe.admit(image.pixel_hash, image.perceptual_hash)  # dedupe
        output.write(candidate, image)  # write
        if candidate.on_kept:
            candidate.on_kept()

    with ThreadPoolExecutor(workers, thread_name_prefix="collect") as pool:
        for group in source.groups(*shard):  # source
            tally.requested += group.quota or 0
            run_group(group, process, pool, workers, output, dedupe, tally)
    return output.finish(tally.requested, source.notes)


def run_group(
    group: Group,
    process: Callable[[Candidate], None],
    pool: ThreadPoolExecutor,
    workers: int,
    output: DatasetOutput,
    dedupe: Dedupe,
    tally: Tally,
) -> None:
    """Process candidates concurrently until the group's quota is kept (or candidates run out).

    At most `quota - kept` are in flight, so no image is downloaded only to be thrown away;
    candidates an earlier run already settled are counted without any network request."""
    kept = 0
    in_flight: dict[Future[None], Candidate] = {}
    candidates = _valid(group.candidates, output, tally)

    def room() -> bool:
        return group.quota is None or kept + len(in_flight) < group.quota

    while True:
        while room() and len(in_flight) < workers * 2:
            candidate = next(candidates, None)
            if candidate is None:
                break
            if (record := output.cached(candidate)) is not None:
                kept += _reuse(record, candidate, output, dedupe, tally)
                continue
            in_flight[pool.submit(process, candidate)] = candidate
        if not in_flight:
            return
        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in done:
            candidate = in_flight.pop(future)
            try:
                future.result()
                kept += 1
                tally.kept += 1
            except Skip as skip:
                output.skip(candidate, skip.reason)
                tally.skipped[skip.reason] += 1
            tally.on_change(tally)


def _valid(candidates: Iterator[Candidate], output: DatasetOutput, tally: Tally) -> Iterator[Candidate]:
    """List rows count as requested; rows with no caption or no image are skipped up front."""
    for candidate in candidates:
        if not candidate.group:
            tally.requested += 1
        reason = candidate.skip or (
            "no-caption" if not candidate.caption else "no-image" if not (candidate.url or candidate.load) else ""
        )
        if reason:
            output.skip(candidate, reason)
            tally.skipped[reason] += 1
            continue
        yield candidate


def _reuse(record: dict[str, Any], candidate: Candidate, output: DatasetOutput, dedupe: Dedupe, tally: Tally) -> int:
    """Count what an earlier run settled for this candidate; 1 if it is kept."""
    if record["kind"] == "kept":
        try:
            dedupe.admit(record["pixel_hash"], record.get("perceptual_hash", ""))
            output.reuse(record)
            tally.kept += 1
            tally.reused += 1
            return 1
        except Skip as skip:
            record = {
                "kind": "skipped",
                "key": record["key"],
                "group": record["group"],
                "reason": skip.reason,
                "run": output.run,
            }
    output.reuse(record)
    tally.skipped[record["reason"]] += 1
    return 0
