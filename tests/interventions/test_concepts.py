"""Concept steering on the shipped demo model and a hand-made run: the report steers the best unit of each concept
on prompts that lack it and counts hits as the scored images show them."""

from __future__ import annotations

import json

import polars as pl
import pytest
from intervention_runs import LAYER, make_intervention_run, not_a_run, one_line

from backend.errors import DifflensError
from backend.interventions.concepts import clean_hit, concept_prompts, concept_steering_report


@pytest.fixture
def run(tmp_path, sae):
    return make_intervention_run(tmp_path / "run", sae)


def test_concept_steering_report_counts_hits(run, model):
    report = concept_steering_report(run.root, LAYER, scale=3.0, seeds=[0, 1], model=model)
    assert report.height == 1  # colour only by default; rank 1 only
    row = report.row(0, named=True)
    assert row["concept"] == "colour=red" and row["unit"] == 17 and row["seeds"] == 2
    assert row["steps"] == "2-3" and row["mask"] == "object"  # the defaults: late steps, on the object
    steered = run.read_table("interventions").filter(pl.col("concept") == "colour=red")
    assert steered.height == 2 and row["hits"] == int(steered["concept_hit"].sum())
    assert row["rate"] == pytest.approx(row["hits"] / 2) and row["clean_hits"] <= row["hits"]
    after = [json.loads(a) for a in steered["attributes"]]
    before = [json.loads(a) for a in steered["baseline_attributes"]]
    assert row["clean_hits"] == sum(clean_hit(a, b, "colour=red") for a, b in zip(after, before, strict=True))
    assert row["baseline_hits"] == sum(b["colour"] == "red" for b in before)
    for prompt in steered["prompt"]:
        assert " red " not in prompt  # steered prompts lack the concept
    assert run.read_table("steering_success").height == 1


def test_concept_prompts_lack_the_concept():
    prompts = concept_prompts("colour=red", range(9))
    assert len(prompts) == 9 and not any(" red " in p for p in prompts)
    assert {p.split()[2] for p in prompts} == {"green", "blue", "yellow"}


def test_concept_report_on_a_directory_that_is_not_a_run_is_open_runs_error(tmp_path, model):
    plain, expected = not_a_run(tmp_path)
    with pytest.raises(DifflensError) as e:
        concept_steering_report(plain, LAYER, model=model)
    assert one_line(e) == expected
