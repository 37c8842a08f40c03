"""Live progress: `<output>/progress.json` (kubetune.api.contracts.TrainingProgress), a tqdm bar
on a terminal, one JSON log line per update in a pod (no TTY)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

from kubetune.api.contracts import TrainingProgress
from kubetune.api.layout import PROGRESS_FILE
from kubetune.storage import StorageError, Store

log = logging.getLogger("kubetune.trainer")


class Progress:
    """Main process only. `update` is cheap; the file is written at most every `interval` seconds,
    on every change of state, and when `force`d."""

    def __init__(self, output: Store | None, max_steps: int, interval: float = 5.0) -> None:
        self.output, self.max_steps, self.interval = output, max_steps, interval
        # camelCase keys of TrainingProgress; validated into one on every write
        self.values: dict[str, Any] = TrainingProgress(max_steps=max_steps).model_dump(by_alias=True)
        self._written = 0.0
        self._window: deque[tuple[float, int, int]] = deque(maxlen=50)  # (time, step, images seen)
        self._bar: Any = None
        if output is not None and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, desc="steps", unit="step", dynamic_ncols=True)

    def state(self, state: str, **values: Any) -> None:
        self.update(state=state, force=True, **values)

    def step(self, step: int, images: int, **values: Any) -> None:
        now = time.monotonic()
        self._window.append((now, step, images))
        (t0, s0, n0), (t1, s1, n1) = self._window[0], self._window[-1]
        if t1 > t0 and s1 > s0:
            values["imagesPerSecond"] = round((n1 - n0) / (t1 - t0), 3)
            values["etaSeconds"] = round((self.max_steps - step) * (t1 - t0) / (s1 - s0), 1)
        if self._bar is not None:
            self._bar.n = step
            if values.get("loss") is not None:
                self._bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
            self._bar.refresh()
        self.update(step=step, **values)

    def update(self, force: bool = False, **values: Any) -> None:
        if self.output is None:
            return
        changed_state = "state" in values and values["state"] != self.values["state"]
        self.values.update(values)
        now = time.monotonic()
        if force or changed_state or now - self._written >= self.interval:
            self._written = now
            self.values["updatedAt"] = datetime.now(timezone.utc).replace(microsecond=0)
            progress = TrainingProgress.model_validate(self.values)
            try:
                self.output.write_bytes(PROGRESS_FILE, progress.to_json(), "application/json")
            except StorageError as error:  # progress is best effort; training goes on
                log.warning("cannot write progress: %s", error)
            if self._bar is None:
                line = progress.model_dump(mode="json", by_alias=True)
                log.info(json.dumps({"event": "progress", **line}, sort_keys=True))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
