"""Model loading: `load_model(spec)` turns `demo` or a local diffusers directory into a DiffusionModel, and a local
transformers image-classification directory into a ClassifierModel (backend/models/classifier.py).

The directory's `model_index.json` names the pipeline class, which picks the adapter (a classifier directory is
recognised by its config.json instead: `model_kind`). Nothing is downloaded:
loading is `local_files_only`, and weights must be safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from backend.errors import DifflensError, ModelLoadError
from backend.models.base import DiffusionModel

PIPELINE_ADAPTERS = {
    "DemoShapesPipeline": ("backend.models.demo", "DemoShapesPipeline", "DemoModel"),
    "StableDiffusionPipeline": ("diffusers", "StableDiffusionPipeline", "StableDiffusionModel"),
    "StableDiffusionXLPipeline": ("diffusers", "StableDiffusionXLPipeline", "StableDiffusionXLModel"),
    "PixArtAlphaPipeline": ("diffusers", "PixArtAlphaPipeline", "PixArtAlphaModel"),
    "StableDiffusion3Pipeline": ("diffusers", "StableDiffusion3Pipeline", "StableDiffusion3Model"),
    "FluxPipeline": ("diffusers", "FluxPipeline", "FluxModel"),
}
ADAPTER_MODULES = {"DemoModel": "backend.models.demo", "StableDiffusion3Model": "backend.models.sd3",
                   "FluxModel": "backend.models.flux"}
DIFFUSERS_DTYPE_ARG = "0.40"
"""The first diffusers whose from_pretrained takes `dtype=` (from it on `torch_dtype=` is deprecated); older ones
ignore it and load float32. pyproject's floor."""


def resolve_spec(spec: str) -> Path:
    """The local directory a spec names (`demo` is the shipped demo model)."""
    from backend.models.demo import DEMO_DIR

    if spec == "demo":
        if not (DEMO_DIR / "model_index.json").exists():
            raise ModelLoadError(
                f"the demo model is missing from {DEMO_DIR}; restore it with `git checkout data/demo-model` "
                "or train it with `python cli.py demo-model train`"
            )
        return DEMO_DIR
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {spec!r} not found: give `demo` or a local diffusers directory holding model_index.json "
            "(weights are never downloaded)"
        )
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} has no model_index.json; point --model at a diffusers pipeline directory (or a "
                             "transformers image-classification directory: config.json with a "
                             "...ForImageClassification architecture)")
    return path


def pipeline_class_name(path: Path) -> str:
    try:
        name = json.loads((path / "model_index.json").read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"{path / 'model_index.json'} is not a diffusers model index ({exc})") from exc
    if name not in PIPELINE_ADAPTERS:
        raise ModelLoadError(f"{path} holds a {name}; supported pipelines: {', '.join(PIPELINE_ADAPTERS)}")
    return name


def model_kind(spec: str) -> str:
    """"classifier" for a local image-classification directory, else "diffusion" (without loading anything)."""
    from backend.models.classifier import is_image_classifier

    return "classifier" if spec != "demo" and is_image_classifier(Path(spec).expanduser()) else "diffusion"


def load_model(spec: str = "demo", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               ) -> DiffusionModel:
    """Load `demo` or a local diffusers directory as a DiffusionModel on device in dtype (a local image-classification
    directory as a ClassifierModel)."""
    import importlib

    if model_kind(spec) == "classifier":
        from backend.models.classifier import load_classifier

        return load_classifier(Path(spec).expanduser(), spec, device=device, dtype=dtype)
    path = resolve_spec(spec)
    name = pipeline_class_name(path)
    module_name, pipe_cls_name, adapter_name = PIPELINE_ADAPTERS[name]
    quiet_hf_logging()  # before the pipeline class is imported: importing some warns (transformers' image processors)
    pipe_cls = getattr(importlib.import_module(module_name), pipe_cls_name)
    extra = {"safety_checker": None, "requires_safety_checker": False} if name == "StableDiffusionPipeline" else {}
    try:
        pipe = pipe_cls.from_pretrained(str(path), local_files_only=True, dtype=dtype,
                                        use_safetensors=True, **extra)
    except OSError as exc:
        raise ModelLoadError(f"could not load {path}: {str(exc).splitlines()[0]}") from exc
    check_dtype(pipe, dtype, path)  # before moving it: a float32 copy of a large model may not fit the GPU
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    adapter_module = importlib.import_module(ADAPTER_MODULES.get(adapter_name, "backend.models.latent"))
    return getattr(adapter_module, adapter_name)(pipe, spec=spec)


def module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """A component's dtype as diffusers / transformers report it (modules they keep in float32 excepted)."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def check_dtype(pipe, dtype: torch.dtype, path) -> None:
    """A one-line error when a component did not load in dtype (a diffusers older than 0.40 ignores `dtype=`)."""
    import diffusers
    from packaging.version import Version

    for name, component in pipe.components.items():
        got = module_dtype(component) if isinstance(component, torch.nn.Module) else None
        if got is not None and got != dtype:
            short = lambda d: str(d).removeprefix("torch.")  # noqa: E731
            why = (f"diffusers {diffusers.__version__} ignores the dtype argument: install "
                   f"diffusers>={DIFFUSERS_DTYPE_ARG} (pip install -U diffusers)"
                   if Version(diffusers.__version__) < Version(DIFFUSERS_DTYPE_ARG)
                   else f"diffusers {diffusers.__version__} kept it so")
            raise ModelLoadError(f"{path}: {name} loaded as {short(got)}, not the requested {short(dtype)}; {why}")


def quiet_hf_logging() -> None:
    """Silence diffusers/transformers loading bars and advisory warnings (our own bars report progress)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise DifflensError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]
