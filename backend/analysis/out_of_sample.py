"""Honest concept recovery: the best unit and step for a concept chosen on one half of the generations, its AUROC
scored on the other half.

The split (`split_of`): by seed parity when every prompt has generations of both parities (choose on even seeds,
score on odd: the same prompts, other noise); else by prompt parity (choose on the even-numbered prompts, score on
the odd ones). In each half a prompt's activation is the mean over its generations in that half, and AUROC is
concepts.py's (prompt level, per step). Per concept, the (unit, step) with the best AUROC on the choosing half over
all units and steps is kept; its AUROC on the scoring half is the out-of-sample score. A concept without positive
or negative prompts in a half is not scored. The in-sample figure beside it (concept_summary.mean_best_auroc)
chooses and scores on all generations.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy.sparse import csr_matrix

from backend.analysis.concepts import ConceptLabels, auroc_PC

SEED_SPLIT = "seed parity (choose on even seeds, score on odd)"
PROMPT_SPLIT = "prompt parity (choose on even prompts, score on odd)"


def split_of(gens: pl.DataFrame) -> tuple[np.ndarray, str]:
    """(choose_N: True for the generations that choose, the split's name)."""
    even = (gens["seed"].to_numpy() % 2) == 0
    both = (gens.with_columns(even=pl.Series(even)).group_by("p").agg(pl.col("even").n_unique())["even"] == 2).all()
    if both:
        return even, SEED_SPLIT
    return (gens["p"].to_numpy() % 2) == 0, PROMPT_SPLIT


class _Half:
    """Prompt-level averaging and concept labels of one half of the generations."""

    def __init__(self, mask_N: np.ndarray, labels: ConceptLabels):
        prompt_N = labels.prompt_of_N
        prompts = np.unique(prompt_N[mask_N])
        row_of = np.full(labels.positive_PC.shape[0], -1)
        row_of[prompts] = np.arange(len(prompts))
        gens = np.flatnonzero(mask_N)
        per_prompt = np.bincount(row_of[prompt_N[gens]], minlength=len(prompts))
        self.average_PN = csr_matrix((1.0 / per_prompt[row_of[prompt_N[gens]]], (row_of[prompt_N[gens]], gens)),
                                     shape=(len(prompts), len(mask_N)), dtype=np.float32)
        self.positive_PC = labels.positive_PC[prompts]
        n_pos = self.positive_PC.sum(0)
        self.scored_C = (n_pos > 0) & (n_pos < len(prompts))

    def auroc(self, acts_XN: np.ndarray) -> np.ndarray:
        return auroc_PC((self.average_PN @ acts_XN.T).T, self.positive_PC)


class OutOfSample:
    """Accumulates, chunk by chunk of units, each concept's best (unit, step) on the choosing half and its score on
    the other."""

    def __init__(self, gens: pl.DataFrame, labels: ConceptLabels):
        choose_N, self.split = split_of(gens)
        self.choose, self.score = _Half(choose_N, labels), _Half(~choose_N, labels)
        n = len(labels.names)
        self.best_C = np.full(n, -np.inf)
        self.oos_C = np.full(n, np.nan)

    def update(self, pooled_USN: np.ndarray) -> None:
        n_steps, n_gens = pooled_USN.shape[1:]
        acts_XN = pooled_USN.reshape(-1, n_gens)
        auc_XC = self.choose.auroc(acts_XN)
        pick_C = auc_XC.argmax(0)
        value_C = auc_XC[pick_C, np.arange(auc_XC.shape[1])]
        better = value_C > self.best_C
        if better.any():
            held_CC = self.score.auroc(acts_XN[pick_C])
            self.best_C = np.where(better, value_C, self.best_C)
            self.oos_C = np.where(better, np.diag(held_CC), self.oos_C)

    def summary(self) -> dict:
        """auroc_choose (mean of the chosen units' AUROC on the choosing half), auroc_oos (their mean on the
        scoring half), oos_split; over the concepts scored on both halves (null when none)."""
        ok = self.choose.scored_C & self.score.scored_C & np.isfinite(self.oos_C)
        if not ok.any():
            return {"auroc_choose": None, "auroc_oos": None, "oos_split": self.split}
        return {"auroc_choose": float(self.best_C[ok].mean()), "auroc_oos": float(self.oos_C[ok].mean()),
                "oos_split": self.split}
