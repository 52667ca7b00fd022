"""The demo model: a tiny pixel-space text-to-image model of coloured shapes.

Components are stock diffusers/transformers classes (UNet2DConditionModel, CLIPTextModel, a word-level
PreTrainedTokenizerFast, DDIMScheduler), bundled as `DemoShapesPipeline` so that the model saves and loads
in diffusers layout (`model_index.json` beside one folder per component) like any other pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from backend.demo import shapes
from backend.errors import UnknownWordError

DEMO_DIR = Path(__file__).resolve().parents[2] / "data" / "demo-model"
RESOLUTION = 16
MAX_TOKENS = 16
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 1.5


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the demo vocabulary: [BOS] words [EOS], padded with [PAD]."""
    words = words if words is not None else shapes.vocabulary()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=MAX_TOKENS,
    )


def tokenize(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> torch.Tensor:
    """Token ids [B, MAX_TOKENS]; raises UnknownWordError naming the word and listing the vocabulary."""
    enc = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=False)
    ids = enc["input_ids"]
    for prompt, row in zip(prompts, ids, strict=True):
        if len(row) > tokenizer.model_max_length:
            raise UnknownWordError(
                f"prompt {prompt!r} has {len(row) - 2} words; the demo model takes at most "
                f"{tokenizer.model_max_length - 2}"
            )
        if tokenizer.unk_token_id in row:
            known = set(tokenizer.get_vocab())
            words = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(prompt)
            unknown = sorted({w for w, _ in words if w not in known})
            vocab = " ".join(w for w in sorted(known) if w not in SPECIAL_TOKENS)
            raise UnknownWordError(
                f"unknown word(s) {', '.join(map(repr, unknown))} in prompt {prompt!r}; the demo model knows: {vocab}"
            )
    return torch.tensor(ids, dtype=torch.long)


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPTextModel(cfg)


def build_unet() -> UNet2DConditionModel:
    """Cross-attention at 8x8 and 4x4 (down, mid and up), plain ResNet blocks at 16x16."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )


class DemoShapesPipeline(DiffusionPipeline):
    """Pixel-space text-to-image pipeline of the demo model (images are the 'latents')."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    def encode_prompt(self, prompts: list[str], do_classifier_free_guidance: bool,
                      negative_prompts: list[str] | None = None):
        """(cond, uncond) text states [B, T, D]; uncond is the negative prompts (default: the empty prompt), or None
        without CFG."""
        device = self.text_encoder.device
        ids = tokenize(self.tokenizer, prompts).to(device)
        cond = self.text_encoder(ids).last_hidden_state
        if not do_classifier_free_guidance:
            return cond, None
        empty = tokenize(self.tokenizer, negative_prompts or [""] * len(prompts)).to(device)
        return cond, self.text_encoder(empty).last_hidden_state

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], num_inference_steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE) -> np.ndarray:
        """uint8 images [B, H, W, 3] (the reference loop; backend/models/base.py hooks its own)."""
        from backend.models import base

        model = DemoModel(self)
        return base.to_uint8(model.generate(prompts, seeds, num_inference_steps, guidance_scale))


def new_pipeline() -> DemoShapesPipeline:
    tokenizer = build_tokenizer()
    return DemoShapesPipeline(
        unet=build_unet(),
        text_encoder=build_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=build_scheduler(),
    )


def load_pipeline(path: str | Path = DEMO_DIR, device="cpu", dtype=torch.float32) -> DemoShapesPipeline:
    pipe = DemoShapesPipeline.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    return pipe.to(device)


from backend.models.base import DiffusionModel  # noqa: E402  (base imports nothing from here at import time)


class DemoModel(DiffusionModel):
    """Adapter: pixel space, CFG against the empty prompt, DDIM."""

    family = "demo"
    default_steps = DEFAULT_STEPS
    default_guidance = DEFAULT_GUIDANCE

    def __init__(self, pipe: DemoShapesPipeline, spec: str = "demo"):
        super().__init__(pipe, denoiser=pipe.unet, spec=spec)

    @property
    def default_resolution(self) -> tuple[int, int]:
        size = self.pipe.unet.config.sample_size
        return size, size

    def check_prompts(self, prompts: list[str]) -> None:
        tokenize(self.pipe.tokenizer, list(prompts))  # unknown words and over-long prompts are one-line errors

    def encode_prompts(self, prompts: list[str], cfg: bool, negative: list[str | None] | None = None):
        negatives = None if negative is None else [neg or "" for neg in negative]
        cond, uncond = self.pipe.encode_prompt(list(prompts), cfg, negatives)
        return {"encoder_hidden_states": cond}, ({"encoder_hidden_states": uncond} if cfg else None)

    def initial_latents(self, generators: list[torch.Generator], height: int | None = None,
                        width: int | None = None) -> torch.Tensor:
        h, w = height or self.default_resolution[0], width or self.default_resolution[1]
        noise = [torch.randn((1, 3, h, w), generator=g) for g in generators]
        return torch.cat(noise).to(self.device, self.dtype) * self.scheduler.init_noise_sigma

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)
