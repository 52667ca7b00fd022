"""inspector/charts.py: every chart template is valid Vega-Lite, and the profile chart's datasets and selection."""

from __future__ import annotations

import polars as pl


def test_chart_templates_are_valid_vega_lite():
    """Run time skips Altair's validation (charts.py); every template is checked against the schema here."""
    import altair as alt
    import jsonschema
    from altair.vegalite.v6.schema.core import load_schema

    from inspector import charts

    schema = load_schema()
    params = {"profile_template": ("freq", 260), "histogram_template": ("activation", 200)}
    assert len(charts.TEMPLATES) >= 10
    for name, build in charts.TEMPLATES.items():
        with alt.utils.schemapi.debug_mode(True):
            chart = build(*params.get(name, (200,)))
            spec = chart.to_dict(validate=True)
        jsonschema.validate(spec, schema)
    prof = pl.DataFrame({"step": [0, 1], "timestep": [999.0, 0.0], "freq": [0.1, 0.5], "mean": [1.0, float("nan")],
                         "max": [2.0, 3.0]})
    pk = pl.DataFrame({"step": [1], "timestep": [0.0], "height": [0.5], "rank": [1]})
    spec = charts.profile_chart(prof, pk, "freq", 1)
    assert set(spec["datasets"]) == {"profile", "peaks", "selected"}
    assert all(isinstance(v, bytes) for v in spec["datasets"].values())
    assert spec["layer"][0]["encoding"]["x"]["scale"]["reverse"] is True  # x = timestep, reversed
    assert spec["params"][0]["name"] == charts.PICK or any(p.get("name") == charts.PICK
                                                          for layer in spec["layer"] for p in layer.get("params", []))
