"""Our TopK SAE training step versus SAELens's TopKTrainingSAE step, on identical data, init and settings.

    python benchmarks/sae_train.py            # d=256, n=8192, k=32, batch 4096, fp32, 2 threads

Both start from the same weights (unit-norm decoder rows, encoder = decoder^T scaled so the first reconstructions
have the data's norm, as sae.train.init_sae does; b_dec = data mean), see the same
batches in the same order, use Adam at the same learning rate with gradient clipping at 1.0, and run in this one
process with their steps interleaved (ours, SAELens's, one dense GEMM, ...), so that load from other processes
slows all three alike. Reported: tokens/s of each and their ratio, the one-GEMM bound (batch / time of one dense
[B, d] x [d, n] product) and the fraction of it we reach, and the FVU of each on held-out data after the same
number of tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def synthetic_batch(step: int, batch: int, d: int, atoms_AD: torch.Tensor, active: int = 8) -> torch.Tensor:
    """Sparse non-negative sums of dictionary atoms plus noise: the kind of data an SAE should fit."""
    g = torch.Generator().manual_seed(10_000 + step)
    idx = torch.randint(atoms_AD.shape[0], (batch, active), generator=g)
    coef = torch.rand(batch, active, generator=g) * 2 + 0.5
    x = torch.einsum("bk,bkd->bd", coef, atoms_AD[idx])
    return x + 0.05 * torch.randn(batch, d, generator=g) + 0.3


def fvu(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def encoder_scale(init: dict, d: int, n: int, k: int, sample_ND: torch.Tensor) -> float:
    """The factor sae.train.scale_encoder_to_data gives the transposed-decoder encoder on this data."""
    from sae.model import SAE, SAEConfig
    from sae.train import scale_encoder_to_data

    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=k))
    with torch.no_grad():
        sae.W_dec.copy_(init["W_dec"])
        sae.W_enc_T.copy_(init["W_dec"])
        sae.b_dec.copy_(init["b_dec"])
    return scale_encoder_to_data(sae, sample_ND)


def our_trainer(d: int, n: int, k: int, batch: int, lr: float, init: dict):
    from sae.model import SAE, SAEConfig
    from sae.train import SAETrainConfig, Trainer

    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=k))
    with torch.no_grad():
        sae.W_dec.copy_(init["W_dec"])
        sae.W_enc_T.copy_(init["W_enc_T"])
        sae.b_dec.copy_(init["b_dec"])
    cfg = SAETrainConfig(n_latents=n, k=k, batch_size=batch, total_tokens=batch * 10**6, lr=lr, warmup_steps=0,
                         dead_tokens=1000 * batch)
    trainer = Trainer(sae, cfg, total_steps=10**6)
    return trainer.train_step, lambda x: sae(x)


def saelens_trainer(d: int, n: int, k: int, lr: float, init: dict):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, dtype="float32", device="cpu",
                                                aux_loss_coefficient=1 / 32))
    with torch.no_grad():
        sae.W_dec.copy_(init["W_dec"])
        sae.W_enc.copy_(init["W_enc_T"].T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(init["b_dec"])
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(n, dtype=torch.long)

    def step(x: torch.Tensor) -> None:  # SAETrainer._train_step, without logging
        sae.train()
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=since_fired > 1000, n_training_steps=0,
            is_logging_step=False))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step, lambda x: sae(x)


def time_steps(step, batches) -> list[float]:
    times = []
    for x in batches:
        t = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=40, help="training steps for each (equal tokens)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, n, k, b = args.d, args.n, args.k, args.batch

    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(4 * n, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    batches = [synthetic_batch(i, b, d, atoms) for i in range(args.steps)]
    held_out = synthetic_batch(-1, b, d, atoms)
    w = torch.randn(n, d, generator=g)
    init = {"W_dec": w / w.norm(dim=1, keepdim=True), "b_dec": torch.cat(batches[:2]).mean(0)}
    init["W_enc_T"] = init["W_dec"] * encoder_scale(init, d, n, k, batches[0])

    W_DN = init["W_dec"].T.contiguous()
    gemm = []

    # Interleaved (ours, theirs, ours, ...) so that load from other processes hits both alike.
    trainers = {"difflens": our_trainer(d, n, k, b, args.lr, init), "saelens": saelens_trainer(d, n, k, args.lr, init)}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for x in batches:
        for name, (step, _) in trainers.items():
            times[name] += time_steps(step, [x])
        gemm += time_steps(lambda x: x @ W_DN, [x])
    gemm_s = statistics.median(gemm[2:])
    results = {}
    for name, (_, forward) in trainers.items():
        with torch.no_grad():
            final_fvu = fvu(forward(held_out), held_out)
        step_s = statistics.median(times[name][2:])
        results[name] = {"step_ms": step_s * 1e3, "tokens_per_s": b / step_s, "fvu": final_fvu}
        print(f"{name:9s} step {step_s * 1e3:7.1f} ms  {b / step_s:8.0f} tokens/s  FVU after "
              f"{args.steps * b:,} tokens {final_fvu:.4f}", flush=True)

    ours, theirs = results["difflens"], results["saelens"]
    summary = {
        "settings": vars(args),
        "speedup_vs_saelens": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "one_gemm_bound_tokens_per_s": b / gemm_s,
        "fraction_of_gemm_bound": ours["tokens_per_s"] / (b / gemm_s),
        "fvu_difference": ours["fvu"] - theirs["fvu"],
        **{f"{name}_{key}": value for name, r in results.items() for key, value in r.items()},
    }
    print(f"speed-up vs SAELens: {summary['speedup_vs_saelens']:.2f}x   one-GEMM bound {b / gemm_s:.0f} tokens/s "
          f"({gemm_s * 1e3:.1f} ms): we reach {summary['fraction_of_gemm_bound']:.0%}   "
          f"FVU ours - SAELens: {summary['fvu_difference']:+.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
