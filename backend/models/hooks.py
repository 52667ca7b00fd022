"""Forward hooks on denoiser blocks: read activations (output or delta) and edit them, CFG-aware.

Tensors are normalised to tokens `[B, T, C]`: UNet maps `[B, C, H, W]` become `[B, H*W, C]` (row-major
positions), transformer sequences are already `[B, T, C]`. With classifier-free guidance the denoiser's batch
is `[uncond; cond]`; readers get the conditional half unless asked otherwise. Every hook is a context
manager: nothing stays registered after its block exits, even on error.

Public helpers for other hooks (ablation, the layer probe): `main_output` / `replace_main_output` (a block's
hidden-state output, whatever container it comes in) and `main_input` (the hidden state it was called with).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from backend.errors import DifflensError
from backend.models.base import DiffusionModel

Read = Literal["output", "delta"]
Half = Literal["cond", "uncond", "both"]


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C]; [B, T, C] unchanged."""
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    if x.ndim == 3:
        return x
    raise DifflensError(f"cannot read a hook output of shape {tuple(x.shape)}; expected [B,C,H,W] or [B,T,C]")


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of to_tokens for a tensor shaped like `like`."""
    if like.ndim == 4:
        b, c, h, w = like.shape
        out = tokens.transpose(1, 2).reshape(b, c, h, w)  # a channels-last view of the tokens
        # hand the next block the memory layout it expects: convolutions on a channels-last view run slower
        return out.contiguous() if like.is_contiguous() else out
    return tokens


def main_output(out):
    """The hidden-state tensor of a block's output (blocks may return tensors, tuples or lists whose first item is
    the hidden state, or output dataclasses with `.sample`); a one-line DifflensError when it holds none."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    raise DifflensError(f"hook output of type {type(out).__name__} holds no tensor")


def replace_main_output(out, new: torch.Tensor):
    """The block's output with its hidden state (see main_output) replaced by new; auxiliary outputs pass through."""
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    out.sample = new
    return out


def main_input(args, kwargs) -> torch.Tensor:
    """The hidden-state tensor a block was called with (its first positional argument, or `hidden_states=`)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise DifflensError("this block's input is not a tensor, so its delta (output - input) is undefined")


def select_half(x: torch.Tensor, cfg_active: bool, half: Half) -> torch.Tensor:
    """The conditional / unconditional half of a CFG batch (the whole batch without CFG)."""
    if not cfg_active or half == "both":
        return x
    uncond, cond = x.chunk(2)
    return cond if half == "cond" else uncond


@dataclass
class HookEvent:
    """What a reader is told at each call of a hooked block."""

    layer: str
    step: int
    tokens: torch.Tensor  # [B, T, C], the selected CFG half
    spatial: tuple[int, int] | None  # (H, W) of a map, None for sequences


def module(model: DiffusionModel, layer: str) -> torch.nn.Module:
    from backend.models.layers import check_layers

    check_layers(model, [layer])
    return model.denoiser.get_submodule(layer)


@contextmanager
def read_activations(model: DiffusionModel, layers: list[str], callback: Callable[[HookEvent], None],
                     read: Read = "output", half: Half = "cond") -> Iterator[None]:
    """Call callback(HookEvent) each time one of layers runs, for the whole `with` block."""
    from backend.models.layers import check_layers

    check_layers(model, layers)
    with ExitStack() as stack:
        for layer in layers:
            mod = model.denoiser.get_submodule(layer)

            def hook(_m, args, kwargs, out, layer=layer):
                y = main_output(out)
                if read == "delta":
                    x = main_input(args, kwargs)
                    if x.shape != y.shape:
                        raise DifflensError(
                            f"layer {layer!r} changes shape {tuple(x.shape)} -> {tuple(y.shape)}, so it has no "
                            "delta; read its output, or pick a block that keeps its shape"
                        )
                    y = y - x
                y = select_half(y, model.cfg_active, half)
                spatial = tuple(y.shape[2:]) if y.ndim == 4 else None
                callback(HookEvent(layer, model.step_index, to_tokens(y), spatial))

            handle = mod.register_forward_hook(hook, with_kwargs=True)
            stack.callback(handle.remove)
        yield


@contextmanager
def edit_activations(model: DiffusionModel, layer: str,
                     edit: Callable[[torch.Tensor, int], torch.Tensor], half: Half = "both") -> Iterator[None]:
    """Replace a block's output tokens with edit(tokens [B, T, C], step) for the `with` block.

    half="cond" edits only the conditional half of a CFG batch (the rest passes through unchanged).
    """
    mod = module(model, layer)

    def hook(_m, _args, out):
        y = main_output(out)
        tok = to_tokens(y)
        if model.cfg_active and half != "both":
            uncond, cond = tok.chunk(2)
            if half == "cond":
                tok = torch.cat([uncond, edit(cond, model.step_index)])
            else:
                tok = torch.cat([edit(uncond, model.step_index), cond])
        else:
            tok = edit(tok, model.step_index)
        return replace_main_output(out, from_tokens(tok, y))

    handle = mod.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
