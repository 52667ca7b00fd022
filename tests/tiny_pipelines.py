"""Tiny random-weight pipelines of every supported family, built from configs and saved locally.

Nothing is downloaded: tokenizers are built from a vocabulary written here.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

WORDS = "a photo of cat dog red blue green house tree on the in".split()


def clip_tokenizer(dirpath: Path, max_len: int = 16):
    """A CLIPTokenizer over single characters (no merges), written to dirpath."""
    from transformers import CLIPTokenizer

    dirpath.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,!?'":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (dirpath / "vocab.json").write_text(json.dumps(vocab))
    (dirpath / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(dirpath / "vocab.json"), str(dirpath / "merges.txt"), model_max_length=max_len)


def word_tokenizer(max_len: int = 16):
    """A word-level fast tokenizer with T5-like specials (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_len)


def clip_text(vocab_size: int, hidden: int = 32, projection: bool = False, max_len: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=max_len, projection_dim=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def vae(**config):
    """A two-level VAE (8x8 latents of 16 px images, 4 channels); config adds or overrides AutoencoderKL arguments
    (SD3 / FLUX: shift_factor, scaling_factor, sample_size)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(dict(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4,
                                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                 norm_num_groups=8, sample_size=16) | config))


def unet(cross_dim: int, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    kw = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
              attention_head_dim=4, norm_num_groups=8)
    if sdxl:
        kw |= dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    return UNet2DConditionModel(**kw)


def build_sd(root: Path, scheduler: str = "ddim", v_prediction: bool = False) -> Path:
    """A tiny StableDiffusionPipeline saved to root/sd; returns its path."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    tok = clip_tokenizer(root / "_tok_sd")
    kind = "v_prediction" if v_prediction else "epsilon"
    sched = (DDIMScheduler(prediction_type=kind, clip_sample=False, set_alpha_to_one=False)
             if scheduler == "ddim" else EulerDiscreteScheduler(prediction_type=kind))
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip_text(len(tok)), tokenizer=tok,
                                   unet=unet(32), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out = root / f"sd-{scheduler}"
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def build_sdxl(root: Path, turbo: bool = False) -> Path:
    """A tiny StableDiffusionXLPipeline (turbo: Euler-ancestral, trailing spacing) saved under root."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    tok = clip_tokenizer(root / "_tok_xl1")
    tok2 = clip_tokenizer(root / "_tok_xl2")
    sched = (EulerAncestralDiscreteScheduler(timestep_spacing="trailing") if turbo
             else EulerDiscreteScheduler(steps_offset=1))
    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=clip_text(len(tok)), text_encoder_2=clip_text(len(tok2), projection=True),
        tokenizer=tok, tokenizer_2=tok2, unet=unet(64, sdxl=True), scheduler=sched,
    )
    out = root / ("sdxl-turbo" if turbo else "sdxl")
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def build_pixart(root: Path) -> Path:
    """A tiny PixArtAlphaPipeline (DiT denoiser, T5 encoder) saved under root."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    tok = word_tokenizer()
    t5 = t5_encoder(len(tok))
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5, vae=vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    out = root / "pixart"
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def build_controlnet(sd_dir: Path, out: Path) -> Path:
    """A tiny ControlNetModel made from the tiny SD pipeline's UNet (ControlNetModel.from_unet) and saved to out.

    Its conditioning embedding downsamples by the VAE's factor (2 here, 8 in real SD), so a control image at the
    generation size meets the latents; its zero-initialised output convolutions get random weights, so it changes
    the image (a fresh ControlNet adds nothing)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(str(sd_dir / "unet"))
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.1)
    net.save_pretrained(str(out), safe_serialization=True)
    return out


def control_image(path: Path, size: tuple[int, int] = (16, 16), seed: int = 0) -> Path:
    """A random RGB PNG control image (width, height) written to path."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def build_sd3(root: Path) -> Path:
    """A tiny StableDiffusion3Pipeline (MMDiT denoiser: joint blocks, the last one context-pre-only; two CLIP
    encoders with projection and a T5; flow-matching Euler with SD3's shift 3) saved under root. Sizes follow
    diffusers' own SD3 pipeline tests: the CLIP states (2 x 32, concatenated) are cut to the T5 width (32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok, tok2 = clip_tokenizer(root / "_tok_sd3_1"), clip_tokenizer(root / "_tok_sd3_2")
    tok3 = word_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5035), text_encoder=clip_text(len(tok), projection=True),
        tokenizer=tok, text_encoder_2=clip_text(len(tok2), projection=True), tokenizer_2=tok2,
        text_encoder_3=t5_encoder(len(tok3)), tokenizer_3=tok3,
    )
    out = root / "sd3"
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def build_flux(root: Path, guidance_distilled: bool = True) -> Path:
    """A tiny FluxPipeline saved under root: double-stream `transformer_blocks.N` and single-stream
    `single_transformer_blocks.N`, CLIP (pooled) + T5 (sequence), 2x2-packed latents (a 16 px image: 8x8 latents,
    a 4x4 grid of packed tokens; 32 px: 8x8). guidance_distilled: FLUX.1-dev's guidance embedding and dynamic
    shift; else FLUX.1-schnell's (no guidance input, fixed shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tok, tok2 = clip_tokenizer(root / "_tok_flux"), word_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_distilled)
    sched = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                             max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
             if guidance_distilled else FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe = FluxPipeline(transformer=transformer, scheduler=sched,
                        vae=vae(shift_factor=0.1159, scaling_factor=0.3611, sample_size=32),
                        text_encoder=clip_text(len(tok)), tokenizer=tok,
                        text_encoder_2=t5_encoder(len(tok2)), tokenizer_2=tok2)
    out = root / ("flux-dev" if guidance_distilled else "flux-schnell")
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


# The schedulers the real checkpoints ship (their scheduler/scheduler_config.json, keys that matter), so the
# equivalence tests run our loop with each family's real default and not only the one a tiny pipeline was built
# with. SD 1.5 ships PNDM (PLMS, skip_prk_steps: n + 1 denoiser calls), SD 2.1 DDIM with v-prediction, SDXL-base
# Euler with "leading" spacing (its initial noise scale depends on the step count), SDXL-Turbo Euler-ancestral with
# "trailing" spacing, PixArt-alpha DPM-Solver++ (2nd order multistep).
_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 trained_betas=None)
REAL_SCHEDULERS = {
    "sd15-pndm": ("sd_dir", "PNDMScheduler",
                  _SD_BETAS | dict(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, clip_sample=False)),
    "sd21-ddim-v": ("sd_dir", "DDIMScheduler",
                    _SD_BETAS | dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                     prediction_type="v_prediction", skip_prk_steps=True)),
    "sdxl-base-euler-leading": ("sdxl_dir", "EulerDiscreteScheduler",
                                _SD_BETAS | dict(interpolation_type="linear", prediction_type="epsilon",
                                                 steps_offset=1, timestep_spacing="leading",
                                                 use_karras_sigmas=False)),
    "sdxl-turbo-euler-a-trailing": ("sdxl_turbo_dir", "EulerAncestralDiscreteScheduler",
                                    _SD_BETAS | dict(prediction_type="epsilon", steps_offset=1,
                                                     timestep_spacing="trailing")),
    "sdxl-turbo-euler-trailing": ("sdxl_turbo_dir", "EulerDiscreteScheduler",
                                  _SD_BETAS | dict(prediction_type="epsilon", steps_offset=1,
                                                   timestep_spacing="trailing")),
    "pixart-dpm-solver": ("pixart_dir", "DPMSolverMultistepScheduler",
                          dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                               trained_betas=None, algorithm_type="dpmsolver++", solver_order=2,
                               solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                               prediction_type="epsilon", thresholding=False, timestep_spacing="linspace",
                               steps_offset=0, use_karras_sigmas=False, variance_type=None)),
}


def with_scheduler(src: Path, dst: Path, class_name: str, config: dict) -> Path:
    """A copy of the pipeline directory src at dst (components linked, not copied) with another scheduler."""
    import diffusers

    dst.mkdir(parents=True, exist_ok=True)
    for part in src.iterdir():
        if part.name not in ("scheduler", "model_index.json") and not (dst / part.name).exists():
            (dst / part.name).symlink_to(part.resolve(), target_is_directory=part.is_dir())
    index = json.loads((src / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", class_name]
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    getattr(diffusers, class_name).from_config(config).save_pretrained(str(dst / "scheduler"))
    return dst
