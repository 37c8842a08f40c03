"""`python -m kubetune.api.crd_write`: write the generated CRD where the repo keeps copies."""

from __future__ import annotations

from pathlib import Path

from kubetune.api.crd import render_crd_yaml, render_reference_markdown

REPO = Path(__file__).resolve().parents[2]
TARGETS = [REPO / "crds" / "finetunejob.yaml", REPO / "charts" / "kubetune" / "crds" / "finetunejob.yaml"]
REFERENCE = REPO / "docs" / "spec-reference.md"


def main() -> None:
    text = render_crd_yaml()
    for target in TARGETS:
        if target.parent.parent.exists() or target.parent.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"wrote {target.relative_to(REPO)}")
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(render_reference_markdown())
    print(f"wrote {REFERENCE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
