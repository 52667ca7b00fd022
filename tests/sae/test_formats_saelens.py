"""SAELens checkpoints written by SAELens itself (save_model / save_inference_model) read into difflens SAEs whose
codes and reconstructions equal SAELens's encode / decode on the same inputs."""

import json

import pytest
import torch
from sae_checkpoints import assert_codes_and_reconstructions
from sae_lens import SAE as SAELensSAE
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from safetensors.torch import load_file, save_file

from sae.formats import SAELoadError, read_sae

D, N, K = 16, 64, 4
CLASSES = {"standard": (StandardSAE, StandardSAEConfig), "topk": (TopKSAE, TopKSAEConfig),
           "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}


def inputs() -> torch.Tensor:
    return torch.randn(32, D, generator=torch.Generator().manual_seed(7)) * 2 + 0.5


@torch.no_grad()
def randomise(sae, seed=0):
    """Weights and biases away from their init (non-unit decoder rows, non-zero biases, positive thresholds)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sae.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.startswith("b_") else 0.4))
        if name == "threshold":
            p.copy_(torch.rand(p.shape, generator=g) * 0.5)
    return sae


def saelens_sae(arch, **cfg):
    cls, cfg_cls = CLASSES[arch]
    extra = {"k": K} if arch == "topk" else {}
    return randomise(cls(cfg_cls(d_in=D, d_sae=N, **extra, **cfg))).eval()


def assert_same(ours, theirs, x):
    """Our dense codes and reconstructions equal SAELens's encode and decode."""
    with torch.no_grad():
        acts = theirs.encode(x)
        recon = theirs.decode(acts)
    assert_codes_and_reconstructions(ours, x, acts, recon)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_inference_architectures_match_saelens(tmp_path, arch, apply_b_dec):
    theirs = saelens_sae(arch, apply_b_dec_to_input=apply_b_dec)
    theirs.save_model(tmp_path)
    imported = read_sae(tmp_path)
    assert imported.source_format == "saelens"
    assert imported.original_config == json.loads((tmp_path / "cfg.json").read_text())
    assert imported.sae.cfg.architecture == {"standard": "relu"}.get(arch, arch)
    assert_same(imported.sae, SAELensSAE.load_from_disk(tmp_path), inputs())


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_per_token_normalisations_match_saelens(tmp_path, norm, arch):
    saelens_sae(arch, normalize_activations=norm).save_model(tmp_path)
    imported = read_sae(tmp_path)
    assert imported.sae.cfg.normalize == {"layer_norm": "layernorm"}.get(norm, "norm_rescale")
    assert_same(imported.sae, SAELensSAE.load_from_disk(tmp_path), inputs())


def test_topk_training_checkpoint_with_decoder_norm_rescaling(tmp_path):
    """TopKTrainingSAE.save_model keeps rescale_acts_by_decoder_norm and unfolded weights; SAELens's inference
    TopKSAE applies the rescaling at encode and decode."""
    train = randomise(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=True)))
    train.save_model(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["rescale_acts_by_decoder_norm"] is True
    assert_same(read_sae(tmp_path).sae, SAELensSAE.load_from_disk(tmp_path).eval(), inputs())


def test_batchtopk_training_and_inference_checkpoints(tmp_path):
    """A batchtopk training checkpoint holds the scalar topk_threshold; SAELens saves it for inference as jumprelu
    (batchtopk_sae.py). Both read to the codes of SAELens's inference SAE."""
    train = randomise(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=float(K),
                                                                      rescale_acts_by_decoder_norm=True)))
    train.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    train.save_model(tmp_path / "train")
    train.save_inference_model(tmp_path / "inference")
    reference = SAELensSAE.load_from_disk(tmp_path / "inference").eval()
    assert isinstance(reference, JumpReLUSAE)
    from_train = read_sae(tmp_path / "train")
    assert from_train.sae.cfg.architecture == "batchtopk" and from_train.sae.cfg.k == K
    assert_same(from_train.sae, reference, inputs())
    assert_same(read_sae(tmp_path / "inference").sae, reference, inputs())


def test_expected_average_scaling_factor_is_folded_from_the_scaler_file(tmp_path):
    saelens_sae("topk", normalize_activations="expected_average_only_in").save_model(tmp_path)
    with pytest.raises(SAELoadError, match="activation_scaler.json"):
        read_sae(tmp_path)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5, "has_whitening": False}))
    reference = SAELensSAE.load_from_disk(tmp_path)
    reference.fold_activation_norm_scaling_factor(2.5)  # what SAELens's trainer does before its final save
    imported = read_sae(tmp_path)
    assert imported.original_config["activation_scaler.json"]["scaling_factor"] == 2.5
    assert_same(imported.sae, reference, inputs())


def test_pre_6_topk_config_reads_like_its_6_form(tmp_path):
    saelens_sae("topk").save_model(tmp_path)
    reference = SAELensSAE.load_from_disk(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    old = {"d_in": D, "d_sae": N, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "hook_point": "blocks.0.hook_resid_pre", "normalize_activations": False, "dtype": cfg["dtype"]}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    imported = read_sae(tmp_path)
    assert imported.sae.cfg.layer == "blocks.0.hook_resid_pre"
    assert_same(imported.sae, reference, inputs())


def test_bad_checkpoints_are_refused_in_one_line(tmp_path):
    saelens_sae("standard").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"architecture": "gated"}))
    with pytest.raises(SAELoadError, match="architecture 'gated' is not supported") as err:
        read_sae(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"normalize_activations": "covariance_whitening"}))
    with pytest.raises(SAELoadError, match="fold_activation_whitening"):
        read_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    w["W_dec"][3, 2] = float("nan")
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(SAELoadError, match="'W_dec' has NaN or inf"):
        read_sae(tmp_path)
    del w["b_enc"]
    w["W_dec"][3, 2] = 0.0
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(SAELoadError, match="no tensor 'b_enc'"):
        read_sae(tmp_path)
