"""Model families (see base.py): which one a pipeline is, from its model_index.json."""

from __future__ import annotations

from typing import Any

from kubetune.trainer.families.base import FamilyError, ModelFamily, Parts
from kubetune.trainer.families.flux import Flux
from kubetune.trainer.families.sd import StableDiffusion
from kubetune.trainer.families.sd3 import StableDiffusion3
from kubetune.trainer.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, type[ModelFamily]] = {
    f.name: f for f in (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)
}
"""Family name -> family; the names are --model_family's choices (and spec.model.family's)."""
BY_PIPELINE = {f.pipeline_class: f.name for f in FAMILIES.values()}

__all__ = ["BY_PIPELINE", "FAMILIES", "FamilyError", "ModelFamily", "Parts", "family_for"]


def family_for(model_index: dict[str, Any], stated: str | None = None) -> ModelFamily:
    """The family of a pipeline from its model_index.json (`_class_name`), or the stated one
    (--model_family); a pipeline of no supported family, or of another family than the stated
    one, is refused."""
    class_name = str(model_index.get("_class_name") or "")
    found = BY_PIPELINE.get(class_name)
    supported = ", ".join(f"{name} ({f.pipeline_class})" for name, f in FAMILIES.items())
    if stated:
        if stated not in FAMILIES:
            raise FamilyError(f"--model_family {stated}: not a supported family ({supported})")
        if found and found != stated:
            raise FamilyError(f"--model_family {stated}: the pipeline is a {class_name} ({found})")
        return FAMILIES[stated]()
    if not found:
        raise FamilyError(f"pipeline class {class_name or '(none)'} is not supported; supported families: {supported}")
    return FAMILIES[found]()
