"""The grid: KEY=V1,V2 arguments, their combinations, run names and validation (no model, no files)."""

from __future__ import annotations

import pytest

from backend.errors import DifflensError
from backend.sweep.grid import combinations, parse_grid, plan_sweep, run_name, split_values


def test_values_are_toml_and_commas_inside_brackets_do_not_split():
    assert split_values('8, 16,[1, 2],"a,b"') == ["8", "16", "[1, 2]", '"a,b"']
    grid = parse_grid(["sae.k=8,16", "analysis.pool=mean,max", "sae.lr=1e-3,2e-4", 'capture.layers=["a"],["a","b"]'])
    assert grid == {"sae.k": [8, 16], "analysis.pool": ["mean", "max"], "sae.lr": [1e-3, 2e-4],
                    "capture.layers": [["a"], ["a", "b"]]}


def test_combinations_in_grid_order_with_readable_safe_names():
    grid = parse_grid(["sae.k=8,16", "sae.expansion=4,8"])
    combos = combinations(grid)
    assert combos == [{"sae.k": 8, "sae.expansion": 4}, {"sae.k": 8, "sae.expansion": 8},
                      {"sae.k": 16, "sae.expansion": 4}, {"sae.k": 16, "sae.expansion": 8}]
    assert [run_name("demo", c) for c in combos] == ["demo-k8-expansion4", "demo-k8-expansion8", "demo-k16-expansion4",
                                                      "demo-k16-expansion8"]
    assert run_name("s", {"sae.lr": 0.001, "capture.guidance": -1.0, "capture.layers": ["a.b", "c"]}) == \
        "s-lr0.001-guidance_1.0-layersa.b_c"
    # two swept keys with the same field name keep their sections
    assert run_name("s", {"sae.batch_size": 64, "capture.batch_size": 8}) == "s-sae_batch_size64-capture_batch_size8"


def test_plan_resolves_each_run_with_the_config_rule():
    plan = plan_sweep(["sae.k=8,16"], sets={"capture.steps": 5, "sae.k": 4}, name="s")
    cfgs = [plan.config(r) for r in plan.runs]
    assert [c.name for c in cfgs] == ["s-k8", "s-k16"] and [c.sae.k for c in cfgs] == [8, 16]
    assert all(c.capture.steps == 5 for c in cfgs)  # --set holds for every run; the grid wins over it


@pytest.mark.parametrize("args, message", [
    (["sae.kk=8,16"], "sweep grid [sae]: unknown key(s) kk; valid keys:"),
    (["nosuch.k=1,2"], "unknown config section 'nosuch'"),
    (["sae.k=8,abc"], "sweep grid [sae]: k must be int (got 'abc')"),
    (["capture.read=output,sideways"], "capture.read is 'sideways'; use output or delta"),
    (["name=a,b"], "name cannot be swept"),
    (["sae.k"], "sweep takes KEY=V1,V2,... arguments"),
    (["sae.k=8,,16"], "has an empty value"),
    (["sae.k=8,8"], "repeats a value"),
    (["sae.k=8", "sae.k=16"], "sae.k is given twice"),
    ([], "needs at least one KEY=V1,V2"),
])
def test_bad_grids_are_one_line_errors(args, message):
    with pytest.raises(DifflensError) as err:
        plan_sweep(args)
    assert message in str(err.value) and "\n" not in str(err.value)
