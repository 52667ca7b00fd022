"""The goals of unit labels and honest scores on an analysed run (the demo: `make demo`), and the time of the
analysis stage's labels pass.

    python benchmarks/label_goals.py --run runs/demo

Prints, per (layer, kind) and over all of them:
  - labels: among units whose best concept AUROC (every unit scored, as concepts.py scores them) is >= 0.9, the
    share whose label (units.label, computed without ground truth) names that concept, and the same for labels
    recomputed (nothing is written) with the "breakeven" method and with the "top_n" method at other label_top_n
    values (--top-n; a sensitivity check). With --words the recomputed labels ignore the prompts' attributes and
    read their words (as for a plain .txt prompt file of any model): a word names a concept when it is the
    concept's value (`red` for colour=red, and `group=red`); and how often the breakeven label names the
    concept at low, middle and high confidence;
  - concept recovery in-sample (concept_summary.mean_best_auroc) beside out-of-sample (auroc_oos, oos_split);
  - the seconds of the analysis stage (manifest) and of the labels pass alone with each label method, rerun
    here on the run's activity (nothing is written).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from backend.analysis.label_pass import chunk_labels, label_activity_UN  # noqa: E402
from backend.analysis.labels import breakeven_labels, candidates, unit_labels  # noqa: E402
from backend.analysis.out_of_sample import OutOfSample  # noqa: E402
from backend.analysis.range_examples import range_examples  # noqa: E402
from backend.run.config import AnalysisConfig  # noqa: E402

METHODS = ("breakeven", "top_n")


def label_agreement(con, inputs, cfg: AnalysisConfig, threshold: float, top_ns: list[int],
                    words: bool) -> tuple[list[dict], list[tuple[float, bool]]]:
    """Per partition: units with best concept AUROC >= threshold, and how many of them are labelled that concept
    (units.label as stored, and recomputed by the breakeven method and by top_n with each label_top_n of top_ns);
    and (confidence, names the concept) of each such unit's breakeven label."""
    concepts = concept_labels(inputs.gens, cfg.spatial_attributes)
    cands = candidates(inputs.gens.with_columns(attributes=pl.lit("{}")) if words else inputs.gens)
    rows, calibration = [], []
    for part in inputs.partitions:
        best_UC, _ = best_auroc(con, inputs, part, concepts, cfg)
        strong = np.flatnonzero(best_UC.max(1) >= threshold)
        named = [concepts.names[c] for c in best_UC[strong].argmax(1)]
        stored = read_part(inputs.store, "units", part).sort("unit")["label"].to_list()
        recomputed = {"breakeven": [], **{f"top_{n}": [] for n in top_ns}}
        confidence = []
        for chunk in chunks(con, inputs, part, cfg):
            acts_USN = chunk.pooled_USN if cfg.label_stat == "pool" else chunk.best_UN[:, None, :]
            labels, conf, _ = breakeven_labels(acts_USN, cands, cfg.label_pseudo_count)
            recomputed["breakeven"] += labels
            confidence.append(conf)
            for n in top_ns:
                recomputed[f"top_{n}"] += unit_labels(label_activity_UN(chunk, cfg), cands, n,
                                                      cfg.label_pseudo_count)[0]
        row = {"layer": part.layer, "kind": part.kind, "units": len(strong)}
        for name, label_U in (("stored", stored), *recomputed.items()):
            row[name] = int(sum(names_concept(label_U[u], c, words) for u, c in zip(strong, named, strict=True)))
        rows.append(row)
        conf_U = np.concatenate(confidence)
        calibration += [(float(conf_U[u]), names_concept(recomputed["breakeven"][u], c, words))
                        for u, c in zip(strong, named, strict=True)]
    return rows, calibration


def print_calibration(calibration: list[tuple[float, bool]]) -> None:
    """How often the breakeven label names the concept, by its confidence."""
    conf = np.array([c for c, _ in calibration], np.float64)
    right = np.array([r for _, r in calibration], bool)
    for lo, hi in ((0.0, 0.5), (0.5, 0.75), (0.75, 1.01)):
        mine = (conf >= lo) & (conf < hi)  # NaN (no label) is in no bin
        share = f"{right[mine].mean():.1%}" if mine.any() else "-"
        print(f"breakeven labels with confidence in [{lo}, {min(hi, 1.0)}]: {int(mine.sum())}, "
              f"naming the concept: {share}")


def names_concept(label: str | None, concept: str, words: bool) -> bool:
    """Whether a label names a concept ("key=value"): the same string, or with word labels the value (or the group
    of that name: the demo's groups are its colours)."""
    value = concept.split("=", 1)[1]
    return label is not None and (label in (value, f"group={value}") if words else label == concept)


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
            chunk_labels(chunk, cands, cfg)
            range_examples(chunk.best_UN, chunk.step_UN, gen_ids, chunk.lo, cfg.range_bins, cfg.range_per_bin)
            if scorer is not None:
                scorer.update(chunk.pooled_USN)
    return time.perf_counter() - t0


def stored_method(inputs) -> str:
    """The label method the run's analysis used (runs analysed before label_method existed used top_n)."""
    return (inputs.ctx.manifest["config"].get("analysis") or {}).get("label_method", "top_n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--label-stat", default="", help="pool or example (default: the run's analysis.label_stat)")
    parser.add_argument("--top-n", default="16", help="label_top_n values to recompute top_n labels with")
    parser.add_argument("--words", action="store_true", help="recompute labels from the prompts' words only")
    args = parser.parse_args()
    inputs = load_inputs(args.run)
    cfg: AnalysisConfig = inputs.ctx.config.analysis
    if args.label_stat:
        cfg = dataclasses.replace(cfg, label_stat=args.label_stat)
    con = connect(cfg)
    top_ns = [int(n) for n in args.top_n.split(",") if n]
    rows, calibration = label_agreement(con, inputs, cfg, args.threshold, top_ns, args.words)
    print(f"labels: units with best concept AUROC >= {args.threshold} whose label names that concept (stored: "
          f"units.label, label_method = {stored_method(inputs)}; recomputed{' from words' if args.words else ''}: "
          "breakeven, and top_N: top_n with label_top_n = N)")
    with pl.Config(tbl_cols=-1, tbl_width_chars=200):
        print(pl.DataFrame(rows))
    total = sum(r["units"] for r in rows)
    for name in ("stored", "breakeven", *(f"top_{n}" for n in top_ns)):
        right = sum(r[name] for r in rows)
        print(f"all, {name}: {right} of {total} ({right / max(total, 1):.1%})")
    print_calibration(calibration)
    summary = pl.read_parquet(Path(args.run) / "tables" / "concept_summary.parquet")
    print("concept recovery, in-sample (mean_best_auroc) and out-of-sample (auroc_oos):")
    print(summary.select("layer", "kind", "mean_best_auroc", "auroc_choose", "auroc_oos", "oos_split"))
    stage = inputs.ctx.manifest["stages"]["analysis"]
    seconds = {m: time_label_pass(con, inputs, dataclasses.replace(cfg, label_method=m)) for m in METHODS}
    print(f"analysis stage: {stage.get('seconds')} s (manifest); labels pass alone: "
          + ", ".join(f"{s:.2f} s ({m})" for m, s in seconds.items()))


if __name__ == "__main__":
    main()
