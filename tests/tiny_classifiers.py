"""Tiny image classifiers and image folders for tests: a random ViTForImageClassification saved with
save_pretrained (safetensors, a preprocessor_config.json), and class-per-sub-folder PNG images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("red", "blue")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def build_tiny_vit(path: Path, classes=CLASSES, image_size: int = 16, patch_size: int = 4, hidden: int = 16,
                   layers: int = 2, preprocessor: bool = True, seed: int = 0) -> Path:
    """A random ViTForImageClassification (hidden width `hidden`, (image_size / patch_size)^2 patches + CLS) saved to
    path, with a ViTImageProcessor config when preprocessor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=2, intermediate_size=2 * hidden, num_labels=len(classes),
                    id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    ViTForImageClassification(cfg).eval().save_pretrained(path, safe_serialization=True)
    if preprocessor:
        ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return Path(path)


def write_image_folder(root: Path, classes=CLASSES, per_class: int = 3, size: int = 20, seed: int = 0) -> Path:
    """root/<class>/<class>-<i>.png: noisy images tinted by their class's colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            pixels = np.clip(np.array(COLOURS.get(c, (128, 128, 128)))[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{c}-{i}.png")
    return Path(root)


def build_tiny_siglip(path: Path, classes=CLASSES, image_size: int = 16, patch_size: int = 4, hidden: int = 16,
                      seed: int = 0) -> Path:
    """A random SiglipForImageClassification: a ViT-style encoder without a CLS token (mean-pooled head)."""
    import torch
    from transformers import SiglipConfig, SiglipForImageClassification

    torch.manual_seed(seed)
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=2 * hidden)
    text = dict(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * hidden,
                vocab_size=16, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg = SiglipConfig(vision_config=vision, text_config=text, num_labels=len(classes),
                       id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    SiglipForImageClassification(cfg).eval().save_pretrained(path, safe_serialization=True)
    return Path(path)
