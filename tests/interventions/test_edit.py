"""Feature edits on the shipped demo model (4 DDIM steps): the SAE splice leaves the baseline bit for bit when it
edits nothing, matches the dense splice when it does, and changes the image; edit_run's presets on a hand-made run."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from intervention_runs import (
    GUIDANCE,
    LAYER,
    N_LATENTS,
    OTHER,
    PROMPT,
    STEPS,
    gen,
    make_intervention_run,
    no_hooks_left,
    not_a_run,
    one_line,
)

from backend.errors import DifflensError
from backend.interventions.edit import edit_run, feature_edit
from backend.interventions.generate import edited_generate
from backend.models.hooks import to_tokens


def test_zeroing_nothing_reproduces_the_baseline_exactly(model, sae):
    base = gen(model, seeds=(0, 1), prompts=(PROMPT, PROMPT))
    out = edited_generate(model, LAYER, [PROMPT] * 2, [0, 1], feature_edit(sae), STEPS, GUIDANCE)
    assert torch.equal(out, base)
    assert no_hooks_left(model)


def test_naive_splice_is_not_exact_so_the_exactness_test_can_fail(sae):
    """decode(codes) + (x - decode(codes)) rounds; the edit's delta form does not."""
    x = torch.randn(512, 64) * 3
    with torch.no_grad():
        xh = sae.decode(sae.encode(x))
    assert not torch.equal(xh + (x - xh), x)
    assert torch.equal(feature_edit(sae)(x[None], 0)[0], x)


def test_feature_zero_and_scale_match_the_dense_splice(sae):
    x_NC = torch.randn(300, 64) * 2
    with torch.no_grad():
        dense = sae.encode(x_NC, dense=True)
        recon = sae.decode(sae.encode(x_NC))
    active = dense.gt(0).sum(0).argsort(descending=True)[:6].tolist()
    zero, scale = active[:3], active[3:]
    for factor in (2.5, -1.0):
        got = feature_edit(sae, zero=zero, scale=scale, factor=factor)(x_NC[None], 0)[0]
        edited = dense.clone()
        edited[:, zero] = 0
        edited[:, scale] *= factor
        expected = (edited @ sae.W_dec + sae.b_dec) + (x_NC - recon)  # decode(edited) + error
        torch.testing.assert_close(got, expected.detach(), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got, x_NC, atol=1e-3)
    everything = feature_edit(sae, zero=range(N_LATENTS))(x_NC[None], 0)[0]
    torch.testing.assert_close(everything, (x_NC - recon + sae.b_dec).detach(), atol=1e-4, rtol=1e-4)


def test_edits_of_a_layernorm_sae_match_its_own_decode():
    """Per-token normalised SAEs (openai TopK, SAeUron) map decoder output back by each token's scale, so an edit
    must too: x + decode(edited codes) - decode(codes), with decode the SAE's own."""
    from sae.model import SAE, SAEConfig, SparseCodes

    torch.manual_seed(1)
    ln = SAE(SAEConfig(d_in=64, n_latents=N_LATENTS, k=8, normalize="layernorm")).eval()
    x_NC = torch.randn(50, 64) * 3 + 1
    with torch.no_grad():
        codes = ln.encode(x_NC)
        zero = codes.indices[:, 0].unique()[:4].tolist()
        edited_vals = torch.where(torch.isin(codes.indices, torch.tensor(zero)), 0.0, codes.values)
        expected = x_NC + ln.decode(SparseCodes(edited_vals, *codes[1:])) - ln.decode(codes)
    got = feature_edit(ln, zero=zero)(x_NC[None], 0)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, x_NC, atol=1e-3)


def test_zeroing_features_changes_the_image(model, sae):
    tokens = []
    mod = model.denoiser.get_submodule(LAYER)
    h = mod.register_forward_hook(lambda m, a, out: tokens.append(to_tokens(out[0])))
    try:
        base = gen(model)
    finally:
        h.remove()
    with torch.no_grad():
        dense = sae.encode(tokens[-1].reshape(-1, 64), dense=True)
    busiest = dense.gt(0).sum(0).argsort(descending=True)[:8].tolist()
    out = edited_generate(model, LAYER, [PROMPT], [0], feature_edit(sae, zero=busiest), STEPS, GUIDANCE)
    assert not torch.equal(out, base)


def test_bad_feature_edits_are_one_line_errors(sae):
    cases = [
        (lambda: feature_edit(sae, scale=[1], factor=float("nan")), "finite"),
        (lambda: feature_edit(sae, zero=[N_LATENTS]), "unknown feature"),
    ]
    for fn, match in cases:
        with pytest.raises(DifflensError) as e:
            fn()
        assert match in one_line(e), match


@pytest.fixture
def run(tmp_path, sae):
    return make_intervention_run(tmp_path / "run", sae)


def test_edit_run_presets(run, model, sae):
    res = edit_run(run.root, LAYER, presets=("none", "frequent", "rare", "all"), n=5, scale=[20, 21],
                      factor=-2.0, seeds=[0], model=model)
    rows = res.rows
    assert rows["preset"].to_list() == ["none", "frequent", "rare", "all", "scale x-2"]
    none = rows.filter(pl.col("preset") == "none").row(0, named=True)
    assert none["effect"] == 0.0 and none["features"] == []
    units = run.read_table("units").filter((pl.col("layer") == LAYER) & (pl.col("kind") == "feature"))
    frequent = rows.filter(pl.col("preset") == "frequent")["features"].to_list()[0]
    assert frequent == units.sort("density", descending=True)["unit"].head(5).to_list()
    rare = rows.filter(pl.col("preset") == "rare")["features"].to_list()[0]
    assert rare == units.filter(pl.col("density") > 0).sort("density")["unit"].head(5).to_list()
    assert len(rows.filter(pl.col("preset") == "all")["features"][0]) == N_LATENTS
    assert rows.filter(pl.col("preset") == "all")["effect"][0] > 0
    assert rows.filter(pl.col("method") == "scale")["scale"][0] == -2.0
    for rel in rows["image"].to_list():
        assert rel.startswith("media/edit/") and (run.root / rel).is_file()
    assert res.grid.is_file() and no_hooks_left(model)
    late = edit_run(run.root, LAYER, presets=("all",), steps="late", seeds=[0], model=model).rows
    assert late["steps"].to_list() == ["2-3"] and late["effect"][0] > 0


def test_edit_run_bad_inputs(run, model):
    for kwargs, match in [(dict(layer=OTHER), "has no SAE"), (dict(layer=LAYER, zero=[N_LATENTS]), "unknown feature"),
                          (dict(layer=LAYER, steps="active"), "no active steps"),
                          (dict(layer=LAYER, presets=("most",)), "unknown preset"),
                          (dict(layer=LAYER, presets=()), "nothing to do"),
                          (dict(layer=LAYER, scale=[1], factor=float("inf")), "finite")]:
        with pytest.raises(DifflensError) as e:
            edit_run(run.root, model=model, **kwargs)
        assert match in one_line(e), match
    assert no_hooks_left(model)


def test_edit_run_on_a_directory_that_is_not_a_run_is_open_runs_error(tmp_path, model):
    plain, expected = not_a_run(tmp_path)
    with pytest.raises(DifflensError) as e:
        edit_run(plain, LAYER, model=model)
    assert one_line(e) == expected
    assert [p.name for p in plain.iterdir()] == ["notes.txt"]
