"""Interventions regenerate a run's generations as captured (backend/interventions/generate.py run_conditions): the
unedited image of steer (prompt mode), edit and ablate equals the captured image of the same prompt and seed only
because it is generated with that generation's negative prompt and control image; on a demo run with negative
prompts and on a tiny SD run through a ControlNet. Plus run_conditions' own rules (prompts the run did not
generate, no CFG, a ControlNet run's prompt without a control image)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from condition_runs import CN_PROMPTS, DEMO_PROMPTS
from intervention_runs import one_line
from PIL import Image

from backend.errors import DifflensError
from backend.interventions.ablate import ablate_run
from backend.interventions.edit import edit_run
from backend.interventions.generate import run_conditions
from backend.interventions.steer import steer_run
from backend.models.base import to_uint8
from backend.run.context import open_run


def captured(root) -> tuple[pl.DataFrame, np.ndarray]:
    gens = pl.read_parquet(root / "tables" / "generations" / "*.parquet").sort("gen_id")
    return gens, np.stack([np.asarray(Image.open(root / p)) for p in gens["image"]])


def steer_baseline(root, layer, prompt, seed) -> np.ndarray:
    res = steer_run(root, layer, "channel", 0, strength=1.0, steps="all", mode="prompt", prompt=prompt, seeds=[seed])
    return res.extra["baseline"][0]


def edit_baseline(root, layer, prompt, seed) -> np.ndarray:
    res = edit_run(root, layer, presets=("none",), prompts=[prompt], seeds=[seed])
    return np.asarray(Image.open(root / res.rows["baseline_image"][0]))


def ablate_baseline(root, layer, prompt, seed) -> np.ndarray:
    ablate_run(root, blocks=[layer], prompts=[prompt], seeds=[seed])
    (path,) = (root / "media" / "ablation").glob("*/baseline/000-seed-*.png")  # (one ablation per test run)
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("run_fixture", ["negative_run", "controlnet_run"])
@pytest.mark.parametrize("baseline_of", [steer_baseline, edit_baseline, ablate_baseline],
                         ids=["steer", "edit", "ablate"])
def test_the_unedited_image_is_the_captured_generation(run_fixture, baseline_of, request, tmp_path):
    import shutil

    src, layer = request.getfixturevalue(run_fixture)
    root = tmp_path / "run"
    shutil.copytree(src, root)  # each intervention writes into its own copy
    gens, recorded = captured(root)
    i = 1  # the second prompt: its own negative prompt on the demo run, its own control image on the ControlNet run
    prompt, seed = gens["prompt"][i], int(gens["seed"][i])
    assert np.array_equal(baseline_of(root, layer, prompt, seed), recorded[i])
    # the test can fail: the same prompt and seed generated without the run's conditions is another image
    ctx = open_run(root)
    plain = to_uint8(ctx.model.generate([prompt], [seed], ctx.n_steps, ctx.guidance))[0]
    assert not np.array_equal(plain, recorded[i])


def test_run_conditions_of_prompts_the_run_did_and_did_not_generate(negative_run):
    ctx = open_run(negative_run[0])
    new = "a small green circle at the top, black background"
    assert run_conditions(ctx, [DEMO_PROMPTS[1], new, DEMO_PROMPTS[0]], 3.0) == {
        "negative_prompts": ["a red square", "a green triangle", "a green triangle"]}
    assert run_conditions(ctx, DEMO_PROMPTS, 1.0) == {}  # no CFG: a negative prompt would do nothing


def test_a_controlnet_runs_new_prompt_among_its_own_is_one_line(controlnet_run):
    ctx = open_run(controlnet_run[0])
    assert run_conditions(ctx, ["a green bird"], 5.0) == {"negative_prompts": ["a green house"]}
    with pytest.raises(DifflensError) as exc:
        run_conditions(ctx, [CN_PROMPTS[0], "a green bird"], 5.0)
    assert "'a green bird' has no control image" in one_line(exc)
