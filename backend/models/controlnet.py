"""ControlNet for Stable Diffusion 1.x / 2.x: loading a local `ControlNetModel`, checking control images, and the
adapter that generates through it.

The adapter is the SD adapter with the ControlNet's residuals added to the UNet, as
`StableDiffusionControlNetPipeline.__call__` does with guess mode off and control guidance over every step: each
prompt's control image is preprocessed as the pipeline's control_image_processor does (resized to the generation
size, RGB in [0, 1]), CFG-doubled with the rest of the conditioning (it rides in the cond dicts under
CONTROL_KEY), and the ControlNet sees the same latents, timestep and text states as the UNet. The denoiser (the hook
target) is still the UNet, so hooks and capture are unchanged. A generation given no control images (the steered
prior, the dream, the splice test) runs the plain UNet; interventions on a run's prompts pass the run's control
images (backend/interventions/generate.py run_conditions).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from backend.errors import DifflensError, ModelLoadError
from backend.models.base import Cond, DiffusionModel
from backend.models.latent import StableDiffusionModel

CONTROL_KEY = "controlnet_cond"
"""The cond-dict key of the preprocessed control images [B, 3, H, W] (popped before the UNet is called)."""
ASPECT_TOLERANCE = 0.01
"""Largest relative difference between a control image's aspect ratio and the generation's: the pipeline resizes the
image to the generation size, which distorts one of another shape."""


def read_controlnet(path: str | Path, device, dtype: torch.dtype):
    """The ControlNetModel in directory path (safetensors, nothing downloaded), or a one-line error."""
    from diffusers import ControlNetModel

    from backend.models import quiet_hf_logging

    path = Path(path).expanduser()
    config = path / "config.json"
    if not config.is_file():
        hint = " (that is a pipeline directory)" if (path / "model_index.json").is_file() else ""
        raise ModelLoadError(f"--controlnet {path}: no config.json{hint}; give a ControlNetModel directory "
                             "(ControlNetModel.save_pretrained, e.g. lllyasviel/sd-controlnet-canny)")
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelLoadError(f"--controlnet {path}: config.json is not a diffusers model config ({exc})") from exc
    if name != "ControlNetModel":
        raise ModelLoadError(f"--controlnet {path} holds a {name}, not a ControlNetModel; give a ControlNet directory")
    quiet_hf_logging()
    try:
        net = ControlNetModel.from_pretrained(str(path), local_files_only=True, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the ControlNet {path}: {str(exc).splitlines()[0]}") from exc
    if net.config.global_pool_conditions:
        raise ModelLoadError(f"--controlnet {path} pools its conditions (global_pool_conditions, a shuffle-type "
                             "ControlNet that needs guess mode); difflens runs ControlNets with guess mode off")
    return net.to(device)


def check_family(model: DiffusionModel) -> None:
    """A one-line error unless model is an SD 1.x / 2.x model (the only family with ControlNet support)."""
    if not isinstance(model, StableDiffusionModel):
        raise DifflensError(f"--controlnet needs a Stable Diffusion 1.x / 2.x model; {model.spec} is a {model.family} "
                            f"model ({type(model.pipe).__name__}): drop --controlnet or use an SD 1.x / 2.x model")


def check_match(model: StableDiffusionModel, controlnet, path) -> None:
    """A one-line error unless the ControlNet's UNet-side shapes are the model's (made for this base model)."""
    unet, net = model.denoiser.config, controlnet.config
    for key in ("cross_attention_dim", "block_out_channels", "in_channels"):
        if list(_listed(getattr(unet, key))) != list(_listed(getattr(net, key))):
            raise DifflensError(f"the ControlNet {path} has {key} {getattr(net, key)} but the model {model.spec} has "
                                f"{getattr(unet, key)}: it was made for another base model")


def _listed(value):
    return value if isinstance(value, list | tuple) else [value]


class StableDiffusionControlNetModel(StableDiffusionModel):
    """SD 1.x / 2.x generating through a ControlNet (see the module docstring)."""

    def __init__(self, pipe, spec: str, controlnet, controlnet_dir: str, scale: float = 1.0):
        super().__init__(pipe, spec=spec)
        from diffusers.image_processor import VaeImageProcessor

        self.controlnet = controlnet
        self.controlnet_dir = str(controlnet_dir)
        self.controlnet_scale = float(scale)
        self.control_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True,
                                                   do_normalize=False)

    def control_tensor(self, images: list, height: int | None, width: int | None) -> torch.Tensor:
        """Control images [B, 3, H, W] in [0, 1] at the generation size, as the pipeline's prepare_image makes
        them (paths are read first)."""
        h, w = height or self.default_resolution[0], width or self.default_resolution[1]
        pil = [read_control_image(im) if isinstance(im, str | Path) else im for im in images]
        image = self.control_processor.preprocess(pil, height=h, width=w).to(dtype=torch.float32)
        return image.to(device=self.device, dtype=self.controlnet.dtype)

    def add_control(self, cond: Cond, uncond: Cond | None, control_images, height, width):
        if control_images is None:
            return cond, uncond
        n = len(cond["encoder_hidden_states"])
        if len(control_images) != n:
            raise ValueError(f"got {len(control_images)} control images for {n} prompts; give one per prompt")
        image = self.control_tensor(list(control_images), height, width)
        return {**cond, CONTROL_KEY: image}, (None if uncond is None else {**uncond, CONTROL_KEY: image})

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if CONTROL_KEY not in cond:
            return super().predict_noise(x, t, cond)
        rest = {k: v for k, v in cond.items() if k != CONTROL_KEY}
        down, mid = self.controlnet(x, t, encoder_hidden_states=rest["encoder_hidden_states"],
                                    controlnet_cond=cond[CONTROL_KEY], conditioning_scale=self.controlnet_scale,
                                    guess_mode=False, return_dict=False)
        return self.denoiser(x, t, **rest, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                             return_dict=False)[0]


def with_controlnet(model: DiffusionModel, controlnet_dir: str, scale: float = 1.0) -> StableDiffusionControlNetModel:
    """model (an SD 1.x / 2.x adapter) generating through the ControlNet in controlnet_dir, on model's device and
    dtype; a model already wrapped with that directory is returned with the scale set."""
    if isinstance(model, StableDiffusionControlNetModel) and model.controlnet_dir == str(controlnet_dir):
        model.controlnet_scale = float(scale)
        return model
    check_family(model)
    net = read_controlnet(controlnet_dir, model.device, model.dtype)
    check_match(model, net, controlnet_dir)
    return StableDiffusionControlNetModel(model.pipe, model.spec, net, str(controlnet_dir), scale)


def read_control_image(path: str | Path):
    """The image file at path as a PIL image, or a one-line error naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DifflensError(f"control image {path} not found; give an image file (a JSONL prompt's control_image is "
                            "relative to the prompt file)")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise DifflensError(f"control image {path} is not a readable image ({exc})") from exc


def check_control_image(path: str | Path, size: tuple[int, int]) -> None:
    """A one-line error unless path is a readable image of the generation's aspect ratio (size: height, width)."""
    im = read_control_image(path)
    h, w = size
    if abs((im.width / im.height) / (w / h) - 1) > ASPECT_TOLERANCE:
        raise DifflensError(f"control image {path} is {im.width}x{im.height} (width x height) but the generation is "
                            f"{w}x{h}: resizing would distort it; give an image of the generation's aspect ratio")
