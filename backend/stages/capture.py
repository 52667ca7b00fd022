"""Capture: generate images for a prompt set and record per-timestep activity of chosen blocks.

Per layer and batch of generations it writes
  - tables/activity/layer=L/kind=channel/part-G.parquet: (gen_id, step, unit, mean, max), the spatial mean and
    max of every channel, sorted by (unit, step, gen_id);
  - activations/L/part-G.{npy,parquet}: a random sample of token vectors per (generation, step), with
    (gen_id, step, position): float16 (clamped to its range, counted in meta.json), or bfloat16 for a bfloat16 model;
  - with SAEs given, tables/activity/layer=L/kind=<feature kind>/part-G.parquet for active features only (kind
    feature for a layer's default SAE, feature.<sae_id> for another: several SAEs of a layer are recorded at once);
and per batch the generations rows and images. A batch is complete once its marker is written, so a killed
capture resumes at the first incomplete batch and ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from backend.buffers import BufferPool
from backend.errors import DifflensError
from backend.models.base import DiffusionModel, condition_arguments, to_uint8
from backend.models.hooks import HookEvent, read_activations
from backend.run import distributed
from backend.run.config import CaptureConfig, RunConfig, file_digest, validate
from backend.run.manifest import is_run
from backend.run.manifest import stage as stage_record
from backend.run.prompts import PromptRecord, load_prompts
from backend.run.schema import feature_kind
from backend.run.store import FLOAT16_MAX, RunStore, shard_name, stage_key, token_dtype
from backend.stages import features

STAGE = "capture"
FEATURES_STAGE = "features"  # a later pass that records SAE features of an already captured run
# A feature encoder maps tokens [N, C] to sparse codes: (values [N, k], indices [N, k]) with zeros allowed.
FeatureEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Generation:
    gen_id: int
    prompt: PromptRecord
    seed: int


def plan_generations(prompts: list[PromptRecord], images_per_prompt: int, seed: int) -> list[Generation]:
    """gen_id = prompt_index * images_per_prompt + image_index; image i of every prompt uses seed + i."""
    return [
        Generation(p * images_per_prompt + i, rec, seed + i)
        for p, rec in enumerate(prompts)
        for i in range(images_per_prompt)
    ]


def plan_batches(gens: list[Generation], batch_size: int, rank: int = 0, world: int = 1) -> list[list[Generation]]:
    """This rank's batches: the run's generations cut into batches of batch_size in gen_id order, batch i going to
    rank i % world. Batches (and so shard names and markers) do not depend on the number of processes, so a run
    resumed with another world size skips exactly the finished batches and captures the rest once."""
    batches = [gens[i:i + batch_size] for i in range(0, len(gens), batch_size)]
    return batches[rank::world]


CONDITIONING_FIELDS = ("negative_prompt", "controlnet", "control_image", "controlnet_scale", "tokens")
"""Capture settings added after run format 2 first shipped: in the run identity only when set, so the identity of a
run made without them (and so its resuming) is unchanged."""


def run_identity(cfg: RunConfig) -> dict:
    """What must match for a run directory to be resumed rather than refused (with a ControlNet, the control
    images' contents too)."""
    import dataclasses

    defaults = CaptureConfig()
    capture = {k: v for k, v in dataclasses.asdict(cfg.capture).items()
               if k not in CONDITIONING_FIELDS or v != getattr(defaults, k)}
    identity = {"model": cfg.model, "dtype": cfg.dtype, "capture": capture}
    if not cfg.images:  # an image-classifier run's inputs are its images (below), not a prompt file
        identity["prompts_digest"] = file_digest(cfg.prompts)
    if cfg.capture.controlnet:
        images = sorted({g.control_image for g in with_run_conditions(load_prompts(cfg.prompts), cfg.capture)
                         if g.control_image})
        identity["control_images_digest"] = {path: file_digest(path) for path in images}
    if cfg.images:
        from backend.run.images import images_digest, load_images

        identity["images"] = cfg.images
        identity["images_digest"] = images_digest(load_images(cfg.images))
    return identity


def with_run_conditions(prompts: list[PromptRecord], c: CaptureConfig) -> list[PromptRecord]:
    """The prompts with the run's negative prompt and control image filled in where a prompt gives none of its own;
    an empty negative prompt reads as none."""
    import dataclasses

    out = []
    for rec in prompts:
        negative = rec.negative if rec.negative is not None else c.negative_prompt
        control = rec.control_image if rec.control_image is not None else (c.control_image or None)
        out.append(dataclasses.replace(rec, negative=negative or None, control_image=control))
    return out


def check_conditions(prompts: list[PromptRecord], c: CaptureConfig, guidance: float,
                     model: DiffusionModel) -> DiffusionModel:
    """One-line errors for negative prompts without CFG, control images without a ControlNet (or the reverse) and
    bad control images; returns the model, wrapped with the ControlNet when one is given."""
    negatives = [p.negative for p in prompts if p.negative]
    if negatives and guidance <= 1:
        raise DifflensError(f"a negative prompt is given ({negatives[0]!r}) but guidance is {guidance:g}, so CFG is "
                            "off and it would be ignored: raise --guidance above 1 or drop the negative prompt")
    if negatives and "negative" not in inspect.signature(model.encode_prompts).parameters:
        raise DifflensError(f"{model.family} models take no negative prompt here; drop --negative-prompt and the "
                            "prompts' negative fields")
    if negatives:
        model.check_prompts(sorted(set(negatives)))
    controls = [p.control_image for p in prompts]
    if not c.controlnet:
        given = next((p for p in prompts if p.control_image), None)
        if given is not None:
            raise DifflensError(f"a control image is given ({given.control_image}) but no ControlNet: pass "
                                "--controlnet DIR, or drop --control-image and the prompts' control_image fields")
        return model
    from backend.models.controlnet import check_control_image, check_family, with_controlnet

    check_family(model)
    missing = next((p for p in prompts if not p.control_image), None)
    if missing is not None:
        raise DifflensError(f"prompt {missing.prompt!r} has no control image: give it a control_image field in the "
                            "JSONL prompt file, or pass --control-image FILE for every prompt")
    for path in sorted(set(controls)):
        check_control_image(path, model.default_resolution)
    return with_controlnet(model, c.controlnet, c.controlnet_scale)


def versions() -> dict:
    import diffusers
    import transformers

    from backend import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "difflens": __version__}


def prepare_run_dir(cfg: RunConfig, overwrite: bool, model_kind: str = "diffusion") -> RunStore:
    """Create or reopen the run directory; refuse one holding a run of another config unless overwrite.

    Call only after everything the capture needs has been validated (see `plan`): a refused or failed command must
    leave no half-made run behind.
    """
    import shutil

    store = RunStore(cfg.out_dir)
    root = store.root
    manifest = store.read_manifest() if is_run(root) else None
    if manifest is None and root.exists() and any(root.iterdir()):
        raise DifflensError(f"{root} exists and is not a difflens run (no manifest.json); choose another --name")
    if manifest is not None and manifest.get("identity") != run_identity(cfg):
        if not overwrite:
            raise DifflensError(
                f"{root} holds a run with a different config (model, prompts, dtype or capture settings); "
                "pass --overwrite to replace it, or choose another --name"
            )
        shutil.rmtree(root)
        manifest = None
    if manifest is not None:
        store.remove_stale_temporaries()  # the later stages record their own sections of the config as they run
    else:
        root.mkdir(parents=True, exist_ok=True)
        store.write_manifest({"identity": run_identity(cfg), "config": cfg.to_dict(), "versions": versions(),
                              "created": time.time(), "stages": {}, "model_kind": model_kind,
                              "tokens": cfg.capture.tokens if model_kind == "classifier" else None})
    return store


def check_feature_replacement(cfg: RunConfig, encoders: dict, overwrite: bool) -> None:
    """Recording other SAEs' features on a finished run replaces that feature activity (and makes the analysis
    stale): a one-line error unless overwrite, before anything is touched."""
    store = RunStore(cfg.out_dir)
    if not encoders or overwrite or not is_run(store.root):
        return
    manifest = store.read_manifest() or {}
    done = stage_record(manifest, FEATURES_STAGE)
    if manifest.get("identity") != run_identity(cfg) or done.get("status") != "done":
        return
    old = features.held(done)
    changed = sorted(f"{layer}:{sae_id}" for (layer, sae_id), e in features.by_sae(encoders).items()
                     if (layer, sae_id) in old and old[(layer, sae_id)] != getattr(e, "identity", ""))
    if changed:
        raise DifflensError(f"{store.root} already has feature activity of other SAEs for {', '.join(changed)} "
                            "(layer:sae_id); recording these SAEs replaces it and makes its analysis stale: pass "
                            "--overwrite to do so, or record them under another id (--sae LAYER:ID=PATH)")


@dataclass
class CapturePlan:
    """Everything a capture needs, validated before anything is written."""

    cfg: RunConfig
    prompts: list[PromptRecord]
    model: DiffusionModel
    encoders: dict[tuple[str, str], FeatureEncoder]
    """By (layer, sae_id)."""
    n_steps: int
    guidance: float
    denoiser_steps: int
    """Denoiser calls per generation: n_steps, or more for schedulers that repeat a timestep (PNDM: n_steps + 1);
    the activity table has one step per call, like the steps table."""


def plan(cfg: RunConfig, model: DiffusionModel | None = None, encoders: dict[str, FeatureEncoder] | None = None,
         device: str | None = None) -> CapturePlan:
    """Validate the config, the prompts (against the model's tokenizer), the layers and the SAEs; touches no file."""
    from backend.models import load_model, model_kind, parse_dtype
    from backend.models.layers import check_layers, layer_channels
    from backend.run.images import run_inputs

    cfg = validate(cfg)
    prompts = run_inputs(cfg, kind_of(model) if model is not None else model_kind(cfg.model))
    model = model or load_model(cfg.model, device=device or cfg.device, dtype=parse_dtype(cfg.dtype))
    if kind_of(model) == "classifier":
        cfg = classifier_settings(cfg, model, prompts)
    c = cfg.capture
    check_layers(model, c.layers)
    model.check_prompts([p.prompt for p in prompts])
    encoders = features.by_sae(encoders)
    unknown = sorted({layer for layer, _ in encoders} - set(c.layers))
    if unknown:
        raise DifflensError(f"SAE given for {', '.join(unknown)}, which this run does not capture "
                            f"(layers: {', '.join(c.layers)})")
    for (layer, _), encoder in encoders.items():
        width = getattr(encoder, "d_in", None)
        if width is not None:
            check_sae_width(layer, width, layer_channels(model, layer))
    n_steps = c.steps or model.default_steps
    guidance = model.default_guidance if c.guidance < 0 else c.guidance
    if c.half == "both" and guidance > 1:
        raise DifflensError("capture.half='both' with CFG records two rows per generation; use cond or uncond")
    prompts = with_run_conditions(prompts, c)
    model = check_conditions(prompts, c, guidance, model)
    return CapturePlan(cfg, prompts, model, encoders, n_steps, guidance, len(model.timesteps(n_steps)))


def classifier_settings(cfg: RunConfig, model: DiffusionModel, images: list[PromptRecord]) -> RunConfig:
    """An image-classifier run's config: one image per input, one step, no CFG (whatever was given), after one-line
    errors for a token choice the model lacks and unreadable images."""
    import dataclasses

    from backend.run.images import check_images

    model.check_tokens(cfg.capture.tokens)
    check_images(images)
    capture = dataclasses.replace(cfg.capture, images_per_prompt=1, steps=1, guidance=1.0)
    return dataclasses.replace(cfg, capture=capture)


def kind_of(model) -> str:
    """A model's kind: "classifier" or "diffusion" (adapters without the attribute are diffusion models)."""
    return getattr(model, "model_kind", "diffusion")


def inputs_of(batch: list[Generation]) -> list[str]:
    """What generate() takes for a batch: the prompts, or an image classifier's image paths."""
    return [g.prompt.image or g.prompt.prompt for g in batch]


def check_sae_width(layer: str, width: int, channels: int, what: str = "the SAE given") -> None:
    """The one-line error of an SAE whose input width is not the layer's channel count."""
    if width != channels:
        raise DifflensError(f"{what} for {layer} takes width {width}, but the layer has {channels} channels; pass an "
                            "SAE trained on this layer")


def capture_with_saes(cfg: RunConfig, sae_options: list[str] | None, overwrite: bool = False,
                      progress: bool = True) -> CaptureSummary:
    """`capture --sae LAYER[:ID]=PATH ...`: load each SAE on this rank's device, then capture (or the features
    pass)."""
    saes = parse_sae_options(sae_options)
    device = distributed.local_device(cfg.device)
    encoders = {key: SAEEncoder(path, device=device) for key, path in saes.items()}
    return capture(cfg, overwrite=overwrite, encoders=encoders or None, progress=progress)


class _Recorder:
    """Hook callback: accumulates per-(generation, step) channel stats and token samples on the device.

    A layer whose every token is sampled (tokens_per_step >= its token count: small models) keeps its tokens
    [B, S, T, C] in the model's dtype, one copy per step, and its stats and samples are computed from them once per
    batch (`finish`), in a few whole-batch operations instead of a dozen small ones per step; other layers reduce
    each step as it comes. Call `finish` after the generation, before reading mean / max / samples, and `release`
    once the samples are written. Its big buffers come from `pool` and go back to it, so the batches of a capture
    reuse them (backend/buffers.py)."""

    def __init__(self, gens: list[Generation], n_steps: int, tokens_per_step: int,
                 encoders: dict[tuple[str, str], FeatureEncoder], pool: BufferPool | None = None):
        self.gens = gens
        self.pool = pool if pool is not None else BufferPool()
        self.n_steps = n_steps
        self.k = tokens_per_step
        self.encoders = encoders
        self.mean: dict[str, torch.Tensor] = {}
        self.max: dict[str, torch.Tensor] = {}
        self.samples: dict[str, torch.Tensor] = {}
        self.positions: dict[str, torch.Tensor] = {}
        self.features: dict[tuple[str, str], list] = {}
        """Per (layer, sae_id), the (step, feature_stats) of each step."""
        self.spatial: dict[str, tuple[int, int] | None] = {}
        self.token_dtype: dict[str, str] = {}
        """Per layer, the token shards' dtype (backend/run/store.py token_dtype): the model's when bfloat16."""
        self.clamped: dict[str, torch.Tensor] = {}
        """Per layer, token sample values clamped to the float16 range (a float16 buffer; on the device)."""
        self.whole: dict[str, torch.Tensor] = {}
        """Per layer whose every token is sampled, its tokens [B, S, T, C] as the model gave them (until finish)."""

    def _positions(self, n_tokens: int, device) -> torch.Tensor:
        """[B, S, k] token positions, deterministic per (gen_id, step); all positions when k >= n_tokens."""
        b, s = len(self.gens), self.n_steps
        if self.k >= n_tokens:
            return torch.arange(n_tokens, device=device).expand(b, s, n_tokens)
        out = torch.empty(b, s, self.k, dtype=torch.long)
        for i, g in enumerate(self.gens):
            gen = torch.Generator().manual_seed(1_000_003 * g.gen_id + n_tokens)
            for step in range(s):
                out[i, step] = torch.randperm(n_tokens, generator=gen)[: self.k].sort().values
        return out.to(device)

    def _start(self, ev: HookEvent) -> None:
        """The layer's buffers, at its first event."""
        tok = ev.tokens
        b, t, c = tok.shape
        self.positions[ev.layer] = self._positions(t, tok.device)
        k = self.positions[ev.layer].shape[-1]
        # the samples are kept in the shards' dtype: bfloat16 tokens as they are (lossless); others in float16,
        # clamped to its range and counted (a float32 run's values beyond 65504 would become inf)
        self.token_dtype[ev.layer] = token_dtype(str(tok.dtype))
        self.clamped[ev.layer] = torch.zeros((), dtype=torch.long, device=tok.device)
        for key in self.encoders:
            if key[0] == ev.layer:
                self.features[key] = []
        self.spatial[ev.layer] = ev.spatial  # (SAE widths were checked against the layer by `plan`)
        if k == t:
            self.whole[ev.layer] = self.pool.take((b, self.n_steps, t, c), tok.dtype, tok.device)
            return
        self.mean[ev.layer] = torch.zeros(b, self.n_steps, c, device=tok.device)
        self.max[ev.layer] = torch.zeros(b, self.n_steps, c, device=tok.device)
        self.samples[ev.layer] = self.pool.take((b, self.n_steps, k, c), self._shard_dtype(ev.layer),
                                                tok.device).zero_()

    def _shard_dtype(self, layer: str) -> torch.dtype:
        return torch.bfloat16 if self.token_dtype[layer] == "bfloat16" else torch.float16

    def _record(self, layer: str, tokf: torch.Tensor, picked: torch.Tensor, dims: int) -> tuple:
        """(mean, max, samples) of float32 tokens over their token dimension `dims`, the picked tokens clamped to
        the float16 range (counted) unless the shards are bfloat16."""
        if self.token_dtype[layer] == "float16":
            over = picked.isfinite() & (picked.abs() > FLOAT16_MAX)
            self.clamped[layer] += over.sum()
            picked = torch.where(over, picked.sign() * FLOAT16_MAX, picked)
        return tokf.mean(dims), tokf.amax(dims), picked.to(self._shard_dtype(layer))

    def __call__(self, ev: HookEvent) -> None:
        tok = ev.tokens
        b, t, c = tok.shape
        if b != len(self.gens):
            raise DifflensError(f"layer {ev.layer} saw batch {b}, expected {len(self.gens)} (use half='cond')")
        if ev.layer not in self.positions:
            self._start(ev)
        features = [(key, e) for key, e in self.encoders.items() if key[0] == ev.layer]
        if ev.layer in self.whole:
            self.whole[ev.layer][:, ev.step] = tok
            if features:
                tokf = tok.float()
                for key, encoder in features:
                    self.features[key].append((ev.step, feature_stats(encoder, tokf)))
            return
        tokf = tok.float()
        pos = self.positions[ev.layer][:, ev.step]
        picked = torch.gather(tokf, 1, pos[..., None].expand(-1, -1, c))
        mean, mx, sample = self._record(ev.layer, tokf, picked, 1)
        self.mean[ev.layer][:, ev.step], self.max[ev.layer][:, ev.step] = mean, mx
        self.samples[ev.layer][:, ev.step] = sample
        for key, encoder in features:
            self.features[key].append((ev.step, feature_stats(encoder, tokf)))

    def finish(self) -> _Recorder:
        """Stats and samples of the layers kept whole (see the class docstring); returns self.

        The float16 clamp (_record) takes ~10 passes over the tokens; a batch whose whole token range is within
        float16's has nothing to clamp and is converted in one. (The range is one global aminmax: torch's aminmax
        along a dimension is ~25x slower than amax along it.)"""
        for layer in list(self.whole):
            whole = self.whole.pop(layer)
            if whole.dtype == self._shard_dtype(layer):  # a bfloat16 or float16 model: the tokens are the samples
                self.mean[layer], self.max[layer] = whole.mean(2, dtype=torch.float32), whole.amax(2).float()
                self.samples[layer] = whole
                continue
            tokf = whole.float()
            low, high = torch.aminmax(tokf)
            if bool((high <= FLOAT16_MAX) & (low >= -FLOAT16_MAX)):  # NaN and inf fail this and go through _record
                samples = self.pool.take(tokf.shape, torch.float16, tokf.device).copy_(tokf)
                self.mean[layer], self.max[layer], self.samples[layer] = tokf.mean(2), tokf.amax(2), samples
            else:
                self.mean[layer], self.max[layer], self.samples[layer] = self._record(layer, tokf, tokf, 2)
            self.pool.give(whole)
        return self

    def release(self) -> None:
        """Give the samples back to the pool: call once they are written and nothing reads them any more."""
        for samples in self.samples.values():
            self.pool.give(samples)
        self.samples.clear()


FEATURE_CHUNK_BYTES = 64 << 20
"""Largest dense pre-activation block [rows, n_latents] (float32) feature_stats has an encoder build at once: an SAE
encodes through a dense [N, n_latents] product, which for a whole batch is GBs (SDXL: 32 x 1024 tokens x 10240
latents = 1.3 GB)."""


def encode_in_chunks(encoder: FeatureEncoder, x_NC: torch.Tensor,
                     max_bytes: int = FEATURE_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """encoder(x) in row chunks of at most max_bytes of dense float32 pre-activations (encoder.n_latents wide; an
    encoder without n_latents gets every row at once), concatenated; a chunk's codes narrower than the widest
    (ReLU SAEs: as many slots as the most active row) are padded with zeros (inactive)."""
    n_latents = getattr(encoder, "n_latents", None)
    rows = len(x_NC) if not n_latents else max(1, int(max_bytes) // (4 * int(n_latents)))
    if rows >= len(x_NC):
        return encoder(x_NC)
    parts = [encoder(x_NC[i:i + rows]) for i in range(0, len(x_NC), rows)]
    width = max(v.shape[1] for v, _ in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return torch.cat([pad(v) for v, _ in parts]), torch.cat([pad(i) for _, i in parts])


def feature_stats(encoder: FeatureEncoder, tokens_BTC: torch.Tensor,
                  max_bytes: int = FEATURE_CHUNK_BYTES) -> tuple[np.ndarray, ...]:
    """Sparse per-generation feature activity: (gen_index, feature, mean, max) of active features only.

    Mean is over all positions (inactive positions count as 0), max over positions. The tokens are encoded in row
    chunks (encode_in_chunks), so memory holds at most max_bytes of dense pre-activations.
    """
    b, t, c = tokens_BTC.shape
    values, indices = encode_in_chunks(encoder, tokens_BTC.reshape(b * t, c), max_bytes)
    values = values.float()
    gen_idx = torch.arange(b, device=values.device).repeat_interleave(t)[:, None].expand_as(indices)
    active = values > 0
    g, f, v = gen_idx[active], indices[active].long(), values[active]
    width = int(indices.max()) + 1 if indices.numel() else 1
    key = g * width + f
    uniq, inverse = torch.unique(key, return_inverse=True)
    sums = torch.zeros(len(uniq), device=v.device).index_add_(0, inverse, v)
    maxs = torch.zeros(len(uniq), device=v.device).scatter_reduce_(0, inverse, v, "amax", include_self=False)
    return ((uniq // width).cpu().numpy(), (uniq % width).cpu().numpy(), (sums / t).cpu().numpy(),
            maxs.cpu().numpy())


class SAEEncoder:
    """A FeatureEncoder from a trained (folded) SAE: its sparse codes of raw activations."""

    def __init__(self, path: str | Path, device="cpu"):
        from sae.formats import weights_file
        from sae.io import SAELoadError, load_sae

        try:
            self.sae = load_sae(path, device=device)
        except SAELoadError as exc:
            raise DifflensError(str(exc)) from exc
        self.d_in = self.sae.cfg.d_in
        self.n_latents = int(self.sae.cfg.n_latents)
        """Width of its dense pre-activations (encode_in_chunks sizes its row chunks by it)."""
        self.path = str(path)
        self.identity = file_digest(weights_file(path))

    @torch.no_grad()
    def __call__(self, x_NC: torch.Tensor):
        codes = self.sae.encode(x_NC.to(self.sae.W_dec.dtype))
        return codes.values, codes.indices


def parse_sae_options(options: list[str] | None) -> dict[tuple[str, str], str]:
    """["LAYER=PATH", "LAYER:ID=PATH", ...] -> {(layer, sae_id): path} (LAYER alone: the layer's default SAE)."""
    from backend.run.schema import DEFAULT_SAE, check_sae_id

    out = {}
    for opt in options or []:
        target, sep, path = opt.partition("=")
        layer, _, sae_id = target.partition(":")
        if not sep or not layer or not path:
            example = "up_blocks.1.attentions.1=runs/demo/sae/up_blocks.1.attentions.1/default"
            raise DifflensError(f"--sae takes LAYER=PATH or LAYER:ID=PATH (e.g. {example}); got {opt!r}")
        out[(layer, check_sae_id(sae_id) if sae_id else DEFAULT_SAE)] = path
    return out


def _activity_table(gen_ids: np.ndarray, mean_BSC: np.ndarray, max_BSC: np.ndarray) -> pa.Table:
    """Rows sorted by (unit, step, gen_id)."""
    b, s, c = mean_BSC.shape
    return pa.table({
        "gen_id": np.tile(gen_ids, c * s).astype(np.int32),
        "step": np.tile(np.repeat(np.arange(s, dtype=np.int16), b), c),
        "unit": np.repeat(np.arange(c, dtype=np.int32), s * b),
        "mean": mean_BSC.transpose(2, 1, 0).ravel().astype(np.float32),
        "max": max_BSC.transpose(2, 1, 0).ravel().astype(np.float32),
    })


def _feature_table(gen_ids: np.ndarray, per_step: list) -> pa.Table:
    cols = {"gen_id": [], "step": [], "unit": [], "mean": [], "max": []}
    for step, (g, f, mean, mx) in per_step:
        cols["gen_id"].append(gen_ids[g].astype(np.int32))
        cols["step"].append(np.full(len(g), step, dtype=np.int16))
        cols["unit"].append(f.astype(np.int32))
        cols["mean"].append(mean.astype(np.float32))
        cols["max"].append(mx.astype(np.float32))
    cols = {k: np.concatenate(v) if v else np.array([], dtype=np.float32) for k, v in cols.items()}
    order = np.lexsort((cols["gen_id"], cols["step"], cols["unit"]))
    return pa.table({k: v[order] for k, v in cols.items()})


@dataclass
class WriteStats:
    activity_rows: int = 0
    token_bytes: int = 0
    seconds: float = 0.0


def _write_layer(store: RunStore, name: str, gen_ids: np.ndarray, rec: _Recorder, layer: str) -> tuple[int, int]:
    """One layer's files of a batch: its activity shard, token shard and index, feature activity; returns (activity
    rows, token bytes) written."""
    activity = _activity_table(gen_ids, rec.mean[layer].cpu().numpy(), rec.max[layer].cpu().numpy())
    store.write_table_shard("activity", name, activity, layer=layer, kind="channel")
    shard_dtype = rec.token_dtype[layer]
    samples = rec.samples[layer].cpu()
    # numpy has no bfloat16: a bfloat16 shard is its bit patterns (uint16)
    samples = (samples.view(torch.int16).numpy().view(np.uint16) if shard_dtype == "bfloat16"
               else samples.numpy())
    b, s, k, c = samples.shape
    pos = rec.positions[layer].cpu().numpy()
    index = pa.table({
        "gen_id": np.repeat(gen_ids, s * k).astype(np.int32),
        "step": np.tile(np.repeat(np.arange(s, dtype=np.int16), k), b),
        "position": pos.reshape(-1).astype(np.int32),
    })
    store.write_token_shard(layer, name, samples.reshape(-1, c), index, dtype=shard_dtype,
                            clamped=int(rec.clamped[layer]))
    _write_features(store, name, gen_ids, rec, layer)
    return activity.num_rows, samples.nbytes


def _generations_table(gens: list[Generation], image_paths: list[str], n_steps: int, guidance: float) -> pa.Table:
    return pa.table({
        "gen_id": np.array([g.gen_id for g in gens], dtype=np.int32),
        "prompt": [g.prompt.prompt for g in gens],
        "seed": np.array([g.seed for g in gens], dtype=np.int64),
        "group": [g.prompt.group for g in gens],
        "attributes": [json.dumps(g.prompt.attributes, sort_keys=True) for g in gens],
        "image": image_paths,
        "n_steps": np.full(len(gens), n_steps, dtype=np.int16),
        "guidance": np.full(len(gens), guidance, dtype=np.float32),
        "negative_prompt": pa.array([g.prompt.negative for g in gens], pa.string()),
        "control_image": pa.array([g.prompt.control_image for g in gens], pa.string()),
        "image_path": pa.array([g.prompt.image for g in gens], pa.string()),
        "class_label": pa.array([g.prompt.group if g.prompt.image else None for g in gens], pa.string()),
    })


def _write_batch(store: RunStore, name: str, gens: list[Generation], rec: _Recorder, images: np.ndarray,
                 n_steps: int, guidance: float, stats: WriteStats, stage: str = STAGE,
                 helper: Executor | None = None) -> None:
    """A batch's files, then its marker. Each layer's files and each chunk of IMAGES_PER_JOB images are a job of
    `helper` (a thread pool): Parquet, zlib and file writes release the GIL, so on a CPU whose cores torch has just
    left idle the batch is written in about 0.7 of the time one thread takes (0.68 on tiny FLUX)."""
    t0 = time.perf_counter()
    helper = helper or InlineExecutor()
    gen_ids = np.array([g.gen_id for g in gens], dtype=np.int64)
    if stage == FEATURES_STAGE:
        _results([helper.submit(_write_features, store, name, gen_ids, rec, layer) for layer in rec.mean])
    else:
        layer_jobs = [helper.submit(_write_layer, store, name, gen_ids, rec, layer) for layer in rec.mean]
        image_jobs = [helper.submit(_write_images, store, gens[i:i + IMAGES_PER_JOB], images[i:i + IMAGES_PER_JOB])
                      for i in range(0, len(gens), IMAGES_PER_JOB)]
        written = _results(layer_jobs + image_jobs)
        for rows, nbytes in written[:len(layer_jobs)]:
            stats.activity_rows += rows
            stats.token_bytes += nbytes
        image_paths = [path for paths in written[len(layer_jobs):] for path in paths]
        store.write_table_shard("generations", name, _generations_table(gens, image_paths, n_steps, guidance))
    rec.release()
    store.mark_batch_done(stage, name, n=len(gens))
    stats.seconds += time.perf_counter() - t0


IMAGES_PER_JOB = 16


def _write_images(store: RunStore, gens: list[Generation], images: np.ndarray) -> list[str]:
    return [store.write_image(g.gen_id, img) for g, img in zip(gens, images, strict=True)]


def _results(jobs: list[Future]) -> list:
    """The jobs' results, once all have ended (the first one's error raised)."""
    wait(jobs)
    return [j.result() for j in jobs]


def conditions_of(batch: list[Generation]) -> dict:
    """generate() keyword arguments for the batch's negative prompts and control images (none when it has none)."""
    return condition_arguments(negative_prompt=[g.prompt.negative for g in batch],
                               control_image=[g.prompt.control_image for g in batch])


def _write_features(store: RunStore, name: str, gen_ids: np.ndarray, rec: _Recorder, layer: str) -> None:
    """The batch's feature activity of each SAE of layer, in its own kind's partition."""
    for (lay, sae_id), per_step in rec.features.items():
        if lay == layer:
            store.write_table_shard("activity", name, _feature_table(gen_ids, per_step), layer=layer,
                                    kind=feature_kind(sae_id))


def _steps_table(model: DiffusionModel, n_steps: int) -> pa.Table:
    ts = model.timesteps(n_steps).cpu().numpy()
    return pa.table({"step": np.arange(len(ts), dtype=np.int16), "timestep": ts.astype(np.float32)})


def overlap_writes(device: torch.device | str) -> bool:
    """Whether a batch's writes run in a background thread while the next batch generates: yes when the denoiser
    runs on an accelerator, or when this process may use more CPU cores than torch's threads; no when torch's
    threads already use every core (a CPU run on a small machine). There, a writer thread takes a core from one
    of torch's threads, whose parallel regions then wait for it: on 2 cores the same writes cost a tiny model's
    capture about twice their CPU time in the background (benchmarks/capture_overhead.py), once inline."""
    if torch.device(device).type != "cpu":
        return True
    return usable_cores() > torch.get_num_threads()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_helpers(layers: int) -> int:
    """Threads that write a batch's files (_write_batch): one per core, at most one per layer and two for the
    images; the thread that hands them the batch only waits."""
    return max(1, min(layers + 2, usable_cores()))


class InlineExecutor:
    """An executor whose submit runs the call at once (its Future holds the result or the exception)."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # re-raised by future.result(), as a thread's would be
            future.set_exception(exc)
        return future

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None


def _result_or_user_error(future: Future, store: RunStore) -> None:
    """Wait for a batch write; an OS error (disk full, permissions) becomes a one-line, resumable error."""
    try:
        future.result()
    except OSError as exc:
        raise DifflensError(f"writing to {store.root} failed ({exc.strerror or exc}); nothing half-written was "
                            "kept: fix the cause and rerun the same command to resume") from exc


@dataclass
class CaptureSummary:
    out_dir: Path
    generations: int
    batches_run: int
    batches_skipped: int
    seconds: float
    token_counts: dict[str, int]
    writes: WriteStats


def capture(cfg: RunConfig, overwrite: bool = False, model: DiffusionModel | None = None,
            encoders: dict[str, FeatureEncoder] | None = None, progress: bool = True) -> CaptureSummary:
    """Run (or resume) the capture stage of cfg into cfg.out_dir.

    With encoders (SAEs by (layer, sae_id), or by layer for a layer's default SAE), feature activity is recorded
    too: in the same pass while the run is being captured, or, once capture is complete, in a features pass that
    records only the SAEs whose activity the run does not hold yet (backend/stages/features.py) and writes only
    their partitions. Everything is validated before the run directory is created or touched.
    """
    with distributed.distributed(cfg.device) as dist:
        p = plan(cfg, model, encoders, device=distributed.local_device(cfg.device))
        cfg, model, encoders, c = p.cfg, p.model, p.encoders, p.cfg.capture
        check_feature_replacement(cfg, encoders, overwrite)
        if dist.is_main:
            store = prepare_run_dir(cfg, overwrite, kind_of(model))
        dist.barrier()
        store = RunStore(cfg.out_dir)
        store.write_behind.lag = len(c.layers)  # a batch drops the previous batch's token shards from the cache
        manifest = store.read_manifest() or {}
        capture_key = stage_key(run_identity(cfg))
        captured = stage_record(manifest, STAGE).get("status") == "done"
        stage = FEATURES_STAGE if encoders and captured else STAGE
        identities = {k: getattr(e, "identity", "") for k, e in encoders.items()}
        if stage == FEATURES_STAGE:  # only the SAEs whose activity the run does not hold (with these weights)
            record = stage_record(manifest, FEATURES_STAGE)
            identities = features.to_record(record, identities)
            encoders = {k: e for k, e in encoders.items() if k in identities}
            if not encoders:
                return CaptureSummary(store.root, 0, 0, 0, 0.0, {}, WriteStats())
        hooked = sorted({layer for layer, _ in encoders}) if stage == FEATURES_STAGE else c.layers
        n_steps, guidance = p.n_steps, p.guidance
        gens = plan_generations(p.prompts, c.images_per_prompt, c.seed)
        batches = plan_batches(gens, c.batch_size, dist.rank, dist.world)
        mine = [g for batch in batches for g in batch]
        t0 = time.perf_counter()
        if dist.is_main:
            store.write_table("steps", _steps_table(model, n_steps))
            fields = dict(started=time.time(), layers=c.layers, n_steps=n_steps, guidance=guidance,
                          generations=len(gens))
            if stage == FEATURES_STAGE:
                paths = {k: getattr(e, "path", "") for k, e in encoders.items()}
                pass_fields, stale = features.begin_fields(record, identities, paths)
                key = stage_key({"capture": capture_key, "saes": features.nested(identities)})
                store.begin_stage(stage, key, clear=stale, **pass_fields, **fields)
            else:
                store.begin_stage(stage, capture_key, **fields)
        dist.barrier()
        run, skipped = 0, 0
        stats = WriteStats()
        pending: list[Future] = []
        desc = stage if dist.world == 1 else f"{stage} rank {dist.rank}"
        writer_pool = ThreadPoolExecutor(max_workers=1) if overlap_writes(model.device) else InlineExecutor()
        buffers = BufferPool(limit=4 * len(hooked))  # per layer: its tokens, and the samples of two batches
        with writer_pool as writer, ThreadPoolExecutor(max_workers=write_helpers(len(hooked))) as helper, \
                tqdm(total=len(mine), desc=desc, unit="img", disable=not progress) as bar:
            for batch in batches:
                name = shard_name(batch[0].gen_id)
                if store.batch_done(stage, name):
                    skipped += 1
                    bar.update(len(batch))
                    continue
                rec = _Recorder(batch, p.denoiser_steps, c.tokens_per_step, encoders or {}, buffers)
                with read_activations(model, hooked, rec, read=c.read, half=c.half):
                    images = to_uint8(model.generate(inputs_of(batch), [g.seed for g in batch],
                                                     n_steps, guidance, **conditions_of(batch)))
                rec.finish()
                # in the background (overlap_writes), writes overlap the next batch's generation; one batch waits
                for f in pending:
                    _result_or_user_error(f, store)
                pending = [writer.submit(_write_batch, store, name, batch, rec, images, n_steps, guidance, stats,
                                         stage, helper)]
                if pending[0].done():  # written inline
                    _result_or_user_error(pending.pop(), store)
                run += 1
                bar.update(len(batch))
            for f in pending:
                _result_or_user_error(f, store)
        dist.barrier()
        token_counts = {}
        if dist.is_main and stage == FEATURES_STAGE:
            store.update_stage(stage, status="done", finished=time.time(), seconds=round(time.perf_counter() - t0, 3))
        elif dist.is_main:
            token_counts = {layer: store.finish_token_meta(layer)["count"] for layer in c.layers}
            store.update_stage(stage, status="done", finished=time.time(),
                               seconds=round(time.perf_counter() - t0, 3), token_counts=token_counts,
                               world_size=dist.world)
        return CaptureSummary(store.root, len(gens), run, skipped, time.perf_counter() - t0, token_counts, stats)
