"""The atlas's pictures as the pages show them: the Atlas page's grid tiles (a unit's prior and / or dream side by
side in one image, its numbers and a link to its page) and the unit page's atlas section (every prior and dream of
the unit, with the dreams' animations and the heat-map-over-steps animation as GIFs).

The grid shows each image's thumbnail, the small JPEG the atlas writes beside it (schema.atlas_thumbnail), inlined
as its file's bytes (no decoding or re-encoding on the server: the browser decodes it); for a run written before
thumbnails, the full image reduced to the thumbnail size (ui.thumbs, in parallel, cached by file and size). The unit
page shows the full images. GIFs are sent as they are (Streamlit keeps a GIF's bytes, so
it plays in the browser).
"""

from __future__ import annotations

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


def tile_jpegs(run: Run, images: list[str | None]) -> list[bytes | None]:
    """The grid JPEGs of atlas images: each thumbnail file's bytes as written (schema.atlas_thumbnail: longer side
    ATLAS_THUMB_PX at most), or, where the thumbnail is missing (a run written before thumbnails), the image itself
    reduced to that size and encoded; None for no image (or an unreadable one)."""
    jpegs = [ui.run_file_bytes(run, None if p is None else atlas_thumbnail(p)) for p in images]
    missing = [i for i, (p, j) in enumerate(zip(images, jpegs, strict=True)) if p is not None and j is None]
    for i, jpeg in zip(missing, _jpegs(run, [images[i] for i in missing], ATLAS_THUMB_PX), strict=True):
        jpegs[i] = jpeg
    return jpegs


def tile_caption(r: dict, kind: str) -> str:
    """A tile's caption: the unit, its density and peak step, its best concept (and the dream's objective)."""
    bits = [f"{kind} {r['unit']}", f"density {ui.format_float(r['density'])}"]
    if r.get("peak_step") is not None:
        bits.append(f"peak step {r['peak_step']}")
    if r.get("label"):
        bits.append(f"label {r['label']}")
    if r.get("concept"):
        bits.append(f"{r['concept']} ({ui.format_float(r['auroc'])})")
    if r.get("objective") is not None:
        bits.append(f"objective {ui.format_float(r['objective'])}")
    flags = [f for f in ("dead", "dense") if r.get(f)]
    return " · ".join(bits + flags)


TILE_STYLE = ("display:block;border:1px solid rgba(128,128,128,0.3);border-radius:0.5rem;padding:0.4rem;"
              "text-decoration:none;color:inherit")
GRID_STYLE = f"display:grid;grid-template-columns:repeat({COLUMNS},minmax(0,1fr));gap:0.75rem"
CAPTION_STYLE = "font-size:0.8rem;opacity:0.75;margin-top:0.25rem;line-height:1.3"
PICTURES_STYLE = f"display:flex;gap:{TILE_GAP_PX}px;align-items:flex-start"
PICTURE_STYLE = "flex:1 1 0;min-width:0;width:100%;height:auto;display:block"
MISSING_STYLE = "aspect-ratio:1;background:rgb(200,200,200)"


def tile_html(jpegs: list[bytes | None], label: str, caption: str, href: str, title: str) -> str:
    """One grid tile: its pictures side by side (inline JPEGs, prior left, dream right; a grey square for a missing
    one) over its label and caption, the whole tile a link to href."""
    import base64
    from html import escape

    if all(j is None for j in jpegs):
        pictures = '<div style="padding:2rem 0;text-align:center">(no image)</div>'
    else:
        pictures = "".join(
            f'<img src="data:image/jpeg;base64,{base64.b64encode(j).decode()}" alt="{escape(title)}: {escape(part)}" '
            f'style="{PICTURE_STYLE}">' if j is not None else f'<div style="{PICTURE_STYLE};{MISSING_STYLE}"></div>'
            for j, part in zip(jpegs, label.split(" | "), strict=True))
        pictures = f'<div class="atlas-pictures" style="{PICTURES_STYLE}">{pictures}</div>'
    return (f'<a class="atlas-tile" href="{escape(href)}" target="_self" title="open {escape(title)}" '
            f'style="{TILE_STYLE}">{pictures}<div class="atlas-caption" style="{CAPTION_STYLE}">{escape(label)}<br>'
            f"{escape(caption)}</div></a>")


def grid(run: Run, layer: str, kind: str, rows: pl.DataFrame) -> None:
    """One page of the atlas grid as one HTML element: per unit its prior and / or dream side by side (their
    thumbnails' JPEG bytes inline: tile_jpegs), a caption, the tile a link to its unit page. One element rather than
    five Streamlit elements a tile (container, image, captions, page link) and no media request per picture: the
    browser lays out the page once."""
    from urllib.parse import urlencode

    columns = [c for c in ("prior_image", "dream_image") if rows[c].null_count() < rows.height]
    label = " | ".join(c.split("_")[0] for c in columns)
    jpegs = {c: tile_jpegs(run, rows[c].to_list()) for c in columns}
    tiles = [tile_html([jpegs[c][i] for c in columns], label, tile_caption(r, kind),
                       f"unit?{urlencode(ui.unit_params(run, layer, kind, r['unit']))}", f"{kind} {r['unit']}")
             for i, r in enumerate(rows.iter_rows(named=True))]
    st.html(f'<div class="atlas-grid" style="{GRID_STYLE}">{"".join(tiles)}</div>')


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
        gifs = [ui.run_file_bytes(run, a) for a in group["animation"].to_list()]
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
    heat = ui.run_file_bytes(run, entry["heatmap_animation"])
    if heat is not None:
        st.caption("heat-map over the denoising steps, top example")
        st.image(heat, width=TILE_PX)
