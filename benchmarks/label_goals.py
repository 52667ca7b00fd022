"""The goals of unit labels and honest scores on an analysed run (the demo: `make demo`), and the time of the
analysis stage's labels pass.

    python benchmarks/label_goals.py --run runs/demo

Prints, per (layer, kind) and over all of them:
  - labels: among units whose best concept AUROC (every unit scored, as concepts.py scores them) is >= 0.9, the
    share whose label (units.label, computed without ground truth) names that concept;
  - concept recovery in-sample (concept_summary.mean_best_auroc) beside out-of-sample (auroc_oos, oos_split);
  - the seconds of the analysis stage (manifest) and of the labels pass alone, rerun here on the run's
    activity (nothing is written).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.analysis.concepts import best_auroc, concept_labels  # noqa: E402
from backend.analysis.generation_activity import chunks  # noqa: E402
from backend.analysis.inputs import connect, load_inputs, read_part  # noqa: E402
from backend.analysis.labels import candidates, unit_labels  # noqa: E402
from backend.analysis.out_of_sample import OutOfSample  # noqa: E402
from backend.analysis.range_examples import range_examples  # noqa: E402
from backend.run.config import AnalysisConfig  # noqa: E402


def label_agreement(con, inputs, cfg: AnalysisConfig, threshold: float) -> list[dict]:
    """Per partition: units with best concept AUROC >= threshold, and how many of them are labelled that concept."""
    concepts = concept_labels(inputs.gens, cfg.spatial_attributes)
    rows = []
    for part in inputs.partitions:
        best_UC, _ = best_auroc(con, inputs, part, concepts, cfg)
        units = read_part(inputs.store, "units", part).sort("unit")
        label_U = np.array(units["label"].to_list(), dtype=object)
        strong = np.flatnonzero(best_UC.max(1) >= threshold)
        named = [concepts.names[c] for c in best_UC[strong].argmax(1)]
        hits = int(sum(label_U[u] == n for u, n in zip(strong, named, strict=True)))
        rows.append({"layer": part.layer, "kind": part.kind, "units": len(strong), "labelled_right": hits,
                     "share": hits / len(strong) if len(strong) else None})
    return rows


def time_label_pass(con, inputs, cfg: AnalysisConfig) -> float:
    """Seconds of the labels pass' computations over every partition (read, label, range examples, out-of-sample;
    no writes)."""
    cands = candidates(inputs.gens)
    concepts = concept_labels(inputs.gens, cfg.spatial_attributes)
    gen_ids = inputs.gens["gen_id"].to_numpy()
    t0 = time.perf_counter()
    for part in inputs.partitions:
        scorer = OutOfSample(inputs.gens, concepts) if concepts is not None else None
        for chunk in chunks(con, inputs, part, cfg):
            unit_labels(chunk.best_UN, cands, cfg.label_top_n, cfg.label_pseudo_count)
            range_examples(chunk.best_UN, chunk.step_UN, gen_ids, chunk.lo, cfg.range_bins, cfg.range_per_bin)
            if scorer is not None:
                scorer.update(chunk.pooled_USN)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    inputs = load_inputs(args.run)
    cfg: AnalysisConfig = inputs.ctx.config.analysis
    con = connect(cfg)
    rows = label_agreement(con, inputs, cfg, args.threshold)
    print(f"labels: units with best concept AUROC >= {args.threshold} whose label names that concept")
    print(pl.DataFrame(rows))
    total = sum(r["units"] for r in rows)
    right = sum(r["labelled_right"] for r in rows)
    print(f"all: {right} of {total} ({right / max(total, 1):.1%})")
    summary = pl.read_parquet(Path(args.run) / "tables" / "concept_summary.parquet")
    print("concept recovery, in-sample (mean_best_auroc) and out-of-sample (auroc_oos):")
    print(summary.select("layer", "kind", "mean_best_auroc", "auroc_choose", "auroc_oos", "oos_split"))
    stage = inputs.ctx.manifest["stages"]["analysis"]
    print(f"analysis stage: {stage.get('seconds')} s (manifest); labels pass alone: "
          f"{time_label_pass(con, inputs, cfg):.2f} s")


if __name__ == "__main__":
    main()
