"""Atlas speed: batched across units versus one unit at a time, and the whole demo atlas (1,152 units).

    .venv/bin/python benchmarks/atlas_speed.py [--run runs/demo] [--prior-units 32] [--dream-units 16]
                                               [--batch 32] [--threads 2] [--whole | --reduced 32]
                                               [--what prior|dream|both] [--skip-ratios] [--skip-whole]
                                               [--prior-steps active|all|late|peaks|A-B]

One process, the same run and settings for both sides of each ratio (goals: priors >= 5x units/minute, dreams >=
2x): priors with 4 seeds at the run's 20 steps; dreams with 2 seeds x 50 iterations at step 0 and the unit's top
peak (targets "0,peaks", max_target_steps 2, the default variant only). The one-at-a-time side is the same code
with atlas.batch_units = 1 (one generation batch, one dream batch per unit), so the ratio is the batching alone.
The two sides alternate (batched, single, batched, single: --repeats 2), and the figure is each side's best.

Then the whole demo atlas (both layers, all channels and SAE features: 2 x (64 + 512) = 1,152 units) with those
settings (goal: <= 20 minutes on 2 cores): `--whole` runs it; otherwise (the default, for a busy machine: check
`uptime`) a reduced atlas of `--reduced` units per (layer, kind) is run and extrapolated linearly per (layer, kind)
by unit count, and the printout says so.

Without --run, a synthetic analysed run of the demo model is built in a temporary directory (units tables with
active windows and peaks drawn at random, one random 512-latent SAE per layer, 20 steps), so nothing needs
`run-all` first; with --run, an analysed run (`python cli.py run-all`) is copied and used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

LAYERS = ["mid_block.attentions.0", "up_blocks.1.attentions.1"]
CHANNELS, LATENTS, STEPS = 64, 512, 20


def synthetic_run(root: Path) -> Path:
    """An analysed demo run as the atlas reads it: manifest, generations, units per (layer, kind), SAEs."""
    from backend.run.store import RunStore
    from sae.io import save_sae
    from sae.model import SAE, SAEConfig

    store = RunStore(root)
    root.mkdir(parents=True)
    parts = [f"{layer}/{kind}" for layer in LAYERS for kind in ("channel", "feature")]
    store.write_manifest({"config": {"model": "demo", "device": "cpu", "dtype": "float32"}, "stages": {
        "capture": {"status": "done", "n_steps": STEPS, "guidance": 1.5, "layers": LAYERS},
        "analysis": {"status": "done", "key": "synthetic", "partitions": parts}}})
    store.write_table_shard("generations", "part-0000000", pa.table({
        "gen_id": np.zeros(1, np.int32), "prompt": ["a large blue circle on the left, gray background"],
        "seed": np.zeros(1, np.int64), "group": ["blue"], "attributes": ["{}"], "image": ["images/000000.png"],
        "n_steps": np.full(1, STEPS, np.int16), "guidance": np.full(1, 1.5, np.float32),
        "negative_prompt": pa.nulls(1, pa.string()), "control_image": pa.nulls(1, pa.string()),
        "image_path": pa.nulls(1, pa.string()), "class_label": pa.nulls(1, pa.string())}))
    rng = np.random.default_rng(0)
    for li, layer in enumerate(LAYERS):
        sae = SAE(SAEConfig(d_in=CHANNELS, n_latents=LATENTS, k=16, layer=layer))
        sae.reset_parameters(torch.Generator().manual_seed(li))
        save_sae(sae.eval(), store.sae_dir(layer))
        for kind, n in (("channel", CHANNELS), ("feature", LATENTS)):
            first = rng.integers(0, STEPS // 2, n).astype(np.int16)
            last = (first + rng.integers(1, STEPS // 2, n)).astype(np.int16)
            peak = ((first + last) // 2).astype(np.int16)
            store.write_table_shard("units", "part-0000000", pa.table({
                "unit": np.arange(n, dtype=np.int32), "density": rng.uniform(0.01, 0.5, n).astype(np.float32),
                "mean": np.full(n, 0.1, np.float32), "max": rng.uniform(0.5, 2.0, n).astype(np.float32),
                "peak_steps": pa.array([[int(p)] for p in peak], pa.list_(pa.int16())), "first_active": first,
                "last_active": last, "active_steps": (last - first + 1).astype(np.int16),
                "dead": np.zeros(n, bool), "dense": np.zeros(n, bool), "label": [""] * n,
                "label_confidence": np.full(n, np.nan, np.float32), "label_step": np.full(n, -1, np.int16)}),
                                    layer=layer, kind=kind)
    return root


def settings(units: str, batch: int, kinds: list[str], layers: list[str], priors: bool, dreams: bool,
             prior_steps: str = "active"):
    from backend.run.config import AtlasConfig, DreamConfig, PriorConfig

    atlas = AtlasConfig(units=units, layers=layers, kinds=kinds, priors=priors, dreams=dreams,
                        dream_variants=["default"], batch_units=batch, heatmap_animations=False)
    prior = PriorConfig(seeds=[0, 1, 2, 3], steps=prior_steps)
    dream = DreamConfig(opt_steps=50, seeds=[0, 1], targets="0,peaks", max_target_steps=2, snapshot_every=10)
    return atlas, prior, dream


def timed_atlas(base: Path, work: Path, model, cfgs) -> float:
    """Seconds of one atlas call on a fresh copy of the run."""
    from backend.run.distributed import Dist
    from backend.stages.atlas import run_atlas

    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    t0 = time.perf_counter()
    run_atlas(work, *cfgs, progress=False, model=model, dist=Dist())
    return time.perf_counter() - t0


def ratio(base: Path, tmp: Path, model, what: str, n: int, batch: int, repeats: int,
          prior_steps: str = "active") -> tuple[float, float]:
    """(batched, one-at-a-time) seconds for n channels of the deeper layer: the best of `repeats` alternating
    runs."""
    units = f"0-{n - 1}"
    sides = {b: settings(units, b, ["channel"], [LAYERS[1]], what == "prior", what == "dream", prior_steps)
             for b in (batch, 1)}
    best = {b: float("inf") for b in sides}
    for _ in range(repeats):
        for b, cfgs in sides.items():
            best[b] = min(best[b], timed_atlas(base, tmp / "work", model, cfgs))
    return best[batch], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="an analysed run to copy (default: a synthetic demo run)")
    ap.add_argument("--prior-units", type=int, default=32)
    ap.add_argument("--dream-units", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32, help="atlas.batch_units of the batched side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whole", action="store_true", help="run the whole 1,152-unit atlas (a quiet machine)")
    ap.add_argument("--reduced", type=int, default=32, help="units per (layer, kind) of the reduced atlas")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side of each ratio")
    ap.add_argument("--skip-ratios", action="store_true")
    ap.add_argument("--skip-whole", action="store_true", help="only the ratios, no whole or reduced atlas")
    ap.add_argument("--what", choices=["prior", "dream", "both"], default="both", help="the ratios to measure")
    ap.add_argument("--prior-steps", default="active", help="prior.steps of the priors' ratio: active (the "
                    "synthetic units' windows open at steps 0-9 of 20), all, late, peaks or a window a-b")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from backend.models import load_model

    model = load_model("demo")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = tmp / "base"
        if args.run:
            shutil.copytree(args.run, base)
        else:
            synthetic_run(base)
        print(f"machine load at start: {load:.2f} (1-minute average), {args.threads} threads")
        if not args.skip_ratios:
            for what, n in (("prior", args.prior_units), ("dream", args.dream_units)):
                if args.what not in (what, "both"):
                    continue
                batched, single = ratio(base, tmp, model, what, n, args.batch, args.repeats, args.prior_steps)
                steps = f" (prior.steps {args.prior_steps})" if what == "prior" else ""
                print(f"{what}s of {n} channels{steps}: batched {batched:.1f} s ({60 * n / batched:.0f} units/min), "
                      f"one at a time {single:.1f} s ({60 * n / single:.0f} units/min): {single / batched:.2f}x "
                      f"(load {os.getloadavg()[0]:.2f})")
        if args.skip_whole:
            return
        total, parts = 0.0, []
        for layer in LAYERS:
            for kind, n_units in (("channel", CHANNELS), ("feature", LATENTS)):
                n = n_units if args.whole else min(args.reduced, n_units)
                cfgs = settings(f"0-{n - 1}", args.batch, [kind], [layer], True, True)
                seconds = timed_atlas(base, tmp / "work", model, cfgs)
                whole = seconds * n_units / n
                total += whole
                parts.append(f"{layer}/{kind}: {n} units {seconds:.1f} s" + ("" if n == n_units else
                                                                             f" -> {n_units} units {whole:.0f} s"))
        print("whole demo atlas (1,152 units; priors 4 seeds, dreams 2 seeds x 50 iterations at step 0 and the top "
              f"peak), {'measured' if args.whole else 'extrapolated from a reduced atlas'}: {total / 60:.1f} min "
              f"(load {os.getloadavg()[0]:.2f})")
        for line in parts:
            print(f"  {line}")


if __name__ == "__main__":
    main()
