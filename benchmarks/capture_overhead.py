"""Capture overhead: a full capture (hooks, stats, token samples, Parquet/npy/PNG writes) versus plain
generation of the same prompts, seeds and steps, in one process, on the demo model or any supported family.

    python benchmarks/capture_overhead.py [--model demo|DIR] [--layer L ...] [--steps N] [--prompts 96]
                                          [--images-per-prompt 2] [--repeats 3]

Layers default to the demo's two for the demo and, for another model, to two of its usual SAE targets (the
middle and the last top-level one: `transformer_blocks.N` of SD3, FLUX's last single-stream block). Steps and
guidance default to the model's. Prints the median ratio capture/plain of alternating runs (goal <= 1.10), the
machine's load average, the ratio of the medians and of the fastest runs (when the machine's speed drifts from run
to run), the same ratio in process CPU time (steadier on a busy machine), activity rows per second written and
token-shard MB/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.models import load_model  # noqa: E402
from backend.models.layers import hook_points  # noqa: E402
from backend.run.config import DEMO_LAYERS, RunConfig, validate  # noqa: E402
from backend.run.prompts import DEMO_PROMPTS, load_prompts  # noqa: E402
from backend.stages.capture import capture, overlap_writes, plan_generations  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompts", type=int, default=96, help="first N prompts of the demo set")
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", action="append", help="a hook point to capture; repeat for several")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="difflens-bench-"))
    prompt_file = tmp / "prompts.jsonl"
    prompt_file.write_text("\n".join(DEMO_PROMPTS.read_text().splitlines()[: args.prompts]) + "\n")
    model = load_model(args.model)
    cfg = RunConfig(name="bench", runs_dir=str(tmp), model=args.model, prompts=str(prompt_file))
    cfg.capture.layers = args.layer or default_layers(model)
    cfg = validate(cfg)
    cfg.capture.images_per_prompt = args.images_per_prompt
    cfg.capture.batch_size = args.batch_size
    gens = plan_generations(load_prompts(prompt_file), args.images_per_prompt, 0)
    n_steps, guidance = args.steps or model.default_steps, model.default_guidance
    cfg.capture.steps, cfg.capture.guidance = n_steps, guidance

    def plain() -> tuple[float, float]:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(0, len(gens), args.batch_size):
            batch = gens[i:i + args.batch_size]
            model.generate([g.prompt.prompt for g in batch], [g.seed for g in batch], n_steps, guidance)
        return time.perf_counter() - t0, time.process_time() - cpu0

    runs = iter(range(1_000_000))

    def captured():
        # a fresh run directory each time, all deleted at the end: deleting the last run's files right before
        # timing the next (online discard on ext4) slows the new run's file creation several-fold
        cfg.name = f"bench{next(runs)}"
        cpu0 = time.process_time()
        s = capture(cfg, model=model, progress=False)
        return s.seconds, time.process_time() - cpu0, s

    plain(), captured()  # warm-up: both sides' first call pays one-time costs (lazy imports, first allocations)
    ratios, cpu_ratios, plains, caps, summary = [], [], [], [], None
    for _ in range(args.repeats):
        p, p_cpu = plain()
        c, c_cpu, summary = captured()
        plains.append(p)
        caps.append(c)
        ratios.append(c / p)
        cpu_ratios.append(c_cpu / p_cpu)
    w = summary.writes
    print(f"model {args.model} ({model.family}); generations: {len(gens)} x {n_steps} steps, guidance {guidance}, "
          f"layers {cfg.capture.layers}, batch {args.batch_size}; load average {os.getloadavg()[0]:.1f}")
    p_med, c_med = statistics.median(plains), statistics.median(caps)
    print(f"plain generation: median {p_med:.2f} s; capture: median {c_med:.2f} s")
    print(f"capture / plain: median {statistics.median(ratios):.3f} (runs: {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"  on a machine whose speed drifts between runs: ratio of the medians {c_med / p_med:.3f}, of the fastest "
          f"runs {min(caps) / min(plains):.3f}")
    print(f"capture / plain in process CPU time (all threads; other processes' load does not count): median "
          f"{statistics.median(cpu_ratios):.3f} (runs: {', '.join(f'{r:.3f}' for r in cpu_ratios)})")
    where = "a background thread" if overlap_writes(model.device) else "inline: torch's threads use every core"
    print(f"writes ({where}): {w.seconds:.2f} s, {w.activity_rows / w.seconds:,.0f} activity rows/s, "
          f"{w.token_bytes / w.seconds / 1e6:.1f} MB/s of token shards ({w.token_bytes / 1e6:.1f} MB)")
    shutil.rmtree(tmp, ignore_errors=True)


def default_layers(model) -> list[str]:
    """The demo's layers, or two usual SAE targets of another model: its middle and last top-level target."""
    if model.family == "demo":
        return list(DEMO_LAYERS)
    targets = [p.name for p in hook_points(model) if p.sae_target]
    top = [n for n in targets if n.count(".") == min(t.count(".") for t in targets)]
    return sorted({top[len(top) // 2], top[-1]}, key=top.index)


if __name__ == "__main__":
    main()
