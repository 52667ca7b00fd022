"""A hand-made analysed run and helpers shared by the steering, edit and ablation tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from backend.run.store import RunStore
from sae.io import save_sae
from sae.model import SAE, SAEConfig

LAYER = "up_blocks.1.attentions.1"  # 64 channels on an 8x8 grid


OTHER = "mid_block.attentions.0"  # no SAE in the hand-made run


PROMPT = "a large blue circle on the left, gray background"


STEPS = 4


GUIDANCE = 1.5


N_LATENTS = 128


def gen(model, prompts=(PROMPT,), seeds=(0,), **kw):
    return model.generate(list(prompts), list(seeds), STEPS, kw.pop("guidance", GUIDANCE), **kw)


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.denoiser.modules())


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


def random_sae() -> SAE:
    """A random folded SAE on LAYER with nonzero biases, so a sloppy splice would not be exact."""
    torch.manual_seed(0)
    s = SAE(SAEConfig(d_in=64, n_latents=N_LATENTS, k=8, layer=LAYER)).eval()
    with torch.no_grad():
        s.b_dec.normal_(0, 0.5)
        s.b_enc.normal_(0, 0.1)
    return s


def not_a_run(tmp_path):
    """A directory that is not a run (it holds one unrelated file), and the error open_run gives for it."""
    from backend.errors import DifflensError
    from backend.run.context import open_run

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a run")
    try:
        open_run(plain)
    except DifflensError as exc:
        return plain, str(exc)
    raise AssertionError("open_run accepted a directory without manifest.json")


def units_table(density, maximum, first_active, last_active) -> pa.Table:
    """A `units` table with the columns the interventions read (unit, density, max, first/last_active) as given
    and the others filled in consistently."""
    n = len(density)
    first, last = np.asarray(first_active, np.int16), np.asarray(last_active, np.int16)
    return pa.table({
        "unit": np.arange(n, dtype=np.int32), "density": np.asarray(density, np.float32),
        "mean": np.asarray(density, np.float32) * 0.1, "max": np.asarray(maximum, np.float32),
        "peak_steps": pa.array([[int(f)] if f >= 0 else [] for f in first], pa.list_(pa.int16())),
        "first_active": first, "last_active": last,
        "active_steps": np.where(first >= 0, last - first + 1, 0).astype(np.int16),
        "dead": first < 0, "dense": np.zeros(n, bool), "label": [""] * n,
        "label_confidence": np.full(n, np.nan, np.float32), "label_step": np.full(n, -1, np.int16)})


def make_intervention_run(root, sae: SAE | None, n_steps: int = STEPS) -> RunStore:
    """A run directory as capture + train-sae + analyze leave it, for LAYER: generations, units (channel and
    feature), concepts (rank-1 feature of colour=red) and sae/LAYER (when sae is given)."""
    store = RunStore(root)
    store.root.mkdir(parents=True, exist_ok=True)
    store.write_manifest({"config": {"model": "demo", "device": "cpu", "dtype": "float32"},
                          "stages": {"capture": {"status": "done", "n_steps": n_steps, "guidance": GUIDANCE}}})
    prompts = [PROMPT, "a small red square at the top, black background"]
    store.write_table_shard("generations", "part-0000000", pa.table({
        "gen_id": np.arange(2, dtype=np.int32), "prompt": prompts, "seed": np.zeros(2, np.int64),
        "group": ["blue", "red"], "attributes": ["{}", "{}"], "image": ["images/000000.png", "images/000001.png"],
        "n_steps": np.full(2, n_steps, np.int16), "guidance": np.full(2, GUIDANCE, np.float32),
        "negative_prompt": pa.nulls(2, pa.string()), "control_image": pa.nulls(2, pa.string()),
        "image_path": pa.nulls(2, pa.string()), "class_label": pa.nulls(2, pa.string())}))
    rng = np.random.default_rng(0)
    for kind, n in (("channel", 64), ("feature", N_LATENTS)):
        density = rng.uniform(0, 1, n).astype(np.float32)
        density[:4] = 0  # dead
        store.write_table_shard("units", "part-0000000", units_table(
            density, np.linspace(0.5, 2.0, n).astype(np.float32), np.where(density > 0, 1, -1),
            np.where(density > 0, 2, -1)), layer=LAYER, kind=kind)
    store.write_table_shard("units", "part-0000000", units_table(np.ones(64, np.float32), np.ones(64, np.float32),
                                                                 np.zeros(64), np.full(64, n_steps - 1)),
                            layer=OTHER, kind="channel")
    store.write_table_shard("concepts", "part-0000000", pa.table({
        "concept": ["colour=red", "colour=red", "shape=circle"], "unit": np.array([17, 3, 5], np.int32),
        "auroc": np.array([0.9, 0.8, 0.7], np.float32), "rank": np.array([1, 2, 1], np.int16),
        "step": np.zeros(3, np.int16)}), layer=LAYER, kind="feature")
    if sae is not None:
        save_sae(sae, store.sae_dir(LAYER))
    return store


