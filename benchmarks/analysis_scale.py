"""How the analysis scales: time and peak RSS of profiles + frequencies + units + peaks on synthetic feature
activity shaped like a Stable Diffusion run (5,120 SAE features, 50 steps, sparse: ~100 active features per
generation and step, frequent features and per-feature preferred steps).

    python benchmarks/analysis_scale.py                     # 10M and 100M rows
    python benchmarks/analysis_scale.py --sizes 10M,30M     # other sizes

Each size is generated streaming (one shard of 32 generations at a time, like capture) into a temporary
directory outside the repository, then analysed in a fresh subprocess whose peak RSS is read with
os.wait4 (the child's own rusage). Prints a table: rows, generations, seconds, rows/s, peak RSS; time should grow
about linearly with rows and RSS should stay flat (bounded by one shard plus [units, steps, groups] arrays).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_FEATURES, N_STEPS, ACTIVE_PER_STEP, SHARD_GENS, GROUPS = 5120, 50, 100, 32, 8
LAYER = "up_blocks.1.attentions.1"


def parse_size(text: str) -> int:
    mult = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}
    text = text.strip().upper()
    return int(float(text[:-1]) * mult[text[-1]]) if text[-1] in mult else int(text)


def step_distributions(rng: np.random.Generator) -> np.ndarray:
    """[S, F] cumulative probabilities: Zipf-like popularity times a bump around each feature's preferred step."""
    popularity = 1.0 / np.arange(1, N_FEATURES + 1) ** 0.8
    centre, width = rng.uniform(0, N_STEPS, N_FEATURES), rng.uniform(3, 15, N_FEATURES)
    steps = np.arange(N_STEPS)[:, None]
    p = popularity[None] * np.exp(-0.5 * ((steps - centre[None]) / width[None]) ** 2) + 1e-7
    return np.cumsum(p / p.sum(1, keepdims=True), axis=1)


def write_run(root: Path, rows: int, seed: int = 0) -> int:
    """A run directory with about `rows` feature-activity rows (whole shards); returns the number of generations."""
    from backend.run.store import RunStore

    store = RunStore(root)
    root.mkdir(parents=True)
    store.write_manifest({"config": {"model": "synthetic"}, "stages": {"capture": {"status": "done"},
                                                                        "features": {"status": "done"}}})
    rng = np.random.default_rng(seed)
    cdf_SF = step_distributions(rng)
    store.sae_dir(LAYER).mkdir(parents=True)
    (store.sae_dir(LAYER) / "cfg.json").write_text(json.dumps({"d_in": 1280, "n_latents": N_FEATURES}))
    written = n_gens = 0
    while written < rows:
        first, b = n_gens, SHARD_GENS
        step = np.tile(np.repeat(np.arange(N_STEPS), ACTIVE_PER_STEP), b)
        gen = np.repeat(np.arange(first, first + b), N_STEPS * ACTIVE_PER_STEP)
        unit = _draw(cdf_SF, step, rng)
        key = np.unique((gen.astype(np.int64) * N_STEPS + step) * N_FEATURES + unit)  # one row per (g, s, f)
        unit, gs = key % N_FEATURES, key // N_FEATURES
        gen, step = gs // N_STEPS, gs % N_STEPS
        mx = rng.exponential(1.0, len(key)).astype(np.float32) + 0.01
        order = np.lexsort((gen, step, unit))
        store.write_table_shard("activity", f"part-{first:07d}", pa.table({
            "gen_id": gen[order].astype(np.int32), "step": step[order].astype(np.int16),
            "unit": unit[order].astype(np.int32), "mean": (mx[order] * 0.05).astype(np.float32),
            "max": mx[order]}), layer=LAYER, kind="feature")
        written += len(key)
        n_gens += b
    store.write_table_shard("generations", "part-0000000", pa.table({
        "gen_id": np.arange(n_gens, dtype=np.int32), "prompt": [f"prompt {i // 2}" for i in range(n_gens)],
        "seed": np.arange(n_gens, dtype=np.int64) % 2, "group": [f"g{(i // 2) % GROUPS}" for i in range(n_gens)],
        "attributes": ["{}"] * n_gens, "image": [""] * n_gens,
        "n_steps": np.full(n_gens, N_STEPS, np.int16), "guidance": np.full(n_gens, 7.5, np.float32)}))
    store.write_table("steps", pa.table({"step": np.arange(N_STEPS, dtype=np.int16),
                                         "timestep": np.linspace(999, 0, N_STEPS).astype(np.float32)}))
    return n_gens


def _draw(cdf_SF: np.ndarray, step: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One feature per row from its step's distribution (inverse CDF, one searchsorted per step)."""
    out = np.empty(len(step), np.int64)
    u = rng.random(len(step))
    for s in range(N_STEPS):
        mine = step == s
        out[mine] = np.minimum(np.searchsorted(cdf_SF[s], u[mine]), N_FEATURES - 1)
    return out


def analyse(run_dir: str, memory_limit: str, threads: int) -> dict:
    """Child process: profiles + frequencies + units + peaks, writing the tables like analyze does."""
    from backend.analysis.inputs import connect, load_inputs
    from backend.stages.analysis import AnalysisConfig, _profiles_part

    cfg = AnalysisConfig(duckdb_memory_limit=memory_limit, duckdb_threads=threads)
    t0 = time.perf_counter()
    inputs = load_inputs(run_dir)
    result = _profiles_part(connect(cfg), inputs, cfg, progress=False)
    return {"seconds": time.perf_counter() - t0, **next(iter(result.values()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10M,100M", help="comma-separated row counts (K/M suffixes)")
    ap.add_argument("--memory-limit", default="2GB", help="DuckDB memory_limit")
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    ap.add_argument("--keep", action="store_true", help="keep the generated tables")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(analyse(args.child, args.memory_limit, args.threads)))
        return
    print(f"| rows | generations | shards | generate s | analyse s | rows/s | peak RSS | dead | dense | "
          f"(threads={args.threads}, memory_limit={args.memory_limit})")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        tmp = Path(tempfile.mkdtemp(prefix="difflens-bench-"))
        try:
            t0 = time.perf_counter()
            n_gens = write_run(tmp / "run", size)
            gen_s = time.perf_counter() - t0
            child = [sys.executable, __file__, "--child", str(tmp / "run"), "--memory-limit", args.memory_limit,
                     "--threads", str(args.threads)]
            proc = subprocess.Popen(child, stdout=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
            out = proc.stdout.read()
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise SystemExit(f"analysis of {size:,} rows failed (exit {proc.returncode})")
            rss = f"{usage.ru_maxrss / 1024:.0f} MB"
            r = json.loads(out.strip().splitlines()[-1])
            shards = len(list((tmp / "run" / "tables" / "activity").rglob("*.parquet")))
            print(f"| {r['rows']:,} | {n_gens:,} | {shards} | {gen_s:.0f} | {r['seconds']:.1f} | "
                  f"{r['rows'] / r['seconds']:,.0f} | {rss} | {r['dead']} | {r['dense']} |", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
