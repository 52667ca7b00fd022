"""The Causal map page on a copy of the inspector's small run with a hand-written `causal_map` table (the backend's
schema): the grid, the best cell per concept, one concept's cells, a concept deep link, and the missing table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from causal_runs import make_causal_run, make_matched_run
from inspector_runs import L_MID, L_UP, open_page

from backend.run.store import RunStore


def _page(root: Path, monkeypatch, **params):
    return open_page(root, monkeypatch, "causal_map", **params)


def _row(concept: str, layer: str, direction: str, window: str, flip: float, collateral: float) -> dict:
    return {"concept": concept, "attribute": concept.split("=")[0], "direction": direction, "kind": "channel",
            "unit": -1 if direction == "mean" else 3, "units": "", "auroc": 0.9, "window": window, "steps": "0-6",
            "mask": "none", "scale": 10.0, "strength": 12.0, "selection_seeds": 4, "selection_flip_rate": flip,
            "selection_collateral_rate": collateral, "seeds": 10, "flip_rate": flip, "collateral_rate": collateral,
            "clean_rate": min(flip, 1 - collateral), "baseline_rate": 0.0}


@pytest.fixture()
def mapped(tmp_path, runs_dir):
    root = tmp_path / "runs"
    shutil.copytree(runs_dir, root)
    store = RunStore(root / "tiny")
    rows = {L_UP: [_row("colour=red", L_UP, "mean", "late", 1.0, 0.0), _row("colour=red", L_UP, "channel", "late",
                                                                          0.9, 0.5),
                   _row("shape=circle", L_UP, "mean", "early", 0.3, 0.1)],
            L_MID: [_row("colour=red", L_MID, "mean", "late", 0.2, 0.0), _row("shape=circle", L_MID, "mean", "early",
                                                                             0.6, 0.0)]}
    for layer, rs in rows.items():
        for concept in {r["concept"] for r in rs}:
            mine = [r for r in rs if r["concept"] == concept]
            store.write_table_shard("causal_map", concept.replace("=", "-"), store.table_from_rows("causal_map", mine),
                                    layer=layer)
    return root


def test_causal_map_page_shows_the_grid_and_the_best_cells(mapped, monkeypatch):
    at = _page(mapped, monkeypatch, run="tiny")
    assert [t.value for t in at.title] == ["Causal map"]
    assert len(at.get("vega_lite_chart")) == 1
    best = at.dataframe[0].value
    assert best["concept"].tolist() == ["colour=red", "shape=circle"]
    assert best["layer"].tolist() == [L_UP, L_MID]  # red: 100% at 0% collateral; circle: 60% beats 30%
    cells = at.dataframe[1].value
    assert cells["flip_rate"].tolist() == sorted(cells["flip_rate"].tolist(), reverse=True)
    assert len(cells) == 3  # colour=red's cells, the first concept


def test_causal_map_page_deep_link_and_missing_table(mapped, runs_dir, monkeypatch):
    at = _page(mapped, monkeypatch, run="tiny", concept="shape=circle")
    assert len(at.dataframe[1].value) == 2
    at = _page(runs_dir, monkeypatch, run="tiny")
    assert "python cli.py causal-map --run" in "\n".join(str(i.value) for i in at.info)


@pytest.mark.slow
def test_lab_steers_along_a_concept_direction(tmp_path, model, monkeypatch):
    """The Lab's direction picker on a captured demo run: the red diff-in-means at the late steps makes a red image
    of a blue prompt."""
    store = make_causal_run(tmp_path / "causal", model)
    at = open_page(store.root.parent, monkeypatch, "lab", run="causal")
    at.button[0].click().run(timeout=180)
    at.text_input(key="lab.prompt").set_value("a large blue circle on the left, gray background")
    next(b for b in at.button if b.label == "Generate").click().run(timeout=120)
    assert "concept:colour=red" in at.selectbox(key="lab.direction").options
    at.selectbox(key="lab.direction").set_value("concept:colour=red")
    at.slider(key="lab.direction_scale").set_value(20.0)
    next(b for b in at.button if b.label == "Steer along the direction").click().run(timeout=120)
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    captions = [c for img in at.image for c in img.captions]
    assert any(c.startswith("concept:colour=red x20") for c in captions)


@pytest.mark.slow
def test_lab_steers_along_a_matched_direction(tmp_path, model, monkeypatch):
    """The Lab's direction picker, made "matched", with one of the run's blue prompts: the per-step, per-position
    difference at every step (scale 1) is steered and shown; a prompt the run did not generate is a one-line error."""
    import json

    store = make_matched_run(tmp_path / "matched", model)
    gens = store.read_table("generations")
    blue = next(p for p, a in zip(gens["prompt"], gens["attributes"], strict=True)
                if json.loads(a)["colour"] == "blue")
    at = open_page(store.root.parent, monkeypatch, "lab", run="matched")
    at.button[0].click().run(timeout=180)
    for prompt, ok in ((blue, True), ("a small green square at the top, white background", False)):
        at.text_input(key="lab.prompt").set_value(prompt)
        next(b for b in at.button if b.label == "Generate").click().run(timeout=120)
        at.selectbox(key="lab.direction").set_value("concept:colour=red")
        at.radio(key="lab.direction_method").set_value("matched")
        at.slider(key="lab.direction_scale").set_value(1.0)
        at.slider(key="lab.direction_window").set_value((0, 9))
        next(b for b in at.button if b.label == "Steer along the direction").click().run(timeout=120)
        assert not at.exception, [e.value for e in at.exception]
        captions = [c for img in at.image for c in img.captions]
        errors = " ".join(str(e.value) for e in at.error)
        if ok:
            assert not errors and any(c.startswith("matched:colour=red x1 (per step and position)") for c in captions)
        else:
            assert "is not in" in errors and "generations table" in errors
