"""The shapes world: attribute coverage, prompts, rendering and the scorer."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.demo import shapes

spec_strategy = st.builds(
    shapes.ShapeSpec,
    colour=st.sampled_from(list(shapes.COLOURS)),
    shape=st.sampled_from(shapes.SHAPES),
    size=st.sampled_from(shapes.SIZES),
    position=st.sampled_from(shapes.POSITIONS),
    background=st.sampled_from(list(shapes.BACKGROUNDS)),
)


def test_attribute_value_counts_meet_the_spec():
    counts = {k: len(v) for k, v in shapes.ATTRIBUTES.items()}
    assert counts["colour"] >= 4 and counts["shape"] >= 3 and counts["size"] == 2
    assert counts["position"] >= 5 and counts["background"] >= 3


def test_all_specs_is_every_combination_once():
    specs = shapes.all_specs()
    assert len(specs) == np.prod([len(v) for v in shapes.ATTRIBUTES.values()])
    assert len({s.prompt() for s in specs}) == len(specs)


def test_prompt_words():
    spec = shapes.ShapeSpec("red", "circle", "large", "left", "gray")
    assert spec.prompt() == "a large red circle on the left, gray background"


@settings(max_examples=60, deadline=None)
@given(spec=spec_strategy, res=st.sampled_from([16, 24, 32]))
def test_scorer_reads_back_every_rendered_spec(spec, res):
    img = shapes.render(spec, res)
    assert img.shape == (res, res, 3) and img.dtype == np.uint8
    assert shapes.score_image(img) == spec.attributes()


@settings(max_examples=30, deadline=None)
@given(spec=spec_strategy)
def test_every_prompt_word_is_in_the_vocabulary(spec):
    vocab = set(shapes.vocabulary())
    assert set(spec.prompt().replace(",", " ,").split()) <= vocab


def test_scorer_says_none_on_a_blank_image():
    img = np.full((16, 16, 3), shapes.BACKGROUNDS["gray"], dtype=np.uint8)
    scored = shapes.score_image(img)
    assert scored["background"] == "gray" and scored["shape"] == "none"


def test_random_specs_are_reproducible_and_cover_values():
    a = shapes.random_specs(500, np.random.default_rng(3))
    b = shapes.random_specs(500, np.random.default_rng(3))
    assert a == b
    assert {s.position for s in a} == set(shapes.POSITIONS)


def test_attribute_accuracy_counts_mistakes():
    specs = shapes.all_specs()[:10]
    imgs = shapes.render_batch(specs)
    wrong = [dict(s.attributes(), colour="blue" if s.colour != "blue" else "red") for s in specs]
    acc = shapes.attribute_accuracy(imgs, wrong)
    assert acc["colour"] == 0.0 and acc["shape"] == 1.0
