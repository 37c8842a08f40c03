"""Parts of FineTuneJob specs for tests: small enough to run on a CPU in seconds."""

from __future__ import annotations

from typing import Any


def tiny_training(**overrides: Any) -> dict[str, Any]:
    """`spec.training` for a few CPU steps of the tiny pipeline (`tiny_sd.build_tiny_pipeline`):
    4 steps of batches of 2 at 32 px in fp32, a checkpoint every 2 steps, no dataloader workers.
    OVERRIDES add fields or replace these (e.g. `seed=1, gradientCheckpointing=False`)."""
    return {
        "resolution": 32,
        "batchSize": 2,
        "gradientAccumulationSteps": 1,
        "maxTrainSteps": 4,
        "mixedPrecision": "fp32",
        "checkpointEverySteps": 2,
        "dataloaderNumWorkers": 0,
        **overrides,
    }


def checkpoint_state(**overrides: Any) -> dict[str, Any]:
    """A CheckpointState (kubetune.api.contracts) as JSON: a LoRA run at step 4 after 8 samples
    (global batch 2). OVERRIDES replace fields by their JSON names (e.g. `globalBatchSize=8`)."""
    return {
        "step": 4,
        "samplesSeen": 8,
        "epoch": 4,
        "seed": 7,
        "method": "lora",
        "globalBatchSize": 2,
        "worldSize": 1,
        "cacheKey": "cache",
        "dataloader": {"position": 8, "epoch": 4, "indexInEpoch": 0, "samples": 2},
        "rng": {"seed": 7, "scheme": "per sample"},
        **overrides,
    }
