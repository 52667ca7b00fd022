"""Steering overhead: generation with a steering hook (strength x direction added at every step) versus plain
generation of the same prompts, seeds and steps, in one process on the demo model.

    python benchmarks/steer_overhead.py [--prompts 32] [--batch-size 32] [--repeats 7] [--threads 1]

Plain and steered runs alternate (so drifting machine load hits both alike); prints the median time of each and
the median of the per-pair ratios steered/plain (goal <= 1.05), for steering without and with a spatial mask.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from backend.interventions.directions import unit_direction  # noqa: E402
from backend.interventions.masks import region_mask  # noqa: E402
from backend.interventions.steer import steered_generate  # noqa: E402
from backend.models import load_model  # noqa: E402
from backend.models.layers import layer_channels  # noqa: E402
from backend.run.prompts import DEMO_PROMPTS, load_prompts  # noqa: E402

LAYER = "up_blocks.1.attentions.1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--layer", default=LAYER)
    ap.add_argument("--prompts", type=int, default=32, help="first N prompts of the demo set (one seed each)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    prompts = [r.prompt for r in load_prompts(DEMO_PROMPTS)[: args.prompts]]
    seeds = list(range(len(prompts)))
    n_steps, guidance = model.default_steps, model.default_guidance
    n_channels = layer_channels(model, args.layer)
    direction = unit_direction("channel", 0, n_channels)
    schedule = [1.0] * n_steps  # the hook edits at every step: the worst case
    mask = region_mask("left", model.default_resolution[0])

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(prompts), args.batch_size):
            fn(prompts[i:i + args.batch_size], seeds[i:i + args.batch_size])
        return time.perf_counter() - t0

    def plain(p, s):
        model.generate(p, s, n_steps, guidance)

    def steered(p, s):
        steered_generate(model, args.layer, p, s, direction, schedule, None, n_steps, guidance)

    def masked(p, s):
        steered_generate(model, args.layer, p, s, direction, schedule, mask, n_steps, guidance)

    for fn in (plain, steered, masked):  # warm-up
        timed(fn)
    times: dict[str, list[float]] = {"plain": [], "steered": [], "masked": []}
    ratios: dict[str, list[float]] = {"steered": [], "masked": []}
    for _ in range(args.repeats):
        p = timed(plain)
        times["plain"].append(p)
        for name, fn in (("steered", steered), ("masked", masked)):
            t = timed(fn)
            times[name].append(t)
            ratios[name].append(t / p)
    print(f"{len(prompts)} generations x {n_steps} steps (guidance {guidance}), batch {args.batch_size}, "
          f"layer {args.layer}, {torch.get_num_threads()} thread(s), {args.repeats} repeats")
    for name, ts in times.items():
        print(f"  {name:<8} median {statistics.median(ts):.3f} s")
    for name, rs in ratios.items():
        print(f"{name}/plain: median {statistics.median(rs):.3f} (runs: {', '.join(f'{r:.3f}' for r in rs)})")


if __name__ == "__main__":
    main()
