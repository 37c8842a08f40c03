"""Print kubetune's version after checking that every place naming it agrees (stdlib only).

The package (kubetune/__init__.py), the chart (Chart.yaml version and appVersion) and, when given,
a release tag (`v<version>`) must name the same version: the release workflow runs this before it
builds anything, so a tag that does not match the sources publishes nothing.
Usage: python .ci/check-version.py [TAG]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def found(path: str, pattern: str) -> str:
    match = re.search(pattern, (REPO / path).read_text(), re.MULTILINE)
    if not match:
        raise SystemExit(f"{path}: no match for {pattern}")
    return match.group(1)


def main() -> int:
    versions = {
        "kubetune/__init__.py __version__": found("kubetune/__init__.py", r'^__version__ = "([^"]+)"'),
        "charts/kubetune/Chart.yaml version": found("charts/kubetune/Chart.yaml", r"^version: *\"?([^\"\s]+)\"?"),
        "charts/kubetune/Chart.yaml appVersion": found("charts/kubetune/Chart.yaml", r"^appVersion: *\"?([^\"\s]+)\"?"),
    }
    if len(sys.argv) > 1:
        tag = sys.argv[1]
        versions[f"tag {tag}"] = tag.removeprefix("refs/tags/").removeprefix("v")
    if len(set(versions.values())) != 1:
        for where, version in versions.items():
            print(f"  {where}: {version}", file=sys.stderr)
        print("versions differ: set them all to the release's version", file=sys.stderr)
        return 1
    print(next(iter(versions.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
