"""Shared check of the SAE checkpoint-format tests (tests/sae/test_formats_*.py): a read SAE's codes and
reconstructions equal the reference library's on the same inputs."""

import torch


def assert_codes_and_reconstructions(sae, x: torch.Tensor, codes_BN: torch.Tensor, recon_BD: torch.Tensor) -> None:
    """sae's dense codes of x equal codes_BN and its reconstruction equals recon_BD (tight float32 tolerances)."""
    with torch.no_grad():
        codes = sae.encode(x)
        torch.testing.assert_close(codes.dense(sae.cfg.n_latents), codes_BN, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(codes), recon_BD, rtol=1e-5, atol=1e-5)
