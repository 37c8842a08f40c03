"""Captioning and CLIP scoring speed through kubetune.trainer.captioning's own code path, with
real model architectures: BLIP base (Salesforce/blip-image-captioning-base's published config:
ViT-B/16 at 384 px, 12-layer BERT decoder) and CLIP ViT-B/32 (CLIPConfig's defaults), both with
random weights because nothing is downloaded. Random weights never emit the end token early, so
every caption is exactly --max-new-tokens long (real BLIP captions are about 10-20 tokens).

    .venv/bin/python bench/trainer/caption_speed.py --images 16 --batch-size 8 --max-new-tokens 20

Prints one JSON object: images/s of each, on the device there is (CUDA when available).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--size", type=int, default=512, help="side of the test images in pixels")
    args = parser.parse_args()

    import torch
    from trainer_testkit import write_imagefolder
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from kubetune.dev.testing.tiny_sd import write_tokenizer
    from kubetune.dev.testing.tiny_vlm import build_blip_base
    from kubetune.trainer import captioning
    from kubetune.trainer.data import open_imagefolder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = open_imagefolder(str(write_imagefolder(root / "data", args.images, size=args.size)), "image", "text")
        images = [(i, data.image(i)) for i in range(len(data))]
        result: dict[str, object] = {"device": device, "images": args.images, "batchSize": args.batch_size}

        blip = build_blip_base(root / "blip")
        settings = captioning.CaptionSettings(str(blip), max_new_tokens=args.max_new_tokens)
        caption = captioning._captioner(blip, settings, device)()
        caption(images[:1])  # warm-up
        started = time.perf_counter()
        for start in range(0, len(images), args.batch_size):
            caption(images[start : start + args.batch_size])
        result["captionImagesPerSecond"] = round(len(images) / (time.perf_counter() - started), 3)
        result["maxNewTokens"] = args.max_new_tokens

        clip = root / "clip"
        write_tokenizer(clip)
        from transformers import CLIPImageProcessorPil, CLIPTokenizer

        CLIPModel(CLIPConfig()).eval().save_pretrained(clip)  # ViT-B/32: CLIPConfig's defaults
        CLIPProcessor(
            image_processor=CLIPImageProcessorPil(), tokenizer=CLIPTokenizer.from_pretrained(clip)
        ).save_pretrained(clip)
        score = captioning._scorer(clip, data.captions, device)()
        score(images[:1])
        started = time.perf_counter()
        for start in range(0, len(images), 32):
            score(images[start : start + 32])
        result["clipImagesPerSecond"] = round(len(images) / (time.perf_counter() - started), 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
