"""SAE maths against a tiny dense reference, per architecture."""

import pytest
import torch

from sae.model import SAE, SAEConfig, fold_input_affine
from sae.sparse_ops import sparse_decode


def make(arch, d=8, n=32, k=4, seed=0):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=k, architecture=arch))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_enc_T.add_(torch.randn_like(sae.W_enc_T) * 0.1)
    return sae


def reference_codes(sae, x):
    pre = (x - sae.b_dec) @ sae.W_enc_T.T + sae.b_enc
    a = sae.cfg.architecture
    if a == "topk":
        thr = pre.topk(sae.cfg.k, dim=-1).values[:, -1:]
        return torch.where(pre >= thr, pre.relu(), torch.zeros_like(pre))
    if a == "relu":
        return pre.relu()
    flat = pre.relu().flatten()
    thr = flat.topk(x.shape[0] * sae.cfg.k).values[-1]
    return torch.where(pre.relu() >= thr, pre.relu(), torch.zeros_like(pre))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_encode_decode_match_dense_reference(arch):
    sae = make(arch)
    sae.train()
    x = torch.randn(16, 8)
    codes = sae.encode(x)
    dense = codes.dense(32)
    torch.testing.assert_close(dense, reference_codes(sae, x))
    torch.testing.assert_close(sae.decode(codes), dense @ sae.W_dec + sae.b_dec)
    if arch == "topk":
        assert codes.indices.shape == (16, 4)
        assert ((dense > 0).sum(-1) <= 4).all()
    if arch == "batchtopk":
        assert (dense > 0).sum() == 16 * 4


def test_batchtopk_inference_uses_the_threshold():
    sae = make("batchtopk")
    sae.train()
    for _ in range(50):
        sae.encode(torch.randn(64, 8))
    assert sae.threshold > 0
    sae.eval()
    x = torch.randn(8, 8)
    dense = sae.encode(x, dense=True)
    pre = (x - sae.b_dec) @ sae.W_enc_T.T + sae.b_enc
    torch.testing.assert_close(dense, torch.where(pre > sae.threshold, pre, torch.zeros_like(pre)))


def test_encode_with_grad_matches_dense_autograd():
    sae = make("topk")
    x = torch.randn(16, 8)
    idx = sae.encode(x).indices
    vals = sae.encode_with_grad(x, idx)
    loss = (sae.decode(type(sae.encode(x))(vals, idx)) - x).pow(2).sum()
    loss.backward()
    g_sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.W_enc_T.T + sae.b_enc
    mask = torch.zeros_like(pre).scatter_(1, idx, 1.0)
    z = pre.relu() * mask
    ((z @ sae.W_dec + sae.b_dec - x).pow(2).sum()).backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(g_sparse[n], p.grad, msg=n)


def test_folding_keeps_codes_and_reconstructions():
    sae = make("topk")
    mean = torch.randn(8) * 3
    sae.cfg.normalized, sae.cfg.input_mean, sae.cfg.input_scale = True, mean.tolist(), 0.37
    x_raw = torch.randn(32, 8) * 5 + mean
    codes = sae.encode(sae.normalise(x_raw))
    recon = sae.decode(codes) / 0.37 + mean
    folded = sae.folded()
    assert not folded.cfg.normalized
    fcodes = folded.encode(x_raw)
    torch.testing.assert_close(fcodes.dense(32), codes.dense(32), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded.decode(fcodes), recon, rtol=1e-4, atol=1e-4)


def test_decoder_rows_are_unit_and_parallel_grad_is_removed():
    sae = make("topk")
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(sae.W_enc_T.data, sae.W_dec.data + (sae.W_enc_T.data - sae.W_dec.data))
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(32), atol=1e-6, rtol=0)


def test_fresh_encoder_is_decoder_transpose():
    sae = SAE(SAEConfig(d_in=8, n_latents=32, k=4))
    assert torch.equal(sae.W_enc_T, sae.W_dec)


def test_bad_configs():
    with pytest.raises(ValueError, match="architecture"):
        SAE(SAEConfig(d_in=4, n_latents=8, architecture="gated"))
    with pytest.raises(ValueError, match="k must be"):
        SAE(SAEConfig(d_in=4, n_latents=8, k=9))
    with pytest.raises(ValueError, match="input normalisation .rms."):
        SAE(SAEConfig(d_in=4, n_latents=8, k=2, normalize="rms"))


def test_jumprelu_keeps_positive_values_above_each_latents_threshold():
    sae = make("jumprelu").eval()
    assert sae.threshold.shape == (32,)
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(-0.2, 0.4, 32))
    x = torch.randn(16, 8)
    pre = (x - sae.b_dec) @ sae.W_enc_T.T + sae.b_enc
    expected = pre.relu() * (pre > sae.threshold)
    torch.testing.assert_close(sae.encode(x, dense=True), expected)


@pytest.mark.parametrize("mode", ["layernorm", "norm_rescale"])
def test_per_token_normalisation_wraps_encode_and_decode(mode):
    """layernorm: openai/sparse_autoencoder LN (unbiased std + 1e-5 in, * std + mu out); norm_rescale: SAELens
    constant_norm_rescale (x * sqrt(D) / ||x||, divided back)."""
    sae = make("topk")
    sae.cfg.normalize = mode
    x = torch.randn(16, 8) * 4 + 2
    if mode == "layernorm":
        mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
        x_n, back = (x - mu) / (std + 1e-5), lambda y: y * std + mu
    else:
        coeff = 8 ** 0.5 / x.norm(dim=-1, keepdim=True)
        x_n, back = x * coeff, lambda y: y / coeff
    dense = reference_codes(sae, x_n)
    codes = sae.encode(x)
    torch.testing.assert_close(codes.dense(32), dense)
    torch.testing.assert_close(sae.encode(x, dense=True), dense)
    torch.testing.assert_close(sae.pre_acts(x), (x_n - sae.b_dec) @ sae.W_enc_T.T + sae.b_enc)
    torch.testing.assert_close(sae.decode(codes), back(dense @ sae.W_dec + sae.b_dec), rtol=1e-5, atol=1e-5)
    new = codes.values * 2
    edited = codes._replace(values=new)
    torch.testing.assert_close(sae.decode_change(codes, new), sae.decode(edited) - sae.decode(codes),
                               rtol=1e-5, atol=1e-5)


def test_fold_input_affine_reads_raw_inputs():
    sae = make("relu")
    mean, std = torch.randn(8), torch.rand(8) + 0.5
    x = torch.randn(16, 8) * std + mean
    z = (x - mean) / std
    folded = fold_input_affine(sae, mean, std)
    torch.testing.assert_close(folded.encode(x, dense=True), sae.encode(z, dense=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x), sae(z) * std + mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_sparse_decode_gradients_match_dense_autograd(architecture):
    """The hand-written sparse backward equals autograd through a dense [B, N] code matrix."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=6, n_latents=20, k=3, architecture=architecture), dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(9, 6, dtype=torch.float64)
    with torch.no_grad():
        sel = sae.select(sae.pre_acts(x))
    target = torch.randn(9, 6, dtype=torch.float64)

    out = sparse_decode(sel.values, sel.indices, x, sae.W_enc_T, sae.b_enc, sae.W_dec, sae.b_dec) + sae.b_dec
    (out - target).pow(2).sum().backward()
    sparse_grads = {k: p.grad.clone() for k, p in sae.named_parameters()}
    sae.zero_grad()

    mask = sel.dense(20) > 0
    z = torch.where(mask, sae.pre_acts(x).relu(), 0.0)
    ref = z @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out, ref)
    (ref - target).pow(2).sum().backward()
    for k, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[k], p.grad, msg=k)
