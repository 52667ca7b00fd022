"""The Lab's live model (inspector/live.py) on the shipped demo model: one cached model shared by every browser session
(its generations serialised, so a session sees only its own activations), what a generation keeps in the cache (what
the page shows, not every step's tokens), and the device and dtype on a machine without the run's GPU."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from inspector import live

LAYER = "up_blocks.1.attentions.1"  # 64 channels on an 8x8 grid
STEPS = 8
GUIDANCE = 1.5
PROMPTS = ("a large red circle on the left, gray background", "a small blue square at the top, black background")


@pytest.fixture(scope="module")
def demo(one_thread):
    from backend.models import load_model

    return load_model("demo")


def arrays(obj) -> list[np.ndarray]:
    """Every numpy array reachable from a Capture (dataclass fields, dicts, lists), in a fixed order."""
    if isinstance(obj, np.ndarray):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [a for f in dataclasses.fields(obj) for a in arrays(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [a for k in sorted(obj) for a in arrays(obj[k])]
    if isinstance(obj, list | tuple):
        return [a for v in obj for a in arrays(v)]
    return []


def same(a, b) -> bool:
    xs, ys = arrays(a), arrays(b)
    return len(xs) == len(ys) and all(x.shape == y.shape and np.allclose(x, y, atol=1e-5)
                                      for x, y in zip(xs, ys, strict=True))


class Interleave:
    """A forward pre-hook on the denoiser that sleeps a little, so two threads' generations really overlap."""

    def __init__(self, model, seconds=0.004):
        self.handle = model.denoiser.register_forward_pre_hook(lambda *_: time.sleep(seconds))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run_together(*jobs):
    """Run the jobs in threads started together; their results (or exceptions), in order."""
    results = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def call(i, job):
        start.wait()
        try:
            results[i] = job()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def capture(model, prompt, seed, **kw):
    return live.capture(model, "demo", LAYER, prompt, seed, STEPS, GUIDANCE, **kw)


# ------------------------------------------------------------------------------------------------ one model, many
# sessions


def test_two_sessions_generating_at_once_see_only_their_own_activations(demo):
    """Two browser sessions share the cached model: each hooked generation must record its own forward passes only
    (without the model's lock both read hooks fire on both generations, and the shared scheduler is stepped twice)."""
    refs = [capture(demo, PROMPTS[0], 0), capture(demo, PROMPTS[1], 1)]
    live.capture.clear()
    with Interleave(demo):
        got = run_together(lambda: capture(demo, PROMPTS[0], 0), lambda: capture(demo, PROMPTS[1], 1))
    for ref, result in zip(refs, got, strict=True):
        assert not isinstance(result, Exception), result
        assert same(result, ref)
        assert np.array_equal(result.image, ref.image)


def test_a_steered_generation_does_not_leak_into_another_sessions_capture(demo):
    """Session A reads the layer while session B steers it (an edit hook on the same module)."""
    items = [("channel", 7, 40.0)]
    ref_capture = capture(demo, PROMPTS[0], 0)
    ref_steered = live.steer(demo, LAYER, PROMPTS[1], 1, STEPS, GUIDANCE, items, (0, STEPS - 1))
    live.capture.clear()
    with Interleave(demo):
        got = run_together(lambda: capture(demo, PROMPTS[0], 0),
                           lambda: live.steer(demo, LAYER, PROMPTS[1], 1, STEPS, GUIDANCE, items, (0, STEPS - 1)))
    assert not isinstance(got[0], Exception) and not isinstance(got[1], Exception), got
    assert same(got[0], ref_capture)
    assert np.array_equal(got[1], ref_steered)


def test_the_lock_is_one_per_model_and_reentrant(demo):
    lock = live.model_lock(demo)
    assert live.model_lock(demo) is lock
    with lock, lock:  # steer holds it and calls the layer probe, which takes it too
        pass
    other = object.__new__(type(demo))
    assert live.model_lock(other) is not lock


# ------------------------------------------------------------------------------------------------ what is cached


def test_a_generation_caches_what_the_page_shows_not_every_steps_tokens(demo):
    """The cached generation of the demo: per step every unit's mean and max and the maps of the most active units
    (as many as the page can show), the maps in float16; before, float32 tokens of every step (for SDXL about
    0.5 GB a generation)."""
    cap = capture(demo, PROMPTS[0], 0)
    n_tokens, n_units, steps = 64, 64, STEPS
    all_tokens = steps * n_tokens * n_units * 4  # what the old cache held: float32 [T, C] at every step
    cached = sum(a.nbytes for a in arrays(cap)) - cap.image.nbytes
    bound = steps * (n_units * 2 * 4 + 32 * (n_tokens * 2 + 8))  # the page's "Top" goes up to 32 units
    assert cached <= bound, (cached, bound)
    assert cached <= 0.35 * all_tokens


def test_summary_bytes_for_an_sdxl_sized_layer():
    """One step of an SDXL up-block at 1024 px (64x64 tokens x 640 channels): the old cache kept 10.5 MB per step,
    the summary keeps the maps of the 32 most active channels."""
    tokens = torch.randn(64 * 64, 640, generator=torch.Generator().manual_seed(0))
    step = live.summarise(tokens, "channel")
    kept = sum(t.nbytes for t in step)
    assert kept < 0.03 * tokens.numel() * 4  # 10.5 MB -> about 0.27 MB
    assert kept <= 640 * 8 + 32 * (4096 * 2 + 8)


@pytest.mark.parametrize("kind", ["channel", "feature"])
def test_top_units_are_those_of_the_full_tokens(demo, kind):
    """The summary ranks and maps units exactly as ranking the full [T, U] activations would (channels, or the SAE
    codes of a feature layer)."""
    from intervention_runs import random_sae

    from backend.models.hooks import read_activations

    sae = random_sae() if kind == "feature" else None
    full = {}
    with torch.no_grad(), read_activations(demo, [LAYER], lambda ev: full.__setitem__(ev.step, ev.tokens[0].float()),
                                           half="cond"):
        demo.generate([PROMPTS[1]], [3], STEPS, GUIDANCE)
    cap = live.capture(demo, "demo", LAYER, PROMPTS[1], 3, STEPS, GUIDANCE, kind=kind, _sae=sae, sae_key="random")
    for step in (0, STEPS // 2, STEPS - 1):
        with torch.no_grad():
            maps = full[step] if sae is None else sae.encode(full[step], dense=True)
        mean = maps.mean(0).numpy()
        order = np.argsort(-mean, kind="stable")[:8]
        tops = live.top_units(cap, step, 8)
        assert [t["unit"] for t in tops] == order.tolist()
        for t in tops:
            column = maps[:, t["unit"]].numpy()
            assert t["mean"] == pytest.approx(column.mean(), rel=1e-5, abs=1e-7)
            assert t["max"] == pytest.approx(column.max(), rel=1e-5, abs=1e-7)
            assert t["heatmap"].shape == (8, 8)
            np.testing.assert_allclose(t["heatmap"].ravel(), column, rtol=2e-3, atol=2e-3 * np.abs(column).max())


# ------------------------------------------------------------------------------------------------ device and dtype


def test_the_runs_device_when_this_machine_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert live.lab_device("cuda") == ("cuda", None)
    assert live.lab_device("cuda:1") == ("cuda:1", None)
    assert live.lab_device("cpu") == ("cpu", None)
    device, note = live.lab_device("cuda:5")
    assert device == "cpu" and "cuda:5" in note
    assert live.device_options("cuda") == ["cuda", "cpu", "cuda:0", "cuda:1"]


def test_a_cuda_run_on_a_cpu_only_node_runs_on_the_cpu():
    assert not torch.cuda.is_available()  # this machine: a CPU build of torch
    device, note = live.lab_device("cuda")
    assert device == "cpu" and "cuda" in note and "CPU" in note
    assert live.device_options("cuda") == ["cpu"]


@pytest.mark.parametrize("run_dtype, device, expected", [
    ("bfloat16", "cpu", "bfloat16"),  # bfloat16 runs on the CPU
    ("float16", "cpu", "float32"),  # float16 on the CPU: slow, and some kernels are missing
    ("float16", "cuda", "float16"),
    ("float32", "cpu", "float32"),
])
def test_lab_dtype(run_dtype, device, expected):
    dtype, note = live.lab_dtype(device, run_dtype)
    assert dtype == expected
    assert (note is not None) == (expected != run_dtype)


def test_half_precision_failures_are_explained():
    exc = RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")
    assert "float32" in live.half_precision_problem(exc, "cpu", "float16")
    assert live.half_precision_problem(exc, "cpu", "float32") is None
    assert live.half_precision_problem(ValueError("unknown word"), "cpu", "float16") is None


def test_a_bfloat16_model_generates_on_the_cpu():
    model = live.load_model("demo", "cpu", "bfloat16")
    assert model.dtype == torch.bfloat16
    cap = capture(model, PROMPTS[0], 0, device="cpu", dtype="bfloat16")
    assert cap.image.shape == (16, 16, 3) and all(np.isfinite(a).all() for a in arrays(cap))
    assert len(live.top_units(cap, 0, 4)) == 4


def test_the_lab_page_runs_a_cuda_float16_run_on_this_cpu(tmp_path, runs_dir, monkeypatch):
    """The page on a run made with --device cuda --dtype float16: it says so, loads on the CPU in float32, and
    generates (it used to fail loading the model on a machine without CUDA)."""
    from streamlit.testing.v1 import AppTest

    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "gpu")
    manifest = json.loads((root / "gpu/manifest.json").read_text())
    manifest["config"].update(device="cuda", dtype="float16")
    (root / "gpu/manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("DIFFLENS_RUNS", str(root))
    at = AppTest.from_file(str(Path(live.__file__).parent / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("views/lab.py")
    at.run()
    assert at.selectbox(key="lab.device").value == "cpu" and at.selectbox(key="lab.dtype").value == "float32"
    shown = " ".join(str(c.value) for c in [*at.caption, *at.info])
    assert "cuda" in shown and "CPU" in shown
    next(b for b in at.button if b.label == "Load model").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    at.text_input(key="lab.prompt").set_value(PROMPTS[0])
    at.number_input(key="lab.steps").set_value(4)
    next(b for b in at.button if b.label == "Generate").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert sum(c.startswith("channel ") for img in at.image for c in img.captions) == 8


@pytest.mark.parametrize("run_fixture", ["negative_run", "controlnet_run"])
def test_the_labs_image_of_one_of_the_runs_prompts_is_the_captured_one(run_fixture, request, one_thread):
    """The Lab generates (and steers) a run's prompt with the negative prompt and control image the run generated
    it with, through the run's ControlNet: the image equals the captured one; without them it is another image."""
    import polars as pl
    from PIL import Image

    root, layer = request.getfixturevalue(run_fixture)
    gens = pl.read_parquet(root / "tables" / "generations" / "*.parquet").sort("gen_id")
    config = json.loads((root / "manifest.json").read_text())["config"]
    c = config["capture"]
    i = 1  # the second prompt: its own negative prompt (demo run) or control image (ControlNet run)
    prompt, seed = gens["prompt"][i], int(gens["seed"][i])
    steps, guidance = int(gens["n_steps"][i]), float(gens["guidance"][i])
    recorded = np.asarray(Image.open(root / gens["image"][i]))
    model = live.load_model(config["model"], "cpu", "float32", c.get("controlnet") or "",
                            float(c.get("controlnet_scale") or 1.0))
    conditions = live.conditions(str(root), "sig", prompt, guidance)
    assert np.array_equal(live.generate(model, layer, prompt, seed, steps, guidance, conditions=conditions).image,
                          recorded)
    assert np.array_equal(live.steer(model, layer, prompt, seed, steps, guidance, [], (0, steps - 1),
                                     conditions=conditions), recorded)
    assert not np.array_equal(live.generate(model, layer, prompt, seed, steps, guidance).image, recorded)
    described = live.describe_conditions(conditions)
    assert ("control image `b.png`" in described) == (run_fixture == "controlnet_run")
    assert "negative prompt" in described


def test_the_labs_conditions_of_a_prompt_the_run_did_not_generate(negative_run, controlnet_run):
    new = "a small green circle at the top, black background"
    assert live.condition_kwargs(live.conditions(str(negative_run[0]), "sig", new, 3.0)) == {
        "negative_prompts": ["a green triangle"]}  # the run's own --negative-prompt
    assert live.conditions(str(negative_run[0]), "sig", new, 1.0) == ()  # no CFG: nothing to condition on
    assert live.condition_kwargs(live.conditions(str(controlnet_run[0]), "sig", "a green bird", 5.0)) == {
        "negative_prompts": ["a green house"]}  # no control image: generated without the ControlNet
    assert live.describe_conditions(()) == ""
