"""A tiny BLIP captioner and a tiny CLIP model built offline, for tests of captioning and relevance
filtering, and BLIP base's architecture (random weights) for benchmarks. Nothing here downloads
anything; the weights are random, so captions are nonsense and scores arbitrary, but each goes
through the real transformers classes, processors and `generate`.

The BLIP tokenizer is a hand-written WordPiece vocabulary (`BertTokenizer`, as BLIP uses); the CLIP
tokenizer is tiny_sd's character-level one.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from kubetune.dev.testing.tiny_sd import write_tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = ["a", "an", "the", "photo", "of", "lighthouse", "at", "dusk", "red", "blue", "circle", "square", "sky"]


def _blip_processor(path: Path, image_size: int) -> Any:
    from transformers import BertTokenizer, BlipImageProcessorPil, BlipProcessor

    path.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + WORDS + [c for c in string.ascii_lowercase if c not in WORDS] + list(string.punctuation)
    vocab += [f"##{c}" for c in string.ascii_lowercase]
    (path / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]", model_max_length=64)
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer), len(dict.fromkeys(vocab))


def build_tiny_blip(path: str | Path, seed: int = 0) -> Path:
    """A BlipForConditionalGeneration of a few thousand parameters (32 px images) + its processor."""
    return _build_blip(Path(path), seed, tiny=True)


def build_blip_base(path: str | Path, seed: int = 0) -> Path:
    """BLIP base's published architecture (Salesforce/blip-image-captioning-base: ViT-B/16 at
    384 px, a 12-layer BERT decoder) with random weights and the tiny vocabulary: for timing."""
    return _build_blip(Path(path), seed, tiny=False)


def _build_blip(path: Path, seed: int, tiny: bool) -> Path:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    image_size = 32 if tiny else 384
    processor, vocab_size = _blip_processor(path, image_size)
    tokens = {"vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 5, "sep_token_id": 3, "eos_token_id": 3}
    if tiny:
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        vision |= {"image_size": image_size, "patch_size": 8}
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        text |= {"encoder_hidden_size": 32, "max_position_embeddings": 64}
    else:  # BLIP base: BlipConfig's defaults are its vision and text configs
        vision = {"image_size": image_size, "patch_size": 16}
        text = {"max_position_embeddings": 512}
    config = BlipConfig(vision_config=vision, text_config=text | tokens, projection_dim=32 if tiny else 512)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.generation_config.update(**{k: v for k, v in tokens.items() if k != "vocab_size"}, decoder_start_token_id=5)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A CLIPModel of a few thousand parameters (32 px images) + CLIPProcessor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = Path(path)
    vocab_size = write_tokenizer(path)
    tokenizer = CLIPTokenizer.from_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = small | {"vocab_size": vocab_size, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1}
    config = CLIPConfig(
        text_config=text | {"pad_token_id": 1}, vision_config=small | {"image_size": 32, "patch_size": 8}
    )
    config.projection_dim = 16
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    json.loads((path / "config.json").read_text())  # written
    return path
