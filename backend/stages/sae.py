"""The SAE stage: train the configured SAEs of each captured layer of a run (the `default` one of [sae] and any
[sae.variants.<id>]), save each under sae/<layer>/<sae_id>/, log its curve."""

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
from backend.run.schema import DEFAULT_SAE, check_sae_id, feature_kind
from backend.run.store import RunStore, stage_key
from backend.stages.features import forget
from sae.data import SAEDataError, ShardReader
from sae.io import load_sae, save_sae
from sae.train import SAETrainConfig, reconstruction_stats, train

ARCHITECTURES = ("topk", "batchtopk", "relu")


def sae_label(layer: str, sae_id: str) -> str:
    """How messages and summaries name one SAE: the layer for its default SAE, `layer:sae_id` for another."""
    return layer if sae_id == DEFAULT_SAE else f"{layer}:{sae_id}"


def train_saes(run, cfg: SAEStageConfig, overwrite: bool = False, progress: bool = True,
               sae_ids: list[str] | None = None) -> dict[str, dict]:
    """Train (or resume) the configured SAEs (sae_ids, default cfg.sae_ids(): `default` and the variants) of each
    of cfg.layers (default: every captured layer); returns final metrics by sae_label.

    An SAE whose saved cfg.json has its key (same settings, same capture) is kept. One trained with other settings
    (or imported) is replaced only with overwrite: the new SAE trains under _work/sae/<layer>/<sae_id>/
    (resumable) and takes the old one's place only once complete; that SAE's feature activity is then removed and
    its analysis and the interventions marked stale. Other SAEs of the layer are not touched.
    """
    ctx = as_context(run, require="capture")
    store = ctx.store
    captured = ctx.layers
    layers = cfg.layers or captured
    unknown = sorted(set(layers) - set(captured))
    if unknown:
        raise DifflensError(f"no activations for {', '.join(unknown)} in {store.root}; captured layers: "
                            f"{', '.join(captured)}")
    ids = [check_sae_id(i) for i in (sae_ids or cfg.sae_ids())]
    train_cfgs = {i: cfg.train_config(i) for i in ids}
    for layer in layers:
        for train_cfg in train_cfgs.values():
            check_train_config(train_cfg, token_width(store, layer), layer)
    capture_key = ctx.stage("capture").get("key")
    keys = {i: stage_key({"train": key_settings(c), "capture": capture_key}) for i, c in train_cfgs.items()}
    jobs = [(layer, i) for layer in layers for i in ids]
    replaced = {job: saved for job in jobs if (saved := _saved_cfg(store, *job)) and saved.get("key") != keys[job[1]]}
    if replaced and not overwrite:
        (layer, i), saved = next(iter(replaced.items()))
        raise DifflensError(f"{store.root} already has SAEs for {', '.join(sae_label(*j) for j in replaced)} "
                            f"{_other_origin(saved, asdict(train_cfgs[i]))}; training replaces them and makes their "
                            "feature tables and analysis stale: pass --overwrite to do so, or keep them by giving "
                            "the settings they were trained with (or another --name)")
    results: dict[tuple[str, str], dict] = {}
    with distributed.distributed(ctx.device) as dist:
        if dist.is_main:
            ctx.record_config("sae", asdict(cfg))
        for layer, sae_id in jobs:
            key, train_cfg = keys[sae_id], train_cfgs[sae_id]
            saved = _saved_cfg(store, layer, sae_id)
            metrics = saved.get("metrics") if saved and saved.get("key") == key else None
            dist.barrier()
            if metrics is None:
                device = distributed.local_device(ctx.device)
                metrics = _train_layer(store, layer, train_cfg, progress, write=dist.is_main, device=device, key=key,
                                       sae_id=sae_id)
                if dist.is_main and (layer, sae_id) in replaced:
                    mark_downstream_stale(store, layer, sae_id)
            if dist.is_main:
                if cfg.splice_samples and "frac_loss_recovered" not in metrics:
                    metrics |= _splice(ctx, layer, cfg.splice_samples, sae_id)
                    save_sae(ctx.sae(layer, sae_id), store.sae_dir(layer, sae_id),
                             extra={"train": asdict(train_cfg), "metrics": metrics, "key": key})
                store.update_stage("sae", status="running", key=stage_key(_nested(keys, layers)),
                                   metrics=_nested(results | {(layer, sae_id): metrics}))
            results[(layer, sae_id)] = metrics
        if dist.is_main:
            write_sae_metrics(store, results)
            store.update_stage("sae", status="done", finished=time.time())
        dist.barrier()
    return {sae_label(*job): m for job, m in results.items()}


def key_settings(cfg: SAETrainConfig) -> dict:
    """The training settings an SAE's key covers: every field, but `normalize` only when set (so the keys of SAEs
    trained before it existed are unchanged)."""
    settings = asdict(cfg)
    if settings.get("normalize") == "none":
        del settings["normalize"]
    return settings


def _nested(by_job: dict, layers: list[str] | None = None) -> dict:
    """{(layer, sae_id): v} -> {layer: {sae_id: v}}; or, with layers, {sae_id: v} -> {layer: {sae_id: v}}."""
    if layers is not None:
        return {layer: dict(by_job) for layer in layers}
    out: dict = {}
    for (layer, sae_id), v in by_job.items():
        out.setdefault(layer, {})[sae_id] = v
    return out


def write_sae_metrics(store: RunStore, results: dict[tuple[str, str], dict]) -> None:
    """tables/sae_metrics.parquet: these SAEs' rows, and the rows of the run's other SAEs kept as they were."""
    import polars as pl

    path = store.root / "tables" / "sae_metrics.parquet"
    have = set(store.saes())
    rows = []
    if path.is_file():
        old = pl.read_parquet(path)
        if "sae_id" not in old.columns:  # a format-2 table: the default SAEs' metrics
            old = old.with_columns(sae_id=pl.lit(DEFAULT_SAE))
        rows = [r for r in old.to_dicts() if (r["layer"], r["sae_id"]) in have and (r["layer"], r["sae_id"])
                not in results]
    rows += [{"layer": layer, "sae_id": sae_id} | m for (layer, sae_id), m in results.items()]
    order = {layer: n for n, layer in enumerate(dict.fromkeys([r["layer"] for r in rows]))}
    rows.sort(key=lambda r: (order[r["layer"]], r["sae_id"] != DEFAULT_SAE, r["sae_id"]))
    # splice columns are null when the test was skipped
    store.write_table("sae_metrics", store.table_from_rows("sae_metrics", rows))


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


def _other_origin(saved: dict, new: dict) -> str:
    if saved.get("source_format"):
        return f"imported from {saved.get('source')} ({saved['source_format']})"
    return f"trained with other settings ({_differences(saved.get('train', {}), new)})"


def _saved_cfg(store: RunStore, layer: str, sae_id: str = DEFAULT_SAE) -> dict | None:
    path = store.sae_dir(layer, sae_id) / "cfg.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mark_downstream_stale(store: RunStore, layer: str, sae_id: str = DEFAULT_SAE) -> None:
    """A replaced SAE: its feature activity is removed, and what read it must run again: the features pass records
    it again (the record forgets it), the analysis recomputes its partition (the record forgets that partition's
    key), the interventions run again. Other SAEs' activity and analysis stay as they are."""
    kind = feature_kind(sae_id)
    shutil.rmtree(store.partition_dir("activity", layer, kind), ignore_errors=True)
    stages = (store.read_manifest() or {}).get("stages", {})
    why = f"the SAE {sae_label(layer, sae_id)} was replaced"
    if "features" in stages:
        store.update_stage("features", **forget(stages["features"], layer, sae_id))
    if "analysis" in stages:
        part_keys = {k: v for k, v in (stages["analysis"].get("partition_keys") or {}).items()
                     if k != f"{layer}/{kind}"}
        store.clear_stage_markers("analysis")
        store.update_stage("analysis", status="stale", key=None, stale_because=why, partition_keys=part_keys)
    if "interventions" in stages:
        store.clear_stage_markers("interventions")
        store.update_stage("interventions", status="stale", key=None, stale_because=why)


def _train_layer(store: RunStore, layer: str, cfg: SAETrainConfig, progress: bool, write: bool = True,
                 device: str = "cpu", key: str = "", sae_id: str = DEFAULT_SAE) -> dict:
    """Train one SAE of a layer (every rank under torchrun); the writer rank saves it and its curve."""
    t0 = time.time()
    work = work_dir(store, layer, sae_id)
    legacy = store.root / "_work" / "sae" / layer / "key.json"  # a format-2 run's unfinished training
    if write and legacy.is_file():
        shutil.rmtree(legacy.parent)
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
    swap_in(store, layer, sae_id)
    log = result.log
    store.write_table_shard("sae_training", "part-0000000", pa.table({
        "step": np.array([r["step"] for r in log], dtype=np.int32),
        "tokens": np.array([r["tokens"] for r in log], dtype=np.int64),
        "fvu": np.array([r["fvu"] for r in log], dtype=np.float64),
        "l0": np.array([r["l0"] for r in log], dtype=np.float32),
        "dead_frac": np.array([r["dead_frac"] for r in log], dtype=np.float32),
        "lr": np.array([r["lr"] for r in log], dtype=np.float32),
    }), layer=layer, kind=feature_kind(sae_id))
    return metrics


def work_dir(store: RunStore, layer: str, sae_id: str = DEFAULT_SAE) -> Path:
    """Where one SAE of a layer trains (checkpoints included) until it is complete."""
    return store.root / "_work" / "sae" / layer / sae_id


def swap_in(store: RunStore, layer: str, sae_id: str = DEFAULT_SAE, new: Path | None = None) -> None:
    """Move a completed SAE (default: from its work_dir) to sae/<layer>/<sae_id>/, replacing the old one (kept
    aside until the new one is in place). A format-2 layer's SAE (sae/<layer>/ itself) moves aside file by file,
    so the layer's other SAEs stay."""
    new = new or work_dir(store, layer, sae_id)
    target = store.root / "sae" / layer / sae_id
    old = store.root / "_work" / "sae-replaced" / layer / sae_id
    shutil.rmtree(new / "checkpoint", ignore_errors=True)
    (new / "key.json").unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)
    legacy = store.sae_dir(layer, sae_id)
    if legacy != target:  # format 2: cfg.json, sae.safetensors and the exports of sae/<layer>/
        old.mkdir(parents=True, exist_ok=True)
        for path in list(legacy.iterdir()):
            if path.is_file() or not (path / "sae.safetensors").is_file():
                path.rename(old / path.name)
    if target.exists():
        old.parent.mkdir(parents=True, exist_ok=True)
        target.rename(old)
    target.parent.mkdir(parents=True, exist_ok=True)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    for empty in (new.parent, old.parent):  # _work/sae/<layer>/, _work/sae-replaced/<layer>/ when nothing is left
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()


def _splice(ctx, layer: str, n_samples: int, sae_id: str = DEFAULT_SAE) -> dict:
    """Splice-test metrics for one SAE of layer on the first n_samples generations of the run (the run's model,
    device and dtype)."""
    from backend.models.splice import splice_test

    gens = ctx.generations().head(n_samples)
    model = ctx.model  # first: the SAE then loads on the model's device
    sae = ctx.sae(layer, sae_id)
    if ctx.model_kind == "classifier":  # the classes' cross-entropy instead of the noise-prediction loss
        from backend.models.classifier import splice_test as classifier_splice_test

        every = ctx.generations()  # sorted by class: an even spread over the classes instead of the first ones
        gens = every.gather_every(max(1, every.height // max(n_samples, 1))).head(n_samples)
        return classifier_splice_test(model, layer, lambda x: sae(x.to(sae.W_dec.dtype)).to(x.dtype),
                                      gens["image_path"].to_list(), gens["class_label"].to_list()).to_dict()
    result = splice_test(model, layer, lambda x: sae(x.to(sae.W_dec.dtype)).to(x.dtype), gens["prompt"].to_list(),
                         gens["seed"].to_list(), int(gens["n_steps"][0]), float(gens["guidance"][0]))
    return result.to_dict()


EXPORT_FORMATS = ("saelens",)


def export_saes(run_dir: str | Path, layers: list[str] | None, fmt: str, out_dir: str | Path | None = None,
                sae_id: str = DEFAULT_SAE) -> dict:
    """Export one SAE (sae_id) of the run's layers (default: every layer with that SAE) to out_dir/<layer>/ (default:
    sae/<layer>/<sae_id>/<fmt>/)."""
    from sae.io import SAELoadError, export_saelens

    if fmt not in EXPORT_FORMATS:
        raise DifflensError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    ctx = open_run(run_dir)
    store, trained = ctx.store, [layer for layer, i in ctx.saes() if i == check_sae_id(sae_id)]
    if not trained:
        raise DifflensError(f"{run_dir} has no trained SAEs; run `python cli.py train-sae --run {run_dir}` first")
    layers = layers or trained
    missing = sorted(set(layers) - set(trained))
    if missing:
        raise DifflensError(f"no SAE {sae_id!r} for {', '.join(missing)} in {run_dir}; layers with one: "
                            f"{', '.join(trained)}")
    written = {}
    for layer in layers:
        try:
            sae = load_sae(store.sae_dir(layer, sae_id))
        except SAELoadError as exc:
            raise DifflensError(str(exc)) from exc
        target = Path(out_dir) / layer if out_dir else store.sae_dir(layer, sae_id) / fmt
        written[layer] = export_saelens(sae, target, hook_name=layer)
    return written
