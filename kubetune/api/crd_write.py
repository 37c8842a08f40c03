"""`python -m kubetune.api.crd_write`: write the generated CRD where the repo keeps copies.

First the pod-template schema (kubetune/api/podtemplate.schema.json) from the Kubernetes definitions
kubernetes-validate ships, when it is installed: the models, and so the CRD, are built from it (a new
schema restarts the program, as the models were imported with the old one).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGETS = [REPO / "crds" / "finetunejob.yaml", REPO / "charts" / "kubetune" / "crds" / "finetunejob.yaml"]
REFERENCE = REPO / "docs" / "spec-reference.md"
VALUES_SCHEMA = REPO / "charts" / "kubetune" / "values.schema.json"


def values_schema(text: str) -> str:
    """The chart's values.schema.json with jobDefaults checked by the pod-template schema."""
    from kubetune.api import podtemplate

    schema = json.loads(text)
    schema["properties"]["jobDefaults"] = {
        "type": "object",
        "additionalProperties": False,
        "description": "Pod-template overlays for every job's pods (spec.<component>.podTemplate's shape).",
        "properties": {
            component: podtemplate.for_helm(podtemplate.pod_template_schema(component))
            for component in ("collector", "trainer")
        },
    }
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    from kubetune.api import podtemplate

    try:
        schema = podtemplate.render_schema_json()
    except ImportError:
        print(f"kubernetes-validate is not installed: {podtemplate.SCHEMA_FILE.name} left as it is")
    else:
        if schema != podtemplate.SCHEMA_FILE.read_text():
            podtemplate.SCHEMA_FILE.write_text(schema)
            print(f"wrote {podtemplate.SCHEMA_FILE.relative_to(REPO)}")
            # the models (imported with kubetune.api) were built from the old schema: start again
            os.execv(sys.executable, [sys.executable, "-m", "kubetune.api.crd_write"])
    from kubetune.api.crd import render_crd_yaml, render_reference_markdown

    text = render_crd_yaml()
    for target in TARGETS:
        if target.parent.parent.exists() or target.parent.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"wrote {target.relative_to(REPO)}")
    if VALUES_SCHEMA.exists():
        VALUES_SCHEMA.write_text(values_schema(VALUES_SCHEMA.read_text()))
        print(f"wrote {VALUES_SCHEMA.relative_to(REPO)}")
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(render_reference_markdown())
    print(f"wrote {REFERENCE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
