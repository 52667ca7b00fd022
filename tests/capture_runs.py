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




def interrupt_replay_at_second_batch(monkeypatch):
    """Make the heat-map replay stop (KeyboardInterrupt) when it writes its second batch; returns a function that
    undoes it, for the resume."""
    from backend.analysis import examples

    real, calls = examples._maps_table, []

    def fail_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(examples, "_maps_table", fail_second)
    return lambda: monkeypatch.setattr(examples, "_maps_table", real)
