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
from backend.run import distributed
from backend.run.config import SAEStageConfig
from backend.run.store import RunStore
from sae.data import SAEDataError, ShardReader
from sae.io import load_sae, save_sae
from sae.train import SAETrainConfig, reconstruction_stats, train


def train_saes(run_dir: str | Path, cfg: SAEStageConfig, progress: bool = True) -> dict[str, dict]:
    """Train (or resume) an SAE for each of cfg.layers (default: every captured layer); returns final metrics.

    A layer whose saved SAE was trained with the same settings is kept; changed settings retrain it.
    """
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    if manifest is None:
        raise DifflensError(f"{run_dir} is not a run directory; run `python cli.py run-all` or `capture` first")
    captured = manifest.get("stages", {}).get("capture", {})
    if captured.get("status") != "done":
        raise DifflensError(f"{run_dir} has no finished capture; rerun `python cli.py capture` to complete it")
    layers = cfg.layers or captured["layers"]
    unknown = sorted(set(layers) - set(captured["layers"]))
    if unknown:
        raise DifflensError(f"no activations for {', '.join(unknown)} in {run_dir}; captured layers: "
                            f"{', '.join(captured['layers'])}")
    train_cfg = cfg.train_config()
    results = {}
    with distributed.distributed(manifest["config"].get("device", "cpu")) as dist:
        for layer in layers:
            saved = _saved_metrics(store, layer, train_cfg)
            dist.barrier()
            if saved is None:
                device = distributed.local_device(manifest["config"].get("device", "cpu"))
                saved = _train_layer(store, layer, train_cfg, progress, write=dist.is_main, device=device)
            if dist.is_main:
                if cfg.splice_samples and "frac_loss_recovered" not in saved:
                    saved |= _splice(store, manifest, layer, cfg.splice_samples)
                    save_sae(load_sae(store.sae_dir(layer)), store.sae_dir(layer),
                             extra={"train": asdict(train_cfg), "metrics": saved})
                store.update_stage("sae", status="running", **{layer: saved})
            results[layer] = saved
        if dist.is_main:
            store.write_table("sae_metrics", pa.Table.from_pylist([{"layer": k} | v for k, v in results.items()]))
            store.update_stage("sae", status="done", finished=time.time())
        dist.barrier()
    return results


def _saved_metrics(store: RunStore, layer: str, train_cfg: SAETrainConfig) -> dict | None:
    path = store.sae_dir(layer) / "cfg.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("train") != json.loads(json.dumps(asdict(train_cfg))):
        shutil.rmtree(store.sae_dir(layer) / "checkpoint", ignore_errors=True)
        return None
    return saved.get("metrics")


def _train_layer(store: RunStore, layer: str, cfg: SAETrainConfig, progress: bool, write: bool = True,
                 device: str = "cpu") -> dict:
    """Train one layer's SAE (every rank under torchrun); the writer rank saves it and its curve."""
    t0 = time.time()
    try:
        reader = ShardReader.from_dir(store.activations_dir(layer), cfg.batch_size, seed=cfg.seed)
        result = train(reader, cfg, checkpoint_dir=store.sae_dir(layer) / "checkpoint", layer=layer,
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
    save_sae(result.sae, store.sae_dir(layer), extra={"train": asdict(cfg), "metrics": metrics})
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


def _splice(store: RunStore, manifest: dict, layer: str, n_samples: int) -> dict:
    """Splice-test metrics for layer's SAE on the first n_samples generations of the run."""
    from backend.models import load_model
    from backend.models.splice import splice_test

    config = manifest["config"]
    gens = store.read_table("generations").sort("gen_id").head(n_samples)
    model = load_model(config["model"], device=config.get("device", "cpu"))
    sae = load_sae(store.sae_dir(layer), device=config.get("device", "cpu"))
    result = splice_test(model, layer, lambda x: sae(x), gens["prompt"].to_list(), gens["seed"].to_list(),
                         int(gens["n_steps"][0]), float(gens["guidance"][0]))
    return result.to_dict()


EXPORT_FORMATS = ("saelens",)


def export_saes(run_dir: str | Path, layers: list[str] | None, fmt: str, out_dir: str | Path | None = None) -> dict:
    """Export the run's SAEs (default: every layer with one) to out_dir/<layer>/ (default: sae/<layer>/<fmt>/)."""
    from sae.io import SAELoadError, export_saelens, load_sae

    if fmt not in EXPORT_FORMATS:
        raise DifflensError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    store = RunStore(run_dir)
    if store.read_manifest() is None:
        raise DifflensError(f"{run_dir} is not a run directory (no manifest.json)")
    trained = sorted(p.parent.name for p in (store.root / "sae").glob("*/cfg.json"))
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
