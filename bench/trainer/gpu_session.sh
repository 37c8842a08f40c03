#!/bin/bash
# One device session's trainer benchmarks, most important first, so a session that runs out of
# time still returns the first ones: SD 1.5 stock vs kubetune (profiled), kubetune with --compile
# (profiled), checkpoint every 10 steps (the stall), then SDXL 1.0 base at 1024 px.
# Needs bench/wheels and bench/results/stock (docs/trainer.md, "Benchmark"); writes to $OUT.
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
bench --stock $STOCK/train_text_to_image.py --wheels bench/wheels --profile "$OUT/sd" --json "$OUT/sd.json"
bench --stock $STOCK/train_text_to_image.py --only kubetune --compile --profile "$OUT/compile" --json "$OUT/sd-compile.json"
bench --stock $STOCK/train_text_to_image.py --only kubetune --extra=--checkpointing_steps=10 --json "$OUT/sd-ckpt.json"
bench --stock $STOCK/train_text_to_image_sdxl.py --steps 20 --json "$OUT/sdxl.json"
