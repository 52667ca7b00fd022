"""Deep-dream speed: one unit of the demo model, 100 optimisation steps, 4 seeds, 2 threads (target: < 30 s).

    .venv/bin/python benchmarks/dream_speed.py [--model demo] [--layer up_blocks.1.attentions.1]
                                               [--kind channel|feature] [--unit 12] [--targets 0,10,15]
                                               [--steps 100] [--seeds 4] [--threads 2]

The default layer is the demo's deepest SAE target (8x8 tokens: the forward runs through most of the UNet) and
three target steps (the default max_target_steps: step 0 and two peaks), so one optimisation step is one
forward + backward over a batch of seeds x 3 latents. A feature dream uses a random SAE of the layer (the
objective's cost does not depend on its weights). Model loading, the latent-scale fit of a latent-space model
(--model DIR: a local diffusers pipeline; give --layer and --targets for it) and one warm-up step are not timed;
the figure printed is the whole `dream_unit` call, snapshots and image decoding included.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="demo or a local diffusers pipeline directory")
    ap.add_argument("--layer", default="up_blocks.1.attentions.1")
    ap.add_argument("--kind", default="channel", choices=["channel", "feature"])
    ap.add_argument("--unit", type=int, default=12)
    ap.add_argument("--targets", default="0,10,15", help="target denoising steps of a 20-step generation")
    ap.add_argument("--steps", type=int, default=100, help="optimisation steps")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from backend.interventions.dream import default_config, dream_unit, latent_scale
    from backend.models import load_model
    from backend.models.layers import layer_channels
    from sae.model import SAE, SAEConfig

    model = load_model(args.model)
    scale = latent_scale(model)  # fitted once per latent-space model (not timed)
    sae = None
    if args.kind == "feature":
        d = layer_channels(model, args.layer)
        sae = SAE(SAEConfig(d_in=d, n_latents=8 * d, k=16))
        sae.reset_parameters(torch.Generator().manual_seed(0))
        sae.eval()
    targets = [int(s) for s in args.targets.split(",")]
    cfg = default_config(args.kind)
    cfg.seeds = list(range(args.seeds))
    warm = default_config(args.kind)
    warm.opt_steps, warm.seeds = 1, cfg.seeds
    dream_unit(model, args.layer, args.kind, args.unit, targets, warm, sae=sae)
    cfg.opt_steps = args.steps
    t0 = time.perf_counter()
    result = dream_unit(model, args.layer, args.kind, args.unit, targets, cfg, sae=sae)
    seconds = time.perf_counter() - t0
    first = [r["activation"] for r in result.rows if r["opt_step"] == 0]
    last = [r["activation"] for r in result.rows if r["opt_step"] == cfg.opt_steps]
    print(f"dream {args.model} {args.layer} {args.kind} {args.unit} (latent std {scale.std:g}): "
          f"{args.steps} steps x {args.seeds} seeds x "
          f"{len(targets)} target steps on {args.threads} threads: {seconds:.1f} s "
          f"({1000 * seconds / args.steps:.0f} ms/step); activation {sum(first) / len(first):.3f} -> "
          f"{sum(last) / len(last):.3f}")


if __name__ == "__main__":
    main()
