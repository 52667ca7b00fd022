"""Class steering: add strength x a unit's direction at an image classifier's layer and watch its predictions move.

This module owns
  - `class_steering` (the core, on a plain transformers image classifier and a direction): logits of held images
    without and with strength x direction added to the layer's output tokens (CLS, patches or all), by a forward
    hook on the module of that name; `ClassSteering` holds them and `summary_rows` turns them into one row per
    (strength, class): share of predictions changed, mean logit change, flip rate towards a target class;
  - on an image-classifier run: `open_classifier_run` (its model and held images, generations.image_path),
    `steer_unit` / `class_steer_run` (the unit's direction from directions.unit_direction, a feature's decoder row
    of the layer's SAE; strengths as multiples of the layer's mean token norm; the default target: the unit's best
    class in the run's `concepts` table, else the class whose logit rises most; the `class_steering` table and a
    figure under media/class-steer/), and `steer_best_units` (each class's best unit steered towards it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import torch

from backend.errors import DifflensError
from backend.interventions.directions import unit_direction
from backend.run.context import check_kind, check_unit
from backend.run.schema import sae_id_of

Tokens = Literal["cls", "patch", "all"]
TOKEN_CHOICES = ("cls", "patch", "all")
DEFAULT_SCALES = (1.0, 2.0, 4.0)
"""Default strengths of steer-classes, in multiples of the layer's mean token norm."""


@dataclass
class ClassSteering:
    """Logits of N images without steering and at each strength, and what they were computed with."""

    class_names: list[str]
    strengths: list[float]
    """Absolute strengths along the unit-norm direction, in the layer's activation units."""
    baseline_logits_NC: torch.Tensor
    logits_SNC: torch.Tensor
    """Logits at each strength [S, N, C]."""
    tokens: str
    token_norm: float
    """Mean L2 norm of the layer's steered tokens in the unsteered pass (the unit of a relative strength)."""
    scales: list[float] = field(default_factory=list)
    """The relative strengths the strengths came from (strength / token_norm), if given that way."""

    @property
    def baseline_pred_N(self) -> torch.Tensor:
        return self.baseline_logits_NC.argmax(-1)

    def class_index(self, name: str) -> int:
        if name not in self.class_names:
            raise DifflensError(f"unknown class {name!r}; the model's classes: {', '.join(self.class_names)}")
        return self.class_names.index(name)

    def rising_class(self) -> str:
        """The class whose mean logit rises most at the largest strength."""
        gain_C = (self.logits_SNC[-1] - self.baseline_logits_NC).mean(0)
        return self.class_names[int(gain_C.argmax())]

    def flip_rate(self, target: str, s: int) -> float:
        """Share of images not predicted as target without steering that are predicted as target at strength s
        (NaN when every image already was)."""
        t = self.class_index(target)
        away_N = self.baseline_pred_N != t
        if not bool(away_N.any()):
            return float("nan")
        return float((self.logits_SNC[s].argmax(-1)[away_N] == t).float().mean())


def resolve_module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """The submodule named layer; `vit.encoder.layer.N` and `vit.layers.N` name the same block (transformers 4 /
    5 spellings). A one-line error lists the model's encoder layers when neither exists."""
    names = dict(model.named_modules())
    if layer in names:
        return names[layer]
    m = re.fullmatch(r"(.*?)(?:encoder\.layer|layers)\.(\d+)(.*)", layer)
    if m:
        for spelling in ("layers", "encoder.layer"):
            alias = f"{m.group(1)}{spelling}.{m.group(2)}{m.group(3)}"
            if alias in names:
                return names[alias]
    blocks = [n for n in names if re.fullmatch(r".*(?:encoder\.layer|layers)\.\d+", n)]
    raise DifflensError(f"the model has no layer {layer!r}; its encoder layers: {', '.join(blocks) or 'none'}")


def token_slice(tokens: str) -> slice:
    """The token positions of a token choice in a [B, 1 + patches, D] hidden state (token 0 = CLS)."""
    if tokens not in TOKEN_CHOICES:
        raise DifflensError(f"unknown token choice {tokens!r}; use one of {', '.join(TOKEN_CHOICES)}")
    return {"cls": slice(0, 1), "patch": slice(1, None), "all": slice(None)}[tokens]


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _logits(model, pixels_NCHW: torch.Tensor, module, edit, batch_size: int) -> torch.Tensor:
    """Logits [N, C] with edit(hidden [B, T, D]) -> hidden applied to module's output (None: no edit)."""

    def hook(_mod, _inp, output):
        hidden = edit(_hidden(output))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = module.register_forward_hook(hook) if edit is not None else None
    try:
        return torch.cat([model(pixel_values=pixels_NCHW[i:i + batch_size]).logits.float()
                          for i in range(0, len(pixels_NCHW), batch_size)])
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def mean_token_norm(model, pixels_NCHW: torch.Tensor, layer: str, tokens: Tokens = "all",
                    batch_size: int = 128) -> float:
    """Mean L2 norm of the layer's output tokens of a token choice over the images (unsteered)."""
    module, where = resolve_module(model, layer), token_slice(tokens)
    norms: list[torch.Tensor] = []

    def record(hidden_BTD):
        norms.append(hidden_BTD[:, where].float().norm(dim=-1).flatten())
        return hidden_BTD

    _logits(model, pixels_NCHW, module, record, batch_size)
    return float(torch.cat(norms).mean())


def class_steering(model, pixel_values_BCHW: torch.Tensor, layer: str, direction_D: torch.Tensor,
                   strengths: Sequence[float], tokens: Tokens = "all", batch_size: int = 128,
                   class_names: list[str] | None = None) -> ClassSteering:
    """Logits of the images unsteered and with strength x direction (normalised to unit length) added to the
    chosen tokens of layer's output, for each strength. The model is any transformers image classifier (its
    forward takes pixel_values and returns .logits) whose layer outputs [B, 1 + patches, D]."""
    strengths = [float(s) for s in strengths]
    if not strengths:
        raise DifflensError("give at least one strength (e.g. --strengths 1,2,4)")
    if not all(np.isfinite(strengths)):
        raise DifflensError(f"strengths must be finite numbers (got {strengths})")
    if len(pixel_values_BCHW) == 0:
        raise DifflensError("no images to steer")
    module, where = resolve_module(model, layer), token_slice(tokens)
    direction_D = torch.as_tensor(direction_D, dtype=torch.float32).flatten()
    norm = float(direction_D.norm())
    if not np.isfinite(norm) or norm == 0:
        raise DifflensError("the steering direction is zero or not finite")
    unit_D = direction_D / norm
    model.eval()
    norms: list[torch.Tensor] = []

    def record(hidden_BTD):
        if hidden_BTD.shape[-1] != unit_D.shape[0]:
            raise DifflensError(f"the direction has {unit_D.shape[0]} channels but {layer} has {hidden_BTD.shape[-1]}")
        norms.append(hidden_BTD[:, where].float().norm(dim=-1).flatten())
        return hidden_BTD

    baseline = _logits(model, pixel_values_BCHW, module, record, batch_size)
    steered = []
    for s in strengths:
        def add(hidden_BTD, s=s):
            out = hidden_BTD.clone()
            out[:, where] += s * unit_D.to(out.device, out.dtype)
            return out

        steered.append(_logits(model, pixel_values_BCHW, module, add, batch_size))
    names = class_names or [model.config.id2label[i] for i in range(baseline.shape[1])]
    return ClassSteering(names, strengths, baseline, torch.stack(steered), tokens, float(torch.cat(norms).mean()))


def summary_rows(result: ClassSteering, target: str) -> list[dict]:
    """One row per (strength, class): the strength's share of changed predictions and flip rate towards target,
    and the class's mean logit change and share of predictions with and without steering."""
    t = result.class_index(target)
    base_pred_N = result.baseline_pred_N
    n, n_classes = result.baseline_logits_NC.shape
    rows = []
    for s, strength in enumerate(result.strengths):
        pred_N = result.logits_SNC[s].argmax(-1)
        change_C = (result.logits_SNC[s] - result.baseline_logits_NC).mean(0)
        common = {"strength": strength, "scale": result.scales[s] if result.scales else float("nan"),
                  "tokens": result.tokens, "images": n, "target": target,
                  "changed": float((pred_N != base_pred_N).float().mean()),
                  "flip_rate": result.flip_rate(target, s),
                  "target_share": float((pred_N == t).float().mean())}
        for c in range(n_classes):
            rows.append({**common, "class_label": result.class_names[c], "logit_change": float(change_C[c]),
                         "share": float((pred_N == c).float().mean()),
                         "baseline_share": float((base_pred_N == c).float().mean())})
    return rows


# ------------------------------------------------------------------------------------------------ on a run
def _manifest(run: Path) -> dict:
    from backend.run.manifest import not_a_run
    from backend.run.store import RunStore

    manifest = RunStore(run).read_manifest()
    if manifest is None:
        raise not_a_run(run)
    return manifest


def check_classifier_run(run: Path, manifest: dict) -> None:
    if manifest.get("model_kind") != "classifier":
        raise DifflensError(f"{run} is a diffusion run; steer-classes needs an image-classifier run (made with "
                            "--images); steer a diffusion run with `python cli.py steer`")


def run_images(run: Path, manifest: dict, n: int) -> tuple[list[Path], list[str]]:
    """The first n generations' image files and class labels (image_path: absolute, or relative to the run's
    images directory, else to the working directory)."""
    from backend.run.store import RunStore

    gens = RunStore(run).read_table("generations").sort("gen_id")
    if "image_path" not in gens.columns:
        raise DifflensError(f"{run}'s generations have no image_path column; capture it again with --images")
    gens = gens.head(n) if n > 0 else gens
    images_dir = Path((manifest.get("config") or {}).get("images") or ".")
    paths = []
    for p in gens["image_path"]:
        path = Path(p)
        if not path.is_absolute():
            path = images_dir / path if (images_dir / path).is_file() else path
        if not path.is_file():
            raise DifflensError(f"image {p} of {run} is missing (looked in {images_dir}); restore the run's "
                                f"images directory")
        paths.append(path)
    labels = gens["class_label"].to_list() if "class_label" in gens.columns else gens["group"].to_list()
    return paths, labels


def load_pixels(model_dir: Path, paths: list[Path], config=None) -> torch.Tensor:
    """pixel_values [N, 3, H, W] of image files, read and preprocessed as capture did (backend/models/classifier.py
    read_image and Preprocessor: the directory's image processor, else resize and normalise from the model config)."""
    from transformers import AutoConfig

    from backend.models.classifier import Preprocessor, read_image

    preprocess = Preprocessor(Path(model_dir), config or AutoConfig.from_pretrained(model_dir, local_files_only=True))
    return preprocess([read_image(p) for p in paths]).float()


def class_concepts(run: Path, layer: str, kind: str) -> pl.DataFrame | None:
    """The rows of the run's concepts table for (layer, kind) whose concept is a class (class=NAME), with the
    class name as class_label; None without a concepts table."""
    part = run / "tables" / "concepts" / f"layer={layer}" / f"kind={kind}"
    files = sorted(part.glob("*.parquet")) if part.is_dir() else []
    if not files:
        return None
    return (pl.concat([pl.read_parquet(f) for f in files])
            .filter(pl.col("concept").str.starts_with("class="))
            .with_columns(class_label=pl.col("concept").str.slice(len("class="))))


def unit_best_class(run: Path, layer: str, kind: str, unit: int) -> str | None:
    """The class for which the unit has its highest AUROC in the run's concepts table (None: not listed there)."""
    rows = class_concepts(run, layer, kind)
    if rows is None:
        return None
    rows = rows.filter(pl.col("unit") == unit).sort("auroc", descending=True)
    return rows["class_label"][0] if rows.height else None


@dataclass
class ClassSteerResult:
    rows: pl.DataFrame
    table: Path
    figure: Path
    target: str
    target_source: str
    """concepts (the unit's best class), rising (the class whose logit rose most) or given."""


@dataclass
class ClassifierRun:
    """An image-classifier run opened for steering: its model, class names and the pixels of its held images."""

    root: Path
    model: torch.nn.Module
    class_names: list[str]
    pixels_NCHW: torch.Tensor
    image_paths: list[Path]
    tokens: str

    def check_target(self, target: str | None) -> None:
        if target is not None and target not in self.class_names:
            raise DifflensError(f"unknown class {target!r}; the model's classes: {', '.join(self.class_names)}")

    def direction(self, layer: str, kind: str, unit: int) -> torch.Tensor:
        """The unit's unit-norm direction [D] at layer (a one-line error for a unit the layer lacks)."""
        from backend.run.store import RunStore

        resolve_module(self.model, layer)
        n_channels = self.model.config.hidden_size
        if check_kind(kind) == "channel":
            check_unit(kind, unit, n_channels, layer)
            return unit_direction(kind, unit, n_channels)
        from sae.io import SAELoadError, load_sae

        sae_dir = RunStore(self.root).sae_dir(layer, sae_id_of(kind))
        if not (sae_dir / "cfg.json").is_file():
            raise DifflensError(f"{self.root} has no SAE for {layer} (kind {kind}); train one with "
                                f"`python cli.py train-sae --run {self.root} --layer {layer}`")
        try:
            sae = load_sae(sae_dir, device="cpu")
        except SAELoadError as exc:
            raise DifflensError(str(exc)) from exc
        return unit_direction(kind, unit, n_channels, sae)


def open_classifier_run(run_dir: str | Path, n_images: int = 64, tokens: str | None = None,
                        device: str = "cpu") -> ClassifierRun:
    """A classifier run's model (from its config's model directory) and its first n_images images; tokens
    defaults to the run's capture.tokens."""
    from transformers import AutoModelForImageClassification

    run = Path(run_dir)
    manifest = _manifest(run)
    check_classifier_run(run, manifest)
    config = manifest.get("config") or {}
    tokens = tokens or (config.get("capture") or {}).get("tokens") or "all"
    token_slice(tokens)
    if n_images < 1:
        raise DifflensError(f"--images must be at least 1 (got {n_images})")
    model_dir = Path(config.get("model") or "")
    if not (model_dir / "config.json").is_file():
        raise DifflensError(f"the run's model {model_dir} is missing (no config.json); restore it or rerun the run")
    model = AutoModelForImageClassification.from_pretrained(model_dir, use_safetensors=True).to(device).eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    paths, _ = run_images(run, manifest, n_images)
    return ClassifierRun(run, model, names, load_pixels(model_dir, paths, model.config).to(device), paths, tokens)


def steer_unit(cr: ClassifierRun, layer: str, kind: str, unit: int, scales: Sequence[float] = DEFAULT_SCALES,
               target: str | None = None) -> ClassSteerResult:
    """Steer one unit of an opened classifier run (strength = scale x the layer's mean token norm over the
    steered tokens); write its `class_steering` shard and figure."""
    from backend.fileio import atomic_write_with
    from backend.interventions.media import digest, safe_name
    from backend.run.store import RunStore

    scales = [float(s) for s in scales]
    if not scales or not all(np.isfinite(scales)):
        raise DifflensError(f"give finite strengths, e.g. --strengths 1,2,4 (got {scales})")
    cr.check_target(target)
    direction_D = cr.direction(layer, kind, unit)
    norm = mean_token_norm(cr.model, cr.pixels_NCHW, layer, cr.tokens)
    result = class_steering(cr.model, cr.pixels_NCHW, layer, direction_D, [s * norm for s in scales], cr.tokens,
                            class_names=cr.class_names)
    result.scales = scales
    source = "given"
    if target is None:
        target = unit_best_class(cr.root, layer, kind, unit)
        source = "concepts" if target else "rising"
        target = target or result.rising_class()
    key = digest([layer, kind, unit, scales, target, [str(p) for p in cr.image_paths], cr.tokens])
    rows = pl.DataFrame([{"unit": unit, **r, "target_source": source, "spec": key}
                         for r in summary_rows(result, target)])
    store = RunStore(cr.root)
    table = store.write_table_shard("class_steering", f"{kind}-{unit:05d}-{key}",
                                    store.table_from_rows("class_steering", rows.to_dicts()), layer=layer, kind=kind)
    figure = cr.root / "media" / "class-steer" / safe_name(layer) / f"{kind}-{unit:05d}-{key}.png"
    atomic_write_with(figure, lambda p: class_steering_figure(result, target, f"{layer} {kind} {unit}").save(p, "PNG"),
                      suffix=".png")
    return ClassSteerResult(rows, table, figure, target, source)


def class_steer_run(run_dir: str | Path, layer: str, kind: str, unit: int,
                    scales: Sequence[float] = DEFAULT_SCALES, target: str | None = None, n_images: int = 64,
                    tokens: str | None = None, device: str = "cpu") -> ClassSteerResult:
    """Steer a classifier run's unit on its first n_images images (see steer_unit)."""
    check_kind(kind)
    return steer_unit(open_classifier_run(run_dir, n_images, tokens, device), layer, kind, unit, scales, target)


def best_units(run: Path, layer: str, kind: str) -> pl.DataFrame:
    """Each class's best unit (rank 1 of concept class=NAME in the run's concepts table): class_label, unit,
    auroc."""
    rows = class_concepts(run, layer, kind)
    if rows is None:
        raise DifflensError(f"{run} has no concepts table for {layer}/{kind}; run "
                            f"`python cli.py analyze --run {run}` first")
    return rows.filter(pl.col("rank") == 1).select("class_label", "unit", "auroc").sort("class_label")


def steer_best_units(run: str | Path | ClassifierRun, layer: str, kind: str = "feature",
                     scales: Sequence[float] = (2.0,), n_images: int = 64, tokens: str | None = None,
                     device: str = "cpu") -> pl.DataFrame:
    """For every class, steer its best unit towards it (one class_steering shard each); one row per (class,
    scale): unit, auroc, flip_rate, changed. For run-all's interventions on a classifier run. run: a run directory,
    or a run opened once (open_classifier_run) for several calls; n_images, tokens and device open a directory."""
    check_kind(kind)
    cr = run if isinstance(run, ClassifierRun) else open_classifier_run(run, n_images, tokens, device)
    best = best_units(cr.root, layer, kind)
    out = []
    for row in best.iter_rows(named=True):
        r = steer_unit(cr, layer, kind, row["unit"], scales, target=row["class_label"])
        mine = r.rows.filter(pl.col("class_label") == row["class_label"])
        out.append(mine.select("scale", "flip_rate", "changed", "logit_change")
                   .with_columns(class_label=pl.lit(row["class_label"]), unit=pl.lit(row["unit"]),
                                 auroc=pl.lit(row["auroc"])))
    if not out:
        raise DifflensError(f"{cr.root}'s concepts table for {layer}/{kind} has no class= concepts")
    return pl.concat(out).select("class_label", "unit", "auroc", "scale", "flip_rate", "changed", "logit_change")


def short_label(name: str) -> str:
    """A class name short enough to stand under a bar: 'red-circle' -> 'Rcir', 'circle' -> 'circle'."""
    colour, _, shape = name.partition("-")
    return f"{colour[:1].upper()}{shape[:3]}" if shape else name[:6]


def class_steering_figure(result: ClassSteering, target: str, title: str):
    """Left: share of predictions changed and flip rate towards target, by strength; right: each class's mean
    logit change at the largest strength (target in red)."""
    from backend.analysis.draw import GRID, INK, PALETTE, Axes, canvas, fmt, font, nice_ticks

    img = canvas(760, 330)
    xs = result.scales or result.strengths
    left = Axes(img, (60, 50, 340, 270), (min(0.0, min(xs)), max(xs)), (0.0, 1.0))
    left.frame(title=f"{title} -> {target}", xlabel="scale (x mean token norm)" if result.scales else "strength",
               ylabel="share of images")
    changed = [float((result.logits_SNC[s].argmax(-1) != result.baseline_pred_N).float().mean())
               for s in range(len(xs))]
    flips = [result.flip_rate(target, s) for s in range(len(xs))]
    for ys, colour in ((changed, PALETTE[0]), (flips, PALETTE[3])):
        left.line([0.0, *xs], [0.0, *ys], colour)
        left.points(xs, ys, colour, r=3)
    left.legend([("changed", PALETTE[0]), ("flipped", PALETTE[3])])
    gain_C = (result.logits_SNC[-1] - result.baseline_logits_NC).mean(0).tolist()
    n = len(gain_C)
    lo, hi = min(0.0, min(gain_C)), max(0.0, max(gain_C))
    right = Axes(img, (420, 50, 740, 270), (-0.5, n - 0.5), (lo, hi))
    _, top, _, bottom = right.box
    for y in nice_ticks(*right.ylim):
        right.draw.line([(420, right.py(y)), (740, right.py(y))], fill=GRID)
        right.draw.text((416, right.py(y)), fmt(y), fill=INK, font=font(11), anchor="rm")
    right.draw.rectangle([420, top, 740, bottom], outline=INK)
    right.draw.text((580, top - 22), f"mean logit change at {xs[-1]:g}", fill=INK, font=font(13), anchor="mb")
    for c, g in enumerate(gain_C):
        colour = PALETTE[3] if result.class_names[c] == target else PALETTE[0]
        right.draw.rectangle([right.px(c - 0.35), min(right.py(g), right.py(0)), right.px(c + 0.35),
                              max(right.py(g), right.py(0))], fill=colour)
        right.draw.text((right.px(c), bottom + 4 + 11 * (c % 2)), short_label(result.class_names[c]), fill=INK,
                        font=font(9), anchor="mt")
    if any("-" in name for name in result.class_names):
        right.draw.text((580, bottom + 32), "R/G/B/Y: red, green, blue, yellow; cir/squ/tri: circle, square, "
                        "triangle", fill=INK, font=font(9), anchor="mt")
    return img
