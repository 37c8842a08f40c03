"""Helpers for the collector's tests: run `kubetune collect` in-process, read its output."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kubetune.dev.testing.webapis import StandIn


@dataclass
class Result:
    code: int
    stderr: str

    @property
    def last_line(self) -> str:
        return self.stderr.strip().splitlines()[-1]


@pytest.fixture
def collect(capsys: pytest.CaptureFixture[str]) -> Any:
    """Run `kubetune collect ARGS` through the real dispatcher; returns exit code and stderr."""
    from kubetune.cli import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(["collect", *args])
        return Result(code, capsys.readouterr().err)

    return run


@pytest.fixture
def server() -> Iterator[StandIn]:
    with StandIn() as stand_in:
        yield stand_in
