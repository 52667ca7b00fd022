"""RunContext: one run opened for work, the only way stages and commands reach a run's settings and objects.

It owns
  - the one "not a run" error (`open_run`), and the "stage X has not run yet" errors (`require`);
  - the run's resolved config (a RunConfig rebuilt from manifest.json) and its generation settings: captured
    layers, denoising step count, guidance, read / half (each with one precedence, see the properties);
  - the run's model, loaded once with the run's device and dtype unless the caller overrides them;
  - the run's SAEs (several per layer: sae/<layer>/<sae_id>/, kind feature.<sae_id>), its units tables, and unit
    checks (`check_kind`, `n_units`, `check_unit`) that use the one probe pass of backend/models/layers.py for a
    layer's channel count.

Nothing here writes: writers go through `ctx.store` (backend/run/store.py).
"""

from __future__ import annotations

from pathlib import Path

from backend.errors import DifflensError
from backend.run.config import RunConfig, from_dict, resolve, upgrade_saved
from backend.run.manifest import captured_guidance, captured_steps, is_run, not_a_run, stage
from backend.run.schema import DEFAULT_SAE, SAE_ID, SAE_ID_MAX, feature_kind, is_feature, sae_id_of
from backend.run.store import RunStore

KINDS = ("channel", "feature")
"""The kinds every run may have; an SAE other than a layer's default adds `feature.<sae_id>` (schema.feature_kind)."""


def check_kind(kind: str) -> str:
    """kind, if it is spelled as a unit kind (channel, feature, feature.<sae_id>); else a one-line error."""
    sae_id = sae_id_of(kind) if isinstance(kind, str) else None
    if kind != "channel" and (sae_id is None or not SAE_ID.fullmatch(sae_id) or len(sae_id) > SAE_ID_MAX):
        raise DifflensError(f"unknown unit kind {kind!r}; use channel, feature (the layer's default SAE) or "
                            "feature.<sae_id> (another SAE of the layer)")
    return kind


def check_unit(kind: str, unit: int, n_units: int, layer: str = "") -> int:
    """unit as an int, or a one-line error naming the valid range."""
    check_kind(kind)
    if not 0 <= int(unit) < n_units:
        where = f" of {layer}" if layer else ""
        raise DifflensError(f"unknown {kind} {unit}{where}: valid {kind}s are 0..{n_units - 1}")
    return int(unit)


class RunContext:
    """A run directory opened for work (see the module docstring)."""

    def __init__(self, store: RunStore, manifest: dict, device: str | None = None, dtype: str | None = None,
                 model=None):
        self.store = store
        self.manifest = manifest
        self.config: RunConfig = from_dict(upgrade_saved(manifest.get("config") or {}), f"{store.root}/manifest.json")
        self.device = device or self.config.device
        self.dtype = dtype or self.config.dtype
        self._model = model
        self._saes: dict = {}

    # ------------------------------------------------------------------ the run
    @property
    def root(self) -> Path:
        return self.store.root

    def stage(self, name: str) -> dict:
        return stage(self.manifest, name)

    def stage_done(self, name: str) -> bool:
        return self.stage(name).get("status") == "done"

    def require(self, stage: str) -> RunContext:
        """A one-line error unless `stage` has finished on this run, naming the command that runs it."""
        if self.stage_done(stage):
            return self
        fix = {"capture": f"rerun `python cli.py capture` (same options) to complete {self.root}",
               "sae": f"run `python cli.py train-sae --run {self.root}`",
               "analysis": f"run `python cli.py analyze --run {self.root}`"}.get(stage, "run `python cli.py run-all`")
        what = {"capture": "no finished capture", "sae": "no trained SAEs",
                "analysis": "not been analysed"}.get(stage, f"no finished {stage} stage")
        raise DifflensError(f"{self.root} has {what}; {fix}")

    def require_generator(self, what: str) -> RunContext:
        """A one-line error on an image-classifier run for a command that generates images (`what` names it)."""
        if self.manifest.get("model_kind") == "classifier":
            raise DifflensError(f"{self.root} is an image-classifier run: {what} works on image generation, and its "
                                "model classifies images instead (steer its classes: `python cli.py steer-classes`)")
        return self

    def resolve(self, file=None, overrides: dict | None = None) -> RunConfig:
        """This run's config under the one config rule: defaults < saved config < --config FILE < overrides."""
        return resolve(saved=self.manifest.get("config") or {}, file=file, overrides=overrides)

    def record_config(self, section: str, values: dict) -> None:
        """Save a section of the config a command ran with, so the next command on this run resolves the same."""
        manifest = self.store.read_manifest() or self.manifest
        manifest.setdefault("config", {})[section] = values
        self.store.write_manifest(manifest)
        self.manifest = manifest
        self.config = from_dict(upgrade_saved(manifest["config"]), f"{self.root}/manifest.json")

    # ------------------------------------------------------------------ generation settings
    @property
    def layers(self) -> list[str]:
        """Captured layers (the capture stage's record, else the config's)."""
        return list(self.stage("capture").get("layers") or self.config.capture.layers)

    @property
    def n_steps(self) -> int:
        """Denoising steps of the run's generations: as captured, else as configured, else the model's default."""
        n = captured_steps(self.manifest)
        return n if n is not None else int(self.model.default_steps)

    @property
    def guidance(self) -> float:
        """CFG scale of the run's generations: as captured, else as configured, else the model's default."""
        g = captured_guidance(self.manifest)
        return g if g is not None else float(self.model.default_guidance)

    @property
    def read(self) -> str:
        return self.config.capture.read

    @property
    def half(self) -> str:
        return self.config.capture.half

    def generations(self):
        """The generations table (polars), sorted by gen_id."""
        return self.store.read_table("generations").sort("gen_id")

    # ------------------------------------------------------------------ model and SAEs
    @property
    def model(self):
        """The run's model, loaded on first use with this context's device and dtype."""
        if self._model is None:
            from backend.models import load_model, parse_dtype

            self._model = load_model(self.config.model, device=self.device, dtype=parse_dtype(self.dtype))
            c = self.config.capture
            if c.controlnet:  # the run generated through a ControlNet: so do its replays
                from backend.models.controlnet import with_controlnet

                self._model = with_controlnet(self._model, c.controlnet, c.controlnet_scale)
            if getattr(self._model, "model_kind", "diffusion") == "classifier":  # read the tokens the run captured
                self._model.check_tokens(c.tokens)
        return self._model

    @property
    def model_kind(self) -> str:
        """"diffusion" or "classifier" (the manifest's `model_kind`; runs made before it are diffusion runs)."""
        return self.manifest.get("model_kind") or "diffusion"

    def saes(self) -> list[tuple[str, str]]:
        """Every (layer, sae_id) with a trained or imported SAE in sae/<layer>/<sae_id>/."""
        return self.store.saes()

    def sae_layers(self) -> list[str]:
        """Layers with at least one SAE."""
        return sorted({layer for layer, _ in self.saes()})

    def feature_kinds(self, layer: str) -> list[str]:
        """The kinds of the layer's SAEs: feature (its default SAE), feature.<sae_id>, ..."""
        return [feature_kind(i) for lay, i in self.saes() if lay == layer]

    def check_kind(self, layer: str, kind: str) -> str:
        """kind, if this run has it for layer (channel always; a feature kind when the layer has that SAE); else a
        one-line error listing the layer's SAEs."""
        if check_kind(kind) == "channel" or (layer, sae_id_of(kind)) in self.saes():
            return kind
        have = ", ".join(f"{lay}:{i}" for lay, i in self.saes()) or "none"
        fix = (f"train one with `python cli.py train-sae --run {self.root} --layer {layer}`" if kind == "feature"
               else f"import one with `python cli.py import-sae PATH --run {self.root} --layer {layer} "
                    f"--name {sae_id_of(kind)}`")
        raise DifflensError(f"{self.root} has no SAE for {layer} with id {sae_id_of(kind)!r} (kind {kind}; the run's "
                            f"SAEs, layer:id: {have}); {fix}")

    def sae(self, layer: str, sae_id: str = DEFAULT_SAE):
        """One SAE of the layer (folded, on the model's device), loaded once; sae_id may also be given as a kind
        (feature, feature.<sae_id>)."""
        if is_feature(sae_id):
            sae_id = sae_id_of(sae_id)
        if (layer, sae_id) not in self._saes:
            from sae.io import SAELoadError, load_sae

            self.check_kind(layer, feature_kind(sae_id))
            device = self._model.device if self._model is not None else self.device
            try:
                self._saes[(layer, sae_id)] = load_sae(self.store.sae_dir(layer, sae_id), device=device)
            except SAELoadError as exc:
                raise DifflensError(str(exc)) from exc
        return self._saes[(layer, sae_id)]

    # ------------------------------------------------------------------ units
    def units(self, layer: str, kind: str):
        """The analysed units table of (layer, kind), sorted by unit."""
        import polars as pl

        files = sorted(self.store.partition_dir("units", layer, check_kind(kind)).glob("*.parquet"))
        if not files:
            raise DifflensError(f"{self.root} has no units table for {layer}/{kind}; run "
                                f"`python cli.py analyze --run {self.root}` first")
        return pl.concat([pl.read_parquet(f) for f in files]).sort("unit")

    def n_channels(self, layer: str) -> int:
        from backend.models.layers import layer_channels

        return layer_channels(self.model, layer)

    def n_units(self, layer: str, kind: str) -> int:
        """Channels of the layer (one probe pass per model), or latents of its SAE."""
        if is_feature(check_kind(kind)):
            return int(self.sae(layer, sae_id_of(kind)).cfg.n_latents)
        return self.n_channels(layer)

    def check_unit(self, layer: str, kind: str, unit: int) -> int:
        return check_unit(kind, unit, self.n_units(layer, kind), layer)


def open_run(run_dir: str | Path, *, device: str | None = None, dtype: str | None = None, model=None,
             require: str | None = None) -> RunContext:
    """Open an existing run; `require` names a stage that must have finished (e.g. "capture", "analysis")."""
    store = RunStore(run_dir)
    if not is_run(store.root):
        raise not_a_run(run_dir)
    manifest = store.read_manifest()
    ctx = RunContext(store, manifest, device=device, dtype=dtype, model=model)
    if require:
        ctx.require(require)
    return ctx


def as_context(run, **open_kw) -> RunContext:
    """A RunContext from a run directory, or the context itself (stage functions accept either)."""
    return run if isinstance(run, RunContext) else open_run(run, **open_kw)
