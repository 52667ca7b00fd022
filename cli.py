"""difflens command line: each command parses options, calls one backend function and says where results went."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from backend.run.config import DreamConfig
from backend.run.options import Opt, config_options

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Open up diffusion models with sparse autoencoders and channel analysis.")
demo_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Train, sample and evaluate the shipped demo model.")
app.add_typer(demo_app, name="demo-model")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="`demo` or a local diffusers pipeline directory.")]
DeviceOpt = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[str, typer.Option(help="float32, float16 or bfloat16 (bfloat16 also runs on a CPU; float16 "
                                            "there is slow).")]
RunDeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="torch device for the model: cpu, cuda, cuda:1 ... (cuda is this process's GPU under torchrun / "
                     "srun). [default: the run's]")]
RunDtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", help="Model dtype: float32, float16 or bfloat16. [default: the run's]")]


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

    _check_device(device, dtype)
    return load_model(model, device=device, dtype=parse_dtype(dtype))


def _check_device(device: str, dtype: str, whose: str = "") -> None:
    """A one-line error before anything loads: an unknown dtype, or a device this machine does not have."""
    from backend.models import parse_dtype
    from backend.run.distributed import check_device

    parse_dtype(dtype)
    check_device(device, whose)


@app.command()
@user_errors
def layers(
    model: ModelOpt = "demo",
    all_modules: Annotated[bool, typer.Option("--all", help="Every submodule, not just blocks.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """List hook points: name, module type, output shape, channels; * marks the usual SAE targets."""
    from backend.models.layers import hook_points

    points = hook_points(_load(model, device, dtype), all_modules=all_modules)
    width = max(len(p.name) for p in points)
    typer.echo(f"  {'layer':<{width}}  {'module':<28} {'output shape':<16} channels")
    for p in points:
        mark = "*" if p.sae_target else " "
        shape = "x".join(map(str, p.shape))
        typer.echo(f"{mark} {p.name:<{width}}  {p.module_type:<28} {shape:<16} {p.channels}")
    typer.echo("* usual SAE targets (attention / transformer blocks)")


ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="A run.toml (configs/demo.toml documents every key); options given here win over it.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Any config key: --set sae.lr=1e-3 --set analysis.pool=max (see configs/demo.toml).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace what differs (a run of another config, an SAE trained "
                                                 "with other settings) instead of refusing.")]
RunOpt = Annotated[Path, typer.Option(help="Run directory.")]
LayerOpt = Annotated[list[str] | None, typer.Option("--layer", "-l", help="Layer; repeat for several.")]
SAENameOpt = Annotated[str | None, typer.Option(
    "--name", help="The id of the SAE to train (sae/<layer>/<id>/, unit kind feature.<id>), with [sae]'s settings "
                   "changed by [sae.variants.<id>] if configured. [default: every configured SAE: default and the "
                   "variants]")]

RUN_OPTIONS = (Opt("", ["name", "runs_dir", "model", "prompts", "device", "dtype", "images"]),
               Opt("capture", rename={"layers": "layer"}))


def _overrides(overrides: dict, sets: list[str] | None) -> dict:
    from backend.run.config import parse_set

    return {**parse_set(sets), **{k: v for k, v in overrides.items() if v is not None}}


def _new_run_config(config: Path | None, overrides: dict, sets: list[str] | None):
    """Commands that make or resume a run (capture, run-all): defaults < --config < options, and when the run
    already exists its saved config joins the rule (defaults < saved < --config < options), so a resumed run keeps
    its device, dtype and settings unless told otherwise."""
    from backend.run.config import resolve
    from backend.run.context import open_run
    from backend.run.manifest import is_run

    given = _overrides(overrides, sets)
    cfg = resolve(file=config, overrides=given)
    return open_run(cfg.out_dir).resolve(config, given) if is_run(cfg.out_dir) else cfg


def _run_context(run: Path, config: Path | None = None, overrides: dict | None = None, sets=None, **open_kw):
    """Commands that act on a run: defaults < the run's saved config < --config < options."""
    from backend.run.context import open_run

    ctx = open_run(run, **open_kw)
    return ctx, ctx.resolve(config, _overrides(overrides or {}, sets))


def _model_run_context(run: Path, device: str | None, dtype: str | None, config: Path | None = None,
                       overrides: dict | None = None, sets=None, loads: bool = True):
    """_run_context for a command that runs the run's model: on the run's device and dtype unless --device /
    --dtype say otherwise. Checked here, before anything loads: options always; the run's own device when the
    command will load the model (`loads`; a stage that may have nothing left to do loads it only when needed)."""
    ctx, cfg = _run_context(run, config, overrides, sets, device=device, dtype=dtype)
    if loads or device or dtype:
        _check_device(ctx.device, ctx.dtype, "" if device else "the run's device")
    return ctx, cfg


def _print_capture(summary) -> None:
    typer.echo(f"captured {summary.generations} generations into {summary.out_dir} "
               f"({summary.batches_run} batches run, {summary.batches_skipped} already done, "
               f"{summary.seconds:.1f} s)")
    for layer, n in summary.token_counts.items():
        typer.echo(f"  {layer}: {n:,} token vectors in {summary.out_dir}/activations/{layer}/")


def _print_saes(run: Path, results: dict) -> None:
    for name, m in results.items():  # name: the layer (its default SAE) or layer:sae_id
        layer, _, sae_id = name.partition(":")
        splice = f", loss recovered {m['frac_loss_recovered']:.1%}" if "frac_loss_recovered" in m else ""
        typer.echo(f"  SAE {name}: FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, dead {m['dead_frac']:.1%}{splice} "
                   f"-> {run}/sae/{layer}/{sae_id or 'default'}/")


def _next_steps(out_dir: Path) -> None:
    typer.echo("\nnext:")
    typer.echo(f"  python cli.py query {out_dir} \"SELECT layer, unit, avg(mean) AS mean FROM activity "
               "GROUP BY ALL ORDER BY mean DESC LIMIT 10\"")
    typer.echo(f"  ls {out_dir}/images {out_dir}/media")
    if (out_dir / "tables" / "concept_summary.parquet").is_file():
        typer.echo(f"  python cli.py query {out_dir} \"SELECT * FROM concept_summary\"")


@app.command()
@user_errors
def query(
    run: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/demo.")],
    sql: Annotated[str, typer.Argument(help="DuckDB SQL; every table of the run is a view (activity, ...).")],
    limit: Annotated[int, typer.Option(help="Rows to print at most.")] = 50,
) -> None:
    """Run DuckDB SQL over a run's tables and print the result."""
    import duckdb

    from backend.errors import DifflensError
    from backend.run.query import connect, table_sources

    con = connect(run)
    try:
        rel = con.sql(sql)
    except duckdb.Error as exc:
        tables = ", ".join(table_sources(run)) or "none yet"
        raise DifflensError(f"{str(exc).splitlines()[0]} (tables of this run: {tables})") from exc
    if rel is None:
        return
    rel.show(max_rows=limit, max_width=200)


@app.command()
@user_errors
@config_options(*RUN_OPTIONS)
def capture(
    overrides: dict, config: ConfigOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False,
    sae: Annotated[list[str] | None, typer.Option(
        help="LAYER=PATH of a trained SAE (the layer's default SAE, kind feature), or LAYER:ID=PATH (another SAE "
             "of the layer, kind feature.ID): also record its feature activity (on a finished run: only that, for "
             "the SAEs whose activity the run does not hold yet); repeat for several.")] = None,
) -> None:
    """Generate images for a prompt set and record per-timestep activity of the chosen layers."""
    from backend.stages.capture import capture_with_saes

    cfg = _new_run_config(config, overrides, set_)
    _check_device(cfg.device, cfg.dtype)
    summary = capture_with_saes(cfg, sae, overwrite=overwrite)
    _print_capture(summary)
    _next_steps(summary.out_dir)


@app.command("run-all")
@user_errors
@config_options(*RUN_OPTIONS, Opt("sae", ["architecture", "expansion", "k", "total_tokens"], prefix="sae-"),
                Opt("analysis", ["top_k_channels", "examples_top_n"], prefix="analysis-"),
                Opt("interventions", ["enabled", "top_units", "dream_iterations"], prefix="interventions-"))
def run_all(overrides: dict, config: ConfigOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Run every stage (capture, SAE training, feature recording, analysis, interventions) on the demo model or a
    config."""
    from backend.stages.pipeline import run_all as run_pipeline

    cfg = _new_run_config(config, overrides, set_)
    _check_device(cfg.device, cfg.dtype)
    summary = run_pipeline(cfg, overwrite=overwrite)
    _print_capture(summary.stages["capture"])
    _print_saes(summary.out_dir, summary.stages.get("sae", {}))
    if "analysis" in summary.stages:
        typer.echo("analysis:")
        _print_analysis(summary.stages["analysis"])
    if "interventions" in summary.stages:
        typer.echo("interventions:")
        _print_interventions(summary.out_dir, summary.stages["interventions"])
    typer.echo(f"run directory: {summary.out_dir} (manifest.json, images/, activations/, sae/, tables/, media/)")
    _next_steps(summary.out_dir)


@app.command("train-sae")
@user_errors
@config_options(Opt("sae", ["layers", "architecture", "expansion", "k", "total_tokens", "batch_size", "lr",
                            "splice_samples"], rename={"layers": "layer"}))
def train_sae(overrides: dict, run: RunOpt = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None,
              overwrite: OverwriteOpt = False, device: RunDeviceOpt = None, dtype: RunDtypeOpt = None,
              name: SAENameOpt = None) -> None:
    """Train an SAE per captured layer (resumes from its checkpoint); writes sae/<layer>/<id>/ and
    tables/sae_training."""
    from backend.stages.sae import train_saes

    ctx, cfg = _model_run_context(run, device, dtype, config, overrides, set_, loads=False)
    _print_saes(run, train_saes(ctx, cfg.sae, overwrite=overwrite, sae_ids=[name] if name else None))


@app.command("import-sae")
@user_errors
def import_sae(
    path: Annotated[Path, typer.Argument(help="Directory of the SAE checkpoint.")],
    layer: Annotated[str, typer.Option("--layer", "-l", help="The run's layer the SAE was trained on.")],
    run: RunOpt = Path("runs/demo"),
    name: Annotated[str, typer.Option(help="The SAE's id in the run (sae/<layer>/<id>/; unit kind feature.<id>, or "
                                           "feature for `default`).")] = "default",
    overwrite: Annotated[bool, typer.Option(help="Replace an SAE of the same id (its feature activity and "
                                                 "analysis are redone).")] = False,
) -> None:
    """Copy an SAE checkpoint into a run as one of its layer's SAEs (our format, with its provenance in cfg.json)."""
    from backend.stages.sae_import import import_sae as run_import

    r = run_import(run, path, layer, name, overwrite=overwrite)
    typer.echo(f"imported {path} ({r['source_format']}, {r['d_in']} -> {r['n_latents']} latents) as SAE "
               f"{r['sae_id']!r} of {layer} (kind {r['kind']}) -> {r['dir']}/"
               + (" (replaced; its features and analysis are stale)" if r["replaced"] else ""))
    typer.echo(f"next: python cli.py capture --runs-dir {run.parent} --name {run.name} "
               f"--sae {layer}:{r['sae_id']}={r['dir']}  (then python cli.py analyze --run {run})")


@app.command("export-sae")
@user_errors
def export_sae(
    run: Annotated[Path, typer.Option(help="Run directory with trained SAEs.")] = Path("runs/demo"),
    layer: LayerOpt = None,
    format: Annotated[str, typer.Option("--format", help="Target format: saelens.")] = "saelens",
    out: Annotated[Path | None, typer.Option(help="Output directory (default: sae/<layer>/<id>/<format>/).")] = None,
    name: Annotated[str, typer.Option(help="The id of the SAE to export (of each layer).")] = "default",
) -> None:
    """Export trained SAEs for other tools (SAELens: `SAE.load_from_disk(dir)`)."""
    from backend.stages.sae import export_saes

    for exported, path in export_saes(run, layer or None, format, out, sae_id=name).items():
        typer.echo(f"{exported}: {path}")


def _print_analysis(summary: dict) -> None:
    for name, p in (summary.get("profiles") or {}).items():
        typer.echo(f"  {name}: {p['units']} units ({p['dead']} dead, {p['dense']} dense), {p['peaks']} peaks")
    for note in summary.get("pending", []):
        typer.echo(f"  pending: {note}")
    rows = (summary.get("concepts") or {}).get("summary", [])
    if rows:
        typer.echo(f"  {'layer':<28} {'kind':<8} {'mean best AUROC':>16} {'shape-unit localisation':>24} "
                   f"{'best localising unit':>21}")
    for r in rows:
        loc = "-" if r["localisation"] is None else f"{r['localisation']:.1%}"
        best = ("-" if r.get("best_localisation") is None
                else f"{r['best_localisation']:.1%} (#{r['best_localising_unit']})")
        typer.echo(f"  {r['layer']:<28} {r['kind']:<8} {r['mean_best_auroc']:>16.3f} {loc:>24} {best:>21}")
    _print_classes(summary.get("classes") or {})
    _print_labels(summary.get("labels") or {})
    typer.echo(f"tables: {summary['out_dir']}/tables (units, profiles, peaks, examples, frequencies, comparisons, "
               f"concepts, localisation, concept_summary); figures: {summary['out_dir']}/media/")


def _print_classes(classes: dict) -> None:
    """An image-classifier run's best unit per class, scored out of sample (class_best)."""
    for name, c in classes.items():
        if isinstance(c, dict) and "mean_best_auroc_test" in c:
            typer.echo(f"  {name}: best unit per class (chosen on half the images), held-out AUROC mean "
                       f"{c['mean_best_auroc_test']:.3f}, min {c['min_best_auroc_test']:.3f} over {c['classes']} "
                       "classes (tables class_scores, class_best)")


def _print_labels(labels: dict) -> None:
    """The labels pass: units labelled, and out-of-sample concept recovery beside the half it was chosen on."""
    for name, p in labels.items():
        if not isinstance(p, dict):
            continue
        line = f"  {name}: {p['labelled']} units labelled"
        if p.get("auroc_oos") is not None:
            line += (f"; out-of-sample concept recovery {p['auroc_oos']:.3f} (on the choosing half "
                     f"{p['auroc_choose']:.3f}; split by {p['oos_split']})")
        typer.echo(line)


@app.command()
@user_errors
@config_options(Opt("analysis", ["top_k_channels", "examples_top_n", "pool", "peaks_top_n", "device"]))
def analyze(overrides: dict, run: RunOpt = Path("runs/demo"), config: ConfigOpt = None, set_: SetOpt = None,
            dtype: RunDtypeOpt = None) -> None:
    """Profiles, peaks, top examples with heat-maps, group frequencies and comparisons, concept recovery, plots."""
    from backend.stages.analysis import analyze as run_analysis

    ctx, cfg = _run_context(run, config, overrides, set_)
    # the heat-map replay's model: on analysis.device (--device, saved with the run's [analysis]) else the run's
    ctx, _ = _model_run_context(run, cfg.analysis.device or None, dtype, loads=False)
    _print_analysis(run_analysis(ctx, cfg.analysis))


@app.command()
@user_errors
@config_options(Opt("analysis", ["compare_multiplier", "compare_pseudo_count"], rename={
    "compare_multiplier": "multiplier", "compare_pseudo_count": "pseudo_count"}))
def compare(
    overrides: dict,
    group_a: Annotated[str, typer.Argument(help="Prompt group whose distinctive units are wanted.")],
    group_b: Annotated[str, typer.Argument(help="Prompt group to compare against (same seeds).")],
    run: RunOpt = Path("runs/demo"),
    top: Annotated[int, typer.Option(help="Units to print per layer and kind.")] = 10,
) -> None:
    """Rank units by how much more often they fire for group A's prompts than for group B's (log-odds ratio)."""
    from backend.analysis.compare import compare_run

    ctx, cfg = _run_context(run, overrides=overrides)
    ranked, png = compare_run(ctx, group_a, group_b, cfg.analysis)
    multiplier = cfg.analysis.compare_multiplier
    for (layer, kind), rows in ranked.group_by(["layer", "kind"], maintain_order=True):
        typer.echo(f"{layer} / {kind}: {len(rows)} units with freq_{group_a} > {multiplier:g} x freq_{group_b}")
        typer.echo(f"  {'rank':>4} {'unit':>6} {'freq_' + group_a:>12} {'freq_' + group_b:>12} {'ratio':>8} "
                   f"{'log-odds':>9}")
        for r in rows.head(top).iter_rows(named=True):
            typer.echo(f"  {r['rank']:>4} {r['unit']:>6} {r['freq_a']:>12.3f} {r['freq_b']:>12.3f} "
                       f"{r['ratio']:>8.2f} {r['score']:>9.2f}")
    if ranked.is_empty():
        typer.echo(f"no unit fires more than {multiplier:g}x as often for {group_a} as for {group_b}")
    typer.echo(f"histogram: {png}")


@app.command()
@user_errors
@config_options(Opt("analysis", ["plot_top_units"], rename={"plot_top_units": "units"}))
def plots(overrides: dict, run: RunOpt = Path("runs/demo")) -> None:
    """Write activity-profile figures (PNG, peaks marked) of the top units of an analysed run."""
    from backend.analysis.plots import write_run_plots

    ctx, cfg = _run_context(run, overrides=overrides)
    paths = write_run_plots(ctx, cfg.analysis)
    typer.echo(f"wrote {len(paths)} figures to {run}/media/plots/")


@app.command("compare-saes")
@user_errors
def compare_saes(
    run: RunOpt = Path("runs/demo"),
    layer: Annotated[str, typer.Option("--layer", "-l", help="The layer whose SAEs to compare.")] = "",
    saes: Annotated[str, typer.Option(help="SAE ids to compare, comma-separated (at least two). [default: every "
                                           "SAE of the layer]")] = "",
    samples: Annotated[int | None, typer.Option(help="Token vectors in the fixed sample the metrics are measured "
                                                     "on. [default: 65536]")] = None,
    splice_samples: Annotated[int | None, typer.Option(help="Generations for the splice test (loss recovered); 0: "
                                                            "skip it. [default: the run's sae.splice_samples]")] = None,
    device: RunDeviceOpt = None,
) -> None:
    """Compare a layer's SAEs: FVU, L0, dead/dense, loss recovered, concept recovery, density, decoder matching."""
    from backend.analysis.sae_compare import SAECompareConfig
    from backend.analysis.sae_compare import compare_saes as run_compare
    from backend.errors import DifflensError

    if not layer:
        raise DifflensError("compare-saes needs --layer LAYER (see `python cli.py layers --model ...`)")
    given = {"samples": samples, "splice_samples": splice_samples}
    cfg = SAECompareConfig(saes=[s.strip() for s in saes.split(",") if s.strip()],
                           **{k: v for k, v in given.items() if v is not None})
    ctx, _ = _model_run_context(run, device, None, loads=cfg.splice_samples != 0)
    result = run_compare(ctx, layer, cfg)
    typer.echo(f"{layer}: {result['rows'][0]['tokens']:,} sample tokens")
    typer.echo(f"  {'sae':<12} {'latents':>7} {'k':>4} {'FVU':>7} {'L0':>6} {'dead':>6} {'dense':>6} "
               f"{'loss rec.':>9} {'concept AUROC':>13}")
    for r in result["rows"]:
        loss = "-" if r.get("frac_loss_recovered") is None else f"{r['frac_loss_recovered']:.1%}"
        auroc = "-" if r.get("mean_best_auroc") is None else f"{r['mean_best_auroc']:.3f}"
        typer.echo(f"  {r['sae_id']:<12} {r['n_latents']:>7} {r['k']:>4} {r['fvu']:>7.3f} {r['l0']:>6.1f} "
                   f"{r['dead_frac']:>6.1%} {r['dense_frac']:>6.1%} {loss:>9} {auroc:>13}")
    for (a, b), m in result["matches"].items():
        typer.echo(f"  {a} -> {b}: best decoder cosine median {m['median']:.3f}, {m['above_0.9']:.0%} of {a}'s "
                   f"latents above 0.9")
    typer.echo(f"tables: {run}/tables (sae_comparison, sae_density, sae_matches); figure: {result['figure']}")


DREAM_KNOBS = [f for f in DreamConfig.__dataclass_fields__ if f not in ("opt_steps", "seeds")]
"""The [dream] settings the dream command takes as options (its iterations and seeds are --iterations / --seeds)."""


@app.command()
@user_errors
@config_options(Opt("interventions", ["dream_iterations", "dream_seeds"], rename={
    "dream_iterations": "iterations", "dream_seeds": "seeds"}), Opt("dream", DREAM_KNOBS))
def dream(
    overrides: dict,
    run: RunOpt = Path("runs/demo"),
    layer: Annotated[str, typer.Option(help="Hook point of the unit (see `python cli.py layers`).")]
    = "up_blocks.1.attentions.1",
    kind: Annotated[str, typer.Option(help="channel, feature (the layer's default SAE) or feature.<id> (another SAE "
                                           "of the layer).")] = "channel",
    unit: Annotated[int, typer.Option(help="Channel index, or SAE feature index.")] = 0,
    config: ConfigOpt = None, set_: SetOpt = None,
    device: RunDeviceOpt = None, dtype: RunDtypeOpt = None,
) -> None:
    """Deep dream: optimise an image so one unit fires at step 0 and its peak steps; snapshots go to `dreams`.
    Every [dream] setting is an option (a None default is the kind's, the preset's or the model's)."""
    import dataclasses

    from backend.interventions.dream import dream_run

    ctx, cfg = _model_run_context(run, device, dtype, config, overrides, set_)
    dcfg = dataclasses.replace(cfg.dream, opt_steps=cfg.interventions.dream_iterations)
    s = dream_run(ctx, layer, kind, unit, dcfg, seeds=list(range(cfg.interventions.dream_seeds)))
    for note in s["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"dreamed {layer} / {kind} {unit} at steps {s['target_steps']} ({len(s['seeds'])} seeds, "
               f"{s['opt_steps']} iterations, {s['seconds']:.1f} s): activation {s['activation_start']:.3f} -> "
               f"{s['activation_end']:.3f}")
    typer.echo(f"table: {run}/{s['table']}")
    typer.echo(f"images: {run}/{s['images']}/ (final: {', '.join(s['final_images'])})")


@app.command()
@user_errors
@config_options(Opt("atlas", ["units", "priors", "dreams", "dream_variants", "batch_units", "heatmap_animations"],
                    rename={"dream_variants": "variant"}),
                Opt("prior", prefix="prior-"), Opt("dream", prefix="dream-", rename={"opt_steps": "dream_iterations"}))
def atlas(
    overrides: dict,
    run: RunOpt = Path("runs/demo"),
    layer: LayerOpt = None,
    kind: Annotated[list[str] | None, typer.Option(help="channel or feature; repeat for both. [default: every "
                                                        "analysed kind]")] = None,
    config: ConfigOpt = None, set_: SetOpt = None,
    device: RunDeviceOpt = None, dtype: RunDtypeOpt = None,
) -> None:
    """The unit atlas: steered priors and deep dreams of many units (--units all | top:N | 0-127), batched across
    units, into the `atlas` table and media/atlas/. Resumes after a kill; under torchrun the units are split over
    the ranks. Settings: the [atlas], [prior] and [dream] sections (every key is an option here)."""
    from backend.run import distributed
    from backend.stages.atlas import run_atlas

    given = {**overrides, "atlas.layers": layer or None, "atlas.kinds": kind or None}
    ctx, cfg = _model_run_context(run, device, dtype, config, given, set_, loads=False)
    ctx.device = distributed.local_device(ctx.device)
    with distributed.distributed(ctx.device) as dist:
        s = run_atlas(ctx, cfg.atlas, cfg.prior, cfg.dream, dist=dist)
    for name, part in s["partitions"].items():
        typer.echo(f"  {name}: {part['rank_units']} units, {part['batches_run']} batches run, "
                   f"{part['batches_skipped']} already done, {part['seconds']:.1f} s ({', '.join(part['variants'])})")
    typer.echo(f"table: {run}/tables/atlas; images and animations: {run}/media/atlas/")


@app.command()
@user_errors
@config_options(Opt("interventions"))
def intervene(overrides: dict, run: RunOpt = Path("runs/demo"), config: ConfigOpt = None,
              set_: SetOpt = None, device: RunDeviceOpt = None, dtype: RunDtypeOpt = None) -> None:
    """run-all's interventions stage on an analysed run: steered priors and dreams of the top units, feature
    edits, concept steering, block ablation (settings: the run config's [interventions] section)."""
    from backend.stages.interventions import run_interventions

    ctx, cfg = _model_run_context(run, device, dtype, config, overrides, set_, loads=False)
    _print_interventions(run, run_interventions(ctx, cfg.interventions))  # the model loads only if a part is left


def _print_interventions(run: Path, summary: dict) -> None:
    for name, result in (summary.get("results") or {}).items():
        typer.echo(f"  {name}: {result}")
    typer.echo(f"tables: {run}/tables (interventions, steering_success, ablations, dreams); images: {run}/media/")


def _seeds(text: str) -> list[int]:
    from backend.errors import DifflensError

    try:
        if "-" in text.strip("-"):
            a, b = text.split("-", 1)
            return list(range(int(a), int(b) + 1))
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DifflensError(f"seeds {text!r} not understood; use a range 0-7 or a list 0,3,5") from None


SeedsOpt = Annotated[str | None, typer.Option(help="Seeds: a range 0-7 or a list 0,3,5. [default: the run's "
                                                  "interventions.steer_seeds]")]
NStepsOpt = Annotated[int | None, typer.Option(help="Denoising steps. [default: the run's]")]
RunGuidanceOpt = Annotated[float | None, typer.Option(help="CFG scale with --prompt. [default: the run's]")]
WindowOpt = Annotated[str, typer.Option(help="Denoising steps the edit applies at: active (the unit's active "
                                             "steps), all, late, or an inclusive window 3-8.")]


def _doc(section: str, name: str) -> str:
    """A config field's docstring and default, for the help of an option that defaults to it."""
    from backend.run.config import field_docs, section_class

    default = getattr(section_class(section)(), name)
    return f"{field_docs(section_class(section)).get(name, '')} [default: the run's {section}.{name}, else {default}]"


PriorSeedsOpt = Annotated[str | None, typer.Option(help="One image per seed: a range 0-7 or a list 0,3,5 (the "
                                                       "[prior] seeds). [default: the run's prior.seeds, else "
                                                       "0-3]")]


@app.command()
@user_errors
@config_options(Opt("prior", ["scale", "strength", "steps", "peak_radius", "n_steps"],
                    rename={"steps": "window", "n_steps": "steps"}))
def steer(
    overrides: dict,
    layer: Annotated[str, typer.Option("--layer", "-l", help="Hook point whose output is steered.")],
    unit: Annotated[int | None, typer.Option(help="Channel or feature index (or give --direction).")] = None,
    kind: Annotated[str, typer.Option(help="channel, feature (a decoder row of the layer's default SAE) or "
                                           "feature.<id> (of another SAE of the layer).")]
    = "feature",
    direction: Annotated[str | None, typer.Option(help="Steer along a direction instead of a unit: concept:ATTR=VALUE "
                                                       "or groups:A-vs-B (diff-in-means of the run's generations), "
                                                       "features:ATTR=VALUE or features:A-vs-B (a feature set of "
                                                       "--kind's SAE); scale x its size; matched:ATTR=VALUE (with "
                                                       "--prompt, one of the run's: per step and position, from "
                                                       "generations of the prompt's layout; scale 1 adds it as it "
                                                       "is).")] = None,
    run: RunOpt = Path("runs/demo"),
    mask: Annotated[str | None, typer.Option(help="left, right, top, bottom, center, object (demo), or a .npy/.png.")]
    = None,
    prompt: Annotated[str | None, typer.Option(help="Steer this prompt, shown beside the unsteered image; without "
                                                    "it: the steered prior (empty prompt, no guidance).")] = None,
    seeds: PriorSeedsOpt = None, guidance: RunGuidanceOpt = None,
    config: ConfigOpt = None, set_: SetOpt = None,
    device: RunDeviceOpt = None, dtype: RunDtypeOpt = None,
) -> None:
    """Add strength x a unit's direction to a layer's output and compare with the unsteered images. How strongly and
    where: the [prior] settings, every one an option (--scale, --strength, --window: prior.steps, --peak-radius,
    --seeds, --steps: prior.n_steps, the denoising steps as everywhere)."""
    from backend.interventions.steer import steer_run

    given = {**overrides, "prior.seeds": _seeds(seeds) if seeds is not None else None}
    ctx, cfg = _model_run_context(run, device, dtype, config, given, set_)
    p = cfg.prior
    if direction is not None or unit is None:
        if p.steps == "peaks":
            from backend.errors import DifflensError

            raise DifflensError("--window peaks steers a unit's peak steps; a direction has none: give a window "
                                "(active, all, late or a-b)")
        return _steer_direction(ctx, run, layer, direction, kind, p.scale, p.strength, p.steps, mask, prompt,
                                p.seeds, p.n_steps or None, guidance, unit)
    res = steer_run(ctx, layer, kind, unit, scale=p.scale, strength=p.strength, steps=p.steps, mask=mask,
                    mode="prompt" if prompt else "prior", prompt=prompt, seeds=p.seeds, n_steps=p.n_steps or None,
                    guidance=guidance, peak_radius=p.peak_radius)
    rows = res.rows
    typer.echo(f"steered {kind} {unit} of {layer}: strength {rows['strength'][0]:.3g} at steps {rows['steps'][0]}")
    for r in rows.iter_rows(named=True):
        changed = r["changed_attributes"] if r["changed_attributes"] not in (None, "{}") else ""
        typer.echo(f"  seed {r['seed']}: effect {r['effect']:.3f} {changed}")
    typer.echo(f"grid: {res.grid}\ntable: {res.shard}")


def _steer_direction(ctx, run: Path, layer: str, direction: str | None, kind: str, scale: float,
                     strength: float | None, window: str, mask: str | None, prompt: str | None, seeds: list[int],
                     steps: int | None, guidance: float | None, unit: int | None) -> None:
    """steer --direction: backend.interventions.concept_directions.steer_direction_run, printed like steer."""
    from backend.errors import DifflensError
    from backend.interventions.concept_directions import steer_direction_run

    if (direction is None) == (unit is None):
        raise DifflensError("give --unit N (steer one unit) or --direction SPEC (concept:ATTR=VALUE, groups:A-vs-B), "
                            "not both" if unit is not None else "give --unit N or --direction SPEC "
                            "(e.g. --direction concept:shape=circle)")
    res = steer_direction_run(ctx, direction, layer, scale=scale, strength=strength, steps=window, mask=mask,
                              mode="prompt" if prompt else "prior", prompt=prompt, seeds=seeds, n_steps=steps,
                              guidance=guidance, kind=kind)
    d, rows = res.extra["direction"], res.rows
    extra = f", features {d.units}" if d.units else ""
    if d.deltas_STC is not None:
        source = ("generations of the prompt's layout" if d.matched else
                  "every generation (none shares the prompt's layout)")
        typer.echo(f"steered {layer} along {d.name} (per step and token position, from {source}): "
                   f"strength {rows['strength'][0]:.3g} at steps {rows['steps'][0]}")
    else:
        typer.echo(f"steered {layer} along {d.name} (size {d.norm:.3g}, measured at run steps "
                   f"{d.window[0]}-{d.window[1]}{extra}): strength {rows['strength'][0]:.3g} at steps "
                   f"{rows['steps'][0]}")
    for r in rows.iter_rows(named=True):
        changed = r["changed_attributes"] if r["changed_attributes"] not in (None, "{}") else ""
        typer.echo(f"  seed {r['seed']}: effect {r['effect']:.3f} {changed}")
    typer.echo(f"grid: {res.grid}\ntable: {res.shard}")


@app.command("steer-report")
@user_errors
def steer_report(
    run: RunOpt = Path("runs/demo"),
    layer: Annotated[str | None, typer.Option("--layer", "-l", help="Layer. [default: every layer in concepts]")]
    = None,
    kind: Annotated[str, typer.Option(help="feature, feature.<id> (another SAE of the layer) or channel.")]
    = "feature",
    scale: Annotated[float | None, typer.Option(help="Relative strength. [default: 6, chosen on the demo]")] = None,
    window: Annotated[str, typer.Option(help="late, all, active, or an inclusive window 3-8.")] = "late",
    mask: Annotated[str, typer.Option(help="object (the shape in each baseline), none, or a region.")] = "object",
    attribute: Annotated[list[str] | None, typer.Option("--attribute", help="Attribute; repeat. [default: colour]")]
    = None,
    seeds: Annotated[str | None, typer.Option(help=f"Seeds: a range 0-9 or a list. "
                                                   f"{_doc('interventions', 'concept_seeds')}")] = None,
    device: RunDeviceOpt = None, dtype: RunDtypeOpt = None,
) -> None:
    """Demo model: how often steering each concept's best unit turns images to that concept."""
    from backend.interventions.concepts import REPORT_SCALE, concept_steering_report

    ctx, cfg = _model_run_context(run, device, dtype)
    seed_list = list(range(cfg.interventions.concept_seeds)) if seeds is None else _seeds(seeds)
    table = concept_steering_report(ctx, layer, kind, scale=REPORT_SCALE if scale is None else scale,
                                    steps=window, mask=None if mask == "none" else mask, seeds=seed_list,
                                    attributes=tuple(attribute or ("colour",)))
    for r in table.iter_rows(named=True):
        typer.echo(f"  {r['layer']:<28} {r['concept']:<18} {kind} {r['unit']:>5} (AUROC {r['auroc']:.3f}, rank "
                   f"{r['rank']}): {r['hits']}/{r['seeds']} = {r['rate']:.0%} (clean {r['clean_rate']:.0%}, "
                   f"unsteered {r['baseline_hits']})")
    typer.echo(f"table: {run}/tables/steering_success; images: {run}/media/steer/")


def _list(text: str | None, cast=str) -> list | None:
    """A comma-separated option as a list (None: not given)."""
    from backend.errors import DifflensError

    if text is None:
        return None
    try:
        return [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DifflensError(f"{text!r} is not a comma-separated list of numbers") from None


@app.command("causal-map")
@user_errors
def causal_map_cmd(
    run: RunOpt = Path("runs/demo"),
    layers: Annotated[str | None, typer.Option(help="Layers, comma-separated. [default: every captured layer]")]
    = None,
    windows: Annotated[str | None, typer.Option(help="Step windows: early, middle, late, all, peaks, or a-b; "
                                                     "comma-separated. [default: all five names]")] = None,
    strengths: Annotated[str | None, typer.Option(help="Scales tried (x each direction's size), comma-separated; "
                                                       "the best on the selection seeds is kept. [default: 4,10,25]")]
    = None,
    seeds: Annotated[str | None, typer.Option(help="Held-out seeds the rates are reported on: a range 2000-2019 or "
                                                   "a list. [default: 2000-2019]")] = None,
    selection_seeds: Annotated[str | None, typer.Option(help="Seeds that choose each cell's scale. "
                                                             "[default: 1000-1007]")] = None,
    directions: Annotated[str | None, typer.Option(help="channel, feature, features, mean, matched; "
                                                        "comma-separated (matched tries causal_map.matched_scales). "
                                                        "[default: all five]")] = None,
    masks: Annotated[str | None, typer.Option(help="none, object, background; comma-separated. "
                                                   "[default: none,object]")] = None,
    attributes: Annotated[str | None, typer.Option(help="Attributes whose values are the concepts, "
                                                        "comma-separated. [default: every attribute]")] = None,
    reduced: Annotated[bool, typer.Option(help="The reduced map run-all computes (see [causal_map] reduced).")]
    = False,
    config: ConfigOpt = None, set_: SetOpt = None, device: RunDeviceOpt = None, dtype: RunDtypeOpt = None,
) -> None:
    """Demo model: where each concept is caused. Steers every concept's best channel, best SAE feature, SAE feature
    set and diff-in-means direction at every layer and step window; scale chosen on selection seeds, flip and
    collateral rates on held-out seeds; into the causal_map table. Resumes per (layer, concept)."""
    from backend.interventions.causal_map import best_per_concept, causal_map

    given = {"causal_map.layers": _list(layers), "causal_map.windows": _list(windows),
             "causal_map.scales": _list(strengths, float),
             "causal_map.heldout_seeds": None if seeds is None else _seeds(seeds),
             "causal_map.selection_seeds": None if selection_seeds is None else _seeds(selection_seeds),
             "causal_map.directions": _list(directions), "causal_map.masks": _list(masks),
             "causal_map.attributes": _list(attributes), "causal_map.reduced": reduced}
    ctx, cfg = _model_run_context(run, device, dtype, config, given, set_)
    table = causal_map(ctx, cfg.causal_map)
    ctx.record_config("causal_map", cfg.causal_map.to_dict())
    typer.echo("best per concept (held-out flip rate among cells with collateral <= 20%, else the best flip):")
    for r in best_per_concept(table).sort("attribute", "concept").iter_rows(named=True):
        typer.echo(f"  {r['concept']:<18} {r['flip_rate']:>5.0%} flip {r['collateral_rate']:>5.0%} collateral  "
                   f"{r['direction']:<8} {r['layer']} {r['window']} ({r['steps']}) mask {r['mask']} x{r['scale']:g}")
    typer.echo(f"table: {run}/tables/causal_map ({table.height} cells); inspector: the Causal map page")


@app.command()
@user_errors
def edit(
    layer: Annotated[str, typer.Option("--layer", "-l", help="Layer with an SAE (sae/<layer>/<id>/).")],
    kind: Annotated[str, typer.Option(help="The SAE whose features are edited: feature (the layer's default SAE) or "
                                           "feature.<id>.")] = "feature",
    run: RunOpt = Path("runs/demo"),
    preset: Annotated[list[str] | None, typer.Option("--preset", help="none, frequent, rare, all; repeat. "
                                                                      "[default: all four]")] = None,
    n: Annotated[int | None, typer.Option(help=_doc("interventions", "edit_features"))] = None,
    zero: Annotated[list[int] | None, typer.Option("--zero", help="Also zero these features; repeat.")] = None,
    scale_feature: Annotated[list[int] | None, typer.Option("--scale-feature", help="Scale by --factor; repeat.")]
    = None,
    factor: Annotated[float, typer.Option(help="Factor for --scale-feature (negative flips the feature).")] = 0.0,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Prompt; repeat. [default: the run's first]")]
    = None,
    seeds: SeedsOpt = None,
    window: Annotated[str, typer.Option(help="all, late, or an inclusive window 3-8.")] = "all",
    device: RunDeviceOpt = None, dtype: RunDtypeOpt = None,
) -> None:
    """Zero or scale SAE features (decode(edited codes) + reconstruction error) next to the unedited images."""
    from backend.interventions.edit import PRESETS, edit_run

    ctx, cfg = _model_run_context(run, device, dtype)
    iv = cfg.interventions
    res = edit_run(ctx, layer, presets=tuple(preset) if preset else PRESETS,
                   n=iv.edit_features if n is None else n, zero=zero or (), scale=scale_feature or (),
                   factor=factor, prompts=prompt,
                   seeds=iv.steer_seeds if seeds is None else _seeds(seeds), steps=window, kind=kind)
    for (name,), rows in res.rows.group_by(["preset"], maintain_order=True):
        typer.echo(f"  {name:<14} {len(rows['features'][0]):>5} features  mean effect {rows['effect'].mean():.3f}")
    typer.echo(f"grid: {res.grid}\ntable: {res.shard}")


@app.command()
@user_errors
def ablate(
    run: RunOpt = Path("runs/demo"),
    block: Annotated[list[str] | None, typer.Option("--block", "-b", help="Block to skip; repeat. [default: "
                                                    "every block whose input and output shapes match]")] = None,
    mode: Annotated[str, typer.Option(help="skip (return the block's input) or remove_delta.")] = "skip",
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Prompt; repeat. [default: the run's first "
                                                                      "4]")] = None,
    seeds: Annotated[str, typer.Option(help="Seeds: a range 0-7 or a list 0,3,5.")] = "0",
    steps: NStepsOpt = None, guidance: RunGuidanceOpt = None,
    device: RunDeviceOpt = None, dtype: RunDtypeOpt = None,
) -> None:
    """Skip each block in turn on a fixed prompt set; image grid and effect score per block."""
    from backend.interventions.ablate import ablate_run

    ctx, _ = _model_run_context(run, device, dtype)
    summary, grid = ablate_run(ctx, blocks=block, prompts=prompt, seeds=_seeds(seeds), mode=mode, n_steps=steps,
                               guidance=guidance)
    typer.echo(f"  {'block':<48} {'effect':>7} {'changed':>8}")
    for r in summary.iter_rows(named=True):
        changed = "-" if r["changed"] is None else f"{r['changed']:.0%}"
        typer.echo(f"  {r['layer']:<48} {r['effect']:>7.3f} {changed:>8}")
    typer.echo(f"grid: {grid}\ntable: {run}/tables/ablations")


@app.command()
def inspect(
    runs: Annotated[Path, typer.Option(help="Directory holding the runs (or one run directory).")] = Path("runs"),
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8501,
    address: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 and use an SSH tunnel.")]
    = "127.0.0.1",
) -> None:
    """Browse runs in the Streamlit inspector (prints the SSH tunnel command for a remote machine)."""
    from inspector.launch import serve

    raise typer.Exit(serve(runs, port=port, address=address))  # serve() execs streamlit; returns only on error


@demo_app.command("train")
@user_errors
def demo_train(
    train_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 3000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    out_dir: Annotated[Path, typer.Option(help="Where the trained pipeline goes.")] = Path("data/demo-model"),
    work_dir: Annotated[Path, typer.Option(help="Checkpoints; a rerun resumes from here.")] = Path(
        "runs/demo-model-train"
    ),
    threads: Annotated[int, typer.Option(help="torch threads (0: default).")] = 0,
) -> None:
    """Train the demo model from scratch (resumes from --work-dir after an interruption)."""
    from backend.demo.train import DemoTrainConfig, train_demo_model

    out = train_demo_model(DemoTrainConfig(steps=train_steps, batch_size=batch_size, lr=lr, out_dir=str(out_dir),
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
    from backend.demo.evaluate import sample_grid

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
    from backend.demo.evaluate import evaluate

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
    from backend.demo import shapes
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

    from backend.run.prompts import load_prompts

    records = load_prompts(file)
    groups = Counter(r.group for r in records)
    typer.echo(f"{file}: {len(records)} prompts in {len(groups)} group(s)")
    for g, c in sorted(groups.items()):
        typer.echo(f"  {g}: {c}")


GridArg = Annotated[list[str] | None, typer.Argument(
    help="KEY=V1,V2,... for each swept config key, e.g. sae.k=8,16,32 sae.expansion=4,8 (values are read as TOML).",
    show_default=False)]


@app.command()
@user_errors
def sweep(
    grid: GridArg = None, config: ConfigOpt = None, set_: SetOpt = None,
    name: Annotated[str | None, typer.Option(help="Sweep name: sweeps/<name>/sweep.json and runs "
                                                  "<name>-<key><value>-... [default: the config's name]")] = None,
    executor: Annotated[str, typer.Option(help="local (the runs one after another, here) or slurm (a submitit job "
                                               "array).")] = "local",
    profile: Annotated[str | None, typer.Option(help="Infrastructure profile: a name in configs/infra/ or a .toml "
                                                     "path. [default: local; slurm needs one]")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print what would run or be submitted "
                                                            "(slurm: the sbatch script); write nothing.")] = False,
    status: Annotated[str | None, typer.Option("--status", help="Print this sweep's runs and job states (and "
                                                                "refresh sweep.json) instead of running.")] = None,
    runs_dir: Annotated[Path | None, typer.Option(help="Runs directory holding sweeps/ (for --status). [default: the "
                                                       "config's runs_dir]")] = None,
) -> None:
    """Run-all over a grid of config values: one run per combination, run here one after another (resumable) or
    submitted to SLURM as a job array."""
    from backend.run.config import parse_set, resolve
    from backend.sweep.command import run_sweep, sweep_status

    sets = parse_set(set_)
    if status:
        result = sweep_status(runs_dir or resolve(file=config, overrides=sets).runs_dir, status)
    else:
        result = run_sweep(grid or [], config, sets, name, executor=executor, profile=profile, dry_run=dry_run,
                           echo=typer.echo)
    if result.script:
        typer.echo(result.script)
    verb = "would run" if result.dry_run else "runs of"
    typer.echo(f"{verb} sweep {result.path.parent.name} ({result.path}):")
    for r in result.runs:
        settings = " ".join(f"{k}={v}" for k, v in r["overrides"].items())
        job = f" job {r['job_id']} {r.get('job_state') or ''}".rstrip() if r.get("job_id") else ""
        took = f" {r['seconds']:.1f} s" if r.get("seconds") else ""
        error = f": {r['error']}" if r.get("error") else ""
        typer.echo(f"  {r['name']:<40} {settings:<30} {r['status']}{took}{job}{error}")
    if result.failed:
        raise typer.Exit(1)


@app.command("train-demo-vit")
@user_errors
def train_demo_vit(
    out: Annotated[Path, typer.Option(help="Where the trained ViT goes (config.json, model.safetensors, "
                                           "preprocessor_config.json, metrics.json).")] = Path("data/demo-vit"),
    classes: Annotated[str, typer.Option(help="shape (3 classes) or shape-colour (12: red-circle, ...).")]
    = "shape-colour",
    train_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2400,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed of the weights and the training images.")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default; 1 is fastest for this small "
                                               "model on a shared machine).")] = 1,
) -> None:
    """Train the demo ViT (a small transformers ViTForImageClassification) on shapes-world images; report its
    accuracy on held-out attribute combinations."""
    from backend.demo.vit import DemoViTConfig
    from backend.demo.vit import train_demo_vit as train

    m = train(DemoViTConfig(out=str(out), classes=classes, steps=train_steps, batch_size=batch_size, lr=lr,
                            seed=seed, threads=threads))
    typer.echo(f"demo ViT ({m['n_classes']} classes, {m['parameters']:,} parameters) saved to {out}: held-out "
               f"accuracy {m['heldout_accuracy']:.1%} on {m['heldout_images']} images, trained in "
               f"{m['train_seconds']:.0f} s (load {m['load_average']}); metrics: {out}/metrics.json")


@app.command("demo-images")
@user_errors
def demo_images(
    out: Annotated[Path, typer.Option(help="Directory to write: <class>/<index>-<size>-<position>-<background>.png.")],
    n: Annotated[int, typer.Option(help="Images, balanced over the classes.")] = 1200,
    classes: Annotated[str, typer.Option(help="shape or shape-colour (the demo ViT's classes).")] = "shape-colour",
    seed: Annotated[int, typer.Option(help="Seed of the drawn attributes and the pixel noise.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
) -> None:
    """Write a shapes-world image dataset in class sub-folders (the layout --images reads), for the demo ViT."""
    from backend.demo.images import write_demo_images

    counts = write_demo_images(out, n=n, classes=classes, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {sum(counts.values())} images in {len(counts)} classes to {out}/")


@app.command("steer-classes")
@user_errors
def steer_classes(
    layer: Annotated[str, typer.Option("--layer", "-l", help="Encoder layer whose output tokens are steered, e.g. "
                                                             "vit.encoder.layer.2.")],
    unit: Annotated[int, typer.Option(help="Channel or feature index.")],
    kind: Annotated[str, typer.Option(help="channel, feature (the layer's default SAE) or feature.<id>.")]
    = "feature",
    run: RunOpt = Path("runs/demo-vit"),
    strengths: Annotated[str, typer.Option(help="Strengths in multiples of the layer's mean token norm, "
                                                "comma-separated.")] = "1,2,4",
    target: Annotated[str | None, typer.Option(help="Class the flip rate counts towards. [default: the unit's best "
                                                    "class in the run's concepts table, else the class whose logit "
                                                    "rises most]")] = None,
    images: Annotated[int, typer.Option(help="The run's first N images are steered.")] = 64,
    tokens: Annotated[str | None, typer.Option(help="cls, patch or all. [default: the run's capture.tokens]")]
    = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Image classifiers: add a unit's direction at a layer and report the change in predicted class and logits,
    and the flip rate towards a class; writes the class_steering table and a figure."""
    from backend.errors import DifflensError
    from backend.interventions.class_steer import class_steer_run

    try:
        scales = [float(s) for s in strengths.split(",") if s.strip()]
    except ValueError:
        raise DifflensError(f"--strengths {strengths!r} not understood; give numbers, e.g. 1,2,4") from None
    _check_device(device, "float32")
    r = class_steer_run(run, layer, kind, unit, scales, target=target, n_images=images, tokens=tokens,
                        device=device)
    typer.echo(f"steered {kind} {unit} of {layer} on {r.rows['images'][0]} images ({r.rows['tokens'][0]} tokens); "
               f"target {r.target} ({r.target_source})")
    typer.echo(f"  {'scale':>6} {'strength':>9} {'changed':>8} {'flip rate':>9}  logit change of the target")
    for row in r.rows.filter(r.rows["class_label"] == r.target).iter_rows(named=True):
        typer.echo(f"  {row['scale']:>6g} {row['strength']:>9.3g} {row['changed']:>8.0%} {row['flip_rate']:>9.0%}  "
                   f"{row['logit_change']:+.3f}")
    typer.echo(f"table: {r.table}\nfigure: {r.figure}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    app()
