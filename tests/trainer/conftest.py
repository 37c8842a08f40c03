"""Fixtures of the trainer tests: the tiny offline pipeline, a shapes imagefolder, and one
uninterrupted reference run that resumed and distributed runs are compared with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from trainer_testkit import REFERENCE_STEPS, core_flags, train, write_imagefolder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune.dev.testing.tiny_sd import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX.1-dev-layout pipeline (kubetune.dev.testing.tiny_flow)."""
    from kubetune.dev.testing.tiny_flow import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL pipeline (kubetune.dev.testing.tiny_sdxl), for the SDXL and DreamBooth tests."""
    from kubetune.dev.testing.tiny_sdxl import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD3 pipeline (kubetune.dev.testing.tiny_flow), for the flow and DreamBooth tests."""
    from kubetune.dev.testing.tiny_flow import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", seed=0)


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "dataset", 8)


@pytest.fixture(scope="session")
def reference_run(tiny_model: Path, shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run; resumed and distributed runs must end where it ends.
    Its latent cache (under latent_cache) is shared with them: same key, encoded once."""
    root = tmp_path_factory.mktemp("reference")
    output = root / "out"
    result = train(
        core_flags(
            tiny_model,
            shapes_dataset,
            output,
            max_train_steps=REFERENCE_STEPS,
            checkpointing_steps=12,
            latent_cache_dir=root.parent / "latent_cache",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output
