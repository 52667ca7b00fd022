"""Run configuration: documented dataclasses, read from a TOML file and overridden by CLI options.

A run.toml looks like this (every key optional; these are the defaults for the demo model):

    name = "demo"                       # results go to <runs_dir>/<name>
    runs_dir = "runs"
    model = "demo"                      # `demo` or a local diffusers directory
    prompts = "data/prompts/demo.jsonl" # .txt or .jsonl
    device = "cpu"
    dtype = "float32"

    [capture]
    layers = ["mid_block.attentions.0", "up_blocks.1.attentions.1"]
    images_per_prompt = 2               # seeds seed, seed+1, ...: every prompt gets the same seeds
    seed = 0
    steps = 0                           # 0: the model's default
    guidance = -1.0                     # < 0: the model's default; <= 1 turns CFG off
    batch_size = 32
    tokens_per_step = 64                # token vectors sampled per (generation, step) for SAE training
    read = "output"                     # or "delta" (output - input: the block's residual update)
    half = "cond"                       # CFG half to record: cond, uncond or both

    [sae]                               # every field of SAEStageConfig (sae/train.py SAETrainConfig + below)
    architecture = "topk"
    expansion = 8                       # latents = expansion x channels
    k = 16
    total_tokens = 4_000_000
    splice_samples = 32                 # generations used by the splice test (0: skip it)

    [analysis]                          # every field of backend/analysis/config.py AnalysisConfig
    top_k_channels = 20                 # a channel is active when among its step's top-k channels
    examples_top_n = 8                  # top generations per unit (over all steps and per peak step)

    [interventions]                     # every field of backend/stages/interventions.py InterventionsConfig
    top_units = 2                       # units per (layer, kind) steered and dreamed
    dream_steps = 100
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from backend.analysis.config import AnalysisConfig
from backend.analysis.config import validate as validate_analysis
from backend.errors import DifflensError
from backend.stages.interventions import InterventionsConfig
from backend.stages.interventions import validate as validate_interventions
from sae.train import SAETrainConfig

DEMO_LAYERS = ["mid_block.attentions.0", "up_blocks.1.attentions.1"]


@dataclass
class CaptureConfig:
    """What `capture` records."""

    layers: list[str] = field(default_factory=list)
    """Hook points (see `python cli.py layers`); empty means the model's defaults (demo only)."""
    images_per_prompt: int = 2
    """Generations per prompt, with seeds seed, seed+1, ... (the same seeds for every prompt)."""
    seed: int = 0
    steps: int = 0
    """Denoising steps; 0 means the model's default."""
    guidance: float = -1.0
    """CFG scale; negative means the model's default; <= 1 turns CFG off."""
    batch_size: int = 32
    """Generations per batch (and per shard)."""
    tokens_per_step: int = 64
    """Token vectors sampled per (generation, step) per layer for SAE training (all positions if fewer)."""
    read: str = "output"
    """"output" of each block, or "delta" (output minus input)."""
    half: str = "cond"
    """CFG half recorded: "cond", "uncond" or "both"."""


@dataclass
class SAEStageConfig(SAETrainConfig):
    """SAE training settings of a run (see sae.train.SAETrainConfig), plus what the stage adds around it."""

    total_tokens: int = 4_000_000
    """Training tokens per layer (the demo run has 0.9M tokens on its 8x8 layer: a few passes)."""
    batch_size: int = 4096
    layers: list[str] = field(default_factory=list)
    """Layers to train (empty: every captured layer)."""
    splice_samples: int = 32
    """Generations whose noise-prediction loss is measured with the SAE spliced in (0: skip the test)."""
    record_features: bool = True
    """After training, run the features capture pass (feature activity of every generation)."""

    def train_config(self) -> SAETrainConfig:
        own = {"layers", "splice_samples", "record_features"}
        return SAETrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k not in own})


@dataclass
class RunConfig:
    """Everything a run needs; stored resolved in manifest.json."""

    name: str = "demo"
    runs_dir: str = "runs"
    model: str = "demo"
    prompts: str = "data/prompts/demo.jsonl"
    device: str = "cpu"
    dtype: str = "float32"
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    sae: SAEStageConfig = field(default_factory=SAEStageConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    interventions: InterventionsConfig = field(default_factory=InterventionsConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"capture": CaptureConfig, "sae": SAEStageConfig, "analysis": AnalysisConfig,
            "interventions": InterventionsConfig}


def _check_keys(obj: dict, cls, where: str) -> None:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = set(obj) - allowed
    if unknown:
        names, allowed_names = ", ".join(sorted(unknown)), ", ".join(sorted(allowed))
        raise DifflensError(f"{where}: unknown key(s) {names}; allowed: {allowed_names}")


def from_dict(data: dict, where: str = "config") -> RunConfig:
    top = {k: v for k, v in data.items() if k not in SECTIONS}
    _check_keys(top, RunConfig, where)
    sections = {}
    for name, cls in SECTIONS.items():
        sec = data.get(name, {})
        if not isinstance(sec, dict):
            raise DifflensError(f"{where}: [{name}] must be a table")
        _check_keys(sec, cls, f"{where} [{name}]")
        sections[name] = cls(**sec)
    return RunConfig(**top, **sections)


def load_config(path: str | Path | None) -> RunConfig:
    """Defaults, or a TOML file over the defaults."""
    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise DifflensError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise DifflensError(f"{path} is not valid TOML: {exc}") from exc
    return from_dict(data, str(path))


def override(cfg: RunConfig, **options) -> RunConfig:
    """Apply CLI options that were given (None means not given); `capture_<field>` targets [capture]."""
    for key, value in options.items():
        if value is None:
            continue
        for section in SECTIONS:
            if key.startswith(section + "_"):
                setattr(getattr(cfg, section), key[len(section) + 1:], value)
                break
        else:
            setattr(cfg, key, value)
    return cfg


def validate(cfg: RunConfig) -> RunConfig:
    validate_analysis(cfg.analysis)
    validate_interventions(cfg.interventions)
    c = cfg.capture
    if c.read not in ("output", "delta"):
        raise DifflensError(f"capture.read is {c.read!r}; use output or delta")
    if c.half not in ("cond", "uncond", "both"):
        raise DifflensError(f"capture.half is {c.half!r}; use cond, uncond or both")
    for name in ("images_per_prompt", "batch_size", "tokens_per_step"):
        if getattr(c, name) < 1:
            raise DifflensError(f"capture.{name} must be at least 1 (got {getattr(c, name)})")
    if c.steps < 0:
        raise DifflensError(f"capture.steps must be >= 0 (got {c.steps})")
    if not c.layers:
        if cfg.model != "demo":
            raise DifflensError("no layers given: pass --layer (see `python cli.py layers --model ...`)")
        c.layers = list(DEMO_LAYERS)
    return cfg


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
