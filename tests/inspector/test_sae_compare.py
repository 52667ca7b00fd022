"""The SAEs page (inspector/views/sae_compare.py) and its queries (inspector/queries/sae_compare.py), on a copy of
the inspector tests' run with comparison tables written through the store (the backend's computation has its own
tests, tests/analysis/test_sae_compare.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from inspector_runs import L_MID, N_FEATURES, open_page

N_K8 = 16
COSINE_A = np.linspace(-0.2, 1.0, N_FEATURES).astype(np.float32)  # default's latent i: best cosine COSINE_A[i]


def _write_comparison(run: Path) -> None:
    from backend.run.store import RunStore

    store = RunStore(run)
    for sae_id, kind, n, dead in (("default", "feature", N_FEATURES, 1), ("k8", "feature.k8", N_K8, 3)):
        store.write_table_shard("sae_comparison", sae_id, store.table_from_rows("sae_comparison", [{
            "sae_id": sae_id, "kind": kind, "n_latents": n, "k": 4 if sae_id == "default" else 8,
            "architecture": "topk", "sae_digest": "0" * 16, "tokens": 1000, "fvu": 0.1, "l0": 4.0, "dead": dead,
            "dead_frac": dead / n, "dense_frac": 0.0, "frac_loss_recovered": 0.9, "splice_samples": 8}]), layer=L_MID)
        edges = np.linspace(-3, 0, 16)
        counts = np.zeros(15, np.int64)
        counts[5:5 + n - dead] = 1
        store.write_table_shard("sae_density", sae_id, pa.table({
            "sae_id": [sae_id] * 15, "lo": edges[:-1], "hi": edges[1:], "count": counts}), layer=L_MID)
    for a, b, n_a, n_b, cosine in (("default", "k8", N_FEATURES, N_K8, COSINE_A),
                                   ("k8", "default", N_K8, N_FEATURES, np.full(N_K8, 0.5, np.float32))):
        store.write_table_shard("sae_matches", f"{a}-vs-{b}", pa.table({
            "sae_a": [a] * n_a, "sae_b": [b] * n_a, "feature_a": np.arange(n_a, dtype=np.int32),
            "feature_b": (np.arange(n_a) * 3 % n_b).astype(np.int32), "cosine": cosine}), layer=L_MID)


@pytest.fixture(scope="module")
def compared_runs(runs_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sae-compare") / "runs"
    shutil.copytree(runs_dir / "tiny", root / "tiny")
    _write_comparison(root / "tiny")
    return root


def _page(root: Path, monkeypatch, **params):
    return open_page(root, monkeypatch, "sae_compare", **params)


def test_page_shows_metrics_density_matching_and_opens_both_units(compared_runs, monkeypatch):
    at = _page(compared_runs, monkeypatch)
    assert [t.value for t in at.title] == ["Compare SAEs"]
    metrics = at.dataframe[0].value
    assert metrics["sae_id"].tolist() == ["default", "k8"] and metrics["kind"].tolist() == ["feature", "feature.k8"]
    assert len(at.get("vega_lite_chart")) == 2  # densities overlaid, cosine histogram
    assert at.selectbox(key="saes.pair").value == "default -> k8"
    pairs = at.dataframe[1].value
    assert pairs["feature_a"].tolist()[:3] == [N_FEATURES - 1, N_FEATURES - 2, N_FEATURES - 3]  # best first
    assert pairs["open_b"].iloc[0].endswith(f"kind=feature.k8&unit={(N_FEATURES - 1) * 3 % N_K8}")
    at.session_state[f"matches-{L_MID}-default-k8-best"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    links = [link.proto.query_string for link in at.get("page_link")]
    assert f"layer={L_MID}&kind=feature&unit={N_FEATURES - 1}" in links[-2]
    assert f"kind=feature.k8&unit={(N_FEATURES - 1) * 3 % N_K8}" in links[-1]
    at.radio(key="saes.order").set_value("worst").run()
    assert at.dataframe[1].value["feature_a"].tolist()[0] == 0


def test_page_deep_link_picks_the_pair(compared_runs, monkeypatch):
    at = _page(compared_runs, monkeypatch, run="tiny", layer=L_MID, pair="k8 -> default")
    assert at.selectbox(key="saes.pair").value == "k8 -> default"
    assert len(at.dataframe[1].value) == N_K8
    assert at.query_params["pair"] == "k8 -> default"


def test_page_without_a_comparison_says_how_to_make_one(runs_dir, monkeypatch):
    at = _page(runs_dir, monkeypatch)
    assert any("python cli.py compare-saes --run" in str(i.value) for i in at.info)


def test_match_histogram_bins_every_latent(compared_runs):
    from inspector.db import Database
    from inspector.queries import sae_compare

    db = Database(compared_runs / "tiny")
    hist = sae_compare.match_histogram.on(db, L_MID, "default", "k8", 7)
    assert hist.height == 7 and int(hist["count"].sum()) == N_FEATURES
    assert hist["lo"][0] == pytest.approx(-0.2) and hist["hi"][-1] == pytest.approx(1.0)
    assert hist["count"][-1] >= 1  # cosine 1.0 lands in the last bin
    expect, _ = np.histogram(COSINE_A, np.linspace(float(COSINE_A.min()), 1.0, 8))  # none on an inner edge
    assert hist["count"].to_list() == expect.tolist()
    assert sae_compare.compared_layers.on(db) == [L_MID]
    assert sae_compare.matches.on(db, L_MID, "default", "k8", "feature", 3)["feature_a"].to_list() == [0, 1, 2]
