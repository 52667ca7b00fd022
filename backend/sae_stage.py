"""The SAE stage: train one SAE per captured layer of a run, save it under sae/<layer>/, log its curve."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from backend.errors import DifflensError
from backend.store import RunStore
from sae.data import SAEDataError, ShardReader
from sae.io import save_sae
from sae.train import SAETrainConfig, reconstruction_stats, train


def train_saes(run_dir: str | Path, layers: list[str] | None, cfg: SAETrainConfig,
               progress: bool = True) -> dict[str, dict]:
    """Train (or resume) an SAE for each layer (default: every captured layer); returns final metrics."""
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    if manifest is None:
        raise DifflensError(f"{run_dir} is not a run directory; run `python cli.py run-all` or `capture` first")
    captured = manifest.get("stages", {}).get("capture", {})
    if captured.get("status") != "done":
        raise DifflensError(f"{run_dir} has no finished capture; rerun `python cli.py capture` to complete it")
    layers = layers or captured["layers"]
    unknown = sorted(set(layers) - set(captured["layers"]))
    if unknown:
        raise DifflensError(f"no activations for {', '.join(unknown)} in {run_dir}; captured layers: "
                            f"{', '.join(captured['layers'])}")
    results = {}
    for layer in layers:
        t0 = time.time()
        try:
            reader = ShardReader.from_dir(store.activations_dir(layer), cfg.batch_size, seed=cfg.seed)
            result = train(reader, cfg, checkpoint_dir=store.sae_dir(layer) / "checkpoint", layer=layer,
                           progress=progress)
            final = reconstruction_stats(result.sae, ShardReader.from_dir(store.activations_dir(layer),
                                                                          cfg.batch_size, seed=cfg.seed + 99))
        except SAEDataError as exc:
            raise DifflensError(str(exc)) from exc
        last = result.log[-1]
        metrics = {"fvu": final["fvu"], "l0": final["l0"], "dead_frac": last["dead_frac"],
                   "dense_frac": last["dense_frac"], "tokens": last["tokens"], "seconds": round(time.time() - t0, 2)}
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
        store.update_stage("sae", status="running", **{layer: metrics})
        results[layer] = metrics
    store.update_stage("sae", status="done", finished=time.time())
    return results
