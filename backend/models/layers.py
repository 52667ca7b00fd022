"""Hook points of a denoiser: which submodules exist, what they output, and which are usual SAE targets."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from backend.errors import UnknownLayerError
from backend.models.base import DiffusionModel

SAE_TARGET_TYPES = {"Transformer2DModel", "BasicTransformerBlock", "PixArtTransformer2DModel"}


@dataclass(frozen=True)
class HookPoint:
    name: str
    module_type: str
    shape: tuple[int, ...]
    """Output shape of one image, without batch: (C, H, W) for maps, (T, C) for token sequences."""
    channels: int
    sae_target: bool


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    return None


def candidate_modules(denoiser: torch.nn.Module, max_depth: int = 6) -> dict[str, torch.nn.Module]:
    """The block structure: top-level children and every numbered element of a ModuleList (`up_blocks.1`,
    `up_blocks.1.attentions.1`, `transformer_blocks.3`), down to max_depth dots."""
    out = {}
    for name, mod in denoiser.named_modules():
        if not name or isinstance(mod, torch.nn.ModuleList):
            continue
        parts = name.split(".")
        if (len(parts) == 1 or parts[-1].isdigit()) and len(parts) <= max_depth:
            out[name] = mod
    return out


def hook_points(model: DiffusionModel, all_modules: bool = False) -> list[HookPoint]:
    """Every hook point with its output shape, found by one denoiser pass at the default resolution."""
    modules = dict(model.denoiser.named_modules()) if all_modules else candidate_modules(model.denoiser)
    modules.pop("", None)
    shapes: dict[str, tuple[int, ...]] = {}
    order: dict[str, int] = {}
    handles = []
    for name, mod in modules.items():
        def enter(_m, _inp, name=name):
            order.setdefault(name, len(order))

        def record(_m, _inp, out, name=name):
            t = _first_tensor(out)
            if t is not None and name not in shapes:
                shapes[name] = tuple(t.shape[1:])
        handles.append(mod.register_forward_pre_hook(enter))
        handles.append(mod.register_forward_hook(record))
    try:
        with torch.no_grad():
            cond, _ = model.encode_prompts([""], cfg=False)
            gens = [torch.Generator().manual_seed(0)]
            latents = model.initial_latents(gens)
            t = model.timesteps(1)[0]
            model.predict_noise(model.scheduler.scale_model_input(latents, t), t, cond)
    finally:
        for h in handles:
            h.remove()
    points = []
    for name in sorted(shapes, key=order.__getitem__):  # execution order, a block before its parts
        mod, shape = modules[name], shapes[name]
        channels = shape[0] if len(shape) == 3 else shape[-1]
        points.append(HookPoint(name, type(mod).__name__, shape, channels, type(mod).__name__ in SAE_TARGET_TYPES))
    return points


def check_layers(model: DiffusionModel, layers: list[str]) -> None:
    """Raise UnknownLayerError for a layer the denoiser lacks, with a did-you-mean and the usual targets."""
    names = [n for n, _ in model.denoiser.named_modules() if n]
    for layer in layers:
        if layer in names:
            continue
        close = difflib.get_close_matches(layer, names, n=3)
        targets = [n for n, m in model.denoiser.named_modules() if type(m).__name__ in SAE_TARGET_TYPES]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownLayerError(
            f"unknown layer {layer!r}; {hint}SAE targets of this model: {', '.join(targets[:12])}"
            f"{' ...' if len(targets) > 12 else ''} (all: python cli.py layers --model {model.spec})"
        )


def layer_channels(model: DiffusionModel, layer: str) -> int:
    """Channels of a layer's output (C of [B, C, H, W] or [B, T, C])."""
    check_layers(model, [layer])
    for p in hook_points(model):
        if p.name == layer:
            return p.channels
    raise UnknownLayerError(f"layer {layer!r} produced no tensor output, so it has no channels to read or steer")
