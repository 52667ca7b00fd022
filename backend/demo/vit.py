"""The demo ViT: a small transformers `ViTForImageClassification` trained from scratch on the shapes world.

This module owns
  - the demo classification tasks (`CLASSINGS`: shape, or shape x colour) and each spec's class name;
  - the held-out split: whole attribute combinations (size, position, background) of every class that training
    never sees (`split_specs`), so held-out accuracy measures generalisation, not memory;
  - rendering at the ViT's resolution with mild per-pixel noise (`render_images`: every image distinct) and the
    normalisation the saved `preprocessor_config.json` describes (`pixel_values`);
  - `train_demo_vit` (seeded, deterministic, progress bar) which saves the model (safetensors), its image
    processor settings and `metrics.json` (held-out accuracy, train time), and `heldout_accuracy`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from backend.demo import shapes
from backend.demo.train import warmup_cosine
from backend.errors import DifflensError

DEMO_VIT_DIR = Path(__file__).resolve().parents[2] / "data" / "demo-vit"
RESOLUTION = 32
PATCH = 4
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
SPLIT_SEED = 17
"""Seed of the held-out split of attribute combinations: fixed, so every evaluation holds out the same ones."""
HELDOUT_PER_CLASS = 0.2
"""Share of each shape x colour class's combinations (size x position x background) held out of training."""
CLASSINGS = ("shape", "shape-colour")


@dataclass
class DemoViTConfig:
    """Settings of `python cli.py train-demo-vit`."""

    out: str = str(DEMO_VIT_DIR)
    """Where the trained model goes (config.json, model.safetensors, preprocessor_config.json, metrics.json)."""
    classes: str = "shape-colour"
    """shape (3 classes) or shape-colour (12: 'red-circle', ...)."""
    steps: int = 2400
    """Optimizer steps."""
    batch_size: int = 64
    lr: float = 2e-3
    """Peak learning rate (linear warm-up, then cosine decay to 5%)."""
    warmup: int = 100
    weight_decay: float = 0.05
    noise: float = 8.0
    """Std of the per-pixel Gaussian noise added to rendered images, in 0-255 units."""
    shift: int = 3
    """Training images are shifted by up to this many pixels each way (edges repeated), so the model learns
    shapes anywhere rather than the positions it saw (held-out images are not shifted)."""
    hidden: int = 64
    """Hidden size (channels of every encoder layer's output)."""
    layers: int = 4
    heads: int = 4
    mlp: int = 128
    """Intermediate (MLP) size."""
    eval_images: int = 1200
    """Held-out images the closing accuracy is measured on."""
    seed: int = 0
    threads: int = 0
    """torch threads (0: torch's default)."""


def class_names(classes: str) -> list[str]:
    """The class names of a classing, in label order."""
    check_classes(classes)
    if classes == "shape":
        return list(shapes.SHAPES)
    return [f"{c}-{s}" for c in shapes.COLOURS for s in shapes.SHAPES]


def check_classes(classes: str) -> None:
    if classes not in CLASSINGS:
        raise DifflensError(f"unknown --classes {classes!r}; use one of {', '.join(CLASSINGS)}")


def class_of(spec: shapes.ShapeSpec, classes: str) -> str:
    """A spec's class name under a classing: 'circle' or 'red-circle'."""
    return spec.shape if classes == "shape" else f"{spec.colour}-{spec.shape}"


def split_specs() -> tuple[list[shapes.ShapeSpec], list[shapes.ShapeSpec]]:
    """(train, held-out) attribute combinations: per shape x colour, a fixed HELDOUT_PER_CLASS share of its
    size x position x background combinations is held out (the same for either classing)."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, held = [], []
    by_class: dict[str, list[shapes.ShapeSpec]] = {}
    for spec in shapes.all_specs():
        by_class.setdefault(class_of(spec, "shape-colour"), []).append(spec)
    for specs in by_class.values():
        order = rng.permutation(len(specs))
        n_held = round(HELDOUT_PER_CLASS * len(specs))
        held += [specs[i] for i in order[:n_held]]
        train += [specs[i] for i in order[n_held:]]
    return train, held


def render_images(specs: list[shapes.ShapeSpec], rng: np.random.Generator, noise: float = 8.0,
                  res: int = RESOLUTION, shift: int = 0) -> np.ndarray:
    """uint8 [N, res, res, 3]: each spec rendered by the shapes world, shifted by up to `shift` pixels each way
    (edges repeated), plus Gaussian pixel noise of std `noise`."""
    clean = shapes.render_batch(specs, res).astype(np.float32)
    if shift > 0:
        clean = shifted(clean, rng.integers(-shift, shift + 1, size=(len(specs), 2)))
    noisy = clean + rng.normal(0.0, noise, size=clean.shape).astype(np.float32) if noise > 0 else clean
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def shifted(images_NHWC: np.ndarray, offsets_N2: np.ndarray) -> np.ndarray:
    """Each image moved by its (dy, dx) offset, the uncovered border filled by repeating the edge."""
    m = int(np.abs(offsets_N2).max()) if len(offsets_N2) else 0
    if m == 0:
        return images_NHWC
    padded = np.pad(images_NHWC, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    h, w = images_NHWC.shape[1:3]
    return np.stack([padded[i, m - dy:m - dy + h, m - dx:m - dx + w] for i, (dy, dx) in enumerate(offsets_N2)])


def pixel_values(images_NHW3: np.ndarray) -> torch.Tensor:
    """float32 [N, 3, H, W]: uint8 images rescaled to [0, 1] and normalised by IMAGE_MEAN / IMAGE_STD (what
    ViTImageProcessor does with the saved preprocessor_config.json)."""
    x = torch.from_numpy(np.ascontiguousarray(images_NHW3)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def labelled_batch(specs: list[shapes.ShapeSpec], n: int, classes: str, rng: np.random.Generator,
                   noise: float, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel values [n, 3, H, W], labels [n]) of n specs drawn from `specs` with replacement."""
    index = {name: i for i, name in enumerate(class_names(classes))}
    chosen = [specs[i] for i in rng.integers(len(specs), size=n)]
    labels = torch.tensor([index[class_of(s, classes)] for s in chosen])
    return pixel_values(render_images(chosen, rng, noise, shift=shift)), labels


def new_vit(cfg: DemoViTConfig):
    """An untrained ViTForImageClassification of cfg's size, labelled with the classing's names."""
    from transformers import ViTConfig, ViTForImageClassification

    names = class_names(cfg.classes)
    config = ViTConfig(image_size=RESOLUTION, patch_size=PATCH, num_channels=3, hidden_size=cfg.hidden,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp,
                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                       layer_norm_eps=1e-6)
    return ViTForImageClassification(config)


def image_processor():
    """The ViT image processor matching pixel_values (resize to RESOLUTION, rescale 1/255, IMAGE_MEAN/STD)."""
    try:  # transformers 5: the PIL backend (the default one needs torchvision); transformers 4: the only one
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:
        from transformers import ViTImageProcessor as Processor

    return Processor(do_resize=True, size={"height": RESOLUTION, "width": RESOLUTION}, do_rescale=True,
                                rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGE_MEAN),
                                image_std=list(IMAGE_STD))


@torch.no_grad()
def predict(model, pixels_NCHW: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted label per image [N]."""
    model.eval()
    return torch.cat([model(pixel_values=pixels_NCHW[i:i + batch_size]).logits.argmax(-1)
                      for i in range(0, len(pixels_NCHW), batch_size)])


def heldout_accuracy(model, n: int = 1200, seed: int = 1, noise: float = 8.0) -> float:
    """Accuracy of a demo ViT on n freshly rendered images of the held-out combinations (its id2label gives the
    classing)."""
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    classes = "shape" if names == class_names("shape") else "shape-colour"
    if names != class_names(classes):
        raise DifflensError(f"this model's labels {names[:4]}... are not a demo classing")
    _, held = split_specs()
    pixels, labels = labelled_batch(held, n, classes, np.random.default_rng(seed), noise)
    return float((predict(model, pixels) == labels).float().mean())


def check_config(cfg: DemoViTConfig) -> None:
    """One-line errors for settings that cannot train, before anything is written."""
    check_classes(cfg.classes)
    for name in ("steps", "batch_size", "hidden", "layers", "heads", "mlp", "eval_images"):
        if getattr(cfg, name) < 1:
            raise DifflensError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.hidden % cfg.heads:
        raise DifflensError(f"--hidden {cfg.hidden} must be a multiple of --heads {cfg.heads}")
    if cfg.noise < 0 or cfg.lr <= 0:
        raise DifflensError("--noise must be >= 0 and --lr > 0")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DifflensError(f"--out {out} is a file; give a directory")


def train_demo_vit(cfg: DemoViTConfig, progress: bool = True) -> dict:
    """Train the demo ViT from scratch and save it to cfg.out; return its metrics (also in metrics.json)."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = new_vit(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    rng = np.random.default_rng(cfg.seed)
    train, _ = split_specs()
    model.train()
    t0 = time.perf_counter()
    losses = []
    with tqdm(total=cfg.steps, desc="train-demo-vit", unit="step", disable=not progress) as bar:
        for _ in range(cfg.steps):
            pixels, labels = labelled_batch(train, cfg.batch_size, cfg.classes, rng, cfg.noise, cfg.shift)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
            bar.update()
    seconds = time.perf_counter() - t0
    metrics = {
        "classes": cfg.classes, "n_classes": len(class_names(cfg.classes)),
        "heldout_accuracy": heldout_accuracy(model, cfg.eval_images, seed=cfg.seed + 1, noise=cfg.noise),
        "heldout_images": cfg.eval_images, "final_loss": float(np.mean(losses[-50:])),
        "train_seconds": round(seconds, 1), "load_average": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters()),
        "config": asdict(cfg),
    }
    save_demo_vit(model, Path(cfg.out), metrics)
    return metrics


def save_demo_vit(model, out: Path, metrics: dict) -> None:
    """Write the model (safetensors), preprocessor_config.json and metrics.json into out, each file atomically
    (metrics.json last: its presence means the directory is complete)."""
    from backend.fileio import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    staging = out.parent / f".{out.name}.saving"
    model.save_pretrained(staging, safe_serialization=True)
    image_processor().save_pretrained(staging)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        os.chmod(staging / name, 0o644)
        os.replace(staging / name, out / name)
    for leftover in staging.iterdir():
        leftover.unlink()
    staging.rmdir()
    atomic_write_json(out / "metrics.json", metrics)


def load_demo_vit(path: str | Path = DEMO_VIT_DIR):
    """The saved demo ViT (eval mode), or a one-line error saying how to make it."""
    from transformers import ViTForImageClassification

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise DifflensError(f"no demo ViT in {path}; train one with `python cli.py train-demo-vit --out {path}` "
                            "(or `git checkout data/demo-vit`)")
    return ViTForImageClassification.from_pretrained(path, use_safetensors=True).eval()


def metrics_of(path: str | Path = DEMO_VIT_DIR) -> dict:
    """The metrics.json written beside a trained demo ViT."""
    return json.loads((Path(path) / "metrics.json").read_text())
