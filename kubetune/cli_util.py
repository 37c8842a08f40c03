"""Small pieces every component's command line shares."""

from __future__ import annotations

import argparse


class OneLineError(Exception):
    """Bad input found after parsing: `kubetune` prints it as one line and exits 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
