"""A small captured demo run for the concept-direction and causal-map tests: 24 demo prompts (6 per colour) x 1 image,
10 steps, one layer's channel activity and the feature activity of a random SAE on it."""

from __future__ import annotations

from pathlib import Path

from capture_runs import make_cfg
from conftest import ROOT
from intervention_runs import LAYER, random_sae

from backend.run.store import RunStore

STEPS = 10
PROMPTS = ROOT / "data" / "prompts" / "demo.jsonl"


def make_causal_run(root: Path, model) -> RunStore:
    """capture (channels of LAYER) then a features pass with a random SAE saved as the layer's default SAE."""
    from backend.stages.capture import SAEEncoder, capture
    from sae.io import save_sae

    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[::15]))  # 24 prompts, 6 per colour
    cfg = make_cfg("demo", prompts, root / "runs", name="causal", images_per_prompt=1, steps=STEPS,
                   layers=[LAYER], batch_size=24)
    capture(cfg, model=model, progress=False)
    store = RunStore(cfg.out_dir)
    save_sae(random_sae(), store.sae_dir(LAYER))
    capture(cfg, model=model, encoders={(LAYER, "default"): SAEEncoder(store.sae_dir(LAYER))}, progress=False)
    return store


def make_matched_run(root: Path, model) -> RunStore:
    """A run for matched directions: 3 layouts (shape, size, position) in each of the 4 colours, on gray, 2 images
    each (24 generations), every token of every step in the token shards (what cell means need)."""
    import json

    from backend.stages.capture import capture

    root.mkdir(parents=True, exist_ok=True)
    lines = [line for line in PROMPTS.read_text().splitlines() if '"background": "gray"' in line]
    layouts = []
    for line in lines:
        a = json.loads(line)["attributes"]
        layout = (a["shape"], a["size"], a["position"])
        if layout not in layouts and len(layouts) < 3 and a["size"] != "small":
            layouts.append(layout)
    chosen = [line for line in lines if (lambda a: (a["shape"], a["size"], a["position"]) in layouts)(
        json.loads(line)["attributes"])]
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(chosen) + "\n")
    cfg = make_cfg("demo", prompts, root / "runs", name="matched", images_per_prompt=2, steps=STEPS,
                   layers=[LAYER], batch_size=24, tokens_per_step=64)
    capture(cfg, model=model, progress=False)
    return RunStore(cfg.out_dir)
