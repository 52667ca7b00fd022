"""Capture runs whose generations carry conditions (negative prompts, ControlNet control images), each with a
random SAE on its layer: what the interventions must regenerate as captured (tests/interventions/)."""

from __future__ import annotations

import json
from pathlib import Path

from capture_runs import make_cfg
from tiny_pipelines import build_controlnet, control_image

from backend.run.context import open_run
from backend.stages.capture import capture
from sae.io import save_sae
from sae.model import SAE, SAEConfig

DEMO_PROMPTS = ["a large red circle on the left, gray background", "a small blue square at the top, white background"]
CN_PROMPTS = ["a red cat on the house", "a blue dog in the tree"]
DEMO_LAYER = "up_blocks.1.attentions.1"
CN_LAYER = "mid_block.attentions.0"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def with_random_sae(root: Path, layer: str) -> Path:
    """The run with a random SAE on layer (edit needs one), sized by the layer's channels."""
    ctx = open_run(root)
    sae = SAE(SAEConfig(d_in=ctx.n_channels(layer), n_latents=32, k=4, layer=layer)).eval()
    save_sae(sae, ctx.store.sae_dir(layer))
    return root


def negative_prompt_run(model_dir: Path, d: Path) -> tuple[Path, str]:
    """(run dir, layer): a demo run (CFG 3) whose first prompt takes the run's negative prompt, the second its own."""
    prompts = write_jsonl(d / "p.jsonl", [{"prompt": DEMO_PROMPTS[0]},
                                         {"prompt": DEMO_PROMPTS[1], "negative": "a red square"}])
    cfg = make_cfg(model_dir, prompts, d / "runs", images_per_prompt=1, steps=2, guidance=3.0,
                   negative_prompt="a green triangle", layers=[DEMO_LAYER])
    capture(cfg, progress=False)
    return with_random_sae(cfg.out_dir, DEMO_LAYER), DEMO_LAYER


def controlnet_run(sd_dir: Path, d: Path) -> tuple[Path, str]:
    """(run dir, layer): a tiny SD run through a ControlNet, a control image per prompt, a run-wide negative prompt."""
    images = [control_image(d / "a.png", seed=0), control_image(d / "b.png", seed=1)]
    prompts = write_jsonl(d / "p.jsonl", [{"prompt": p, "control_image": im.name}
                                         for p, im in zip(CN_PROMPTS, images, strict=True)])
    cfg = make_cfg(sd_dir, prompts, d / "runs", images_per_prompt=1, steps=3, guidance=5.0, tokens_per_step=4,
                   layers=[CN_LAYER], controlnet=str(build_controlnet(sd_dir, d / "cn")), controlnet_scale=0.7,
                   negative_prompt="a green house")
    capture(cfg, progress=False)
    return with_random_sae(cfg.out_dir, CN_LAYER), CN_LAYER
