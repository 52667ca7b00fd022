"""Small demo-model capture runs shared by the capture, SAE-stage and analysis-run tests."""

from backend.run.config import RunConfig

LAYERS = ["mid_block.attentions.0", "up_blocks.1.attentions.1"]


def make_cfg(model_dir, prompt_file, runs_dir, name="r", **capture):
    cfg = RunConfig(name=name, runs_dir=str(runs_dir), model=str(model_dir), prompts=str(prompt_file))
    cfg.capture.layers = list(LAYERS)
    cfg.capture.images_per_prompt = 2
    cfg.capture.steps = 3
    cfg.capture.batch_size = 8
    cfg.capture.tokens_per_step = 16
    for k, v in capture.items():
        setattr(cfg.capture, k, v)
    return cfg


