"""The features pass's bookkeeping (backend/stages/features.py): which SAEs' activity a run holds, what a new pass
records and clears; format-2 records read as the layers' default SAEs."""

from backend.stages import features

L = "up_blocks.1.attentions.1"


def test_a_pass_records_only_the_saes_the_run_does_not_hold():
    done = {"status": "done", "sae_ids": {L: {"default": "aa", "b": "bb"}}, "recording": {L: ["b"]}}
    assert features.held(done) == {(L, "default"): "aa", (L, "b"): "bb"}
    new = {(L, "default"): "aa", (L, "b"): "b2", (L, "c"): "cc"}
    assert features.to_record(done, new) == {(L, "b"): "b2", (L, "c"): "cc"}
    fields, clear = features.begin_fields(done, {(L, "c"): "cc"}, {(L, "c"): "runs/x/sae/L/c"})
    assert fields["sae_ids"] == {L: {"default": "aa", "b": "bb", "c": "cc"}} and fields["recording"] == {L: ["c"]}
    assert clear == [f"tables/activity/layer={L}/kind=feature.c"]  # the others' activity is not touched


def test_an_interrupted_pass_holds_nothing_of_what_it_was_recording():
    running = {"status": "running", "sae_ids": {L: {"default": "aa", "b": "bb"}}, "recording": {L: ["b"]}}
    assert features.held(running) == {(L, "default"): "aa"}
    assert features.to_record(running, {(L, "b"): "bb"}) == {(L, "b"): "bb"}  # the same pass: resumed
    _, clear = features.begin_fields(running, {(L, "c"): "cc"}, {})
    assert clear == [f"tables/activity/layer={L}/kind=feature.b", f"tables/activity/layer={L}/kind=feature.c"]


def test_format_2_records_name_the_default_sae_and_forget_drops_one():
    old = {"status": "done", "sae_ids": {L: "aa"}, "saes": {L: "runs/x/sae/L"}}
    assert features.held(old) == {(L, "default"): "aa"}
    assert features.by_sae({L: 1, (L, "b"): 2}) == {(L, "default"): 1, (L, "b"): 2}
    assert features.forget(old, L, "default") == {"sae_ids": {}, "saes": {}}
