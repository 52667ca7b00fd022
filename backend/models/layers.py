"""Hook points of a denoiser: which submodules exist, their shapes, and which are usual SAE targets.

This module owns the one probe pass: `probe(model)` runs the denoiser once (one latent, the empty prompt, no CFG)
with a hook on every submodule and records, per hook point, its module type, input and output shape without batch
and execution order. The result is cached on the model instance, so every shape question about a model (hook
points, a layer's channels or token grid, which blocks keep their shape for ablation, dream's unit count) costs
one denoiser pass per model in all. Shapes are those at the model's default resolution. A joint-attention block
(hooks.BLOCK_STREAMS) is probed per stream: `transformer_blocks.3` is its image stream and, where it has one,
`transformer_blocks.3:text` its text stream (listed right after it).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from backend.errors import DifflensError, UnknownLayerError
from backend.models.base import DiffusionModel
from backend.models.hooks import TEXT_SUFFIX, Stream, block_streams, check_stream, split_layer

SAE_TARGET_TYPES = {"Transformer2DModel", "BasicTransformerBlock", "PixArtTransformer2DModel", "JointTransformerBlock",
                    "FluxTransformerBlock", "FluxSingleTransformerBlock",
                    "ViTLayer", "DeiTLayer", "Dinov2Layer", "BeitLayer", "Data2VecVisionLayer", "SiglipEncoderLayer"}
_CACHE = "_difflens_probe"
"""Attribute of a DiffusionModel holding (denoiser, probes of every submodule) once probed."""


@dataclass(frozen=True)
class Probe:
    """What the probe pass saw of one hook point (shapes without batch)."""

    name: str
    module_type: str
    input_shape: tuple[int, ...] | None
    """Shape of the hidden state the module was called with (hooks.main_input); None when it is not a tensor."""
    output_shape: tuple[int, ...]
    """Shape of its hidden-state output (hooks.main_output): (C, H, W) for maps, (T, C) for token sequences."""
    order: int
    """Execution order (first call): a block comes before its parts, and its text stream right after it."""


@dataclass(frozen=True)
class HookPoint:
    name: str
    module_type: str
    shape: tuple[int, ...]
    """Output shape of one image, without batch: (C, H, W) for maps, (T, C) for token sequences."""
    channels: int
    sae_target: bool


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


def probe(model: DiffusionModel, all_modules: bool = False) -> dict[str, Probe]:
    """Per hook point (candidate_modules, or every submodule with all_modules) that outputs a tensor: its Probe, in
    execution order. One denoiser pass per model, cached on the model (see the module docstring)."""
    cached = getattr(model, _CACHE, None)
    if cached is None or cached[0] is not model.denoiser:
        cached = (model.denoiser, _probe_pass(model))
        setattr(model, _CACHE, cached)
    probes = cached[1]
    if all_modules:
        return dict(probes)
    own = getattr(model, "hook_point_names", None)  # an image classifier lists its blocks and their parts
    names = own() if own is not None else candidate_modules(model.denoiser)
    return {name: p for name, p in probes.items() if split_layer(name)[0] in names}


def _tensor_or_none(read, *args) -> torch.Tensor | None:
    try:
        x = read(*args)
    except DifflensError:
        return None
    return x if isinstance(x, torch.Tensor) else None


@torch.no_grad()
def _probe_pass(model: DiffusionModel) -> dict[str, Probe]:
    """One denoiser pass with a hook on every submodule (the model's flags and scheduler are left as they were)."""
    modules = {name: mod for name, mod in model.denoiser.named_modules() if name}
    order: dict[str, int] = {}
    shapes: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...]]] = {}
    handles = []
    for name, mod in modules.items():
        def enter(_m, _args, name=name):
            order.setdefault(name, len(order))

        points = [name]
        if block_streams(mod) is not None and not block_streams(mod).single_stream:
            points.append(name + TEXT_SUFFIX)

        def record(_m, args, kwargs, out, points=points):
            for point in points:
                stream = Stream.of(model, point)
                y = None if point in shapes else _tensor_or_none(stream.output, out)
                if y is not None:
                    x = _tensor_or_none(stream.input, args, kwargs)
                    shapes[point] = (None if x is None else tuple(x.shape[1:]), tuple(y.shape[1:]))
        handles.append(mod.register_forward_pre_hook(enter))
        handles.append(mod.register_forward_hook(record, with_kwargs=True))
    saved = model.cfg_active, model.step_index
    try:
        cond, _ = model.encode_prompts([""], cfg=False)
        t = model.timesteps_of(1)[0]  # the model's own scheduler is left as it was
        latents = model.initial_latents([torch.Generator().manual_seed(0)])
        model.cfg_active = False
        model.predict_noise(model.model_input(latents, t), t, cond)
    finally:
        model.cfg_active, model.step_index = saved
        for h in handles:
            h.remove()
    ranked = sorted(shapes, key=lambda name: (order[split_layer(name)[0]], name.endswith(TEXT_SUFFIX)))
    return {name: Probe(name, type(modules[split_layer(name)[0]]).__name__, *shapes[name], rank)
            for rank, name in enumerate(ranked)}


def hook_points(model: DiffusionModel, all_modules: bool = False) -> list[HookPoint]:
    """Every hook point with its output shape, from the probe pass (execution order, a block before its parts)."""
    points = []
    for p in probe(model, all_modules).values():
        shape = p.output_shape
        channels = shape[0] if len(shape) == 3 else shape[-1]
        target = p.module_type in SAE_TARGET_TYPES and not p.name.endswith(TEXT_SUFFIX)  # image streams
        points.append(HookPoint(p.name, p.module_type, shape, channels, target))
    return points


def check_layers(model: DiffusionModel, layers: list[str]) -> None:
    """Raise UnknownLayerError for a layer the denoiser lacks, with a did-you-mean and the usual targets, and a
    one-line DifflensError for a text stream (`:text`) of a block without one (hooks.check_stream)."""
    names = [n for n, _ in model.denoiser.named_modules() if n]
    for layer in layers:
        if split_layer(layer)[0] in names:
            check_stream(layer, model.denoiser.get_submodule(split_layer(layer)[0]))
            continue
        close = difflib.get_close_matches(layer, names, n=3)
        targets = [n for n, m in model.denoiser.named_modules() if type(m).__name__ in SAE_TARGET_TYPES]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownLayerError(
            f"unknown layer {layer!r}; {hint}SAE targets of this model: {', '.join(targets[:12])}"
            f"{' ...' if len(targets) > 12 else ''} (all: python cli.py layers --model {model.spec})"
        )


def layer_probe(model: DiffusionModel, layer: str) -> Probe:
    """The probe of one layer (any submodule), or a one-line error for an unknown layer or one without tensor
    output."""
    check_layers(model, [layer])
    p = probe(model, all_modules=True).get(layer)
    if p is None:
        raise UnknownLayerError(f"layer {layer!r} produced no tensor output, so it has no channels to read or steer")
    return p


def layer_channels(model: DiffusionModel, layer: str) -> int:
    """Channels of a layer's output (C of [B, C, H, W] or [B, T, C])."""
    shape = layer_probe(model, layer).output_shape
    return shape[0] if len(shape) == 3 else shape[-1]


def layer_tokens_shape(model: DiffusionModel, layer: str) -> tuple[int, int]:
    """(T, C) of the layer's output read as tokens [B, T, C] (hooks.to_tokens: a [B, C, H, W] map has T = H x W)."""
    shape = layer_probe(model, layer).output_shape
    if len(shape) == 3:
        return shape[1] * shape[2], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    raise DifflensError(f"layer {layer!r} outputs shape {shape} per image, which is neither a map [C, H, W] nor "
                        "tokens [T, C]")
