"""Unit labels from the prompts of a unit's top generations (backend/analysis/labels.py): words, groups and
attribute values over-represented by log-odds, the pseudo-count, the confidence."""

import numpy as np
import polars as pl
import pytest

from backend.analysis.labels import candidates, prompt_words, top_mask_UN, unit_labels

PROMPTS = ["a cat on a mat", "a dog in the park", "the cat sleeps in a box", "a bird over the sea",
           "one cat and a hat", "a fish in a bowl", "a cat by the door", "a horse in a field"]


def gens_of(prompts, groups=None, attributes=None):
    n = len(prompts)
    return pl.DataFrame({"gen_id": range(n), "prompt": prompts, "group": groups or ["all"] * n,
                         "attributes": attributes or ["{}"] * n})


def test_prompt_words_drop_stop_words_case_and_single_letters():
    assert prompt_words("A photo of THE Cat, on a mat; x") == {"cat", "mat"}


def test_a_unit_firing_on_prompts_with_a_word_is_labelled_with_that_word():
    gens = gens_of(PROMPTS)
    cat = np.array(["cat" in p for p in PROMPTS])
    rng = np.random.default_rng(0)
    best_UN = np.stack([np.where(cat, 2.0 + rng.random(8), rng.random(8) * 0.5),  # fires for "cat"
                        np.where(~cat, 1.0 + rng.random(8), 0.0),                    # fires for everything else
                        np.zeros(8)])                                                 # dead
    labels, conf = unit_labels(best_UN, candidates(gens), top_n=4, pseudo=0.5)
    assert labels[0] == "cat"
    assert labels[1] != "cat" and labels[1] is not None  # one of the other prompts' words
    assert labels[2] is None and np.isnan(conf[2])
    assert 0.5 < conf[0] <= 1
    assert conf[1] < conf[0]  # four different words share the other unit's top: none stands out as "cat" does


def test_groups_are_candidates_without_attributes_and_attributes_replace_words():
    groups = ["animals" if i % 2 else "things" for i in range(8)]
    cands = candidates(gens_of(PROMPTS, groups))
    assert "group=animals" in cands.names and "cat" in cands.names
    attrs = ['{"colour": "red"}' if i < 4 else '{"colour": "blue"}' for i in range(8)]
    cands = candidates(gens_of(PROMPTS, groups, attrs))
    assert cands.names == ["colour=blue", "colour=red"]
    red_unit = np.array([[3.0, 2, 2, 2, 0.1, 0.1, 0.1, 0.1]])
    assert unit_labels(red_unit, cands, top_n=4, pseudo=0.5)[0] == ["colour=red"]


def test_the_pseudo_count_keeps_zero_counts_finite_and_shrinks_small_evidence():
    gens = gens_of(PROMPTS)
    cands = candidates(gens)
    one = np.zeros((1, 8))
    one[0, 3] = 1.0  # active in one generation only ("bird ... sea"): too little to label
    labels, conf = unit_labels(one, cands, top_n=4, pseudo=0.5)
    assert labels == [None] and np.isnan(conf[0])
    cat = np.array([[2.0 if "cat" in p else 0.0 for p in PROMPTS]])  # "cat": in every top generation, K - a = 0
    small = unit_labels(cat, cands, top_n=4, pseudo=0.1)
    large = unit_labels(cat, cands, top_n=4, pseudo=4.0)
    assert small[0] == large[0] == ["cat"]
    assert np.isfinite(small[1]).all() and large[1][0] < small[1][0] < 1  # more pseudo-count, less confidence
    # by hand: a = 4 of K = 4, t = 4 of N = 8, p_all = 1/2
    p_top = (4 + 0.1 * 0.5) / (4 + 0.1)
    assert small[1][0] == pytest.approx((p_top - 0.5) / 0.5, rel=1e-6)


def test_top_mask_keeps_only_active_generations():
    best = np.array([[0.0, 3.0, 1.0, 0.0, 2.0]])
    assert top_mask_UN(best, 4).tolist() == [[False, True, True, False, True]]
    assert top_mask_UN(best, 2).tolist() == [[False, True, False, False, True]]


def test_a_unit_whose_top_is_every_generation_or_a_candidate_every_prompt_has_gets_no_label():
    cands = candidates(gens_of([p + " today" for p in PROMPTS]))  # "today": in every prompt
    flat = np.ones((1, 8))
    assert unit_labels(flat, cands, top_n=8, pseudo=0.5)[0] == [None]
    cat = np.array([[2.0 if "cat" in p else 0.1 for p in PROMPTS]])
    assert unit_labels(cat, cands, top_n=4, pseudo=0.5)[0] == ["cat"]
