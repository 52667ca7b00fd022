"""Prompt files: formats and one-line errors naming the line."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.errors import PromptFileError
from backend.run.prompts import DEMO_PROMPTS, load_prompts


def test_txt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\na red cat\n\n  a blue dog  \n")
    recs = load_prompts(f)
    assert [r.prompt for r in recs] == ["a red cat", "a blue dog"]
    assert all(r.group == "all" and r.attributes == {} for r in recs)


def test_jsonl_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x", "group": "g", "attributes": {"colour": "red"}}) + "\n")
    (rec,) = load_prompts(f)
    assert rec.group == "g" and rec.attributes == {"colour": "red"}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"group": "a"}', "'prompt' must be a non-empty string"),
        ('{"prompt": "x", "colour": "red"}', "unknown key"),
        ('["x"]', "expected a JSON object"),
        ('{"prompt": "x", "attributes": [1]}', "'attributes' must be an object"),
        ('{"prompt": "x", "negative": 3}', "'negative' must be a string (got int 3)"),
        ('{"prompt": "x", "negative": ["a"]}', "'negative' must be a string"),
        ('{"prompt": "x", "control_image": true}', "'control_image' must be a string"),
        ('{"prompt": "x", "control_image": " "}', "'control_image' is empty"),
        ('{"prompt": "x", "negativ": "a"}', "allowed: prompt, group, attributes, negative, control_image"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, line, message):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n\n' + line + "\n")
    with pytest.raises(PromptFileError) as exc:
        load_prompts(f)
    assert f"{f}:3:" in str(exc.value) and message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_empty_and_missing_files(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n# only a comment\n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        load_prompts(f)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "nope.txt")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1)
                .filter(lambda s: s.strip() and not s.strip().startswith("#")), min_size=1, max_size=20))
def test_txt_roundtrip(tmp_path_factory, prompts):
    f = tmp_path_factory.mktemp("p") / "p.txt"
    f.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    assert [r.prompt for r in load_prompts(f)] == [p.strip() for p in prompts]


def test_shipped_demo_prompt_set_is_balanced():
    from collections import Counter

    recs = load_prompts(DEMO_PROMPTS)
    assert len(recs) == 360
    for attr in ("colour", "shape", "size", "position", "background"):
        counts = Counter(r.attributes[attr] for r in recs)
        assert len(set(counts.values())) == 1, attr


def test_jsonl_negative_and_control_image(tmp_path):
    """`negative` is kept as given ("" too: no negative for that prompt); `control_image` is resolved against the
    prompt file's directory."""
    d = tmp_path / "set"
    d.mkdir()
    f = d / "p.jsonl"
    f.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": "a", "negative": "blurry", "control_image": "edges/a.png"},
        {"prompt": "b", "negative": ""},
        {"prompt": "c", "control_image": str(tmp_path / "abs.png")},
    ]) + "\n")
    a, b, c = load_prompts(f)
    assert (a.negative, a.control_image) == ("blurry", str(d / "edges" / "a.png"))
    assert (b.negative, b.control_image) == ("", None)
    assert (c.negative, c.control_image) == (None, str(tmp_path / "abs.png"))
    (t,) = load_prompts(_txt(tmp_path, "x\n"))
    assert (t.negative, t.control_image) == (None, None)


def _txt(tmp_path, text):
    f = tmp_path / "p.txt"
    f.write_text(text)
    return f
