"""The SAE stage: train one SAE per captured layer of a run, save it under sae/<layer>/, log its curve."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from backend.errors import DifflensError
from backend.fileio import atomic_write_json
from backend.run import distributed
from backend.run.config import SAEStageConfig
from backend.run.context import as_context, open_run
from backend.run.store import RunStore, stage_key
from sae.data import SAEDataError, ShardReader
from sae.io import load_sae, save_sae
from sae.train import SAETrainConfig, reconstruction_stats, train

ARCHITECTURES = ("topk", "batchtopk", "relu")


def train_saes(run, cfg: SAEStageConfig, overwrite: bool = False, progress: bool = True) -> dict[str, dict]:
    """Train (or resume) an SAE for each of cfg.layers (default: every captured layer); returns final metrics.

    A layer whose saved SAE has this stage's key (same settings, same capture) is kept. One trained with other
    settings is replaced only with overwrite: the new SAE trains under _work/sae/<layer>/ (resumable) and takes
    the old one's place only once complete; the layer's feature tables and the later stages are then stale and
    are removed / marked so.
    """
    ctx = as_context(run, require="capture")
    store = ctx.store
    captured = ctx.layers
    layers = cfg.layers or captured
    unknown = sorted(set(layers) - set(captured))
    if unknown:
        raise DifflensError(f"no activations for {', '.join(unknown)} in {store.root}; captured layers: "
                            f"{', '.join(captured)}")
    train_cfg = cfg.train_config()
    for layer in layers:
        check_train_config(train_cfg, token_width(store, layer), layer)
    key = stage_key({"train": asdict(train_cfg), "capture": ctx.stage("capture").get("key")})
    replaced = {layer: saved for layer in layers if (saved := _saved_cfg(store, layer)) and saved.get("key") != key}
    if replaced and not overwrite:
        raise DifflensError(f"{store.root} already has SAEs for {', '.join(replaced)} trained with other settings "
                            f"({_differences(next(iter(replaced.values())).get('train', {}), asdict(train_cfg))}); "
                            "training replaces them and makes their feature tables and analysis stale: pass "
                            "--overwrite to do so, or keep them by giving the settings they were trained with")
    results = {}
    with distributed.distributed(ctx.device) as dist:
        if dist.is_main:
            ctx.record_config("sae", asdict(cfg))
        for layer in layers:
            saved = _saved_cfg(store, layer)
            metrics = saved.get("metrics") if saved and saved.get("key") == key else None
            dist.barrier()
            if metrics is None:
                device = distributed.local_device(ctx.device)
                metrics = _train_layer(store, layer, train_cfg, progress, write=dist.is_main, device=device, key=key)
                if dist.is_main and layer in replaced:
                    _mark_downstream_stale(store, layer)
            if dist.is_main:
                if cfg.splice_samples and "frac_loss_recovered" not in metrics:
                    metrics |= _splice(ctx, layer, cfg.splice_samples)
                    save_sae(ctx.sae(layer), store.sae_dir(layer),
                             extra={"train": asdict(train_cfg), "metrics": metrics, "key": key})
                store.update_stage("sae", status="running", key=key, **{layer: metrics})
            results[layer] = metrics
        if dist.is_main:
            rows = [{"layer": k} | v for k, v in results.items()]  # splice columns are null when the test was skipped
            store.write_table("sae_metrics", store.table_from_rows("sae_metrics", rows))
            store.update_stage("sae", status="done", finished=time.time())
        dist.barrier()
    return results


def token_width(store: RunStore, layer: str) -> int:
    """Channels of a layer's captured token shards (activations/<layer>/meta.json)."""
    meta = store.activations_dir(layer) / "meta.json"
    if not meta.is_file():
        raise DifflensError(f"{store.root} has no token shards for {layer}; rerun `python cli.py capture`")
    return int(json.loads(meta.read_text())["d"])


def check_train_config(cfg: SAETrainConfig, d_in: int, layer: str) -> None:
    """One-line errors for settings that cannot train on a layer of width d_in (checked before anything is
    written)."""
    if cfg.architecture not in ARCHITECTURES:
        raise DifflensError(f"sae.architecture is {cfg.architecture!r}; use one of {', '.join(ARCHITECTURES)}")
    for name in ("expansion", "batch_size", "total_tokens"):
        if getattr(cfg, name) < 1:
            raise DifflensError(f"sae.{name} must be at least 1 (got {getattr(cfg, name)})")
    n = cfg.latents(d_in)
    if cfg.architecture != "relu" and not 1 <= cfg.k <= n:
        raise DifflensError(f"sae.k = {cfg.k} is out of range for {layer}: its SAE has {n} latents ({d_in} channels "
                            f"x expansion {cfg.expansion}); use 1 <= k <= {n}")
    if cfg.lr < 0 or not 0 <= cfg.decay_start <= 1:
        raise DifflensError("sae.lr must be >= 0 and sae.decay_start within 0..1")


def _differences(old: dict, new: dict) -> str:
    diff = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in sorted(new) if old.get(k) != new[k]]
    return ", ".join(diff) or "trained on another capture"


def _saved_cfg(store: RunStore, layer: str) -> dict | None:
    path = store.sae_dir(layer) / "cfg.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _mark_downstream_stale(store: RunStore, layer: str) -> None:
    """A replaced SAE: its feature activity is removed, and the stages that read it must run again."""
    shutil.rmtree(store.partition_dir("activity", layer, "feature"), ignore_errors=True)
    manifest = store.read_manifest() or {}
    for stage in ("features", "analysis", "interventions"):
        if stage in manifest.get("stages", {}):
            store.clear_stage_markers(stage)
            store.update_stage(stage, status="stale", key=None, stale_because=f"the SAE of {layer} was replaced")


def _train_layer(store: RunStore, layer: str, cfg: SAETrainConfig, progress: bool, write: bool = True,
                 device: str = "cpu", key: str = "") -> dict:
    """Train one layer's SAE (every rank under torchrun); the writer rank saves it and its curve."""
    t0 = time.time()
    work = work_dir(store, layer)
    stamp = work / "key.json"
    if write and work.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("key") != key):
        shutil.rmtree(work)  # a checkpoint of other settings: start afresh
    if write:
        atomic_write_json(stamp, {"key": key})
    try:
        reader = ShardReader.from_dir(store.activations_dir(layer), cfg.batch_size, seed=cfg.seed)
        result = train(reader, cfg, checkpoint_dir=work / "checkpoint", layer=layer,
                       device=device, progress=progress)
        final = reconstruction_stats(result.sae.cpu(), ShardReader.from_dir(store.activations_dir(layer),
                                                                            cfg.batch_size, seed=cfg.seed + 99))
    except SAEDataError as exc:
        raise DifflensError(str(exc)) from exc
    last = result.log[-1]
    metrics = {"fvu": final["fvu"], "l0": final["l0"], "dead_frac": last["dead_frac"],
               "dense_frac": last["dense_frac"], "tokens": last["tokens"], "seconds": round(time.time() - t0, 2)}
    if not write:
        return metrics
    save_sae(result.sae, work, extra={"train": asdict(cfg), "metrics": metrics, "key": key})
    swap_in(store, layer)
    log = result.log
    store.write_table_shard("sae_training", "part-0000000", pa.table({
        "step": np.array([r["step"] for r in log], dtype=np.int32),
        "tokens": np.array([r["tokens"] for r in log], dtype=np.int64),
        "fvu": np.array([r["fvu"] for r in log], dtype=np.float64),
        "l0": np.array([r["l0"] for r in log], dtype=np.float32),
        "dead_frac": np.array([r["dead_frac"] for r in log], dtype=np.float32),
        "lr": np.array([r["lr"] for r in log], dtype=np.float32),
    }), layer=layer, kind="feature")
    return metrics


def work_dir(store: RunStore, layer: str) -> Path:
    """Where a layer's SAE trains (checkpoints included) until it is complete."""
    return store.root / "_work" / "sae" / layer


def swap_in(store: RunStore, layer: str) -> None:
    """Move a completed SAE from _work/sae/<layer>/ to sae/<layer>/, replacing the old one (kept until then)."""
    target, new = store.sae_dir(layer), work_dir(store, layer)
    old = store.root / "_work" / "sae-replaced" / layer
    shutil.rmtree(new / "checkpoint", ignore_errors=True)
    (new / "key.json").unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        old.parent.mkdir(parents=True, exist_ok=True)
        target.rename(old)
    target.parent.mkdir(parents=True, exist_ok=True)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _splice(ctx, layer: str, n_samples: int) -> dict:
    """Splice-test metrics for layer's SAE on the first n_samples generations of the run (the run's model, device
    and dtype)."""
    from backend.models.splice import splice_test

    gens = ctx.generations().head(n_samples)
    model = ctx.model  # first: the SAE then loads on the model's device
    sae = ctx.sae(layer)
    result = splice_test(model, layer, lambda x: sae(x.to(sae.W_dec.dtype)).to(x.dtype), gens["prompt"].to_list(),
                         gens["seed"].to_list(), int(gens["n_steps"][0]), float(gens["guidance"][0]))
    return result.to_dict()


EXPORT_FORMATS = ("saelens",)


def export_saes(run_dir: str | Path, layers: list[str] | None, fmt: str, out_dir: str | Path | None = None) -> dict:
    """Export the run's SAEs (default: every layer with one) to out_dir/<layer>/ (default: sae/<layer>/<fmt>/)."""
    from sae.io import SAELoadError, export_saelens

    if fmt not in EXPORT_FORMATS:
        raise DifflensError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    ctx = open_run(run_dir)
    store, trained = ctx.store, ctx.sae_layers()
    if not trained:
        raise DifflensError(f"{run_dir} has no trained SAEs; run `python cli.py train-sae --run {run_dir}` first")
    layers = layers or trained
    missing = sorted(set(layers) - set(trained))
    if missing:
        raise DifflensError(f"no SAE for {', '.join(missing)} in {run_dir}; layers with SAEs: {', '.join(trained)}")
    written = {}
    for layer in layers:
        try:
            sae = load_sae(store.sae_dir(layer))
        except SAELoadError as exc:
            raise DifflensError(str(exc)) from exc
        target = Path(out_dir) / layer if out_dir else store.sae_dir(layer) / fmt
        written[layer] = export_saelens(sae, target, hook_name=layer)
    return written
