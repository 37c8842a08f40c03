"""The dataset being written: images, per-shard records, the merge, and manifest.json last.

Layout under the output (local folder or s3://):

    train/<name>.jpg, train/metadata.jsonl   the imagefolder (metadata written by the merge)
    README.md                                dataset card (sources, licenses, counts)
    manifest.json                            written last, once every shard is done (DatasetManifest)
    .collector/<run>/shard-NNNNN/part-NNNNNN.jsonl   records, appended in parts as work goes
    .collector/<run>/shard-NNNNN.done.json           a shard finished (its counts and timing)

A record says an item was kept (with its file, caption, provenance and hashes) or skipped (with
the reason). Records of any earlier run are a cache: a kept image whose file is still there and
was made with the same image settings is reused without downloading it again; a permanent skip
of the same run is not tried again. The shard that finds every shard's done marker merges all
records into train/metadata.jsonl, deletes images no record keeps, and writes manifest.json; when
nothing was kept it writes only the manifest, with `counts.kept == 0`, so that readers learn the
collection is over and empty from a count.
Two shards merging at once write the same bytes, so the race is harmless. `.collector/` is a
hidden folder, which `datasets` ignores when it loads the imagefolder.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from kubetune import __version__, ownership
from kubetune.api.contracts import CollectionTiming, DatasetCounts, DatasetManifest, SourceCount, StorageOwner
from kubetune.collector.errors import Skip
from kubetune.collector.images import CleanImage
from kubetune.collector.sources import Candidate
from kubetune.storage import Store

STATE_DIR = ".collector"
FLUSH_RECORDS = 64
FLUSH_SECONDS = 5.0


@dataclass
class Dedupe:
    """Exact (pixel hash) and optional near (perceptual hash) duplicate detection, thread-safe."""

    exact: bool = True
    near: bool = False
    _seen: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, pixel_hash: str, perceptual_hash: str = "") -> None:
        """Remember the image, or raise Skip("duplicate" / "near-duplicate") if seen before."""
        with self._lock:
            if self.exact and pixel_hash in self._seen:
                raise Skip("duplicate")
            if self.near and perceptual_hash and f"p:{perceptual_hash}" in self._seen:
                raise Skip("near-duplicate")
            self._seen.add(pixel_hash)
            if perceptual_hash:
                self._seen.add(f"p:{perceptual_hash}")


@dataclass
class DatasetOutput:
    store: Store
    run: str  # fingerprint of dataset settings + shard count
    processing: str  # hash of the image settings: kept images are reusable when equal
    shard_index: int
    num_shards: int
    info: dict[str, Any]  # fingerprint, settings, for the manifest
    complete: bool = False
    summary: DatasetManifest | None = None  # the manifest found complete by `open`
    _cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    _pending: list[dict[str, Any]] = field(default_factory=list)
    _part: int = 0
    _last_flush: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started: float = field(default_factory=time.time)
    root: Store | None = None  # storage.uri, where the owner marker is (None: the dataset's parent)
    owner: StorageOwner | None = None  # this pod's FineTuneJob (None: nothing claimed nor checked)

    # -- opening: what is already there ---------------------------------------------------------

    def open(self) -> DatasetOutput:
        """Claim the prefix for `owner` (ownership.StorageOwnedError when another FineTuneJob owns
        it: nothing is written or deleted), then read what an earlier run left."""
        ownership.claim(self.root or self._parent(), self.owner)
        manifest = self._read_manifest()
        if manifest is not None and manifest.run == self.run and not manifest.empty:
            self.complete = True
            self.summary = manifest
            return self
        if self.store.exists("manifest.json"):
            # the dataset is being changed (or an empty result is tried again): no longer complete
            self.store.delete("manifest.json")
        files = {key[len("train/") :] for key in self.store.list("train/")}
        for record in self._records(self.store.list(STATE_DIR)):
            if (
                record["kind"] == "kept"
                and record.get("processing") == self.processing
                and record["file_name"] in files
            ):
                self._cache[record["key"]] = record
            elif record["kind"] == "skipped" and record.get("run") == self.run and not Skip(record["reason"]).transient:
                self._cache.setdefault(record["key"], record)
        own = [k for k in self.store.list(self._shard_dir()) if k.endswith(".jsonl")]
        self._part = max((int(k.rsplit("part-", 1)[1][:6]) for k in own), default=0)
        return self

    def cached(self, candidate: Candidate) -> dict[str, Any] | None:
        """What an earlier run recorded for this candidate, if it may be reused."""
        return self._cache.get(candidate.key)

    # -- writing --------------------------------------------------------------------------------

    def reuse(self, record: dict[str, Any]) -> None:
        self._append(record)

    def write(self, candidate: Candidate, image: CleanImage) -> dict[str, Any]:
        file_name = f"{candidate.key}.jpg"
        self.store.write_bytes(f"train/{file_name}", image.jpeg, "image/jpeg")
        record = {
            "kind": "kept",
            "key": candidate.key,
            "group": candidate.group,
            "file_name": file_name,
            "text": candidate.caption,
            **candidate.provenance(),
            "width": image.width,
            "height": image.height,
            "sha256": hashlib.sha256(image.jpeg).hexdigest(),
            "pixel_hash": image.pixel_hash,
            "perceptual_hash": image.perceptual_hash,
            "processing": self.processing,
        }
        self._append(record)
        return record

    def skip(self, candidate: Candidate, reason: str) -> None:
        self._append(
            {
                "kind": "skipped",
                "key": candidate.key,
                "group": candidate.group,
                "reason": reason,
                "url": candidate.url,
                "run": self.run,
            }
        )

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._pending.append(record)
            if len(self._pending) >= FLUSH_RECORDS or time.monotonic() - self._last_flush > FLUSH_SECONDS:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending:
            self._part += 1
            body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self._pending)
            self.store.write_bytes(
                f"{self._shard_dir()}/part-{self._part:06d}.jsonl", body.encode(), "application/x-ndjson"
            )
            self._pending = []
        self._last_flush = time.monotonic()

    # -- finishing ------------------------------------------------------------------------------

    def finish(self, requested: int, notes: list[str]) -> DatasetManifest | None:
        """Mark this shard done; merge if every shard is. Returns the manifest when all are."""
        with self._lock:
            self._flush_locked()
        done = {
            "shard": self.shard_index,
            "numShards": self.num_shards,
            "requested": requested,
            "notes": notes,
            "startedAt": _iso(self._started),
            "finishedAt": _iso(time.time()),
            "seconds": round(time.time() - self._started, 3),
        }
        self.store.write_json(f"{self._run_dir()}/shard-{self.shard_index:05d}.done.json", done)
        markers = [k for k in self.store.list(self._run_dir()) if k.endswith(".done.json")]
        if len(markers) < self.num_shards:
            return None
        return self.merge([self.store.read_json(k) for k in sorted(markers)])

    def shard_counts(self) -> tuple[int, Counter[str]]:
        """Kept and skipped-by-reason of this shard so far (for its own summary)."""
        final = _final_records(self._records(self.store.list(self._shard_dir())))
        kept = sum(1 for r in final if r["kind"] == "kept")
        return kept, Counter(r["reason"] for r in final if r["kind"] == "skipped")

    def merge(self, shards: list[dict[str, Any]]) -> DatasetManifest:
        records = _final_records(self._records(self.store.list(self._run_dir())))
        dedupe = Dedupe(self.info["dedupe"], self.info["nearDedupe"])
        kept: list[dict[str, Any]] = []
        skipped: Counter[str] = Counter()
        for record in records:
            if record["kind"] == "kept":
                try:  # shards dedupe on their own; this catches duplicates across shards
                    dedupe.admit(record["pixel_hash"], record.get("perceptual_hash", ""))
                    kept.append(record)
                except Skip as skip:
                    skipped[skip.reason] += 1
            else:
                skipped[record["reason"]] += 1
        counts = DatasetCounts(
            requested=sum(s["requested"] for s in shards), kept=len(kept), skipped=dict(sorted(skipped.items()))
        )
        content = hashlib.sha256()
        if kept:  # an empty collection leaves the images of an earlier one alone, as it did before
            metadata = "".join(json.dumps(_metadata_row(r), ensure_ascii=False) + "\n" for r in kept)
            self.store.write_bytes("train/metadata.jsonl", metadata.encode(), "application/x-ndjson")
            wanted = {f"train/{r['file_name']}" for r in kept} | {"train/metadata.jsonl"}
            for key in list(self.store.list("train/")):
                if key not in wanted:
                    self.store.delete(key)
            card = _card(self.info, counts, _sources(kept))
            self.store.write_bytes("README.md", card.encode(), "text/markdown")
            for record in sorted(kept, key=lambda r: r["file_name"]):
                line = f"{record['file_name']}\t{record['sha256']}\t{record['text']}\n"
                content.update(line.encode())
        manifest = DatasetManifest(
            kubetune=__version__,
            run=self.run,
            fingerprint=self.info["fingerprint"],
            complete=True,
            counts=counts,
            sources=_sources(kept),
            settings=self.info["settings"],
            notes=sorted({n for s in shards for n in s["notes"]}),
            timing=CollectionTiming.model_validate(
                {
                    "startedAt": min(s["startedAt"] for s in shards),
                    "finishedAt": max(s["finishedAt"] for s in shards),
                    "shardSeconds": [s["seconds"] for s in shards],
                }
            ),
            content_hash=f"sha256:{content.hexdigest()}",
            metadata="train/metadata.jsonl" if kept else None,
        )
        # last: the collection is over (complete, or empty when counts.kept is 0)
        self.store.write_bytes("manifest.json", manifest.to_json(), "application/json")
        return manifest

    # -- helpers --------------------------------------------------------------------------------

    def _parent(self) -> Store:
        parent, _, _ = self.store.uri.rstrip("/").rpartition("/")
        return Store(parent or self.store.uri, self.store.endpoint, self.store.region, self.store._client)

    def _run_dir(self) -> str:
        return f"{STATE_DIR}/{self.run}"

    def _shard_dir(self) -> str:
        return f"{self._run_dir()}/shard-{self.shard_index:05d}"

    def _records(self, keys: Iterable[str]) -> Iterable[dict[str, Any]]:
        for key in sorted(k for k in keys if k.endswith(".jsonl")):
            for line in self.store.read_bytes(key).decode("utf-8").splitlines():
                if line.strip():
                    yield json.loads(line)

    def _read_manifest(self) -> DatasetManifest | None:
        """The manifest already there; None when absent or not one (collected again then)."""
        try:
            return DatasetManifest.model_validate_json(self.store.read_bytes("manifest.json"))
        except (FileNotFoundError, ValidationError):
            return None


def _final_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each key (a retry that succeeded replaces the earlier failure)."""
    final: dict[str, dict[str, Any]] = {}
    for record in records:
        final.pop(record["key"], None)
        final[record["key"]] = record
    return list(final.values())


def _metadata_row(record: dict[str, Any]) -> dict[str, Any]:
    row = {"file_name": record["file_name"], "text": record["text"]}
    for name in ("source", "url", "license", "author"):
        row[name] = record.get(name, "")
    return row


def _sources(kept: list[dict[str, Any]]) -> list[SourceCount]:
    by_source: dict[str, Counter[str]] = {}
    for record in kept:
        by_source.setdefault(record.get("source", ""), Counter())[record.get("license") or "unknown"] += 1
    return [
        SourceCount(source=name, images=sum(c.values()), licenses=dict(sorted(c.items())))
        for name, c in sorted(by_source.items())
    ]


def _card(info: dict[str, Any], counts: DatasetCounts, sources: list[SourceCount]) -> str:
    lines = [
        "---",
        "task_categories: [text-to-image]",
        "---",
        "",
        "# Captioned image dataset",
        "",
        f"Collected by kubetune {__version__} (`kubetune collect`). Images are JPEG, shorter side at most "
        f"{info['settings']['resolution']} px; captions are in `train/metadata.jsonl` (`file_name`, `text`, and "
        "`source`, `url`, `license`, `author` where known).",
        "",
        f"{counts.kept} images kept of {counts.requested} requested.",
        "",
        "## Sources and licenses",
        "",
        "| source | images | licenses |",
        "|---|---|---|",
    ]
    for entry in sources:
        licenses = ", ".join(f"{name} ({count})" for name, count in entry.licenses.items())
        lines.append(f"| {entry.source} | {entry.images} | {licenses} |")
    lines += [
        "",
        "Each image keeps its own license and author (see metadata.jsonl). Check that your use, "
        "including training models, is allowed by them and by each source's terms (Unsplash's guidelines, "
        "for one, discourage training AI models on its photos).",
        "",
    ]
    return "\n".join(lines)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
