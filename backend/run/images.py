"""Image datasets: the inputs of an image-classifier run (`--images`), in place of a prompt file.

`--images` is a folder with one sub-folder of images per class (`<dir>/<class>/<file>`; the class is the
sub-folder's name), or a labels file: CSV with a header, or JSONL, each row giving `path` (relative to the file's
folder, or absolute) and `class`. Each image becomes a PromptRecord whose prompt is its path relative to the
dataset (the generations table's `prompt`), group its class, attributes {"class": <class>}, and `image` its
absolute path (`image_path`). Images are listed in (class, path) order, so gen_ids do not depend on the file
system, and checked readable before a run is created (`check_images`); capture then reads them batch by batch.

`run_inputs(cfg, model_kind)` is the one place that decides between prompts and images and refuses a mismatch:
images for a diffusion model, prompts for a classifier, a classifier without images.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from backend.errors import DifflensError
from backend.run.prompts import PromptRecord, load_prompts

LABEL_SUFFIXES = (".csv", ".jsonl")


def image_suffixes() -> tuple[str, ...]:
    from backend.models.classifier import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES


def record(root: Path, path: Path, cls: str) -> PromptRecord:
    """The record of one image: prompt = its path relative to root (as given when outside it), group = class."""
    full = path if path.is_absolute() else root / path
    try:
        shown = full.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        shown = str(path)
    return PromptRecord(prompt=shown, group=cls, attributes={"class": cls}, image=str(full.resolve()))


def folder_records(root: Path) -> list[PromptRecord]:
    """The images of a class-per-sub-folder dataset, in (class, path) order."""
    suffixes = image_suffixes()
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if stray:
        raise DifflensError(f"{root} holds images outside class sub-folders ({stray[0]}, ...): put each image in a "
                            "sub-folder named for its class, or give a CSV / JSONL labels file (columns path, class)")
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        out += [record(root, f.relative_to(root), folder.name) for f in files]
    return out


def label_rows(path: Path) -> list[tuple[str, str, str]]:
    """(where, path, class) of every row of a CSV / JSONL labels file; one-line errors naming the line."""
    text = path.read_text(encoding="utf-8")
    rows = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = {"path", "class"} - set(reader.fieldnames or [])
        if missing:
            raise DifflensError(f"{path}: the header lacks column(s) {', '.join(sorted(missing))}; a labels CSV has "
                                "columns path,class")
        for n, row in enumerate(reader, start=2):
            rows.append((f"{path}:{n}", row.get("path") or "", row.get("class") or ""))
        return rows
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DifflensError(f"{path}:{n}: not JSON ({exc.msg}); each line is {{\"path\": ..., \"class\": ...}}") \
                from exc
        if not isinstance(obj, dict):
            raise DifflensError(f"{path}:{n}: expected an object with path and class")
        rows.append((f"{path}:{n}", str(obj.get("path") or ""), str(obj.get("class") or "")))
    return rows


def labels_records(path: Path) -> list[PromptRecord]:
    """The images a labels file names, in (class, path) order."""
    out = []
    for where, image, cls in label_rows(path):
        if not image or not cls:
            raise DifflensError(f"{where}: give both a path and a class")
        out.append(record(path.parent, Path(image), cls))
    return sorted(out, key=lambda r: (r.group, r.prompt))


def load_images(spec: str | Path) -> list[PromptRecord]:
    """The records of an image dataset (see the module docstring); one-line errors for a missing or empty one."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise DifflensError(f"images {str(spec)!r} not found: give a folder with one sub-folder of images per class, "
                            "or a CSV / JSONL labels file (columns path, class)")
    if path.is_file() and path.suffix.lower() not in LABEL_SUFFIXES:
        raise DifflensError(f"{path} is neither a folder nor a labels file ({', '.join(LABEL_SUFFIXES)})")
    records = labels_records(path) if path.is_file() else folder_records(path)
    if not records:
        raise DifflensError(f"{path} holds no images ({', '.join(image_suffixes())}); a folder needs one sub-folder "
                            "of images per class")
    return records


def check_images(records: list[PromptRecord]) -> None:
    """A one-line error naming the first missing or unreadable image (decoded in full), before a run is created."""
    from PIL import Image, UnidentifiedImageError

    for rec in records:
        try:
            with Image.open(rec.image) as img:
                img.load()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            why = "not found" if not Path(rec.image).exists() else (str(exc).splitlines()[0] or type(exc).__name__)
            raise DifflensError(f"cannot read image {rec.image} ({why}); replace or remove it") from exc


def images_digest(records: list[PromptRecord]) -> str:
    """A digest of the dataset: every image's path, class and size (a run's identity, without reading them all)."""
    h = hashlib.sha256()
    for rec in records:
        h.update(f"{rec.prompt}\0{rec.group}\0{Path(rec.image).stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def run_inputs(cfg, model_kind: str) -> list[PromptRecord]:
    """The run's inputs: its prompts (diffusion) or its images (classifier), with one-line errors for a mismatch."""
    from backend.run.config import RunConfig

    if model_kind != "classifier":
        if cfg.images:
            raise DifflensError(f"--images is for image classifiers, but {cfg.model} is a diffusion model: give it "
                                "prompts (--prompts FILE), or --model a transformers image-classification directory")
        return load_prompts(cfg.prompts)
    if cfg.prompts != RunConfig().prompts:
        raise DifflensError(f"{cfg.model} is an image classifier: it takes images, not prompts; drop --prompts and "
                            "give --images DIR (one sub-folder per class) or a labels file")
    if not cfg.images:
        raise DifflensError(f"{cfg.model} is an image classifier: give its images with --images DIR (one sub-folder "
                            "of images per class) or --images labels.csv / .jsonl (columns path, class)")
    return load_images(cfg.images)
