"""The demo image dataset: shapes-world PNGs in one sub-folder per class, the layout `--images DIR` reads.

This module owns `write_demo_images`: a deterministic, balanced set of noisy renders (backend/demo/vit.py's
`render_images`, at the demo ViT's resolution) written to a staging directory beside the target and renamed into
place, so a failed or interrupted command leaves no half-written dataset. File names carry each image's full
ground truth: <class>/<index:05d>-<size>-<position>-<background>.png.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from backend.demo import shapes, vit
from backend.errors import DifflensError


def balanced_specs(n: int, classes: str, rng: np.random.Generator) -> list[shapes.ShapeSpec]:
    """n specs, classes taking turns (class i gets image i, i + n_classes, ...), every other attribute drawn
    uniformly."""
    by_class: dict[str, list[shapes.ShapeSpec]] = {}
    for spec in shapes.all_specs():
        by_class.setdefault(vit.class_of(spec, classes), []).append(spec)
    pools = [by_class[name] for name in vit.class_names(classes)]
    return [pools[i % len(pools)][int(rng.integers(len(pools[i % len(pools)])))] for i in range(n)]


def image_name(index: int, spec: shapes.ShapeSpec, classes: str) -> str:
    """The image's path inside the dataset: <class>/<index:05d>-<size>-<position>-<background>.png."""
    return f"{vit.class_of(spec, classes)}/{index:05d}-{spec.size}-{spec.position}-{spec.background}.png"


def check_target(out: Path, overwrite: bool) -> None:
    """A one-line error unless out can take a new dataset: missing, an empty directory, or (with overwrite) a
    directory."""
    if out.exists() and not out.is_dir():
        raise DifflensError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DifflensError(f"--out {out} is not empty; give --overwrite to replace it, or another --out")


def write_demo_images(out: str | Path, n: int = 1200, classes: str = "shape-colour", seed: int = 0,
                      noise: float = 8.0, overwrite: bool = False, progress: bool = True) -> dict[str, int]:
    """Write n demo images into out/<class>/ (atomically: staged beside out, then renamed); return the count per
    class."""
    out = Path(out)
    vit.check_classes(classes)
    if n < 1:
        raise DifflensError(f"--n must be at least 1 (got {n})")
    if noise < 0:
        raise DifflensError(f"--noise must be >= 0 (got {noise})")
    check_target(out, overwrite)
    rng = np.random.default_rng(seed)
    specs = balanced_specs(n, classes, rng)
    images = vit.render_images(specs, rng, noise)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        counts: dict[str, int] = {}
        for i, (spec, img) in enumerate(tqdm(list(zip(specs, images, strict=True)), desc="demo-images",
                                             unit="img", disable=not progress)):
            path = staging / image_name(i, spec, classes)
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(img).save(path)
            counts[path.parent.name] = counts.get(path.parent.name, 0) + 1
        os.chmod(staging, 0o755)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dict(sorted(counts.items()))


def _replace_dir(new: Path, out: Path) -> None:
    """Rename new onto out; an existing out is moved aside first and removed after."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)
