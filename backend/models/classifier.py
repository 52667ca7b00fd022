"""Image classifiers: a local transformers image-classification directory (ViTForImageClassification, or any
AutoModelForImageClassification with a ViT-style encoder) as a model difflens captures, analyses and inspects.

`is_image_classifier(path)` recognises the directory from its config.json (`architectures` ending in
`ForImageClassification`); `load_classifier` loads it (local files, safetensors only) as a `ClassifierModel`.
The adapter speaks the DiffusionModel interface with one "step": `generate(paths, ...)` reads the images,
preprocesses them (the directory's preprocessor_config.json through AutoImageProcessor if present, else resize +
normalise from the model config), runs the classifier once (step 0, timestep 0; its logits are kept in
`last_logits`) and returns the images as the model saw them, so capture, the heat-map replay and the inspector
work as for a diffusion run. Its `denoiser` is the classifier module, so hook points are its submodule paths:
the encoder blocks (`vit.layers.N` in transformers 5, `vit.encoder.layer.N` in transformers 4) and their
attention and MLP parts (`.attention`, `.mlp`); which output of a block is the hidden state is
hooks.HIDDEN_OUTPUT's per-class table.

Token choice (`chosen_tokens`, read by hooks.read_activations): `cls` (the CLS token), `patch` (the h x w patch
grid, row-major: events carry it as `spatial`, so heat-maps work) or `all` (CLS and any other leading tokens,
then the grid: events carry the grid and `prefix`, the number of leading tokens). The grid is image_size /
patch_size of the config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from backend.errors import DifflensError, ModelLoadError
from backend.models.base import DiffusionModel

TOKEN_CHOICES = ("cls", "patch", "all")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ATTENTION_PARTS = ("Attention",)
MLP_PARTS = ("MLP", "Intermediate", "Output")
"""Class-name endings of a block's children listed as hook points beside the block (attention, MLP output)."""


def model_config(path: str | Path) -> dict | None:
    """A directory's config.json as a dict, or None when it has none (or it is not JSON)."""
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def is_image_classifier(path: str | Path) -> bool:
    """True when path is a local transformers image-classification directory: a config.json whose `architectures`
    name a `...ForImageClassification` class (and no diffusers model_index.json)."""
    path = Path(path)
    if not path.is_dir() or (path / "model_index.json").is_file():
        return False
    cfg = model_config(path) or {}
    archs = cfg.get("architectures") or []
    return isinstance(archs, list) and any(str(a).endswith("ForImageClassification") for a in archs)


def read_image(path: str | Path):
    """An image file as an RGB PIL image, or a one-line error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DifflensError(f"cannot read image {path}: {why}; replace or remove the file") from exc


def load_classifier(path: Path, spec: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> ClassifierModel:
    """Load a local image-classification directory (safetensors weights, no download) as a ClassifierModel."""
    from transformers import AutoModelForImageClassification

    from backend.models import quiet_hf_logging

    quiet_hf_logging()
    try:
        net = AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True, dtype=dtype,
                                                              use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {path}: {str(exc).splitlines()[0]}") from exc
    net = net.to(device).eval()
    model = ClassifierModel(net, path, spec)
    if not model.blocks():
        raise ModelLoadError(f"{path} holds a {type(net).__name__}, whose encoder is not ViT-style (no numbered "
                             "blocks of a class in backend/models/hooks.py HIDDEN_OUTPUT); difflens reads ViT-style "
                             "image classifiers (ViT, DeiT, DINOv2, BEiT, SigLIP)")
    return model


def vision_config(config):
    """The config holding image_size / patch_size / num_channels: the model's own, or its vision_config (SigLIP)."""
    return getattr(config, "vision_config", None) or config


def _hidden_output() -> dict[str, int]:
    from backend.models.hooks import HIDDEN_OUTPUT

    return HIDDEN_OUTPUT


class Preprocessor:
    """Image files -> pixel_values [B, C, H, W]: the directory's AutoImageProcessor (preprocessor_config.json), else
    resize to the config's image_size and normalise with mean = std = 0.5 (ViTImageProcessor's defaults); `shown`
    maps pixel_values back to [0, 1] images (the input as the model saw it)."""

    def __init__(self, path: Path, config):
        size = vision_config(config).image_size
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.processor = None
        self.mean, self.std = [0.5] * 3, [0.5] * 3
        if (path / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            try:
                self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"could not load {path / 'preprocessor_config.json'}: "
                                     f"{str(exc).splitlines()[0]}") from exc
            normalises = getattr(self.processor, "do_normalize", True)
            self.mean = list(getattr(self.processor, "image_mean", None) or self.mean) if normalises else [0.0] * 3
            self.std = list(getattr(self.processor, "image_std", None) or self.std) if normalises else [1.0] * 3

    def __call__(self, images: list) -> torch.Tensor:
        if self.processor is not None:
            return torch.as_tensor(np.asarray(self.processor(images=images, return_tensors="np")["pixel_values"]))
        h, w = self.size
        arrays = [np.asarray(img.resize((w, h), resample=2), dtype=np.float32) / 255.0 for img in images]  # bilinear
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return self.normalise(x)

    def normalise(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x_B3HW.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=x_B3HW.dtype)[:, None, None]
        return (x_B3HW - mean) / std

    def shown(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pv = pixel_values.float().cpu()
        mean = torch.tensor(self.mean)[:, None, None]
        std = torch.tensor(self.std)[:, None, None]
        return (pv * std + mean).clamp(0, 1)


class ClassifierModel(DiffusionModel):
    """A transformers image classifier behind the DiffusionModel interface (see the module docstring)."""

    family = "classifier"
    model_kind = "classifier"
    default_steps = 1
    default_guidance = 1.0
    decode_batch = 0

    def __init__(self, net: torch.nn.Module, path: Path, spec: str):  # no scheduler: not DiffusionModel.__init__
        self.pipe = None
        self.denoiser = net
        self.spec = spec
        self.path = Path(path)
        self.config = net.config
        self.step_index = 0
        self.cfg_active = False
        self.text_tokens = 0
        patch = vision_config(self.config).patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.preprocess = Preprocessor(self.path, self.config)
        h, w = self.preprocess.size
        self.patch_grid: tuple[int, int] = (h // ph, w // pw)
        """(h, w) of the patch tokens: image_size / patch_size."""
        self.token_grid = self.patch_grid
        self.tokens = "all"
        """The token choice hooks read (cls, patch or all); set from the run's capture.tokens (check_tokens)."""
        self.last_logits: torch.Tensor | None = None
        """Logits [B, classes] of the last generate() batch."""

    # ------------------------------------------------------------------ the model
    @property
    def default_resolution(self) -> tuple[int, int]:
        return self.preprocess.size

    @property
    def labels(self) -> list[str]:
        """Class names by logit index (the config's id2label)."""
        id2label = self.config.id2label or {}
        return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(self.config.num_labels)]

    def blocks(self) -> list[str]:
        """The encoder blocks' module paths, in order (numbered ModuleList items of a HIDDEN_OUTPUT *Layer class)."""
        known = _hidden_output()
        return [name for name, mod in self.denoiser.named_modules()
                if name.split(".")[-1].isdigit() and type(mod).__name__ in known
                and type(mod).__name__.endswith("Layer")]

    def hook_point_names(self) -> list[str]:
        """Hook points `layers` lists: each block, then its attention and MLP parts (classes in HIDDEN_OUTPUT)."""
        known = _hidden_output()
        out = []
        for block in self.blocks():
            out.append(block)
            for child, mod in self.denoiser.get_submodule(block).named_children():
                kind = type(mod).__name__
                if kind in known and kind.endswith(ATTENTION_PARTS + MLP_PARTS):
                    out.append(f"{block}.{child}")
        return out

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch grid in a block's sequence (CLS, distillation, register tokens)."""
        from backend.models.layers import layer_tokens_shape

        return layer_tokens_shape(self, self.blocks()[0])[0] - self.patch_grid[0] * self.patch_grid[1]

    @property
    def has_cls(self) -> bool:
        return self.prefix_tokens >= 1 and any(n.endswith("cls_token") for n, _ in self.denoiser.named_parameters())

    def check_tokens(self, choice: str) -> str:
        """Set the token choice after a one-line error for an unknown one or one this model lacks."""
        if choice not in TOKEN_CHOICES:
            raise DifflensError(f"unknown token choice {choice!r}; use {', '.join(TOKEN_CHOICES)} (--tokens)")
        if choice == "cls" and not self.has_cls:
            h, w = self.patch_grid
            raise DifflensError(f"{self.spec} has no CLS token (its sequence is the {h}x{w} patch grid); use "
                                "--tokens patch or --tokens all")
        self.tokens = choice
        return choice

    def chosen_tokens(self, tokens_BTC: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None, int]:
        """(tokens, spatial grid, prefix) of a hooked sequence under the token choice (see the module docstring); a
        sequence that is not prefix + grid (a head's output) passes whole, without a grid."""
        h, w = self.patch_grid
        prefix = tokens_BTC.shape[1] - h * w
        if prefix < 0:
            return tokens_BTC, None, 0
        if self.tokens == "cls":
            return tokens_BTC[:, :1], None, 0
        if self.tokens == "patch":
            return tokens_BTC[:, prefix:], (h, w), 0
        return tokens_BTC, (h, w), prefix

    # ------------------------------------------------------------------ images in
    def pixel_values(self, paths: list[str]) -> torch.Tensor:
        """The images at paths preprocessed for the model (on its device, in its dtype)."""
        pixel_values = self.preprocess([read_image(p) for p in paths])
        return pixel_values.to(self.device, self.dtype)

    @torch.no_grad()
    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] (hooks registered on the model act on this pass; step_index 0)."""
        self.step_index = 0
        self.cfg_active = False
        return self.denoiser(pixel_values=pixel_values).logits

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int] | None = None, n_steps: int | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 on_step=None, output: str = "image", negative_prompts=None, control_images=None) -> torch.Tensor:
        """Classify the images at paths `prompts` (seeds and the rest are ignored: one step, no CFG); returns the
        inputs as the model saw them, [B, 3, H, W] in [0, 1]; the logits are kept in last_logits."""
        pixel_values = self.pixel_values(list(prompts))
        self.last_logits = self.classify(pixel_values)
        if on_step is not None:
            on_step(0, torch.zeros(()), self.last_logits)
        return self.preprocess.shown(pixel_values)[:, :3]

    # ------------------------------------------------------------------ the DiffusionModel interface (probe pass)
    def encode_prompts(self, prompts: list[str], cfg: bool, negative=None):
        return {}, None

    def timesteps(self, n_steps: int = 1) -> torch.Tensor:
        return torch.zeros(1)

    def timesteps_of(self, n_steps: int = 1) -> torch.Tensor:
        return torch.zeros(1)

    def initial_latents(self, generators: list[torch.Generator], height: int | None = None,
                        width: int | None = None) -> torch.Tensor:
        """Seeded random pixel_values [B, C, H, W] (the probe pass's input)."""
        h, w = self.preprocess.size
        channels = getattr(vision_config(self.config), "num_channels", 3)
        x = torch.stack([torch.randn(channels, h, w, generator=g) for g in generators])
        return x.to(self.device, self.dtype)

    def model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.denoiser(pixel_values=x).logits

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise DifflensError(f"{self.spec} is an image classifier: it classifies images and generates none")


def read_part(model: ClassifierModel, tokens_BTC: torch.Tensor) -> slice:
    """The positions of a layer's sequence the token choice reads (what an SAE of the run was trained on)."""
    h, w = model.patch_grid
    prefix = max(tokens_BTC.shape[1] - h * w, 0)
    return {"cls": slice(0, 1), "patch": slice(prefix, None)}.get(model.tokens, slice(None))


@torch.no_grad()
def splice_test(model: ClassifierModel, layer: str, reconstruct, paths: list[str], classes: list[str],
                batch_size: int = 32):
    """The splice test of an image classifier: cross-entropy of the images' classes (by the model's label2id when
    every class is one of its labels, else the clean model's own predictions) clean / with reconstruct(tokens [N, C])
    spliced into the layer at the tokens the run reads / with those tokens zeroed (backend/models/splice.py's
    SpliceResult: fraction of the loss recovered)."""
    import torch.nn.functional as F

    from backend.models.hooks import edit_activations
    from backend.models.splice import SpliceResult

    label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
    by_label = all(c in label2id for c in classes)

    def replaced(tok_BTC, new):
        part = read_part(model, tok_BTC)
        out = tok_BTC.clone()
        out[:, part] = new(tok_BTC[:, part])
        return out

    def spliced(tok_BTC, _step):
        return replaced(tok_BTC, lambda x: reconstruct(x.reshape(-1, x.shape[-1]).float()).to(x.dtype).reshape(x.shape))

    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    for start in range(0, len(paths), batch_size):
        pixels = model.pixel_values(paths[start:start + batch_size])
        clean = model.classify(pixels)
        target = (torch.tensor([label2id[c] for c in classes[start:start + batch_size]], device=clean.device)
                  if by_label else clean.argmax(-1))
        logits = {"clean": clean}
        with edit_activations(model, layer, spliced):
            logits["spliced"] = model.classify(pixels)
        with edit_activations(model, layer, lambda tok, _s: replaced(tok, torch.zeros_like)):
            logits["zero"] = model.classify(pixels)
        for name, value in logits.items():
            sums[name] += float(F.cross_entropy(value.float(), target, reduction="sum"))
    n = max(len(paths), 1)
    return SpliceResult(sums["clean"] / n, sums["spliced"] / n, sums["zero"] / n, len(paths))
