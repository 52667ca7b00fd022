"""Real-scale benchmark: the published Stable Diffusion 1.5 UNet (and VAE) architecture at 512 px, random weights
(the configs are written here; nothing is downloaded), on this machine's CPU: time and peak memory of each stage
a GPU user runs (capture, SAE, features pass, analysis with the heat-map replay, one dream iteration).

    python benchmarks/real_scale.py                     # SD 1.5 at 512 px, batch 2, 2 steps
    python benchmarks/real_scale.py --sdxl              # also the SDXL UNet at 1024 px, if memory allows

Each stage runs in its own forked process, so its peak RSS (ru_maxrss) is its own: model weights, activations
and the stage's buffers. The text encoder has CLIP ViT-L/14's width (768, which the UNet's cross-attention
takes) but two layers and a character tokenizer (only the UNet and VAE are the published architectures).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(  # vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048, attention_head_dim=[5, 10, 20], addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True)
LAYER = {"sd15": "up_blocks.1.attentions.1", "sdxl": "up_blocks.0.attentions.1"}


def build_sd15(out: Path) -> Path:
    """Save an SD 1.5-architecture pipeline with random weights at out."""
    import tiny_pipelines as tp
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = tp.clip_tokenizer(out / "_tok", max_len=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=2, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE),
                                   text_encoder=text, tokenizer=tok, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "sd15")
    return out / "sd15"


def build_sdxl(out: Path) -> Path:
    import tiny_pipelines as tp
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = tp.clip_tokenizer(out / "_tok", max_len=77)

    def text(hidden, cls, **kw):
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                                  num_hidden_layers=2, num_attention_heads=hidden // 64, max_position_embeddings=77,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=1, **kw))

    vae = dict(SD15_VAE, sample_size=1024)
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**vae), text_encoder=text(768, CLIPTextModel),
        text_encoder_2=text(1280, CLIPTextModelWithProjection, projection_dim=1280), tokenizer=tok, tokenizer_2=tok,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1))
    pipe.save_pretrained(out / "sdxl")
    return out / "sdxl"


def _stage(name: str, fn, args: tuple, results: dict) -> None:
    """Run fn(*args) in a forked child; record its seconds and peak RSS (GB)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()

    def run():
        t0 = time.perf_counter()
        try:
            extra = fn(*args)
            child.send({"seconds": round(time.perf_counter() - t0, 1),
                        "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                        **(extra or {})})
        except BaseException as exc:  # noqa: BLE001 - reported, not raised, so the other stages still run
            child.send({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})

    proc = ctx.Process(target=run)
    proc.start()
    results[name] = parent.recv() if parent.poll(4 * 3600) else {"error": "no result"}
    proc.join()
    print(f"  {name:<12} {json.dumps(results[name])}", flush=True)


def _capture(cfg, encoders_from: str | None = None):
    from backend.stages.capture import SAEEncoder, capture

    encoders = {cfg.capture.layers[0]: SAEEncoder(encoders_from)} if encoders_from else None
    s = capture(cfg, encoders=encoders, progress=False)
    return {"generations": s.generations}


def _sae(cfg):
    from backend.stages.sae import train_saes

    m = train_saes(cfg.out_dir, cfg.sae, progress=False)
    return {"fvu": round(next(iter(m.values()))["fvu"], 3)}


def _analysis(cfg):
    from backend.stages.analysis import analyze

    s = analyze(cfg.out_dir, cfg.analysis, progress=False)
    return {"examples": s.get("examples")}


def _dream(cfg):
    from backend.interventions.dream import default_config, dream_run

    dcfg = default_config("feature")
    dcfg.opt_steps, dcfg.snapshot_every = 1, 1
    s = dream_run(cfg.out_dir, cfg.capture.layers[0], "feature", 0, dcfg, seeds=[0, 1], progress=False)
    return {"target_steps": s["target_steps"]}


def bench(family: str, model_dir: Path, work: Path, threads: int) -> dict:
    import torch

    from backend.run.config import RunConfig

    torch.set_num_threads(threads)
    prompts = work / "prompts.txt"
    prompts.write_text("a red house\na blue tree\n")
    cfg = RunConfig(name=family, runs_dir=str(work / "runs"), model=str(model_dir), prompts=str(prompts))
    c = cfg.capture
    c.layers, c.images_per_prompt, c.steps, c.batch_size, c.tokens_per_step = [LAYER[family]], 1, 2, 2, 64
    cfg.sae.expansion, cfg.sae.k, cfg.sae.total_tokens, cfg.sae.batch_size = 8, 32, 4096, 256  # 384 tokens captured
    cfg.sae.splice_samples, cfg.sae.record_features = 0, False
    cfg.analysis.examples_top_n, cfg.analysis.plot_top_units = 1, 1
    results: dict = {}
    print(f"{family}: {model_dir.name}, batch 2, 2 steps (PNDM calls the denoiser 3 times), layer {LAYER[family]}")
    _stage("capture", _capture, (cfg,), results)
    _stage("sae", _sae, (cfg,), results)
    _stage("features", _capture, (cfg, str(cfg.out_dir / "sae" / LAYER[family] / "default")), results)
    _stage("analysis", _analysis, (cfg,), results)
    _stage("dream", _dream, (cfg,), results)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdxl", action="store_true", help="also the SDXL UNet at 1024 px")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="difflens-scale-"))
    out = {"load_before": os.getloadavg()}
    try:
        t0 = time.perf_counter()
        model = build_sd15(work)
        print(f"built SD 1.5 architecture in {time.perf_counter() - t0:.0f} s")
        out["sd15"] = bench("sd15", model, work, args.threads)
        if args.sdxl:
            shutil.rmtree(model)
            out["sdxl"] = bench("sdxl", build_sdxl(work), work, args.threads)
    finally:
        out["load_after"] = os.getloadavg()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
