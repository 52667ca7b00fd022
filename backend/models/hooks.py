"""Forward hooks on denoiser blocks: read activations (output or delta) and edit them, CFG-aware.

Tensors are normalised to tokens `[B, T, C]`: UNet maps `[B, C, H, W]` become `[B, H*W, C]` (row-major
positions), transformer sequences are already `[B, T, C]`. With classifier-free guidance the denoiser's batch
is `[uncond; cond]`; readers get the conditional half unless asked otherwise. Every hook is a context
manager: nothing stays registered after its block exits, even on error.

Public helpers for other hooks (ablation, the layer probe): `main_output` / `replace_main_output` (a block's
hidden-state output, whatever container it comes in) and `main_input` (the hidden state it was called with).

Joint-attention blocks (SD3's MMDiT, FLUX's double- and single-stream blocks) return two streams, the image tokens
and the text tokens, in an order that differs between block classes (and diffusers versions): `BLOCK_STREAMS`
says per block class which output is which, as diffusers' own hook helpers keep it (TransformerBlockRegistry).
A hook point is a module path (`transformer_blocks.3`: its image stream) or, on a block with a text stream, the
path with `:text` (`transformer_blocks.3:text`); `split_layer`, `check_stream` and `Stream` resolve it. Image-stream
tokens of a transformer are laid out row-major over the model's token grid (`model.token_grid`, set by the adapter
each denoiser call: FLUX's 2x2-packed latents, SD3's and PixArt's patches), so their events carry that grid as
`spatial` like a UNet map does.

Blocks with one hidden state that return a tuple (image-classifier encoder blocks, their attention) say which item
it is in `HIDDEN_OUTPUT`, per block class. An image classifier (backend/models/classifier.py) picks the tokens a
reader sees (`chosen_tokens`: its CLS token, its patch grid, or both, the grid's leading tokens counted in the
event's `prefix`).
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


TEXT_SUFFIX = ":text"
"""Suffix of a hook point naming a joint-attention block's text stream (`transformer_blocks.3:text`)."""


@dataclass(frozen=True)
class BlockStreams:
    """Where a joint-attention block keeps its two token streams (diffusers' TransformerBlockMetadata)."""

    image: int
    """Index of the image stream (hidden_states) in the block's output tuple."""
    text: int
    """Index of the text stream (encoder_hidden_states) in the block's output tuple."""
    text_argument: str = "encoder_hidden_states"
    """The block's argument carrying the text stream in (the delta of the text stream is output - this)."""
    single_stream: bool = False
    """The block attends over one joint sequence [text; image] (FLUX single-stream): its text part is not a hook
    point. Diffusers before the split API return that sequence as one tensor: the image part is its tail."""


BLOCK_STREAMS: dict[str, BlockStreams] = {
    "JointTransformerBlock": BlockStreams(image=1, text=0),  # SD3 / SD3.5 MMDiT (the last one outputs no text)
    "FluxTransformerBlock": BlockStreams(image=1, text=0),  # FLUX double-stream
    "FluxSingleTransformerBlock": BlockStreams(image=1, text=0, single_stream=True),  # FLUX single-stream
}


HIDDEN_OUTPUT: dict[str, int] = {
    # image-classifier encoders (backend/models/classifier.py): blocks, their attention and MLP parts. transformers
    # 5 returns a tensor from a ViTLayer and (hidden state, attention weights) from a ViTAttention; transformers 4
    # returned tuples from both. A tensor output is the hidden state itself.
    **{f"{family}{part}": 0 for family in ("ViT", "DeiT", "Dinov2", "Beit", "Data2VecVision", "Siglip")
       for part in ("Layer", "EncoderLayer", "Attention", "MLP", "Output", "Intermediate")},
}
"""Per block class with one hidden state: the index of that hidden state when the block returns a tuple (the block
metadata for blocks that are not joint-attention blocks; classes not listed use main_output's rules)."""


def split_layer(layer: str) -> tuple[str, str]:
    """(module path, stream) of a hook point: `blocks.3` -> ("blocks.3", "image"), `blocks.3:text` -> "text"."""
    if layer.endswith(TEXT_SUFFIX):
        return layer[: -len(TEXT_SUFFIX)], "text"
    return layer, "image"


def block_streams(block: torch.nn.Module) -> BlockStreams | None:
    return BLOCK_STREAMS.get(type(block).__name__)


def check_stream(layer: str, block: torch.nn.Module) -> None:
    """A one-line DifflensError for a text stream the block does not have (the image stream always exists)."""
    name, stream = split_layer(layer)
    if stream == "image":
        return
    streams = block_streams(block)
    kind = type(block).__name__
    if streams is None:
        raise DifflensError(f"layer {layer!r}: a {kind} has no text stream (only joint-attention blocks, "
                            f"{', '.join(BLOCK_STREAMS)}, have one); hook {name!r}")
    if streams.single_stream:
        raise DifflensError(f"layer {layer!r}: a {kind} holds one joint [text; image] sequence, and only its image "
                            f"part is a hook point; hook {name!r}, or the text stream of a double-stream block "
                            "(transformer_blocks.N:text)")
    if getattr(block, "context_pre_only", False):
        raise DifflensError(f"layer {layer!r}: this {kind} is the last joint block and outputs no text stream "
                            f"(context_pre_only); hook an earlier block's text stream, or {name!r}")


@dataclass(frozen=True)
class Stream:
    """How a hook reads and writes one stream of a block: which output, which input (see BLOCK_STREAMS)."""

    streams: BlockStreams | None = None
    """The block's stream table; None: a block with one hidden state (main_output's rules)."""
    stream: str = "image"
    model: DiffusionModel | None = None
    """Whose `text_tokens` (the text length of the current denoiser call) split a single-stream block's one
    [text; image] tensor (older diffusers)."""

    hidden: int | None = None
    """The block's HIDDEN_OUTPUT index (None: a class not listed there, read by main_output's rules)."""

    @classmethod
    def of(cls, model: DiffusionModel, layer: str) -> Stream:
        name, stream = split_layer(layer)
        block = model.denoiser.get_submodule(name)
        return cls(block_streams(block), stream, model, HIDDEN_OUTPUT.get(type(block).__name__))

    @property
    def text_tokens(self) -> int:
        return int(getattr(self.model, "text_tokens", 0) or 0)

    def _index(self) -> int:
        return self.streams.text if self.stream == "text" else self.streams.image

    def _joined(self, x) -> bool:
        return self.streams.single_stream and isinstance(x, torch.Tensor)

    def output(self, out) -> torch.Tensor:
        """The stream's tensor in a block's output (a one-line DifflensError when it holds none)."""
        if self.streams is None and self.hidden is not None and isinstance(out, tuple | list):
            return out[self.hidden]
        if self.streams is None:
            return main_output(out)
        if self._joined(out):
            return out[:, self.text_tokens:]
        y = out[self._index()] if isinstance(out, tuple | list) else None
        if not isinstance(y, torch.Tensor):
            raise DifflensError(f"this block's output holds no {self.stream} stream")
        return y

    def replace(self, out, new: torch.Tensor):
        """The block's output with the stream replaced by new; the other stream passes through."""
        if self.streams is None and self.hidden is not None and isinstance(out, tuple | list):
            items = list(out)
            items[self.hidden] = new
            return type(out)(items)
        if self.streams is None:
            return replace_main_output(out, new)
        if self._joined(out):
            return torch.cat([out[:, :self.text_tokens], new], dim=1)
        items = list(out)
        items[self._index()] = new
        return type(out)(items)

    def input(self, args, kwargs) -> torch.Tensor:
        """The stream's tensor the block was called with."""
        if self.streams is None:
            return main_input(args, kwargs)
        text = kwargs.get(self.streams.text_argument, args[1] if len(args) > 1 else None)
        text = text if isinstance(text, torch.Tensor) and text.ndim == 3 else None  # (not the [B, C] temb)
        if self.stream == "text":
            if text is None:
                raise DifflensError("this block was not called with a text stream, so its delta is undefined")
            return text
        x = main_input(args, kwargs)
        return x[:, self.text_tokens:] if self.streams.single_stream and text is None else x


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
    prefix: int = 0
    """Tokens before the spatial grid (an image classifier's CLS token when reading all tokens): tokens[:, prefix:]
    is the (H, W) grid, row-major."""


def module(model: DiffusionModel, layer: str) -> torch.nn.Module:
    """The block a hook point lives on (`blocks.3:text` -> blocks.3), after check_layers."""
    from backend.models.layers import check_layers

    check_layers(model, [layer])
    return model.denoiser.get_submodule(split_layer(layer)[0])


def token_grid(model: DiffusionModel, n_tokens: int) -> tuple[int, int] | None:
    """(h, w) of the model's image-token grid when it has n_tokens (the adapter's `token_grid`), else None."""
    grid = getattr(model, "token_grid", None)
    return grid if grid is not None and grid[0] * grid[1] == n_tokens else None


@contextmanager
def read_activations(model: DiffusionModel, layers: list[str], callback: Callable[[HookEvent], None],
                     read: Read = "output", half: Half = "cond") -> Iterator[None]:
    """Call callback(HookEvent) each time one of layers runs, for the whole `with` block."""
    from backend.models.layers import check_layers

    check_layers(model, layers)
    with ExitStack() as stack:
        for layer in layers:
            mod = model.denoiser.get_submodule(split_layer(layer)[0])
            stream = Stream.of(model, layer)

            def hook(_m, args, kwargs, out, layer=layer, stream=stream):
                y = stream.output(out)
                if read == "delta":
                    x = stream.input(args, kwargs)
                    if x.shape != y.shape:
                        raise DifflensError(
                            f"layer {layer!r} changes shape {tuple(x.shape)} -> {tuple(y.shape)}, so it has no "
                            "delta; read its output, or pick a block that keeps its shape"
                        )
                    y = y - x
                y = select_half(y, model.cfg_active, half)
                spatial = tuple(y.shape[2:]) if y.ndim == 4 else (
                    token_grid(model, y.shape[1]) if stream.stream == "image" else None)
                chosen = getattr(model, "chosen_tokens", None)  # an image classifier's token choice (cls, patch, all)
                if chosen is not None:
                    callback(HookEvent(layer, model.step_index, *chosen(to_tokens(y))))
                    return
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
    stream = Stream.of(model, layer)

    def hook(_m, _args, out):
        y = stream.output(out)
        tok = to_tokens(y)
        if model.cfg_active and half != "both":
            uncond, cond = tok.chunk(2)
            if half == "cond":
                tok = torch.cat([uncond, edit(cond, model.step_index)])
            else:
                tok = torch.cat([edit(uncond, model.step_index), cond])
        else:
            tok = edit(tok, model.step_index)
        return stream.replace(out, from_tokens(tok, y))

    handle = mod.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
