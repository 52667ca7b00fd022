"""Out-of-sample concept recovery (backend/analysis/out_of_sample.py): the split, and a unit chosen on one half
scored on the other, against a brute force."""

import numpy as np
import polars as pl
import pytest
from analysis_runs import gens_for

from backend.analysis.concepts import auroc_PC, concept_labels
from backend.analysis.out_of_sample import PROMPT_SPLIT, SEED_SPLIT, OutOfSample, split_of


def attrs(p):
    return {"colour": ["red", "blue", "green"][p % 3], "position": "left"}


def gens_df(n_prompts, seeds):
    rows = gens_for(n_prompts * seeds, ["g"], seeds_per_prompt=seeds, attributes=attrs)
    import json

    return pl.DataFrame([{**r, "attributes": json.dumps(r["attributes"])} for r in rows]).with_columns(
        p=pl.col("gen_id") // seeds)


def test_the_split_is_seed_parity_when_every_prompt_has_both_else_prompt_parity():
    two = gens_df(6, 2)
    choose, name = split_of(two)
    assert name == SEED_SPLIT and choose.tolist() == [s % 2 == 0 for s in two["seed"].to_list()]
    one = gens_df(6, 1)
    choose, name = split_of(one)
    assert name == PROMPT_SPLIT and choose.tolist() == [p % 2 == 0 for p in range(6)]


def test_the_unit_chosen_on_one_half_is_scored_on_the_other():
    gens = gens_df(12, 2)
    labels = concept_labels(gens, ["position"])
    red = np.array([attrs(p)["colour"] == "red" for p in gens["p"].to_list()])
    even = (gens["seed"].to_numpy() % 2) == 0
    rng = np.random.default_rng(1)
    n_units, n_steps, n = 3, 2, gens.height
    pooled = rng.normal(size=(n_units, n_steps, n)).astype(np.float32) * 0.1
    pooled[0, 1] += 5.0 * (red & even)       # unit 0: red on the choosing half only (overfits)
    pooled[1, 0] += 0.15 * red               # unit 1: a weaker red signal on both halves
    scorer = OutOfSample(gens, labels)
    scorer.update(pooled[:2])
    scorer.update(pooled[2:])  # a second chunk of units
    got = scorer.summary()
    assert got["oos_split"] == SEED_SPLIT
    c = labels.names.index("colour=red")
    assert scorer.best_C[c] == 1.0  # unit 0 wins on the choosing half ...
    odd_acts = pooled[0, 1][~even]  # ... and is scored on the odd seeds: one generation per prompt
    brute = auroc_PC(odd_acts[None], labels.positive_PC[gens["p"].to_numpy()[~even]])[0, c]
    assert scorer.oos_C[c] == pytest.approx(brute)
    assert scorer.oos_C[c] < 0.9
    assert got["auroc_oos"] == pytest.approx(float(np.mean(scorer.oos_C)))
    assert got["auroc_choose"] == pytest.approx(float(np.mean(scorer.best_C)))
