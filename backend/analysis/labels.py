"""Unit labels without ground truth: what a unit's top-activating prompts have in common.

Candidates. When the prompts carry attributes, the candidates are their attribute values (`colour=red`, every
attribute, spatial ones included); otherwise the prompts' words (lower-cased, stop-words and one-letter words
dropped) and, when the run has two or more prompt groups, the groups (`group=<name>`). A prompt (and each of its
generations) carries a candidate when its text or attributes do. A candidate every prompt carries is never a label.

Two methods (cfg.label_method); both rank by cfg.label_stat (the spatial `pool` concept recovery scores, per step;
or the example statistic, maximised over steps) and label nothing when no candidate scores above 0 or the unit is
active (above its lowest value) in fewer than 2 prompts / generations.

"breakeven" (the default). Each candidate is read off the unit's top prompts at the size of the candidate itself:
at every step, prompts are ranked by the unit's activation averaged over their generations, and for a candidate
carried by k of the P prompts, a = how many of the unit's k top prompts carry it (prompts at the unit's lowest
value, e.g. an inactive feature's zeros, never count). a / k is the precision of the top k, which equals its recall
here: the precision-recall break-even point (R-precision) of "the top prompts carry the candidate". Shrunk towards
the base rate p = k / P by the pseudo-count c (cfg.label_pseudo_count) and measured from chance towards 1:

    score = ((a + c p) / (k + c) - p) / (1 - p)

The label is the (step, candidate) with the best score (ties: the earlier step, then the first name in sorted
order) and its confidence is that score, clipped to [0, 1]: 1 when the unit's top k prompts are exactly the k
carrying the label, 0 when they carry it no more often than chance. Sizing the top set to each candidate compares
a colour seen in a quarter of the prompts and a position seen in a fifth on equal terms, so neither the rare
candidate nor the combination of attributes a unit likes most wins by the size of a fixed top list; reading every
step finds a unit whose signal is early (composition) as well as one whose signal is late (texture).

"top_n" (the first method, kept for comparison). The unit's cfg.label_top_n generations with the highest activation
maximised over steps (active ones only) against all generations, by the log-odds ratio of carrying each candidate
with the pseudo-count c added to every count, as compare.py does:

    score = log((a + c) / (K - a + c)) - log((t + c) / (N - t + c))

(a of the K top generations carry it, t of all N); the label is the best-scoring candidate and its confidence is
the breakeven one for the top K generations: ((a + c p) / (K + c) - p) / (1 - p), p = t / N, clipped to [0, 1].
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
    average_PN: csr_matrix
    """[prompts, generations] the mean over each prompt's generations (one row per distinct prompt text)."""
    carried_PT: np.ndarray
    """[prompts, candidates] float32 1 where the prompt carries the candidate."""


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
    average = prompt_average_PN(gens)
    carried_PT = (np.asarray((average @ carried).todense()) > 0).astype(np.float32)
    return Candidates(names, carried, average, carried_PT)


def prompt_average_PN(gens: pl.DataFrame) -> csr_matrix:
    """[prompts, generations] averaging matrix: row p has 1 / n_p at the n_p generations of prompt p."""
    _, prompt_N = np.unique(gens["prompt"].to_numpy(), return_inverse=True)
    per_prompt = np.bincount(prompt_N)
    return csr_matrix((1.0 / per_prompt[prompt_N], (prompt_N, np.arange(len(prompt_N)))),
                      shape=(len(per_prompt), len(prompt_N)), dtype=np.float32)


def chance_corrected(a, k, p, pseudo: float):
    """How far the share a / k, shrunk towards the base rate p by the pseudo-count, lies from p towards 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((a + pseudo * p) / (k + pseudo) - p) / (1 - p)


def breakeven_labels(acts_USN: np.ndarray, cands: Candidates, pseudo: float) -> tuple[list, np.ndarray, np.ndarray]:
    """(label or None, confidence or NaN, step of the label or -1) per unit from its activation [units, steps,
    generations] (labels.py's "breakeven" method)."""
    n_units, n_steps, _ = acts_USN.shape
    score_UST = breakeven_scores_UST(acts_USN, cands, pseudo)
    flat = score_UST.reshape(n_units, -1)
    best = flat.argmax(1) if flat.shape[1] else np.zeros(n_units, np.int64)
    score_U = flat[np.arange(n_units), best] if flat.shape[1] else np.full(n_units, -np.inf)
    step_U, cand_U = np.divmod(best, max(len(cands.names), 1))
    ok = score_U > 1e-9
    labels = [cands.names[t] if good else None for t, good in zip(cand_U.tolist(), ok.tolist(), strict=True)]
    confidence = np.where(ok, np.clip(score_U, 0, 1), np.nan).astype(np.float32)
    return labels, confidence, np.where(ok, step_U, -1)


def breakeven_scores_UST(acts_USN: np.ndarray, cands: Candidates, pseudo: float) -> np.ndarray:
    """[units, steps, candidates] the break-even score of every candidate at every step (-inf: never a label)."""
    n_units, n_steps, n_gens = acts_USN.shape
    n_prompts, n_cands = cands.carried_PT.shape
    prompt_XP = np.ascontiguousarray((cands.average_PN @ acts_USN.reshape(-1, n_gens).T).T, np.float32)
    above_XP = prompt_XP > prompt_XP.min(1, keepdims=True)
    counts_T = cands.carried_PT.sum(0).astype(np.int64)
    sizes = np.unique(counts_T[(counts_T > 0) & (counts_T < n_prompts)])
    ranked_XP = -np.partition(-prompt_XP, sizes - 1, axis=1) if len(sizes) else prompt_XP
    score_XT = np.full((prompt_XP.shape[0], n_cands), -np.inf)
    for k in sizes:
        mine = np.flatnonzero(counts_T == k)
        top_XP = above_XP & (prompt_XP >= ranked_XP[:, k - 1:k])
        a_XT = np.minimum(top_XP.astype(np.float32) @ cands.carried_PT[:, mine], k)
        score_XT[:, mine] = chance_corrected(a_XT, k, k / n_prompts, pseudo)
    active_X = above_XP.sum(1) >= MIN_ACTIVE
    score_XT[~active_X] = -np.inf
    return score_XT.reshape(n_units, n_steps, n_cands)


def top_mask_UN(best_UN: np.ndarray, top_n: int) -> np.ndarray:
    """[units, generations] True for each unit's top_n generations by activation, among those above 0."""
    n = min(top_n, best_UN.shape[1])
    order = np.argsort(-best_UN, axis=1, kind="stable")[:, :n]
    mask = np.zeros(best_UN.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask & (best_UN > 0)


def unit_labels(best_UN: np.ndarray, cands: Candidates, top_n: int, pseudo: float) -> tuple[list, np.ndarray]:
    """(label or None, confidence or NaN) per unit from its per-generation activation [units, generations]
    (labels.py's "top_n" method)."""
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
    confidence = np.clip(np.where(p_all < 1, chance_corrected(a_UT[rows, best_U], k_U[:, 0], p_all, pseudo), 0), 0, 1)
    ok = (k_U[:, 0] >= MIN_ACTIVE) & (score[rows, best_U] > 1e-9)  # 0 up to rounding: nothing over-represented
    labels = [cands.names[t] if good else None for t, good in zip(best_U.tolist(), ok.tolist(), strict=True)]
    return labels, np.where(ok, confidence, np.nan).astype(np.float32)
