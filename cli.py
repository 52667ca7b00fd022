"""difflens command line: each command parses options, calls one backend function and says where results went."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Open up diffusion models with sparse autoencoders and channel analysis.")
demo_app = typer.Typer(no_args_is_help=True, help="Train, sample and evaluate the shipped demo model.")
app.add_typer(demo_app, name="demo-model")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="`demo` or a local diffusers pipeline directory.")]
DeviceOpt = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[str, typer.Option(help="float32, float16 or bfloat16 (half precision needs a GPU).")]


def user_errors(fn):
    """Turn a DifflensError into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from backend.errors import DifflensError

        try:
            return fn(*args, **kwargs)
        except DifflensError as exc:
            typer.secho(f"error: {exc}", err=True, fg="red")
            raise typer.Exit(1) from None

    return wrapper


def _load(model: str, device: str, dtype: str):
    from backend.models import load_model, parse_dtype

    return load_model(model, device=device, dtype=parse_dtype(dtype))


@app.command()
@user_errors
def layers(
    model: ModelOpt = "demo",
    all_modules: Annotated[bool, typer.Option("--all", help="Every submodule, not just blocks.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """List hook points: name, module type, output shape, channels; * marks the usual SAE targets."""
    from backend.layers import hook_points

    points = hook_points(_load(model, device, dtype), all_modules=all_modules)
    width = max(len(p.name) for p in points)
    typer.echo(f"  {'layer':<{width}}  {'module':<28} {'output shape':<16} channels")
    for p in points:
        mark = "*" if p.sae_target else " "
        shape = "x".join(map(str, p.shape))
        typer.echo(f"{mark} {p.name:<{width}}  {p.module_type:<28} {shape:<16} {p.channels}")
    typer.echo("* usual SAE targets (attention / transformer blocks)")


@demo_app.command("train")
@user_errors
def demo_train(
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 3000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    out_dir: Annotated[Path, typer.Option(help="Where the trained pipeline goes.")] = Path("data/demo-model"),
    work_dir: Annotated[Path, typer.Option(help="Checkpoints; a rerun resumes from here.")] = Path(
        "runs/demo-model-train"
    ),
    threads: Annotated[int, typer.Option(help="torch threads (0: default).")] = 0,
) -> None:
    """Train the demo model from scratch (resumes from --work-dir after an interruption)."""
    from backend.demo_train import DemoTrainConfig, train_demo_model

    out = train_demo_model(DemoTrainConfig(steps=steps, batch_size=batch_size, lr=lr, out_dir=str(out_dir),
                                           work_dir=str(work_dir), threads=threads))
    typer.echo(f"demo model saved to {out}")


@demo_app.command("sample")
@user_errors
def demo_sample(
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("runs/demo/grid.png"),
    n: Annotated[int, typer.Option(help="Number of samples.")] = 24,
    seed: Annotated[int, typer.Option(help="First seed; prompts are drawn with it too.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the model's).")] = None,
    guidance: Annotated[float | None, typer.Option(help="CFG scale; <= 1 turns CFG off.")] = None,
    model: ModelOpt = "demo", device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32",
) -> None:
    """Write a labelled grid of demo-model samples."""
    from backend.demo_eval import sample_grid

    path = sample_grid(_load(model, device, dtype), out, n=n, seed=seed, steps=steps, guidance=guidance)
    typer.echo(f"wrote {path}")


@demo_app.command("evaluate")
@user_errors
def demo_evaluate(
    n: Annotated[int, typer.Option(help="Number of generated images (360 = every attribute combination).")] = 360,
    out: Annotated[Path | None, typer.Option(help="JSON report to write.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="CFG scale.")] = None,
    model: ModelOpt = "demo", device: DeviceOpt = "cpu", dtype: DtypeOpt = "float32",
) -> None:
    """Score generated images against their prompts: per-attribute accuracy."""
    from backend.demo_eval import evaluate

    report = evaluate(_load(model, device, dtype), n=n, steps=steps, guidance=guidance, out=out)
    typer.echo(f"{report['n_images']} images, {report['steps']} steps, guidance {report['guidance']}")
    for attr, acc in report["accuracy"].items():
        typer.echo(f"  {attr:<11} {acc:6.1%}")
    if out:
        typer.echo(f"wrote {out}")


@demo_app.command("prompts")
@user_errors
def demo_prompts(
    out: Annotated[Path, typer.Option(help="JSONL file to write.")] = Path("data/prompts/demo.jsonl"),
    group_by: Annotated[str, typer.Option(help="Attribute that names each prompt's group.")] = "colour",
) -> None:
    """Write the balanced demo prompt set (every attribute combination once) as JSONL."""
    from backend import shapes
    from backend.errors import DifflensError

    if group_by not in shapes.ATTRIBUTES:
        raise DifflensError(f"unknown attribute {group_by!r}; choose one of {', '.join(shapes.ATTRIBUTES)}")
    records = shapes.prompt_records(shapes.all_specs(), group_by=group_by)
    shapes.write_jsonl(records, out)
    typer.echo(f"wrote {len(records)} prompts to {out}")


@app.command()
@user_errors
def prompts(file: Annotated[Path, typer.Argument(help="A .txt or .jsonl prompt file.")]) -> None:
    """Check a prompt file and summarise it (count per group)."""
    from collections import Counter

    from backend.prompts import load_prompts

    records = load_prompts(file)
    groups = Counter(r.group for r in records)
    typer.echo(f"{file}: {len(records)} prompts in {len(groups)} group(s)")
    for g, c in sorted(groups.items()):
        typer.echo(f"  {g}: {c}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    app()
