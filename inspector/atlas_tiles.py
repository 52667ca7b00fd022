"""The atlas's pictures as the pages show them: the Atlas page's grid tiles (a unit's prior and / or dream side by
side in one image, its numbers and a link to its page) and the unit page's atlas section (every prior and dream of
the unit, with the dreams' animations and the heat-map-over-steps animation as GIFs).

The grid shows each image's thumbnail, the small JPEG the atlas writes beside it (schema.atlas_thumbnail; the full
image for a run written before thumbnails), decoded for the visible tiles only (ui.thumbs, in parallel, cached by
file and size); the unit page shows the full images. GIFs are sent as they are (Streamlit keeps a GIF's bytes, so
it plays in the browser).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import streamlit as st

from backend.run.schema import ATLAS_THUMB_PX, atlas_thumbnail
from inspector import overlay, queries, ui
from inspector.queries import Run

TILE_PX = 160
TILE_GAP_PX = 6
COLUMNS = 6


def _jpegs(run: Run, paths: list[str | None], size: int) -> list[bytes | None]:
    return [None if a is None else overlay.to_jpeg(a) for a in ui.thumbs(run, paths, size)]


def tile_pictures(run: Run, images: list[str | None]) -> list[np.ndarray | None]:
    """The grid pictures of atlas images: their thumbnails (longer side ATLAS_THUMB_PX), or the image itself scaled
    to that size where a thumbnail is missing (a run written before thumbnails)."""
    small = ui.thumbs(run, [None if p is None else atlas_thumbnail(p) for p in images], ATLAS_THUMB_PX)
    missing = [i for i, (p, t) in enumerate(zip(images, small, strict=True)) if p is not None and t is None]
    for i, full in zip(missing, ui.thumbs(run, [images[i] for i in missing], ATLAS_THUMB_PX), strict=True):
        small[i] = full
    return small


def tile_caption(r: dict, kind: str) -> str:
    """A tile's caption: the unit, its density and peak step, its best concept (and the dream's objective)."""
    bits = [f"{kind} {r['unit']}", f"density {ui.format_float(r['density'])}"]
    if r.get("peak_step") is not None:
        bits.append(f"peak step {r['peak_step']}")
    if r.get("concept"):
        bits.append(f"{r['concept']} ({ui.format_float(r['auroc'])})")
    if r.get("objective") is not None:
        bits.append(f"objective {ui.format_float(r['objective'])}")
    flags = [f for f in ("dead", "dense") if r.get(f)]
    return " · ".join(bits + flags)


def tile_image(pictures: list[np.ndarray | None]) -> np.ndarray | None:
    """The pictures of one tile side by side (prior left, dream right) as one image, a gap between them and a grey
    square for a missing one; None when all are missing. One image a tile: half the browser's requests and
    elements of two."""
    if all(p is None for p in pictures):
        return None
    height = max(p.shape[0] for p in pictures if p is not None)
    parts = []
    for p in pictures:
        if p is None:
            p = np.full((height, height, 3), 200, np.uint8)
        elif p.shape[0] != height:
            p = overlay.thumbnail(p, height)
        if parts:
            parts.append(np.full((height, TILE_GAP_PX, 3), 255, np.uint8))
        parts.append(p)
    return np.concatenate(parts, axis=1)


def grid(run: Run, layer: str, kind: str, rows: pl.DataFrame) -> None:
    """One page of the atlas grid: per unit its prior and / or dream (side by side in one image), a caption and a
    link to its unit page."""
    columns = [c for c in ("prior_image", "dream_image") if rows[c].null_count() < rows.height]
    label = " | ".join(c.split("_")[0] for c in columns)
    for i, r in enumerate(rows.iter_rows(named=True)):
        if i % COLUMNS == 0:  # a row of tiles at a time (the DOM runs row by row), decoded just before it is sent:
            cols = st.columns(COLUMNS)  # the first row shows while the next ones decode
            decoded = {c: tile_pictures(run, rows[c][i:i + COLUMNS].to_list()) for c in columns}
        with cols[i % COLUMNS], st.container(border=True):
            image = tile_image([decoded[c][i % COLUMNS] for c in columns])
            if image is not None:
                st.image(overlay.to_jpeg(image), caption=label)
            else:
                st.caption("(no image)")
            st.caption(tile_caption(r, kind))
            st.page_link(ui.UNIT_PAGE, label=f"unit {r['unit']}", icon=":material/open_in_new:",
                         help=f"open {kind} {r['unit']}", query_params=ui.unit_params(run, layer, kind, r["unit"]))


def gif_bytes(run: Run, relative: str | None) -> bytes | None:
    """A GIF of the run by its run-relative path (checked to stay inside the run); None when missing."""
    if not relative:
        return None
    try:
        return queries.run_file(run, relative).read_bytes()
    except (queries.InspectorError, OSError):
        return None


def unit_section(run: Run, layer: str, kind: str, unit: int) -> None:
    """The unit page's atlas section: its priors and dreams by variant, each dream beside its animation, and the
    heat-map-over-steps animation of its top example; a note naming the command when the unit has none."""
    st.subheader("Atlas: prior and dreams")
    atlas_cmd = f"python cli.py atlas --run {run.arg} --layer {layer} --kind {kind} --units {unit}"
    if "atlas" not in queries.tables(run):
        st.info(f"not computed yet: run `{atlas_cmd}`")
        return
    entry = queries.unit_atlas(run, layer, kind, unit)
    rows = entry["rows"]
    if rows.is_empty():
        st.info(f"no atlas entry for this {kind}: run `{atlas_cmd}`")
    for (what, variant), group in rows.group_by(["what", "variant"], maintain_order=True):
        st.caption(f"**{what}** · {variant} · target steps {group['target_steps'][0]}")
        group = group.head(COLUMNS)
        cols = st.columns(COLUMNS)
        gifs = [gif_bytes(run, a) for a in group["animation"].to_list()]
        stills = _jpegs(run, [None if g is not None else im for g, im in zip(gifs, group["image"], strict=True)],
                        TILE_PX)  # a still only where there is no animation
        for i, r in enumerate(group.iter_rows(named=True)):
            with cols[i]:
                label = f"seed {r['seed']}" + (f" · objective {ui.format_float(r['objective'])}"
                                               if r["objective"] is not None else "")
                gif = gifs[i]
                if gif is not None:
                    st.image(gif, caption=f"{label} · animation")
                elif stills[i] is not None:
                    st.image(stills[i], caption=label)
                else:
                    st.caption(f"(image missing: {r['image']})")
    heat = gif_bytes(run, entry["heatmap_animation"])
    if heat is not None:
        st.caption("heat-map over the denoising steps, top example")
        st.image(heat, width=TILE_PX)
