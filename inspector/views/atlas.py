"""Atlas page: every unit's steered prior and deep dream of a layer and kind, as a grid of thumbnails, sortable by
density, peak step, best concept, max activation or dream objective, filtered by flag (live, dead, dense) and by
concept, a page of 48 units at a time (filtered, sorted and paged in DuckDB: inspector/queries/atlas.py; only the
visible page's thumbnails are read). Each tile links to its unit page. Deep-linkable:
`atlas?run=RUN&layer=LAYER&kind=KIND&sort=SORT`."""

from __future__ import annotations

import polars as pl
import streamlit as st

from inspector import atlas_tiles, queries, ui

LAYER, KIND, SORT = "atlas.layer", "atlas.kind", "atlas.sort"
SHOW = {"prior": ("prior",), "dream": ("dream",), "prior + dream": ("prior", "dream")}

st.title("Atlas")
run = ui.require_run()

parts = pl.DataFrame()
with ui.guard():
    parts = queries.atlas_partitions(run)
if parts.is_empty():
    st.stop()

ui.seed_from_url({"layer": (LAYER, str), "kind": (KIND, str), "sort": (SORT, str)})
layers = parts["layer"].unique(maintain_order=True).to_list()
ui.clamp_state(LAYER, layers)
layer_now = st.session_state.get(LAYER, layers[0])
kinds = parts.filter(pl.col("layer") == layer_now)["kind"].to_list()
ui.clamp_state(KIND, kinds)

c1, c2, c3 = st.columns([4, 2, 3])
layer = c1.selectbox("Layer", layers, key=LAYER)
kind = c2.selectbox("Kind", kinds, key=KIND)

options = queries.atlas_options(run, layer, kind)
whats = [w for w in ("prior", "dream") if w in options["what"].to_list()]
shows = [s for s, need in SHOW.items() if set(need) <= set(whats)]
show = c3.segmented_control("Show", shows, default=shows[-1], key="atlas.show") or shows[-1]


def _variant(what: str, column) -> tuple[str, int] | None:
    """The (variant, seed) of `what` chosen in column (None when `what` is not shown)."""
    if what not in SHOW[show]:
        return None
    mine = options.filter(pl.col("what") == what)
    variants = mine["variant"].unique(maintain_order=True).to_list()
    a, b = column.columns(2)
    variant = a.selectbox(f"{what} variant", variants, key=f"atlas.{what}.variant")
    seeds = mine.filter(pl.col("variant") == variant)["seed"].to_list()
    seed = b.selectbox(f"{what} seed", seeds, key=f"atlas.{what}.seed")
    return variant, int(seed)


v1, v2 = st.columns(2)
prior = _variant("prior", v1)
dream = _variant("dream", v2)

f1, f2, f3, f4 = st.columns([3, 2, 2, 3])
sorts = [s for s in queries.ATLAS_SORTS if s != "dream objective" or dream is not None]
ui.clamp_state(SORT, sorts)
sort = f1.selectbox("Sort by", sorts, key=SORT)
ui.write_url({"layer": layer, "kind": kind, "sort": sort})
descending = f2.toggle("descending", value=sort != "unit", key=f"atlas.desc-{sort}")
flag = f3.selectbox("Units", list(queries.ATLAS_FLAGS), key="atlas.flag",
                    help="dead: never active; dense: active almost everywhere (analysis flags)")
concepts = queries.concept_names(run, layer, kind)
concept = f4.selectbox("Concept", ["any", *concepts], key="atlas.concept",
                       help="only units among the best units of this concept (by AUROC)")

page_key = f"atlas.page-{layer}-{kind}-{show}-{prior}-{dream}-{sort}-{descending}-{flag}-{concept}"
with ui.guard():
    asked = int(st.session_state.get(page_key, 1))
    found = queries.atlas_grid(run, layer, kind, prior, dream, sort, descending, flag,
                               None if concept == "any" else concept, asked, queries.ATLAS_PAGE_SIZE)
    if found["page"] != asked:  # clamped to the pages there are (set only then: the widget owns its state)
        st.session_state[page_key] = found["page"]
    first = (found["page"] - 1) * queries.ATLAS_PAGE_SIZE
    st.caption(f"{found['total']:,} {kind}s of `{layer}` in the atlas match; {first + 1 if found['total'] else 0}"
               f"-{first + found['rows'].height} shown (click a tile to open its unit)")
    if found["total"]:
        atlas_tiles.grid(run, layer, kind, found["rows"])
    if found["pages"] > 1:
        st.pagination(found["pages"], key=page_key)
