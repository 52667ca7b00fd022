"""The unit atlas in the inspector: inspector/queries/atlas.py (the grid filtered, sorted and paged in DuckDB, one
unit's entries) and the Atlas page and the unit page's atlas section (AppTest) on tests/inspector_runs.py's run,
whose `atlas` table has priors for every feature and channel of the first layer and dreams (two variants, with
GIFs) for features 0-5."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from inspector_runs import ATLAS_SEEDS, L_MID, N_CHANNELS, N_FEATURES

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "inspector" / "app.py"
PRIOR, DREAM = ("default", 0), ("default", 0)


@pytest.fixture()
def run(runs_dir):
    from inspector import queries as q

    return q.open_run(runs_dir, "tiny")


def _atlas_app(root: Path, monkeypatch, **params):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFLENS_RUNS", str(root))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update({"run": "tiny", **params})
    at.run()
    at.switch_page("views/atlas.py")
    at.run()
    _ok(at)
    return at


def _ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _tiles(at) -> list[dict]:
    """The grid's tiles (one HTML element, inspector/atlas_tiles.py grid): each one's link, its pictures' inline
    sources and alt texts, and its caption."""
    import html
    import re

    body = "".join(h.proto.body for h in at.get("html"))
    tiles = []
    for href, pictures, caption in re.findall(r'<a class="atlas-tile" href="([^"]*)"[^>]*>(.*?)'
                                              r'<div class="atlas-caption"[^>]*>(.*?)</div></a>', body):
        images = re.findall(r'<img src="([^"]*)" alt="([^"]*)"', pictures)
        tiles.append({"href": html.unescape(href), "caption": html.unescape(caption),
                      "images": [src for src, _ in images], "alts": [html.unescape(alt) for _, alt in images],
                      "missing": pictures.count("aspect-ratio:1")})
    return tiles


def _tile_units(at) -> list[int]:
    return [int(t["href"].rsplit("unit=", 1)[1]) for t in _tiles(at)]


# ------------------------------------------------------------------------------------------------ queries


def test_the_grid_is_filtered_sorted_and_paged(run):
    from inspector import queries as q

    assert q.atlas_partitions.uncached(run).rows() == [(L_MID, "channel", N_CHANNELS), (L_MID, "feature", N_FEATURES)]
    opts = q.atlas_options.uncached(run, L_MID, "feature")
    assert sorted(set(opts["variant"])) == ["default", "no-noise"] and sorted(set(opts["seed"])) == list(ATLAS_SEEDS)

    both = q.atlas_grid.uncached(run, L_MID, "feature", PRIOR, DREAM)
    assert both["total"] == N_FEATURES and both["pages"] == 1
    rows = both["rows"]
    assert rows["unit"].to_list() == list(range(N_FEATURES))
    assert rows["dream_image"].null_count() == N_FEATURES - 6 and rows["prior_image"].null_count() == 0
    assert rows.filter(rows["unit"] == 3)["prior_image"].item().endswith("prior-default/unit-00003-seed0.png")

    dreams = q.atlas_grid.uncached(run, L_MID, "feature", None, ("no-noise", 1), "dream objective", True)
    assert dreams["rows"]["unit"].to_list() == [5, 4, 3, 2, 1, 0]
    assert dreams["rows"]["dream_image"][0].endswith("dream-no-noise/unit-00005-seed1.png")

    dense = q.units.uncached(run, L_MID, "feature").sort("density", descending=True)
    by_density = q.atlas_grid.uncached(run, L_MID, "feature", PRIOR, None, "density", True)
    assert by_density["rows"]["density"].to_list() == dense["density"].to_list()

    pages = [q.atlas_grid.uncached(run, L_MID, "feature", PRIOR, None, "unit", False, "all", None, p, 4)
             for p in (1, 2, 3, 9)]
    assert [p["rows"]["unit"].to_list() for p in pages] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [8, 9]]
    assert [p["page"] for p in pages] == [1, 2, 3, 3] and pages[0]["pages"] == 3

    dead = q.atlas_grid.uncached(run, L_MID, "feature", PRIOR, None, "unit", False, "dead")
    assert dead["rows"]["unit"].to_list() == [0]
    best_red = q.unit_concepts.uncached(run, L_MID, "feature", 2)["concept"].to_list()[0]
    of_concept = q.atlas_grid.uncached(run, L_MID, "feature", PRIOR, None, "unit", False, "all", best_red)
    assert 2 in of_concept["rows"]["unit"].to_list() and of_concept["total"] < N_FEATURES


def test_the_grid_refuses_unknown_sorts_and_flags(run):
    from inspector import queries as q

    with pytest.raises(q.InspectorError, match="unknown sort"):
        q.atlas_grid.uncached(run, L_MID, "feature", PRIOR, None, "unit; DROP TABLE units")
    with pytest.raises(q.InspectorError, match="unknown flag"):
        q.atlas_grid.uncached(run, L_MID, "feature", PRIOR, None, "unit", False, "nope")
    with pytest.raises(q.InspectorError, match="priors, dreams or both"):
        q.atlas_grid.uncached(run, L_MID, "feature", None, None)


def test_one_units_atlas_entries(run):
    from inspector import queries as q

    entry = q.unit_atlas.uncached(run, L_MID, "feature", 2)
    rows = entry["rows"]
    assert rows.height == len(ATLAS_SEEDS) * 3  # a prior and two dream variants per seed
    assert rows["what"].to_list()[:2] == ["prior", "prior"]
    assert rows.filter(rows["what"] == "dream")["animation"].null_count() == 0
    assert entry["heatmap_animation"] == f"media/atlas/{L_MID}/feature/heatmaps/unit-00002.gif"
    assert q.unit_atlas.uncached(run, L_MID, "feature", 7)["heatmap_animation"] is None


# ------------------------------------------------------------------------------------------------ the page


def test_atlas_page_shows_a_grid_that_links_to_unit_pages(runs_dir, monkeypatch):
    at = _atlas_app(runs_dir, monkeypatch, layer=L_MID, kind="feature")
    assert at.title[0].value == "Atlas"
    assert _tile_units(at) == list(range(N_FEATURES))
    tiles = _tiles(at)
    assert len(at.get("html")) == 1 and not at.image  # the whole grid: one element
    assert all(src.startswith("data:image/jpeg;base64,") for t in tiles for src in t["images"])  # inline
    assert all(t["caption"].startswith("prior | dream<br>feature ") for t in tiles)
    assert tiles[2]["alts"] == ["feature 2: prior", "feature 2: dream"]
    assert all(len(t["images"]) + t["missing"] == 2 for t in tiles)  # a grey square where a unit has no dream
    assert sum(t["missing"] for t in tiles) == N_FEATURES - 6
    assert f"{N_FEATURES} features of `{L_MID}`" in at.caption[0].value
    query = tiles[2]["href"].removeprefix("unit?")
    assert query == f"run=tiny&layer={L_MID}&kind=feature&unit=2"
    at.query_params.update(dict(p.split("=", 1) for p in query.split("&")))
    at.switch_page("views/unit.py")
    at.run()
    _ok(at)
    assert at.title[0].value == "feature 2"

    at = _atlas_app(runs_dir, monkeypatch, layer=L_MID, kind="channel")
    assert _tile_units(at) == list(range(N_CHANNELS))
    assert at.segmented_control(key="atlas.show").options == ["prior"]


def test_atlas_page_sorts_and_filters(runs_dir, monkeypatch):
    from inspector import queries as q

    at = _atlas_app(runs_dir, monkeypatch, layer=L_MID, kind="feature")
    at.selectbox(key="atlas.sort").set_value("density").run()
    _ok(at)
    dense = q.units.uncached(q.open_run(runs_dir, "tiny"), L_MID, "feature").sort(["density", "unit"],
                                                                                descending=[True, False])
    assert _tile_units(at) == dense["unit"].to_list()  # descending by default for everything but the unit
    at.segmented_control(key="atlas.show").set_value("dream").run()
    at.selectbox(key="atlas.sort").set_value("dream objective").run()
    _ok(at)
    assert _tile_units(at) == [5, 4, 3, 2, 1, 0]
    at.selectbox(key="atlas.flag").set_value("dead").run()
    assert _tile_units(at) == [0]
    at.selectbox(key="atlas.flag").set_value("live").run()
    concept = q.unit_concepts.uncached(q.open_run(runs_dir, "tiny"), L_MID, "feature", 2)["concept"][0]
    at.selectbox(key="atlas.concept").set_value(concept).run()
    _ok(at)
    assert 2 in _tile_units(at) and len(_tile_units(at)) < 6


def test_atlas_page_pages_through_a_layer(runs_dir, monkeypatch):
    from inspector import queries as q

    monkeypatch.setattr(q, "ATLAS_PAGE_SIZE", 4)
    at = _atlas_app(runs_dir, monkeypatch, layer=L_MID, kind="feature")
    assert _tile_units(at) == [0, 1, 2, 3]
    pager = at.get("pagination")[0]
    pager.set_value(3).run()
    _ok(at)
    assert _tile_units(at) == [8, 9]
    assert "9-10 shown" in at.caption[0].value
    at.selectbox(key="atlas.flag").set_value("live").run()  # other filters: back to the first page
    assert _tile_units(at) == [1, 2, 3, 4]


def test_unit_page_shows_the_units_atlas_with_animations(runs_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DIFFLENS_RUNS", str(runs_dir))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update({"run": "tiny", "layer": L_MID, "kind": "feature", "unit": "2"})
    at.run()
    at.switch_page("views/unit.py")
    at.run()
    _ok(at)
    assert "Atlas: prior and dreams" in [s.value for s in at.subheader]
    captions = [c for img in at.image for c in img.captions]
    assert sum(c.endswith("· animation") for c in captions) == 2 * len(ATLAS_SEEDS)  # the dreams' GIFs
    gifs = [img for img in at.image if any("animation" in c for c in img.captions)]
    assert all(i.proto.imgs[0].url for i in gifs)
    assert "heat-map over the denoising steps" in "\n".join(c.value for c in at.caption)


def test_atlas_page_without_an_atlas(tmp_path, runs_dir, monkeypatch):
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "tiny")
    shutil.rmtree(root / "tiny/tables/atlas")
    at = _atlas_app(root, monkeypatch)
    assert "python cli.py atlas --run" in "\n".join(i.value for i in at.info)
    assert not _tiles(at)


def test_a_tile_shows_its_pictures_side_by_side_and_a_grey_square_for_a_missing_one():
    from inspector.atlas_tiles import tile_html

    both = tile_html([b"prior-jpeg", b"dream-jpeg"], "prior | dream", "c", "unit?unit=1", "feature 1")
    assert both.index("cHJpb3ItanBlZw==") < both.index("ZHJlYW0tanBlZw==")  # base64 of the bytes, prior first
    alone = tile_html([b"prior-jpeg", None], "prior | dream", "c", "unit?unit=1", "feature 1")
    assert alone.count("<img ") == 1 and alone.count("aspect-ratio:1") == 1
    assert "(no image)" in tile_html([None, None], "prior | dream", "c", "unit?unit=1", "feature 1")


def test_atlas_tiles_carry_the_units_label(runs_dir, monkeypatch):
    at = _atlas_app(runs_dir, monkeypatch, layer=L_MID, kind="feature")
    _ok(at)
    assert any("feature 2 · " in t["caption"] and "label colour=red" in t["caption"] for t in _tiles(at))


def test_the_grid_shows_thumbnails_and_full_images_where_there_are_none(tmp_path, runs_dir):
    """A tile's picture is the image's thumbnail (schema.atlas_thumbnail) when the atlas wrote one, its file's bytes
    as they are, else the image itself at the thumbnail size (a run written before thumbnails)."""
    import numpy as np
    from PIL import Image

    from backend.run.schema import ATLAS_THUMB_PX, atlas_thumbnail
    from inspector import atlas_tiles
    from inspector import queries as q

    root = tmp_path / "runs"
    shutil.copytree(runs_dir, root)
    run = q.open_run(root, "tiny")
    rows = q.atlas_grid.uncached(run, L_MID, "feature", PRIOR, None, "unit", False, "all", None, 1, 3)["rows"]
    images = rows["prior_image"].to_list()
    blue = np.zeros((ATLAS_THUMB_PX, ATLAS_THUMB_PX, 3), np.uint8)
    blue[..., 2] = 255
    Image.fromarray(blue).save(root / "tiny" / atlas_thumbnail(images[1]), format="JPEG")
    jpegs = atlas_tiles.tile_jpegs(run, [*images, None])
    assert jpegs[1] == (root / "tiny" / atlas_thumbnail(images[1])).read_bytes()
    pictures = [None if j is None else np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
    assert pictures[3] is None and all(p.shape == (ATLAS_THUMB_PX, ATLAS_THUMB_PX, 3) for p in pictures[:3])
    assert pictures[1][..., 2].min() > 200 and pictures[1][..., 0].max() < 40  # the thumbnail
    for i in (0, 2):  # no thumbnail: the image, each unit its own red
        full = np.asarray(Image.open(root / "tiny" / images[i]).convert("RGB"))
        assert abs(int(pictures[i][..., 0].mean()) - int(full[..., 0].mean())) <= 2
