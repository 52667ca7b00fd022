"""SAE training: it learns, resumes exactly, and writes a loadable checkpoint."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import ROOT

from sae.data import ShardReader
from sae.io import load_sae, save_sae
from sae.train import SAETrainConfig, Trainer, geometric_median, reconstruction_stats, train


def sparse_data(tmp_path, n=20000, d=16, n_atoms=64, k=3, seed=0):
    """Tokens that are sparse sums of random unit atoms (an SAE can recover them)."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.stack([rng.choice(n_atoms, k, replace=False) for _ in range(n)])
    coef = rng.uniform(1, 3, size=(n, k))
    x = (coef[..., None] * atoms[idx]).sum(1) + 0.5
    for i, part in enumerate(np.array_split(x, 4)):
        np.save(tmp_path / f"part-{i:07d}.npy", part.astype(np.float16))
    return tmp_path


def cfg(**kw):
    base = dict(n_latents=128, k=4, batch_size=512, total_tokens=400_000, log_every=20, checkpoint_every=50,
                warmup_steps=20, lr=3e-3)
    return SAETrainConfig(**(base | kw))


def test_topk_learns_sparse_data(tmp_path):
    data = sparse_data(tmp_path)
    result = train(ShardReader.from_dir(data, 512), cfg(), progress=False)
    stats = reconstruction_stats(result.sae, ShardReader.from_dir(data, 512, seed=9))
    assert stats["fvu"] < 0.15 and stats["l0"] <= 4  # a dense-autograd reference reaches 0.13 here
    assert result.log[-1]["fvu"] < result.log[0]["fvu"]


def test_resume_matches_uninterrupted(tmp_path):
    data = sparse_data(tmp_path / "d" if (tmp_path / "d").mkdir() is None else tmp_path)
    c = cfg(total_tokens=100_000)
    straight = train(ShardReader.from_dir(data, 512), c, checkpoint_dir=tmp_path / "a", progress=False)
    assert train(ShardReader.from_dir(data, 512), c, checkpoint_dir=tmp_path / "b", progress=False,
                 stop_at_step=75) is None
    resumed = train(ShardReader.from_dir(data, 512), c, checkpoint_dir=tmp_path / "b", progress=False)
    for k, v in straight.sae.state_dict().items():
        assert torch.equal(v, resumed.sae.state_dict()[k]), k
    assert straight.log == resumed.log


def test_checkpoint_round_trip_and_folding(tmp_path):
    data = sparse_data(tmp_path / "d" if (tmp_path / "d").mkdir() is None else tmp_path)
    result = train(ShardReader.from_dir(data, 512), cfg(total_tokens=50_000), progress=False)
    save_sae(result.sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    x = torch.from_numpy(np.load(data / "part-0000000.npy")[:64].astype(np.float32))
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), result.sae.decode(result.sae.encode(x)))
    assert not loaded.cfg.normalized


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu"])
def test_step_metrics_stay_on_the_training_device(tmp_path, monkeypatch, architecture):
    """On CUDA a tensor made without a device lands on the CPU, beside the step's CUDA sums: the first step dies.

    Proxy on CPU: train on the CPU with the *default* device set to meta for the loss and the metric accounting,
    so any tensor made there without the training device lands on meta and mixes devices the same way.
    """
    data = sparse_data(tmp_path, n=2048)
    for name in ("_forward", "_account"):
        method = getattr(Trainer, name)

        def on_meta_default(self, *args, _method=method, **kwargs):
            with torch.device("meta"):
                return _method(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, name, on_meta_default)
    c = cfg(architecture=architecture, total_tokens=4 * 512, log_every=2, dead_tokens=512)  # AuxK from step 2
    result = train(ShardReader.from_dir(data, 512), c, progress=False)
    assert [r["tokens"] for r in result.log] == [1024, 2048]
    assert all(np.isfinite(r["fvu"]) and np.isfinite(r["aux_loss"]) for r in result.log)


def test_geometric_median_resists_outliers():
    x = torch.cat([torch.randn(200, 3) * 0.1, torch.full((20, 3), 100.0)])
    assert geometric_median(x).norm() < 1.0 < x.mean(0).norm()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo): each trains on half of every batch; DDP averages gradients."""
    data = sparse_data(tmp_path / "d" if (tmp_path / "d").mkdir() is None else tmp_path)
    c = cfg(total_tokens=30_000, dead_tokens=10**9)  # no AuxK: its normaliser is per-rank by design
    single = train(ShardReader.from_dir(data, 512), c, progress=False)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "ddp_train_worker.py"), str(data), str(tmp_path / "ddp"),
                           json.dumps(asdict(c))],
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_sae(tmp_path / "ddp")
    for k, v in single.sae.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[k], v, atol=1e-4, rtol=1e-4, msg=k)
    logged = json.loads((tmp_path / "ddp" / "cfg.json").read_text())["log"]
    assert [r["tokens"] for r in logged] == [r["tokens"] for r in single.log]  # tokens summed over ranks
    assert logged[-1]["fvu"] == pytest.approx(single.log[-1]["fvu"], rel=0.05)


def scaled_tokens(tmp_path, n=12000, d=16, seed=0):
    """sparse_data with every token multiplied by its own scale (1 to 20) and shifted by its own offset: what a
    per-token LayerNorm removes."""
    data = sparse_data(tmp_path, n=n, d=d, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for path in sorted(data.glob("part-*.npy")):
        x = np.load(path).astype(np.float32)
        x = x * rng.uniform(1, 20, (len(x), 1)) + rng.normal(0, 3, (len(x), 1))
        np.save(path, x.astype(np.float16))
    return data


def test_layernorm_training_normalises_each_token_and_reloads_equal(tmp_path):
    data = scaled_tokens(tmp_path / "d" if (tmp_path / "d").mkdir() is None else tmp_path)
    c = cfg(total_tokens=100_000, normalize="layernorm")
    result = train(ShardReader.from_dir(data, 512), c, progress=False)
    sae = result.sae.requires_grad_(False)
    assert sae.cfg.normalize == "layernorm" and not sae.cfg.normalized
    assert sae.cfg.input_mean == [] and sae.cfg.input_scale == 1.0  # no folded affine on top of the LayerNorm
    x = next(iter(ShardReader.from_dir(data, 256, seed=5)))
    # codes are invariant to each token's scale and offset: the encoder reads the layer-normed token
    a, b = sae.encode(x, dense=True), sae.encode(x * 3.0 + 1.5, dense=True)
    assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))
    # the reconstruction comes back in the token's own space
    x_hat = sae(x)
    rel = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert rel < 0.5
    assert result.log[-1]["fvu"] < result.log[0]["fvu"]  # training FVU: in the layer-normed space
    save_sae(sae, tmp_path / "saved")
    loaded = load_sae(tmp_path / "saved")
    assert loaded.cfg.normalize == "layernorm"
    assert torch.equal(loaded.encode(x, dense=True), sae.encode(x, dense=True))
    assert torch.equal(loaded(x), sae(x))


def test_layernorm_training_reconstructs_normed_tokens_in_the_loss(tmp_path):
    """One training step's loss is the squared error of the layer-normed tokens (not of the raw ones)."""
    from sae.train import init_sae

    data = scaled_tokens(tmp_path / "d" if (tmp_path / "d").mkdir() is None else tmp_path, n=2000)
    reader = ShardReader.from_dir(data, 256)
    sae = init_sae(reader, cfg(normalize="layernorm"))
    trainer = Trainer(sae, cfg(normalize="layernorm"), total_steps=10)
    x = next(iter(reader))
    normed = sae.token_normalised(x)[0]
    loss, codes, x_hat, _ = trainer._forward(normed)
    assert torch.allclose(loss, (x_hat - normed).pow(2).sum(-1).mean())
    assert torch.allclose(normed.mean(-1), torch.zeros(len(x)), atol=1e-4)
    trainer.train_step(x)
    assert trainer.win["sst"] < float((x.double() - x.double().mean(0)).pow(2).sum())  # accounted in normed space
