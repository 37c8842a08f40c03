#!/bin/bash
# One device session's trainer benchmarks, in order of what is still unmeasured, so a session that
# runs out of time still returns the first ones (each writes its JSON as soon as it ends):
#   1. captioning and CLIP scoring speed on the GPU (issue #17's GPU figure; under a minute)
#   2. SD 1.5 with --compile and channels_last, profiled (the next MFU lever, docs/trainer.md)
#   3. SD 1.5 stock vs kubetune eager, 4. kubetune --compile (the table's figures, again)
#   5. a checkpoint every 20 steps (the checkpoint stall), 6. SDXL 1.0 base at 1024 px
# Needs bench/wheels and bench/results/stock (docs/trainer.md, "Benchmark"); writes to $OUT
# (8 files at most come back). Measured so on 2026-12-04 (1, 2, 5, 6 were added after).
#   run: command "bash bench/trainer/gpu_session.sh", carry ["bench/wheels", "bench/results/stock"]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
STOCK=bench/results/stock
bench() { python3 bench/trainer/bench.py --work /tmp/bw "$@" 2>&1 | grep -v -E "it/s\]|s/it\]|^\s*$"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
python3 -m pip install -q --no-index --no-deps bench/wheels/*.whl
python3 bench/trainer/caption_speed.py --images 64 --batch-size 32 --max-new-tokens 20 | tee "$OUT/caption.json"
KUBETUNE_CHANNELS_LAST=1 bench --stock $STOCK/train_text_to_image.py --only kubetune --compile \
    --profile "$OUT/channels-last" --json "$OUT/sd-compile-channels-last.json"
bench --stock $STOCK/train_text_to_image.py --json "$OUT/sd.json"
bench --stock $STOCK/train_text_to_image.py --only kubetune --compile --json "$OUT/sd-compile.json"
bench --stock $STOCK/train_text_to_image.py --only kubetune --extra=--checkpointing_steps=20 --json "$OUT/sd-ckpt.json"
bench --stock $STOCK/train_text_to_image_sdxl.py --steps 20 --json "$OUT/sdxl.json"
