"""ControlNet for SD 1.x / 2.x: a tiny ControlNetModel.from_unet saved and loaded; our loop equals
StableDiffusionControlNetPipeline.__call__; capture through it end to end; bad input refused in one line before
anything is written."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import ROOT
from PIL import Image
from tiny_pipelines import build_controlnet, control_image

from backend.errors import DifflensError
from backend.models import load_model
from backend.models.controlnet import StableDiffusionControlNetModel, with_controlnet
from backend.run.config import RunConfig
from backend.stages.capture import capture, plan

PROMPTS = ["a red cat on the house", "a blue dog in the tree"]
LAYER = "mid_block.attentions.0"


@pytest.fixture(scope="module")
def controlnet_dir(sd_dir, tmp_path_factory):
    return build_controlnet(sd_dir, tmp_path_factory.mktemp("cn") / "controlnet")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two control images: one at the generation size (16x16), one larger of the same aspect ratio (resized)."""
    d = tmp_path_factory.mktemp("control")
    return [control_image(d / "a.png", (16, 16), seed=0), control_image(d / "b.png", (40, 40), seed=1)]


@pytest.fixture(scope="module")
def cn_model(sd_dir, controlnet_dir):
    return with_controlnet(load_model(str(sd_dir)), str(controlnet_dir), scale=0.7)


def pipeline_call(model, images, guidance, negative=None, seeds=(3, 4)):
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(**model.pipe.components, controlnet=model.controlnet)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if negative is None else {"negative_prompt": negative}
    return pipe(PROMPTS, image=[Image.open(p) for p in images], height=16, width=16, num_inference_steps=3,
                guidance_scale=guidance, controlnet_conditioning_scale=0.7, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in seeds], **extra).images.float()


@pytest.mark.parametrize("guidance, negative", [(5.0, None), (5.0, ["a green house", "a red tree"]), (1.0, None)])
def test_our_loop_matches_the_controlnet_pipeline(cn_model, images, guidance, negative):
    paths = [str(p) for p in images]
    ours = cn_model.generate(PROMPTS, [3, 4], n_steps=3, guidance=guidance, negative_prompts=negative,
                             control_images=paths)
    torch.testing.assert_close(ours, pipeline_call(cn_model, images, guidance, negative), atol=1e-5, rtol=1e-5)


def test_the_control_image_steers_the_generation(cn_model, sd_dir, images):
    paths = [str(p) for p in images]
    a = cn_model.generate(PROMPTS, [3, 3], n_steps=3, guidance=5.0, control_images=paths)
    b = cn_model.generate(PROMPTS, [3, 3], n_steps=3, guidance=5.0, control_images=paths[::-1])
    assert (a - b).abs().amax() > 1e-3
    # without control images (interventions, dreams) the adapter is the plain SD model
    plain = load_model(str(sd_dir)).generate(PROMPTS, [3, 3], n_steps=3, guidance=5.0)
    torch.testing.assert_close(cn_model.generate(PROMPTS, [3, 3], n_steps=3, guidance=5.0), plain, atol=0, rtol=0)
    assert (a - plain).abs().amax() > 1e-3


def write_prompts(path, images, **extra):
    rows = [{"prompt": p, "control_image": im.name, **extra} for p, im in zip(PROMPTS, images, strict=True)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def sd_cfg(sd_dir, prompts, runs, name="cn", **capture):
    cfg = RunConfig(name=name, runs_dir=str(runs), model=str(sd_dir), prompts=str(prompts))
    cfg.capture.layers = [LAYER]
    cfg.capture.images_per_prompt, cfg.capture.steps, cfg.capture.tokens_per_step = 1, 3, 4
    cfg.capture.guidance = 5.0
    for k, v in capture.items():
        setattr(cfg.capture, k, v)
    return cfg


def test_capture_through_a_controlnet_end_to_end(sd_dir, controlnet_dir, images, tmp_path):
    """capture -> activity tables and generations rows naming the control images; the run's context loads the model
    with its ControlNet, and generating its generations rows again reproduces the images (what the heat-map replay
    does); a changed control image is a changed run."""
    from backend.analysis.examples import generation_conditions
    from backend.run.context import open_run

    prompts = write_prompts(images[0].parent / "p.jsonl", images, negative="a green house")
    cfg = sd_cfg(sd_dir, prompts, tmp_path / "runs", controlnet=str(controlnet_dir), controlnet_scale=0.7)
    summary = capture(cfg, progress=False)
    assert summary.generations == 2
    root = cfg.out_dir
    gens = pl.read_parquet(root / "tables" / "generations" / "*.parquet").sort("gen_id")
    assert gens["control_image"].to_list() == [str(p) for p in images]
    assert gens["negative_prompt"].to_list() == ["a green house"] * 2
    activity = pl.read_parquet(root / "tables" / "activity" / "**" / "*.parquet", hive_partitioning=True)
    assert activity["layer"].unique().to_list() == [LAYER] and activity["step"].n_unique() == 3
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["config"]["capture"]["controlnet"] == str(controlnet_dir)
    assert set(manifest["identity"]["control_images_digest"]) == {str(p) for p in images}

    ctx = open_run(root)
    assert isinstance(ctx.model, StableDiffusionControlNetModel) and ctx.model.controlnet_scale == 0.7
    again = ctx.model.generate(gens["prompt"].to_list(), gens["seed"].to_list(), ctx.n_steps, ctx.guidance,
                               **generation_conditions(gens))
    recorded = np.stack([np.asarray(Image.open(root / p)) for p in gens["image"]])
    from backend.models.base import to_uint8

    assert np.array_equal(to_uint8(again), recorded)
    capture(cfg, progress=False)  # the same run: resumes (nothing to do)
    control_image(images[0].parent / "a.png", (16, 16), seed=7)  # the same path, another image
    with pytest.raises(DifflensError, match="different config"):
        capture(cfg, progress=False)
    control_image(images[0].parent / "a.png", (16, 16), seed=0)


@pytest.fixture
def bad_inputs(sd_dir, sdxl_dir, controlnet_dir, images, tmp_path):
    """{case: (cfg, message)}: each a capture refused before anything is written."""
    good = write_prompts(images[0].parent / "p.jsonl", images)
    d = images[0].parent
    wide = write_prompts(d / "wide.jsonl", [control_image(d / "wide.png", (32, 16)), images[1]])
    (d / "junk.png").write_text("not an image")
    junk = write_prompts(d / "junk.jsonl", [d / "junk.png", images[1]])
    missing = write_prompts(d / "missing.jsonl", [d / "gone.png", images[1]])
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(PROMPTS) + "\n")
    runs = tmp_path / "runs"
    cn = str(controlnet_dir)
    return {
        "sdxl base": (sd_cfg(sdxl_dir, good, runs, controlnet=cn),
                      f"needs a Stable Diffusion 1.x / 2.x model; {sdxl_dir} is a sdxl model "
                      "(StableDiffusionXLPipeline)"),
        "a unet, not a controlnet": (sd_cfg(sd_dir, good, runs, controlnet=str(sd_dir / "unet")),
                                     "holds a UNet2DConditionModel, not a ControlNetModel"),
        "a pipeline directory": (sd_cfg(sd_dir, good, runs, controlnet=str(sd_dir)), "(that is a pipeline directory)"),
        "wrong aspect ratio": (sd_cfg(sd_dir, wide, runs, controlnet=cn),
                               f"control image {d / 'wide.png'} is 32x16 (width x height) but the generation is 16x16"),
        "unreadable image": (sd_cfg(sd_dir, junk, runs, controlnet=cn), f"{d / 'junk.png'} is not a readable image"),
        "missing image": (sd_cfg(sd_dir, missing, runs, controlnet=cn), f"control image {d / 'gone.png'} not found"),
        "control image without a controlnet": (sd_cfg(sd_dir, good, runs), "but no ControlNet: pass --controlnet"),
        "controlnet without control images": (sd_cfg(sd_dir, plain, runs, controlnet=cn),
                                              f"prompt {PROMPTS[0]!r} has no control image"),
        "negative prompt without cfg": (sd_cfg(sd_dir, plain, runs, negative_prompt="blurry", guidance=1.0),
                                        "but guidance is 1, so CFG is off"),
    }


def test_bad_input_is_one_line_before_anything_is_written(bad_inputs, tmp_path):
    for case, (cfg, message) in bad_inputs.items():
        with pytest.raises(DifflensError) as exc:
            plan(cfg)
        assert message in str(exc.value), case
        assert "\n" not in str(exc.value), case
        with pytest.raises(DifflensError):
            capture(cfg, progress=False)
    assert not (tmp_path / "runs").exists()


def test_the_cli_takes_controlnet_options_and_refuses_a_non_sd_base(sdxl_dir, controlnet_dir, images, tmp_path):
    args = ["--model", str(sdxl_dir), "--prompts", str(images[0].parent / "p.jsonl"), "--runs-dir",
            str(tmp_path), "--name", "x", "--layer", LAYER, "--controlnet", str(controlnet_dir), "--control-image",
            str(images[0]), "--controlnet-scale", "0.5", "--negative-prompt", "blurry"]
    write_prompts(images[0].parent / "p.jsonl", images)
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "capture", *args], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --controlnet needs a Stable Diffusion 1.x / 2.x model; {sdxl_dir} is a sdxl model "
        "(StableDiffusionXLPipeline): drop --controlnet or use an SD 1.x / 2.x model"]
    assert not (tmp_path / "x").exists()


def readme_controlnet_example() -> tuple[list[str], str]:
    """The README's ControlNet command line (args after `python cli.py`) and its example prompt file (jsonl block)."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    (line,) = [ln.strip() for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
               for ln in block.splitlines() if ln.strip().startswith("python cli.py") and "--controlnet" in ln]
    (jsonl,) = re.findall(r"```jsonl\n(.*?)```", readme, flags=re.S)
    return shlex.split(line)[2:], jsonl


@pytest.mark.slow
def test_the_readme_controlnet_example_runs(sd_dir, controlnet_dir, tmp_path):
    """The README's command, in a scratch directory holding a tiny SD pipeline and ControlNet at the paths it names
    and its prompt file with control images; on the CPU, with fewer steps."""
    import shutil

    args, jsonl = readme_controlnet_example()
    option = lambda name: args[args.index(name) + 1]  # noqa: E731
    shutil.copytree(sd_dir, tmp_path / option("--model"))
    shutil.copytree(controlnet_dir, tmp_path / option("--controlnet"))
    prompts = tmp_path / option("--prompts")
    prompts.parent.mkdir(parents=True)
    prompts.write_text(jsonl)
    for i, row in enumerate(json.loads(line) for line in jsonl.splitlines()):
        control_image(prompts.parent / row["control_image"], (32, 32), seed=i)
    quick = ["--device", "cpu", "--dtype", "float32", "--steps", "2", "--images-per-prompt", "1",
             "--tokens-per-step", "4"]
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, *quick], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    gens = pl.read_parquet(tmp_path / "runs" / option("--name") / "tables" / "generations" / "*.parquet")
    relative = Path(option("--prompts")).parent  # recorded as resolved: relative to the cwd, like --prompts
    assert sorted(gens["control_image"].to_list()) == sorted(
        str(relative / json.loads(line)["control_image"]) for line in jsonl.splitlines())
