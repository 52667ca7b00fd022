"""Decoder matching at SAE scale (backend/analysis/sae_match.py): time and peak RSS of best_matches for two random
decoders of N x D (default 20,480 latents x 1,280 channels, an SDXL-sized SAE pair), chunked so one similarity
block stays within BLOCK_ELEMS values.

    python benchmarks/sae_match_speed.py                       # 4096 and 20480 latents, D = 1280
    python benchmarks/sae_match_speed.py --sizes 8192 --d 640

Each size runs in a fresh subprocess whose peak RSS is read with os.wait4. Prints latents, seconds, latents/s and
peak RSS; RSS should stay near the two decoders plus one block whatever N is.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(n: int, d: int) -> None:
    import torch

    from backend.analysis.sae_match import best_matches

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    t0 = time.perf_counter()
    best_matches(a, b)
    print(f"{time.perf_counter() - t0:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,20480")
    parser.add_argument("--d", type=int, default=1280)
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one, args.d)
    print(f"{'latents':>8} {'D':>5} {'seconds':>8} {'latents/s':>10} {'peak RSS MB':>12}")
    for n in (int(s) for s in args.sizes.split(",")):
        proc = subprocess.Popen([sys.executable, __file__, "--one", str(n), "--d", str(args.d)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = float(proc.stdout.read().strip() or "nan")
        print(f"{n:>8} {args.d:>5} {seconds:>8.2f} {n / seconds:>10,.0f} {usage.ru_maxrss / 1024:>12.0f}")


if __name__ == "__main__":
    main()
