"""kubetune's trainer against diffusers' stock training script: same model, data and flags, in one
run. Prints images/s (steady state) of both and their ratio, peak memory, end-to-end time, and on
CUDA the model FLOPs utilisation (MFU) counted with torch's FlopCounterMode.

Three families (--family, else from the stock script's name):
    sd:   examples/text_to_image/train_text_to_image.py
    sdxl: examples/text_to_image/train_text_to_image_sdxl.py
    flux: examples/dreambooth/train_dreambooth_lora_flux.py (LoRA; see flux_flags)

    CPU smoke (the family's tiny model, 64 px):
        .venv/bin/python bench/trainer/bench.py --stock /path/to/train_text_to_image.py
        .venv/bin/python bench/trainer/bench.py --stock /path/to/train_text_to_image_sdxl.py --steps 32 --threads 1
        .venv/bin/python bench/trainer/bench.py --stock /path/to/train_dreambooth_lora_flux.py --steps 240 --threads 1
    GPU (the published architecture, random init, bf16 for both; SD 1.5 at 512 px, batch 16;
    SDXL 1.0 base at 1024 px, batch 4), with the stock scripts in bench/results/stock/ and the
    wheels of docs/trainer.md's list in bench/wheels/ (both git-ignored, carried to the machine):
        python bench/trainer/bench.py --stock bench/results/stock/train_text_to_image.py --wheels bench/wheels
        python bench/trainer/bench.py --stock bench/results/stock/train_text_to_image_sdxl.py --wheels bench/wheels \\
            --work /tmp/bw --json $OUT/sdxl.json
    The SDXL one is prepared for a device session (the `run` tool): carry ["bench/wheels",
    "bench/results/stock"], timeout_s 600; docs/trainer.md ("Benchmark") says how to fill both
    folders, and what to do on 80 GB cards or past 10 minutes.
    FLUX.1-dev (build_flux_dev_pipeline: 11.9 B transformer, T5-XXL, bf16, 34 GB written once in
    --work), LoRA rank 16, 512 px batch 4 then 1024 px batch 1, 30 steps each, T5 length 512, in one
    device command (the second run reuses the model):
        python bench/trainer/bench.py --stock bench/results/stock/train_dreambooth_lora_flux.py \
            --wheels bench/wheels --work /tmp/bw --json $OUT/flux512.json && \
        python bench/trainer/bench.py --stock bench/results/stock/train_dreambooth_lora_flux.py \
            --work /tmp/bw --resolution 1024 --json $OUT/flux1024.json

FLUX: the stock script gets --lora_layers with kubetune's targets (FLUX_LORA_LAYERS; its default
adapts more modules: --stock-default-targets), --lora_alpha = --rank, per-image captions from the
same imagefolder (--dataset_name; it then encodes each batch's captions with CLIP and T5 at every
step, having no text cache) and --cache_latents (its VAE latent cache). FLOPs are the
transformer's forward + backward counted on the meta device.

Both scripts get the same flags (kubetune reads the stock flags; the SDXL script takes the SD
script's flags used here too).

How both are timed alike: a sitecustomize.py put on PYTHONPATH registers a global optimizer
step hook (torch.optim.optimizer.register_optimizer_step_post_hook) that stamps every optimizer
step and records peak memory at exit, so neither script is changed.
Steady state = the steps after the first quarter (warm-up, caching, compilation). Each side gets
a fresh datasets cache (HF_DATASETS_CACHE): the SDXL script caches its VAE latents and text
embeddings there (datasets.map) before training, as kubetune caches its own.

torchvision: the stock script needs it; kubetune does not. Where torchvision cannot be imported,
the bench makes a separate venv for the stock script (this interpreter's packages plus
torchvision, `--no-deps`). The only CPU build for torch 2.13 (torchvision 0.28 from PyPI) is a
CUDA build whose C++ ops fail to load, and its import then fails registering fake kernels for
`torchvision::nms`/`qnms`; the sitecustomize declares those two op schemas first, after which
the pure-Python PIL transforms the script uses (Resize, CenterCrop, RandomCrop,
RandomHorizontalFlip, ToTensor, Normalize) run unchanged.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

SITECUSTOMIZE = """
import atexit, json, os, resource, time
PROFILE_STEPS = 3
# Kernel names to kinds, first match wins (cuDNN/CUTLASS/flash names on Hopper).
PROFILE_GROUPS = [
    ("attention (flash/cudnn sdpa)", ("flash", "fmha", "attention", "sdpa")),
    ("layout (NCHW <-> NHWC)", ("nchwtonhwc", "nhwctonchw")),
    ("convolution", ("conv", "implicit_gemm", "xmma_fprop", "xmma_dgrad", "xmma_wgrad", "wgrad", "dgrad")),
    ("matmul (gemm)", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas")),
    ("group/layer norm", ("group_norm", "groupnorm", "layer_norm", "layernorm", "welford", "rowwisemoments",
                          "gammabeta", "fusedparams")),
    ("optimizer + EMA (foreach)", ("multi_tensor", "foreach", "adam", "lerp")),
    ("copies + casts", ("copy", "memcpy", "memset", "cast", "to_copy")),
    ("elementwise + reductions", ("elementwise", "vectorized", "reduce", "silu", "gelu", "triton")),
]
if os.environ.get("KUBETUNE_BENCH_TV_STUB") == "1":
    import torch
    for _op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{_op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
if os.environ.get("KUBETUNE_BENCH_OUT"):
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    _stamps, _cpu = [], []
    _cuda = torch.cuda.is_available()
    def _hook(optimizer, args, kwargs):
        # No synchronize: that would stop the CPU queueing ahead. The CUDA queue is bounded, so
        # over tens of steps the CPU's pace is the GPU's.
        _stamps.append(time.perf_counter())
        _cpu.append(time.process_time())
    register_optimizer_step_post_hook(_hook)
    _profile_at = int(os.environ.get("KUBETUNE_BENCH_PROFILE_AT") or 0)
    if _profile_at and os.environ.get("RANK", "0") == "0":
        from torch.profiler import ProfilerActivity, profile
        _profiler = []
        _sync = torch.cuda.synchronize if _cuda else (lambda: None)
        # Kernels are the device-side events (an op's own device time would count them twice); on
        # CPU the ops' own CPU time stands in for them (a smoke test of the same code).
        from torch.autograd import DeviceType
        def _own(e):
            if not _cuda:
                return e.self_cpu_time_total
            return e.device_time_total if e.device_type == DeviceType.CUDA else 0
        def _profile_hook(optimizer, args, kwargs):
            # A window of whole steps: from one optimizer step to another (EMA and data included).
            step = len(_stamps)
            if step == _profile_at:
                _sync()
                _profiler.append(profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]))
                _profiler[0].__enter__()
                _profiler.append(time.perf_counter())
            elif step == _profile_at + PROFILE_STEPS and _profiler:
                _sync()
                wall = time.perf_counter() - _profiler[1]
                _profiler[0].__exit__(None, None, None)
                _write_profile(_profiler[0], wall)
        register_optimizer_step_post_hook(_profile_hook)
        def _write_profile(prof, wall):
            kernels = [e for e in prof.key_averages() if _own(e) > 0]
            busy = sum(_own(e) for e in kernels) / 1e6  # seconds of kernel time
            groups = {}
            for e in kernels:
                name = e.key.lower()
                group = next((g for g, words in PROFILE_GROUPS if any(w in name for w in words)), "other")
                groups[group] = groups.get(group, 0.0) + _own(e) / 1e6
            lines = [f"window: {PROFILE_STEPS} steps from step {_profile_at}, {wall:.3f}s wall, "
                     f"{busy:.3f}s of GPU kernels ({100 * busy / wall:.1f}% busy)",
                     "kernel time by kind (share of the window's wall time):"]
            for group, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
                share = 100 * seconds / wall
                lines.append(f"  {group:28} {seconds / PROFILE_STEPS * 1e3:9.2f} ms/step {share:6.1f}%")
            def row(us, count, key):
                return f"  {us / PROFILE_STEPS / 1e3:9.2f} ms/step x{count // PROFILE_STEPS:<5} {key[:100]}"
            lines.append("top kernels (GPU time):")
            for e in sorted(kernels, key=lambda e: -_own(e))[:25]:
                lines.append(row(_own(e), e.count, e.key))
            if _cuda:
                lines.append("top ops by the GPU time of the kernels they launched:")
                ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
                for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:15]:
                    lines.append(row(e.self_device_time_total, e.count, e.key))
            lines.append("top host ops (total CPU time):")
            for e in sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total)[:15]:
                lines.append(row(e.cpu_time_total, e.count, e.key))
            with open(os.environ["KUBETUNE_BENCH_PROFILE"], "w") as f:
                f.write("\\n".join(lines) + "\\n")
    @atexit.register
    def _write():
        rank = os.environ.get("RANK", "0")
        if rank != "0":
            return
        out = {"stamps": _stamps, "cpuStamps": _cpu}
        out["peakRssMiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if _cuda:
            out["peakCudaMiB"] = torch.cuda.max_memory_allocated() / 2**20
        with open(os.environ["KUBETUNE_BENCH_OUT"], "w") as f:
            json.dump(out, f)
"""

# kubetune's log line for the time training waited on a checkpoint
CHECKPOINT_PAUSE = re.compile(r"checkpoint-\d+: training paused ([\d.]+)s")

# Dense bf16 peak of the GPUs this is likely to meet, TFLOP/s.
PEAK_BF16_TFLOPS = {
    "H100 80GB HBM3": 989.0,
    "H100 SXM": 989.0,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--stock",
        required=True,
        help="path to diffusers' examples/text_to_image/train_text_to_image.py (sd), train_text_to_image_sdxl.py "
        "or examples/dreambooth/train_dreambooth_lora_flux.py",
    )
    parser.add_argument(
        "--family",
        choices=("sd", "sdxl", "flux"),
        help="default: flux or sdxl if the stock script's name says so, else sd",
    )
    parser.add_argument("--wheels", help="install every wheel in this folder first (pip --no-index --no-deps)")
    parser.add_argument("--work", help="working folder (default: a new temporary one)")
    parser.add_argument(
        "--model",
        choices=("auto", "tiny", "full"),
        default="auto",
        help="tiny: the family's tiny test model; full: its published architecture (SD 1.5, SDXL 1.0 base, "
        "FLUX.1-dev), random init; auto: full on CUDA, else tiny",
    )
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--images", type=int)
    parser.add_argument("--workers", type=int, help="--dataloader_num_workers for both")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="pass --gradient_checkpointing to both")
    parser.add_argument("--compile", action="store_true", help="also torch.compile kubetune's UNet")
    parser.add_argument("--rank", type=int, default=16, help="flux: the LoRA rank of both")
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        help="flux: T5 tokens per caption for both (default: 512 with the full model; 128 with the tiny one, "
        "half its 64 px image's 256 tokens, as 512 is half of 1024 at 512 px)",
    )
    parser.add_argument(
        "--stock-default-targets",
        action="store_true",
        help="flux: let the stock script adapt its own default modules (also the context projections and both "
        "feed-forwards of the double blocks) instead of kubetune's to_q/k/v/to_out.0",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for both sides (CPU: 1 keeps a shared machine's bursts from stalling torch's threads)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: by name)")
    parser.add_argument("--only", choices=("stock", "kubetune"), help="run just one side")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument(
        "--profile",
        help="folder: profile 3 steps near the end of each side (torch.profiler) into profile-<side>.txt there; "
        "the timed window then ends before them",
    )
    parser.add_argument(
        "--extra", action="append", default=[], help="one more flag for kubetune's side (e.g. --checkpointing_steps=10)"
    )
    args = parser.parse_args()
    args.stock = str(Path(args.stock).resolve())
    name = Path(args.stock).name
    family = args.family or ("flux" if "flux" in name else "sdxl" if "sdxl" in name else "sd")

    if args.wheels:
        wheels = sorted(str(p.resolve()) for p in Path(args.wheels).glob("*.whl"))
        run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels])
    ensure_kubetune()
    import torch

    cuda = torch.cuda.is_available()
    size = args.model if args.model != "auto" else ("full" if cuda else "tiny")
    model_kind = MODELS[family, size]
    resolution = args.resolution or (FULL_RESOLUTION[family] if size == "full" else 64)
    batch = args.batch_size or (FULL_BATCH[family](resolution) if cuda else 4)
    steps = args.steps or ((40 if family == "sd" else 30) if cuda else 24)
    sequence = args.max_sequence_length or (512 if size == "full" else 128)
    images = args.images or max(64, batch * 4)
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    precision = "bf16" if cuda else "no"
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by both sides (measure copies os.environ)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        args.profile = str(Path(args.profile).resolve())
    work = Path(args.work or tempfile.mkdtemp(prefix="kubetune-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log(
        f"work folder {work}; {family}: {model_kind} at {resolution}px, batch {batch}, {steps} steps, {images} images, "
        f"precision {precision}, device {torch.cuda.get_device_name(0) if cuda else 'cpu'}"
    )

    model = build_model(work, model_kind)
    data = build_dataset(work / f"dataset-{resolution}", images, resolution)  # images larger than trained
    hooks = work / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    common = [
        f"--pretrained_model_name_or_path={model}",
        f"--resolution={resolution}",
        "--center_crop",
        "--random_flip",
        f"--train_batch_size={batch}",
        "--gradient_accumulation_steps=1",
        f"--max_train_steps={steps}",
        "--learning_rate=1e-05",
        "--max_grad_norm=1",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--mixed_precision={precision}",
        "--use_ema",
        "--seed=0",
        "--allow_tf32",
        f"--dataloader_num_workers={workers}",
        "--checkpointing_steps=1000000",
    ]
    common += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
    stock_only = [f"--train_data_dir={data}"]
    kubetune_only = [f"--train_data_dir={data}"]
    if family == "flux":
        common, stock_only, kubetune_only = flux_flags(common, data, args, sequence)

    results: dict[str, Any] = {
        "family": family,
        "model": model_kind,
        "resolution": resolution,
        "batchSize": batch,
        "steps": steps,
        "images": images,
        "mixedPrecision": precision,
        "flags": common,
        "stockFlags": stock_only,
        "kubetuneFlags": kubetune_only,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "threads": args.threads,
    }
    if args.only != "kubetune":
        python, stub = stock_python(work)
        results["stock"] = measure(
            "stock",
            [python, args.stock, *common, *stock_only, f"--output_dir={work / 'out-stock'}"],
            work,
            hooks,
            batch,
            stub,
            args.profile,
            steps,
        )
        # The trained pipelines are not looked at; SDXL's take 14 GB of disk each.
        shutil.rmtree(work / "out-stock", ignore_errors=True)
    if args.only != "stock":
        extra = [f"--latent_cache_dir={work / f'cache-{time.time_ns()}'}"] + (["--compile"] if args.compile else [])
        extra += args.extra
        results["kubetune"] = measure(
            "kubetune",
            [
                sys.executable,
                "-m",
                "kubetune.trainer",
                *common,
                *kubetune_only,
                *extra,
                f"--output_dir={work / 'out-kubetune'}",
                "--report_to=tensorboard",
            ],
            work,
            hooks,
            batch,
            False,
            args.profile,
            steps,
        )
        shutil.rmtree(work / "out-kubetune", ignore_errors=True)
    if family == "flux":
        results["maxSequenceLength"] = sequence
        flops = flux_training_flops(model, resolution, sequence)
    else:
        flops = unet_training_flops(model, resolution, 1, cuda)  # per image; batch 1 keeps SDXL's count small
    results["unetTrainingFlopsPerImage"] = flops
    peak = args.peak_tflops or next(
        (v for k, v in PEAK_BF16_TFLOPS.items() if cuda and k in torch.cuda.get_device_name(0)), None
    )
    measured = [side for side in ("stock", "kubetune") if "imagesPerSecond" in results.get(side, {})]
    for side in measured:
        if peak:
            results[side]["mfu"] = round(results[side]["imagesPerSecond"] * flops / (peak * 1e12), 4)
    if len(measured) == 2:
        results["speedup"] = round(results["kubetune"]["imagesPerSecond"] / results["stock"]["imagesPerSecond"], 3)
        for key, ratio in (
            ("imagesPerSecondAtMedianStep", "speedupAtMedianStep"),
            ("imagesPerCpuSecond", "speedupPerCpuSecond"),
        ):
            results[ratio] = round(results["kubetune"][key] / results["stock"][key], 3)
        results["peakMemoryRatio"] = round(results["kubetune"]["peakMiB"] / results["stock"]["peakMiB"], 3)
    report(results, peak)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if any("failed" in results.get(side, {}) for side in ("stock", "kubetune")) else 0


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    # Never from the repository root: its `operator/` folder would shadow the standard library's.
    return subprocess.run(command, check=True, text=True, cwd=tempfile.gettempdir(), **kwargs)


def ensure_kubetune() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "import kubetune.trainer.train, kubetune.dev.testing.shapes"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    if probe.returncode:
        log("installing kubetune and kubetune-dev (its test models) from this checkout (--no-deps)")
        editable = ["-e", str(REPO), "-e", str(REPO / "dev")]
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *editable])
        import site
        import sysconfig

        site.addsitedir(sysconfig.get_paths()["purelib"])  # reads the new editable install's .pth


# (family, --model) -> the pipeline built: its name, and the kubetune.dev.testing function building it
MODELS = {
    ("sd", "tiny"): "tiny",
    ("sd", "full"): "sd15",
    ("sdxl", "tiny"): "tiny-sdxl",
    ("sdxl", "full"): "sdxl",
    ("flux", "tiny"): "tiny-flux",
    ("flux", "full"): "flux-dev",
}
FULL_RESOLUTION = {"sd": 512, "sdxl": 1024, "flux": 512}
# the batch size on CUDA with the full model, by resolution (FLUX.1-dev at 1024 px: 4,608 tokens an image)
FULL_BATCH = {"sd": lambda r: 16, "sdxl": lambda r: 4, "flux": lambda r: 4 if r <= 512 else 1}
BUILDERS = {
    "tiny": ("tiny_sd", "build_tiny_pipeline"),
    "sd15": ("tiny_sd", "build_sd15_pipeline"),
    "tiny-sdxl": ("tiny_sdxl", "build_tiny_sdxl_pipeline"),
    "sdxl": ("tiny_sdxl", "build_sdxl_base_pipeline"),
    "tiny-flux": ("tiny_flow", "build_tiny_flux_pipeline"),
    "flux-dev": ("tiny_flow", "build_flux_dev_pipeline"),
}
# The transformer's modules both sides adapt: kubetune's flux family's lora_targets
# (kubetune/trainer/families/base.py), spelled as the stock script's --lora_layers. The stock default
# adds attn.add_{q,k,v}_proj, attn.to_add_out, ff.net.{0.proj,2} and ff_context.net.{0.proj,2}.
FLUX_LORA_LAYERS = "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0"


def flux_flags(
    common: list[str], data: Path, args: argparse.Namespace, sequence: int
) -> tuple[list[str], list[str], list[str]]:
    """train_dreambooth_lora_flux.py's flags for the SD run's settings: no EMA (LoRA), a LoRA learning
    rate, its own weight decay made kubetune's too; per-image captions from the same imagefolder
    (--dataset_name: the stock script then encodes each batch's captions with CLIP and T5 at every
    step, as it has no text cache; --instance_prompt is required but unused), its latent cache
    (--cache_latents), and LoRA alpha = rank (kubetune's scale 1)."""
    dropped = ("--use_ema", "--learning_rate=")
    shared = [flag for flag in common if not flag.startswith(dropped)] + [
        "--learning_rate=0.0001",
        "--adam_weight_decay=0.0001",
        f"--rank={args.rank}",
        "--guidance_scale=3.5",
        f"--max_sequence_length={sequence}",
        "--weighting_scheme=none",
    ]
    stock = [
        f"--dataset_name={data}",
        "--image_column=image",
        "--caption_column=text",
        "--instance_prompt=a shape",
        "--cache_latents",
        f"--lora_alpha={args.rank}",
        "--report_to=tensorboard",
    ]
    stock += [] if args.stock_default_targets else [f"--lora_layers={FLUX_LORA_LAYERS}"]
    return shared, stock, [f"--train_data_dir={data}", "--method=lora"]


def build_model(work: Path, kind: str) -> Path:
    import importlib

    module, function = BUILDERS[kind]
    path = work / f"model-{kind}"
    if not (path / "model_index.json").exists():
        started = time.monotonic()
        getattr(importlib.import_module(f"kubetune.dev.testing.{module}"), function)(path)
        log(f"built {kind} pipeline in {time.monotonic() - started:.0f}s")
    return path


def build_dataset(folder: Path, count: int, resolution: int) -> Path:
    from kubetune.dev.testing.shapes import generate

    train = folder / "train"
    if (train / "metadata.jsonl").exists() and len((train / "metadata.jsonl").read_text().splitlines()) == count:
        return folder
    train.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in generate(count, size=resolution * 5 // 4):  # larger than trained: resize and crop do work
        (train / f"{item.name}.jpg").write_bytes(item.jpeg)
        rows.append(json.dumps({"file_name": f"{item.name}.jpg", "text": item.caption}))
    (train / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def stock_python(work: Path) -> tuple[str, bool]:
    """An interpreter that can import torchvision for the stock script, and whether it needs the
    op-schema stub (see the module docstring)."""
    if _imports_torchvision(sys.executable, False):
        return sys.executable, False
    venv = work / "stock-venv"
    python = str(venv / "bin" / "python")
    if not Path(python).exists():
        import sysconfig

        import torch

        log("torchvision is not importable here: making a venv for the stock script")
        run([sys.executable, "-m", "venv", str(venv)])
        purelib = run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True
        ).stdout.strip()
        Path(purelib, "kubetune-bench-parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
        matching = f"torchvision==0.{minor + 15}.*" if major == 2 else "torchvision"  # torch 2.13 <-> 0.28
        run([python, "-m", "pip", "install", "-q", "--no-deps", matching])
    if _imports_torchvision(python, False):
        return python, False
    if _imports_torchvision(python, True):
        log("torchvision's C++ ops do not load on this machine: declaring torchvision::nms/qnms so it imports")
        return python, True
    raise SystemExit("[bench] cannot import torchvision for the stock script")


def _imports_torchvision(python: str, stub: bool) -> bool:
    env = dict(os.environ, KUBETUNE_BENCH_TV_STUB="1" if stub else "0")
    code = (
        "import os, torch\n"
        "if os.environ['KUBETUNE_BENCH_TV_STUB'] == '1':\n"
        "    [torch.library.define(f'torchvision::{o}', '(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')"
        " for o in ('nms', 'qnms')]\n"
        "from torchvision import transforms\n"
        "from PIL import Image\n"
        "transforms.Resize(8)(Image.new('RGB', (16, 12)))\n"
    )
    return subprocess.run([python, "-c", code], capture_output=True, env=env, cwd=tempfile.gettempdir()).returncode == 0


def measure(
    name: str, command: list[str], work: Path, hooks: Path, batch: int, stub: bool, profile: str | None, steps: int
) -> dict[str, Any]:
    out = work / f"stamps-{name}.json"
    out.unlink(missing_ok=True)
    # Profiled steps run slower: they sit at the end, and the timed window stops before them.
    profile_at = max(steps - 5, 4) if profile else 0
    profile_env = (
        {
            "KUBETUNE_BENCH_PROFILE_AT": str(profile_at),
            "KUBETUNE_BENCH_PROFILE": str(Path(profile) / f"profile-{name}.txt"),
        }
        if profile
        else {}
    )
    env = dict(
        os.environ,
        PYTHONPATH=str(hooks),
        KUBETUNE_BENCH_OUT=str(out),
        KUBETUNE_BENCH_TV_STUB="1" if stub else "0",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_CACHE=str(work / f"datasets-cache-{name}-{time.time_ns()}"),
        TOKENIZERS_PARALLELISM="false",
        **profile_env,
    )
    log(f"running {name}: {' '.join(command[:3])} ...")
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    wall = time.monotonic() - started
    result_log = result.stdout + result.stderr
    (work / f"log-{name}.txt").write_text(result_log)
    if result.returncode:
        # Reported, not raised: the other side still runs (one GPU session may be all there is).
        print(result.stderr[-4000:], file=sys.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        log(f"{name} failed ({result.returncode}): {reason}; log in {work / f'log-{name}.txt'}")
        return {"failed": f"exit {result.returncode}: {reason[:300]}", "wallSeconds": round(wall, 1)}
    data = json.loads(out.read_text())
    stamps = data["stamps"][: profile_at + 1] if profile_at else data["stamps"]
    skip = max(2, len(stamps) // 4)
    steady = stamps[skip:]
    rate = (len(steady) - 1) * batch / (steady[-1] - steady[0])
    # The median step too: on a shared CPU, other processes' bursts stretch some steps manyfold
    # (torch's threads wait on a busy core); the median step is what an unshared machine does.
    median = batch / statistics.median(b - a for a, b in itertools.pairwise(steady))
    # And per CPU second of the process (all its threads; data loading included with 0 workers):
    # what other processes' load leaves unchanged, with --threads 1 (more threads also count spinning).
    cpu = data["cpuStamps"][skip : len(stamps)]
    per_cpu_second = (len(cpu) - 1) * batch / (cpu[-1] - cpu[0])
    peak = data.get("peakCudaMiB", data["peakRssMiB"])
    log(
        f"{name}: {rate:.2f} images/s over steps {skip + 1}-{len(stamps)} ({median:.2f} at the median step, "
        f"{per_cpu_second:.2f} per CPU second), peak {peak:.0f} MiB, {wall:.0f}s end to end"
    )
    result: dict[str, Any] = {}
    pauses = [float(seconds) for seconds in CHECKPOINT_PAUSE.findall(result_log)]
    if pauses:
        # what training waited for per checkpoint, against the steps between two at the default cadence
        from kubetune.api.defaults import CHECKPOINT_EVERY_STEPS as DEFAULT_CHECKPOINT_STEPS

        step_seconds = batch / median
        share = statistics.mean(pauses) / (DEFAULT_CHECKPOINT_STEPS * step_seconds)
        result = {"checkpointPauses": pauses, "checkpointStallAtDefaultCadence": round(share, 4)}
        log(
            f"{name}: training paused {statistics.mean(pauses):.2f}s per checkpoint ({len(pauses)}): "
            f"{100 * share:.2f}% of the time at one checkpoint per {DEFAULT_CHECKPOINT_STEPS} steps"
        )
    return result | {
        "imagesPerSecond": round(rate, 3),
        "imagesPerSecondAtMedianStep": round(median, 3),
        "imagesPerCpuSecond": round(per_cpu_second, 3),
        "peakMiB": round(peak, 1),
        "peakKind": "cuda max_memory_allocated" if "peakCudaMiB" in data else "process max RSS",
        "wallSeconds": round(wall, 1),
        "steps": len(stamps),
    }


def unet_training_flops(model: Path, resolution: int, batch: int, cuda: bool) -> float:
    """FLOPs of one UNet forward + backward per image (model FLOPs: no recomputation counted)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    device = "cuda" if cuda else "cpu"
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device)
    scale = 2 ** (len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    size = resolution // scale
    latents = torch.randn(batch, unet.config.in_channels, size, size, device=device)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    added: dict[str, Any] = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 time ids
        time_ids = 6 * unet.config.addition_time_embed_dim
        pooled = unet.config.projection_class_embeddings_input_dim - time_ids
        added = {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(batch, pooled, device=device),
                "time_ids": torch.full((batch, 6), float(resolution), device=device),
            }
        }
    autocast = torch.autocast(device, torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    with FlopCounterMode(display=False) as counter, autocast:
        unet(latents, timesteps, text, **added).sample.float().pow(2).mean().backward()
    flops = counter.get_total_flops() / batch
    del unet
    if cuda:
        torch.cuda.empty_cache()
    return float(flops)


def flux_training_flops(model: Path, resolution: int, sequence: int) -> float:
    """FLOPs of one FLUX transformer forward + backward per image (all weights' gradients: as for a
    full fine-tune; LoRA skips the frozen weights' gradients, about a third), counted on the meta
    device: no memory, no weights read."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    config = FluxTransformer2DModel.load_config(model, subfolder="transformer")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    scale = 2 ** (len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    size = resolution // scale
    channels = transformer.config.in_channels // 4
    packed = FluxPipeline._pack_latents(torch.randn(1, channels, size, size, device="meta"), 1, channels, size, size)
    image_ids = FluxPipeline._prepare_latent_image_ids(1, size // 2, size // 2, "cpu", torch.float32).to("meta")
    kwargs = {
        "hidden_states": packed.requires_grad_(),
        "encoder_hidden_states": torch.randn(1, sequence, transformer.config.joint_attention_dim, device="meta"),
        "pooled_projections": torch.randn(1, transformer.config.pooled_projection_dim, device="meta"),
        "timestep": torch.full((1,), 0.5, device="meta"),
        "img_ids": image_ids,
        "txt_ids": torch.zeros(sequence, 3, device="meta"),
        "guidance": torch.full((1,), 3.5, device="meta") if transformer.config.guidance_embeds else None,
        "return_dict": False,
    }
    with FlopCounterMode(display=False) as counter:
        transformer(**kwargs)[0].float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def report(results: dict[str, Any], peak: float | None) -> None:
    print()
    print(
        f"{results['family']}: model {results['model']} {results['resolution']}px, batch {results['batchSize']}, "
        f"{results['steps']} steps, {results['mixedPrecision']}, {results['device']}"
    )
    print(
        f"{'Transformer' if results['family'] == 'flux' else 'UNet'} training FLOPs per image: "
        f"{results['unetTrainingFlopsPerImage'] / 1e9:.1f} GFLOP" + (f"; peak {peak:.0f} TFLOP/s" if peak else "")
    )
    print(f"{'':10} {'images/s':>10} {'(median)':>10} {'per CPU s':>10} {'peak MiB':>10} {'wall s':>8} {'MFU':>7}")
    for side in ("stock", "kubetune"):
        if "failed" in results.get(side, {}):
            print(f"{side:10} failed: {results[side]['failed']}")
        elif side in results:
            r = results[side]
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
            print(
                f"{side:10} {r['imagesPerSecond']:>10.2f} {r['imagesPerSecondAtMedianStep']:>10.2f} "
                f"{r['imagesPerCpuSecond']:>10.2f} "
                f"{r['peakMiB']:>10.0f} {r['wallSeconds']:>8.0f} {mfu:>7}"
            )
    if "speedup" in results:
        print(
            f"kubetune / stock: {results['speedup']:.2f}x images/s ({results['speedupAtMedianStep']:.2f}x at the "
            f"median step, {results['speedupPerCpuSecond']:.2f}x per CPU second), "
            f"{results['peakMemoryRatio']:.2f}x peak memory"
        )


if __name__ == "__main__":
    sys.exit(main())
