"""Unit labels without ground truth: what a unit's top-activating generations' prompts have in common.

Candidates. When the prompts carry attributes, the candidates are their attribute values (`colour=red`, every
attribute, spatial ones included); otherwise the prompts' words (lower-cased, stop-words and one-letter words
dropped) and, when the run has two or more prompt groups, the groups (`group=<name>`). A generation carries a
candidate when its prompt does.

Score. A unit's top generations are its cfg.label_top_n generations with the highest activation (cfg.label_stat:
the spatial pool concept recovery scores, or the example statistic, maximised over steps), among those where it
is active (> 0). Each
candidate is scored by the log-odds ratio of being carried, top generations against all generations, with a
pseudo-count c (cfg.label_pseudo_count) added to every count, as compare.py does:

    score = log((a + c) / (K - a + c)) - log((t + c) / (N - t + c))

(a of the K top generations carry it, t of all N). The label is the best-scoring candidate (ties: the first in
sorted order); none when no candidate scores above 0 (a unit whose top is every generation, or a candidate every
generation carries, scores at most 0) or the unit is active in fewer than 2 generations.

Confidence. How far the top generations are from chance towards all carrying the label, with the top share
shrunk towards the base rate by the same pseudo-count: p_top = (a + c p_all) / (K + c), p_all = the share of all
generations that carry it, confidence = clip((p_top - p_all) / (1 - p_all), 0, 1). 1: every top generation
carries a label that is rare overall; 0: they carry it no more often than all generations do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.sparse import csr_matrix

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both but
by can could did do does doing down during each few for from further had has have having he her here hers herself
him himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only or
other our ours ourselves out over own same she should so some such than that the their theirs them themselves then
there these they this those through to too under until up very was we were what when where which while who whom
why will with you your yours yourself yourselves photo picture image
""".split())
"""Words never used as labels: English function words, and the words every text-to-image prompt set is full of."""

WORD = re.compile(r"[a-z][a-z0-9'-]*")
MIN_ACTIVE = 2


@dataclass
class Candidates:
    names: list[str]
    carried_NT: csr_matrix
    """[generations, candidates] 1 where the generation's prompt carries the candidate (inputs.gens order)."""


def prompt_words(prompt: str) -> set[str]:
    """The words of a prompt that can label a unit."""
    return {w for w in WORD.findall(prompt.lower()) if len(w) > 1 and w not in STOP_WORDS}


def candidates(gens: pl.DataFrame) -> Candidates:
    """The label candidates of a run's generations: attribute values when prompts carry attributes, else words and
    prompt groups."""
    attrs = [json.loads(a) if a else {} for a in gens["attributes"].to_list()] if "attributes" in gens.columns \
        else [{} for _ in range(gens.height)]
    if any(attrs):
        tokens = [{f"{k}={v}" for k, v in a.items()} for a in attrs]
    else:
        tokens = [prompt_words(p) for p in gens["prompt"].to_list()]
        if gens["group"].n_unique() >= 2:
            tokens = [t | {f"group={g}"} for t, g in zip(tokens, gens["group"].to_list(), strict=True)]
    names = sorted(set().union(*tokens)) if tokens else []
    index = {n: i for i, n in enumerate(names)}
    rows = np.repeat(np.arange(len(tokens)), [len(t) for t in tokens])
    cols = np.array([index[n] for t in tokens for n in sorted(t)], np.int64)
    carried = csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(tokens), len(names)))
    return Candidates(names, carried)


def top_mask_UN(best_UN: np.ndarray, top_n: int) -> np.ndarray:
    """[units, generations] True for each unit's top_n generations by activation, among those above 0."""
    n = min(top_n, best_UN.shape[1])
    order = np.argsort(-best_UN, axis=1, kind="stable")[:, :n]
    mask = np.zeros(best_UN.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask & (best_UN > 0)


def unit_labels(best_UN: np.ndarray, cands: Candidates, top_n: int, pseudo: float) -> tuple[list, np.ndarray]:
    """(label or None, confidence or NaN) per unit from its per-generation activation [units, generations]."""
    n_units, n_gens = best_UN.shape
    if not cands.names:
        return [None] * n_units, np.full(n_units, np.nan, np.float32)
    top = top_mask_UN(best_UN, top_n)
    k_U = top.sum(1).astype(np.float64)[:, None]
    a_UT = np.asarray((cands.carried_NT.T @ top.T.astype(np.float32)).T, np.float64)
    total_T = np.asarray(cands.carried_NT.sum(0), np.float64)
    score = (np.log(a_UT + pseudo) - np.log(k_U - a_UT + pseudo)
             - np.log(total_T + pseudo) + np.log(n_gens - total_T + pseudo))
    best_U = score.argmax(1)
    rows = np.arange(n_units)
    p_all = total_T[0, best_U] / n_gens
    p_top = (a_UT[rows, best_U] + pseudo * p_all) / (k_U[:, 0] + pseudo)
    with np.errstate(divide="ignore", invalid="ignore"):
        confidence = np.clip(np.where(p_all < 1, (p_top - p_all) / (1 - p_all), 0.0), 0, 1)
    ok = (k_U[:, 0] >= MIN_ACTIVE) & (score[rows, best_U] > 1e-9)  # 0 up to rounding: nothing over-represented
    labels = [cands.names[t] if good else None for t, good in zip(best_U.tolist(), ok.tolist(), strict=True)]
    return labels, np.where(ok, confidence, np.nan).astype(np.float32)
