"""Unit labels from the prompts of a unit's top generations (backend/analysis/labels.py): words, groups and
attribute values, by the breakeven method (each candidate against as many top prompts as carry it, at every step)
and the top_n method (log-odds of a fixed top list), the pseudo-count, the confidence."""

import json

import numpy as np
import polars as pl
import pytest

from backend.analysis.labels import breakeven_labels, candidates, prompt_words, top_mask_UN, unit_labels

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


def factorial_gens(seeds=2):
    """Every colour x position, `seeds` generations per prompt (attributes, as the demo's prompts carry them)."""
    rows = [(c, p) for c in ("red", "green", "blue", "yellow") for p in ("left", "right", "top", "bottom", "center")]
    prompts = [f"a {c} circle on the {p}" for c, p in rows for _ in range(seeds)]
    attrs = [json.dumps({"colour": c, "position": p}) for c, p in rows for _ in range(seeds)]
    return gens_of(prompts, attributes=attrs), rows


def test_breakeven_labels_a_unit_built_for_one_prompt_group_with_that_group():
    prompts = ["a cat on a mat", "a dog in the park", "a bird over the sea", "a fish in a bowl",
               "a hat on a chair", "a box by the door", "a cup of tea", "a lamp in the hall"]
    groups = ["animals"] * 4 + ["things"] * 4
    gens = gens_of([p for p in prompts for _ in range(2)], [g for g in groups for _ in range(2)])
    animal = np.repeat(np.array(groups) == "animals", 2)
    rng = np.random.default_rng(0)
    acts_USN = np.where(animal, 2.0 + rng.random(16), rng.random(16) * 0.5)[None, None, :]
    labels, conf, step = breakeven_labels(acts_USN, candidates(gens), pseudo=0.5)
    assert labels == ["group=animals"] and step.tolist() == [0]
    # the top 4 of 8 prompts are exactly the 4 animals: ((4 + 0.5 * 1/2) / (4 + 0.5) - 1/2) / (1 - 1/2)
    assert conf[0] == pytest.approx(((4 + 0.25) / 4.5 - 0.5) / 0.5, rel=1e-6)


def test_breakeven_sizes_the_top_set_to_each_candidate_where_a_short_top_list_names_a_rarer_one():
    gens, rows = factorial_gens()
    # fires for red (5 of 20 prompts), most for red on the left: its top 2 generations (1 prompt) are red + left
    value = [(3.0 if c == "red" else 1.0) + (0.5 if p == "left" else 0.0) for c, p in rows]
    noise = np.random.default_rng(1).random(40) * 0.1
    acts_N = np.repeat(value, 2) + noise
    cands = candidates(gens)
    assert unit_labels(acts_N[None], cands, top_n=2, pseudo=0.5)[0] == ["position=left"]  # the fixed top list
    labels, conf, _ = breakeven_labels(acts_N[None, None], cands, pseudo=0.5)
    assert labels == ["colour=red"] and conf[0] > 0.8


def test_breakeven_finds_the_step_that_carries_the_signal():
    gens, rows = factorial_gens()
    rng = np.random.default_rng(2)
    early = np.repeat([0.2 if c == "blue" else 0.1 for c, _ in rows], 2) + rng.random(40) * 0.01  # small, clean
    late = rng.random(40) * 5.0  # large, about nothing
    labels, _, step = breakeven_labels(np.stack([early, late])[None], candidates(gens), pseudo=0.5)
    assert labels == ["colour=blue"] and step.tolist() == [0]


def test_breakeven_labels_negative_channels_and_leaves_dead_or_single_prompt_units_unlabelled():
    gens, rows = factorial_gens()
    green = np.repeat([c == "green" for c, _ in rows], 2)
    channel = np.where(green, -0.5, -2.0) + np.random.default_rng(3).random(40) * 0.1  # below 0 everywhere
    single = np.zeros(40)
    single[:2] = 1.0  # one prompt (both seeds): active in fewer than 2 prompts
    acts_USN = np.stack([channel, np.zeros(40), single])[:, None, :]
    labels, conf, step = breakeven_labels(acts_USN, candidates(gens), pseudo=0.5)
    assert labels == ["colour=green", None, None]
    assert np.isnan(conf[1:]).all() and step[1:].tolist() == [-1, -1]


def test_breakeven_never_labels_a_candidate_every_prompt_carries():
    gens = gens_of([p + " today" for p in PROMPTS])
    cat = np.array([[[2.0 if "cat" in p else 0.1 for p in PROMPTS]]])
    assert breakeven_labels(cat, candidates(gens), pseudo=0.5)[0] == ["cat"]
    flat = np.ones((1, 1, 8))
    assert breakeven_labels(flat, candidates(gens), pseudo=0.5)[0] == [None]
