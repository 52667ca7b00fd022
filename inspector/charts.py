"""Altair charts of the inspector. Every chart takes small, already-aggregated frames (polars) from the query layer
(inspector/queries/).

Timestep axes run from high noise (left) to clean (right): x is the scheduler timestep on a reversed scale, so
reading left to right follows the denoising trajectory.

Speed. Building an Altair chart costs tens of milliseconds (schema lookups and validation of every encoding),
more than all of a unit page's queries. So each chart is built with Altair once per shape, over *named* datasets
(`alt.Data(name=...)`), converted to a Vega-Lite spec and cached as a template (`_template`); a page fills in the
datasets (`_fill`) and shows the spec with st.vega_lite_chart (`show`). The tests validate every template against
the Vega-Lite schema once, so nothing is validated at run time.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import altair as alt
import polars as pl
import pyarrow as pa
import streamlit as st

PICK = "pick"
"""Name of the profile chart's point selection (a click selects a step)."""
PEAK_COLOUR = "#d62728"
SELECTED_COLOUR = "#2ca02c"
METRIC_TITLES = {"freq": "freq (share of generations active)", "mean": "mean activation", "max": "max activation"}
TEMPLATES: dict[str, Any] = {}
"""name -> the function that builds that template with Altair (for the schema test)."""


def _template(fn):
    """Cache a template builder: fn(*params) -> Altair chart over named datasets; returns the spec as JSON text."""
    TEMPLATES[fn.__name__] = fn

    @functools.lru_cache(maxsize=64)
    def cached(*params) -> str:
        with alt.utils.schemapi.debug_mode(False):
            return json.dumps(fn(*params).to_dict(validate=False))

    return cached


def _arrow_bytes(df: pl.DataFrame) -> bytes:
    """A frame as Arrow IPC stream bytes, the form Streamlit sends chart datasets in (strings as plain utf8, which
    the browser's Arrow reader takes)."""
    table = df.to_arrow()
    fields = [pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) or pa.types.is_string_view(f.type)
              else f for f in table.schema]
    table = table.cast(pa.schema(fields))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _fill(template: str, **datasets: pl.DataFrame | list[dict]) -> dict[str, Any]:
    """The template's spec with its named datasets filled in (as Arrow bytes: Streamlit passes them through)."""
    spec = json.loads(template)
    spec["datasets"] = {name: _arrow_bytes(data if isinstance(data, pl.DataFrame) else pl.DataFrame(data))
                        for name, data in datasets.items()}
    return spec


def show(spec: dict[str, Any], *, key: str | None = None, on_select: Any = "ignore",
         selection_mode: list[str] | None = None, width: str | int = "stretch", where: Any = None):
    """Display a chart spec; returns the selection state when on_select is not "ignore"."""
    target = where if where is not None else st
    return target.vega_lite_chart(spec=spec, key=key, on_select=on_select, selection_mode=selection_mode,
                                  width=width)


def _timestep_x(title: str = "timestep (noisy → clean)") -> alt.X:
    return alt.X("timestep:Q", scale=alt.Scale(reverse=True, nice=False, zero=False), title=title)


# ------------------------------------------------------------------------------------------------ unit page


@_template
def profile_template(metric: str, height: int):
    tooltip = [alt.Tooltip("step:Q"), alt.Tooltip("timestep:Q", format=".0f"), alt.Tooltip("freq:Q", format=".3f"),
               alt.Tooltip("mean:Q", format=".4g"), alt.Tooltip("max:Q", format=".4g")]
    base = alt.Chart(alt.Data(name="profile")).encode(x=_timestep_x())
    y = alt.Y(f"{metric}:Q", title=METRIC_TITLES.get(metric, metric))
    line = base.mark_line(color="#4c78a8").encode(y=y)
    pick = alt.selection_point(name=PICK, fields=["step"], on="click", nearest=True, empty=False)
    points = base.mark_circle(size=70, color="#4c78a8").encode(
        y=y, tooltip=tooltip, opacity=alt.when(pick).then(alt.value(1.0)).otherwise(alt.value(0.55)),
    ).add_params(pick)
    marks = alt.Chart(alt.Data(name="peaks")).encode(x=_timestep_x(), y=alt.Y("value:Q"))
    peak_points = marks.mark_point(shape="triangle-down", size=170, filled=True, color=PEAK_COLOUR, yOffset=-12).encode(
        tooltip=["label:N", "step:Q", alt.Tooltip("timestep:Q", format=".0f")])
    peak_text = marks.mark_text(dy=-28, color=PEAK_COLOUR, fontWeight="bold").encode(text="label:N")
    rule = alt.Chart(alt.Data(name="selected")).mark_rule(color=SELECTED_COLOUR, strokeDash=[4, 3], size=2).encode(
        x=_timestep_x())
    return alt.layer(line, points, peak_points, peak_text, rule).properties(height=height)


def profile_chart(profile: pl.DataFrame, peaks: pl.DataFrame, metric: str = "freq", selected_step: int | None = None,
                  height: int = 260) -> dict[str, Any]:
    """A unit's activity over timesteps: line + clickable points (selection `pick` on field `step`), peaks marked
    with red triangles and their rank, the selected step as a green rule."""
    at_peaks = pl.DataFrame(schema={"step": pl.Int64, "timestep": pl.Float64, "value": pl.Float64,
                                    "label": pl.String})
    if peaks.height:
        at_peaks = (peaks.select("step", "rank").join(profile.select("step", "timestep", metric), on="step")
                    .select("step", "timestep", pl.col(metric).alias("value"),
                            pl.format("peak {}", pl.col("rank")).alias("label")))
    selected = profile.filter(pl.col("step") == selected_step).select("timestep") if selected_step is not None \
        else pl.DataFrame(schema={"timestep": pl.Float64})
    return _fill(profile_template(metric, height), profile=profile.select("step", "timestep", "freq", "mean", "max"),
                 peaks=at_peaks, selected=selected)


@_template
def activation_template(height: int):
    return (alt.Chart(alt.Data(name="values")).mark_line(point=True)
            .encode(x=_timestep_x(), y=alt.Y("value:Q", title="activation"),
                    color=alt.Color("stat:N", scale=alt.Scale(domain=["max", "mean"], range=["#e45756", "#4c78a8"])),
                    tooltip=["stat:N", "step:Q", alt.Tooltip("value:Q", format=".4g")])
            .properties(height=height))


def activation_chart(profile: pl.DataFrame, height: int = 220) -> dict[str, Any]:
    """Max and mean activation over generations at each timestep (two lines)."""
    long = profile.select("step", "timestep", "max", "mean").unpivot(index=["step", "timestep"], variable_name="stat")
    return _fill(activation_template(height), values=long)


@_template
def histogram_template(title: str, height: int):
    return (alt.Chart(alt.Data(name="bins")).mark_bar(color="#72b7b2")
            .encode(x=alt.X("lo:Q", title=title, bin="binned"), x2="hi:Q",
                    y=alt.Y("count:Q", title="(generation, step) pairs"),
                    tooltip=[alt.Tooltip("lo:Q", format=".3g"), alt.Tooltip("hi:Q", format=".3g"), "count:Q"])
            .properties(height=height))


def histogram_chart(hist: pl.DataFrame, title: str = "activation", height: int = 220) -> dict[str, Any]:
    """Pre-binned histogram (lo, hi, count)."""
    return _fill(histogram_template(title, height), bins=hist)


@_template
def group_frequency_template(height: int):
    return (alt.Chart(alt.Data(name="groups")).mark_bar()
            .encode(x=alt.X("group:N", sort="-y", title="prompt group"), y=alt.Y("freq:Q", title="freq"),
                    color=alt.Color("group:N", legend=None),
                    tooltip=["group:N", alt.Tooltip("freq:Q", format=".3f"), alt.Tooltip("mean:Q", format=".4g")])
            .properties(height=height))


def group_frequency_chart(freqs: pl.DataFrame, height: int = 200) -> dict[str, Any]:
    """A unit's activation frequency per prompt group."""
    return _fill(group_frequency_template(height), groups=freqs.select("group", "freq", "mean"))


@_template
def dream_loss_template(height: int):
    lines = (alt.Chart(alt.Data(name="trace")).mark_line(point=True)
             .encode(x=alt.X("opt_step:Q", title="optimisation step"), y=alt.Y("value:Q", title="value"),
                     color=alt.Color("term:N"), tooltip=["term:N", "opt_step:Q", alt.Tooltip("value:Q", format=".4g")]))
    rule = alt.Chart(alt.Data(name="current")).mark_rule(color=SELECTED_COLOUR).encode(x="opt_step:Q")
    return alt.layer(lines, rule).properties(height=height)


def dream_loss_chart(trace: pl.DataFrame, opt_step: int | None = None, height: int = 220) -> dict[str, Any]:
    """Activation and penalty terms over optimisation steps (columns opt_step, term, value), current step ruled."""
    current = [{"opt_step": int(opt_step)}] if opt_step is not None else []
    return _fill(dream_loss_template(height), trace=trace, current=current)


# ------------------------------------------------------------------------------------------------ other pages


@_template
def frequency_histograms_template(height: int):
    return (alt.Chart(alt.Data(name="bins")).mark_bar()
            .encode(x=alt.X("lo:Q", bin="binned", title="activation frequency"), x2="hi:Q",
                    y=alt.Y("units:Q", title="units", scale=alt.Scale(type="symlog")),
                    color=alt.Color("group:N", legend=None),
                    tooltip=["group:N", alt.Tooltip("lo:Q", format=".3f"), alt.Tooltip("hi:Q", format=".3f"),
                             "units:Q"])
            .properties(height=height, width=300)
            .facet(column=alt.Column("group:N", title=None)))


def frequency_histograms(hist: pl.DataFrame, height: int = 200) -> dict[str, Any]:
    """Side-by-side histograms (one column per group, sorted by name) of units' frequency: group, lo, hi, units."""
    return _fill(frequency_histograms_template(height), bins=hist)


@_template
def sae_training_template(height: int):
    base = alt.Chart(alt.Data(name="curve")).encode(x=alt.X("tokens:Q", title="tokens"), color=alt.Color("layer:N"))
    fvu = base.mark_line().encode(y=alt.Y("fvu:Q", title="FVU", scale=alt.Scale(type="log")),
                                  tooltip=["layer:N", "step:Q", "tokens:Q", alt.Tooltip("fvu:Q", format=".4f")])
    l0 = base.mark_line().encode(y=alt.Y("l0:Q", title="L0"), tooltip=["layer:N", "step:Q", "l0:Q"])
    return alt.hconcat(fvu.properties(height=height, width=320), l0.properties(height=height, width=320))


def sae_training_chart(curve: pl.DataFrame, height: int = 220) -> dict[str, Any]:
    """SAE training curves: FVU (log scale) and L0 against tokens seen, one colour per layer."""
    if "kind" in curve.columns:  # several SAEs per layer: one line per SAE, named layer:sae_id past the default
        curve = curve.with_columns(layer=pl.when(pl.col("kind") == "feature").then(pl.col("layer"))
                                   .otherwise(pl.col("layer") + ":" + pl.col("kind").str.strip_prefix("feature.")))
    return _fill(sae_training_template(height), curve=curve.select("layer", "step", "tokens", "fvu", "l0"))


@_template
def concept_summary_template(height: int):
    return (alt.Chart(alt.Data(name="summary")).mark_bar()
            .encode(x=alt.X("layer:N", title=None), xOffset="kind:N",
                    y=alt.Y("mean_best_auroc:Q", title="mean best AUROC", scale=alt.Scale(domain=[0.5, 1.0])),
                    color=alt.Color("kind:N", scale=alt.Scale(scheme="blues")),
                    tooltip=["layer:N", "kind:N", alt.Tooltip("mean_best_auroc:Q", format=".3f")])
            .properties(height=height))


def concept_summary_chart(summary: pl.DataFrame, height: int = 220) -> dict[str, Any]:
    """Mean best AUROC per layer, channels beside features."""
    return _fill(concept_summary_template(height), summary=summary.select("layer", "kind", "mean_best_auroc"))


@_template
def stage_template(height: int):
    return (alt.Chart(alt.Data(name="stages")).mark_bar(color="#54a24b")
            .encode(y=alt.Y("stage:N", sort=None, title=None), x=alt.X("seconds:Q", title="seconds"),
                    tooltip=["stage:N", "status:N", alt.Tooltip("seconds:Q", format=".1f")])
            .properties(height=height))


def stage_chart(stages: pl.DataFrame, height: int = 160) -> dict[str, Any]:
    """Seconds per stage (horizontal bars)."""
    return _fill(stage_template(height), stages=stages.filter(pl.col("seconds").is_not_null()))


@_template
def effect_template(height: int):
    return (alt.Chart(alt.Data(name="scores")).mark_bar(color="#e45756")
            .encode(y=alt.Y("layer:N", sort="-x", title=None, axis=alt.Axis(labelLimit=320)),
                    x=alt.X("effect:Q", title="effect (mean |Δ pixel|)"),
                    tooltip=["layer:N", alt.Tooltip("effect:Q", format=".4f")])
            .properties(height=height))


def effect_chart(scores: pl.DataFrame, height: int = 220) -> dict[str, Any]:
    """Effect score per ablated block (mean pixel change), largest first."""
    return _fill(effect_template(height), scores=scores.select("layer", "effect"))


# ------------------------------------------------------------------------------------------------ SAE comparison


@_template
def sae_density_template(height: int):
    return (alt.Chart(alt.Data(name="bins")).mark_line(interpolate="step-after", strokeWidth=2)
            .encode(x=alt.X("lo:Q", title="log10 firing frequency (share of sample tokens)"),
                    y=alt.Y("count:Q", title="latents"),
                    color=alt.Color("sae_id:N", title="SAE", scale=alt.Scale(scheme="tableau10")),
                    tooltip=["sae_id:N", alt.Tooltip("lo:Q", format=".2f"), alt.Tooltip("hi:Q", format=".2f"),
                             "count:Q"])
            .properties(height=height))


def sae_density_chart(density: pl.DataFrame, height: int = 240) -> dict[str, Any]:
    """The activation-density histograms of several SAEs overlaid (sae_id, lo, hi, count), one line per SAE."""
    return _fill(sae_density_template(height), bins=density.select("sae_id", "lo", "hi", "count"))


@_template
def cosine_histogram_template(height: int):
    return (alt.Chart(alt.Data(name="bins")).mark_bar(color="#4c78a8")
            .encode(x=alt.X("lo:Q", bin="binned", title="best decoder cosine"), x2="hi:Q",
                    y=alt.Y("count:Q", title="latents of A"),
                    tooltip=[alt.Tooltip("lo:Q", format=".3f"), alt.Tooltip("hi:Q", format=".3f"), "count:Q"])
            .properties(height=height))


def cosine_histogram_chart(hist: pl.DataFrame, height: int = 220) -> dict[str, Any]:
    """Histogram of each latent of A's best cosine with B's decoder rows (lo, hi, count)."""
    return _fill(cosine_histogram_template(height), bins=hist.select("lo", "hi", "count"))


# ------------------------------------------------------------------------------------------------ causal map


@_template
def causal_map_template(height: int):
    base = alt.Chart(alt.Data(name="cells")).encode(
        x=alt.X("window:N", title=None, sort=["early", "middle", "late", "all", "peaks"]),
        y=alt.Y("concept:N", title=None, sort=None, axis=alt.Axis(labelOverlap=False)))
    rect = base.mark_rect().encode(
        color=alt.Color("flip:Q", title="flip rate", scale=alt.Scale(domain=[0, 1], scheme="viridis")),
        tooltip=["concept:N", "layer:N", "window:N",
                 alt.Tooltip("flip:Q", format=".0%", title="flip (collateral <= 20%)"),
                 alt.Tooltip("any_flip:Q", format=".0%", title="flip (any collateral)"),
                 alt.Tooltip("collateral_rate:Q", format=".0%", title="collateral"), "direction:N", "mask:N",
                 alt.Tooltip("scale:Q", format=".3g")])
    text = base.mark_text(fontSize=10).encode(text=alt.Text("flip:Q", format=".0%"),
                                              color=alt.condition("datum.flip > 0.6", alt.value("black"),
                                                                  alt.value("white")))
    return (alt.layer(rect, text, height=height, width=150)
            .facet(column=alt.Column("layer:N", title=None, header=alt.Header(labelLimit=200, labelFontSize=10))))


def causal_map_chart(grid: pl.DataFrame, height: int = 360) -> dict[str, Any]:
    """The causal map: per layer a concept x window grid of held-out flip rates (cells with collateral <= 20%; 0
    where none qualifies), each cell's collateral rate, direction, mask and scale in its tooltip."""
    cells = grid.with_columns(flip=pl.col("flip_rate").fill_null(0.0).fill_nan(0.0)).select(
        "concept", "layer", "window", "flip", "any_flip", "collateral_rate", "direction", "mask", "scale")
    return _fill(causal_map_template(height), cells=cells)
