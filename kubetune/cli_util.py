"""Small pieces every component's command line shares."""

from __future__ import annotations

import argparse


class OneLineError(Exception):
    """Bad input found after parsing: `kubetune` prints it as one line and exits 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


MAX_NAMES = 8
MAX_NAME_CHARS = 32


def name_list(names: list[str] | tuple[str, ...]) -> str:
    """Column names of a user's data as an error shows them: at most MAX_NAMES, each quoted and cut to
    MAX_NAME_CHARS (names are data too: an error line must not carry a file's content into logs
    and pod status), then how many more there are."""
    shown = [repr(str(name)[:MAX_NAME_CHARS]) for name in names[:MAX_NAMES]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
