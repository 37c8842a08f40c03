"""What the collector's steps raise: a skipped item (counted by reason) or a reason to stop."""

from __future__ import annotations


class Skip(Exception):
    """This item is left out; `reason` is the short key it is counted under in the manifest.

    Reasons: http-NNN, timeout, connection-error, too-many-redirects, private-address, bad-url,
    too-large, not-an-image, corrupt, too-many-pixels, too-small, duplicate, near-duplicate,
    no-caption, no-image, unsafe-path, incomplete-result (a search result without an expected
    key). `transient` ones are tried again by a resumed run; the rest are not.
    """

    TRANSIENT = frozenset({"timeout", "connection-error", "http-429", "http-500", "http-502", "http-503", "http-504"})

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason

    @property
    def transient(self) -> bool:
        return self.reason in self.TRANSIENT


class SourceError(Exception):
    """A source cannot be used at all (bad key, API refused, list unreadable): one line, exit 2."""


class RetryableError(Exception):
    """A failure another attempt may fix (API or storage unreachable): one line, exit 1."""
