"""Helpers shared by the inspector's pages: the selected run, error guards, URL <-> widget state, links, images."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import streamlit as st

from inspector import live, overlay, queries
from inspector.queries import InspectorError, Run, RunError, TableMissing, UnsafePath

log = logging.getLogger("difflens.inspector")

ROOT_KEY = "_runs_root"
RUN_KEY = "run"
URL_WRITTEN = "_url_written"
UNIT_PAGE = "views/unit.py"
UNITS_PAGE = "views/units.py"


# ------------------------------------------------------------------------------------------------ run selection


def runs_root() -> Path:
    value = st.session_state.get(ROOT_KEY)
    return Path(value) if value else queries.runs_root()


def current_run() -> Run | None:
    """The run chosen in the sidebar (None, with a message shown, when there is none)."""
    name = st.session_state.get(RUN_KEY)
    if not name:
        root = runs_root()
        st.info(f"No runs found under `{root}`. Make one with `python cli.py run-all`, or point the inspector "
                "at another directory: `streamlit run inspector/app.py -- --runs DIR`.")
        return None
    return queries.open_run(runs_root(), name)


def require_run() -> Run:
    """The current run, or stop the page (after showing why)."""
    with guard():
        run = current_run()
        if run is not None:
            return run
    st.stop()
    raise AssertionError("unreachable")  # st.stop raises


# ------------------------------------------------------------------------------------------------ errors


def show_error(exc: BaseException, what: str = "") -> None:
    prefix = f"{what}: " if what else ""
    if isinstance(exc, TableMissing):
        st.info(f"{prefix}{exc}")
    elif isinstance(exc, UnsafePath):
        st.error(f"{prefix}refused: {exc}")
    elif isinstance(exc, RunError | InspectorError) or _is_user_error(exc):
        st.error(f"{prefix}{exc}")
    else:
        log.exception("inspector page error")
        st.error(f"{prefix}something went wrong reading this run ({type(exc).__name__}: {exc}). The run may be "
                 "partial or corrupt; details are in the server log.")


def _is_user_error(exc: BaseException) -> bool:
    """A backend error whose message names the problem and its fix (backend.errors.DifflensError)."""
    from backend.errors import DifflensError  # a tiny module: no model code

    return isinstance(exc, DifflensError)


@contextmanager
def guard(what: str = "") -> Iterator[None]:
    """Show any error inside the block as a message in the page (never a traceback); the page goes on after it.
    Streamlit's own control flow (st.stop, st.rerun, st.switch_page) passes through."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the page must show a message, not a traceback
        show_error(exc, what)


# ------------------------------------------------------------------------------------------------ URL state


def run_partitions(run: Run) -> pl.DataFrame:
    """The run's (layer, kind) partitions (queries.partitions); an empty frame, with a note on the page, when it has
    none or they cannot be read."""
    parts = pl.DataFrame()
    with guard():
        parts = queries.partitions(run)
        if parts.is_empty():
            st.info("this run has no units yet: run `python cli.py capture` and `python cli.py analyze`")
    return parts


def seed_from_url(params: dict[str, tuple[str, Callable[[str], object]]]) -> None:
    """Before the widgets: params maps a URL parameter to (widget key, parser). A widget's state is loaded from
    its parameter when the parameter changed since this session last wrote it (a deep link, a link from another
    page, an edited URL) or when the widget has no state yet (first visit to the page). Widget keys are
    page-specific: Streamlit does not carry a value between two widgets that share a key on different pages.
    Unparseable values are ignored."""
    written = st.session_state.setdefault(URL_WRITTEN, {})
    for param, (key, parse) in params.items():
        raw = st.query_params.get(param)
        if raw is None:
            continue
        if written.get(param) == raw and key in st.session_state:
            continue
        try:
            value = parse(raw)
        except (TypeError, ValueError):
            continue
        st.session_state[key] = value
        written[param] = raw


def write_url(values: dict[str, object]) -> None:
    """After the widgets: put the current values in the URL (None removes a parameter)."""
    written = st.session_state.setdefault(URL_WRITTEN, {})
    for key, value in values.items():
        if value is None:
            if key in st.query_params:
                del st.query_params[key]
            written.pop(key, None)
            continue
        text = str(value)
        if st.query_params.get(key) != text:
            st.query_params[key] = text
        written[key] = text


def kind_label(kind: str) -> str:
    """How a kind shows in a picker: which SAE a feature kind is (`feature` is the layer's default SAE; deep links
    name another with kind=feature.<sae_id>)."""
    from backend.run.schema import sae_id_of

    sae_id = sae_id_of(kind)
    return kind if sae_id is None else f"{kind} (SAE {sae_id})"


def clamp_state(key: str, options: list, default=None) -> None:
    """Reset a widget's state when it holds a value that is not among its options (e.g. from a stale link)."""
    if key in st.session_state and st.session_state[key] not in options:
        st.session_state[key] = default if default is not None else (options[0] if options else None)


# ------------------------------------------------------------------------------------------------ links


def unit_params(run: Run, layer: str, kind: str, unit: int, step: int | None = None) -> dict[str, str]:
    params = {"run": run.name, "layer": layer, "kind": kind, "unit": str(int(unit))}
    if step is not None and step >= 0:
        params["step"] = str(int(step))
    return params


def open_unit(run: Run, layer: str, kind: str, unit: int, step: int | None = None) -> None:
    """Switch to the unit page showing this unit."""
    st.switch_page(UNIT_PAGE, query_params=unit_params(run, layer, kind, unit, step))


def unit_url(run: Run, layer: str, kind: str, unit: int) -> str:
    """A relative deep link to a unit (for link columns)."""
    from urllib.parse import urlencode

    return "unit?" + urlencode(unit_params(run, layer, kind, unit))


# ------------------------------------------------------------------------------------------------ images


THUMB_CACHE_ENTRIES = 1024
_thumbs: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
_thumbs_lock = threading.Lock()
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="inspector-thumbs")


def _thumb_file(path: Path, size: int) -> np.ndarray | None:
    """A file's display-size image, decoded once (a small LRU of arrays shared by all sessions; thread-safe, so a
    page can decode its images in parallel: PIL releases the GIL while decoding)."""
    from PIL import Image

    try:
        key = (str(path), path.stat().st_mtime_ns, size)
        with _thumbs_lock:
            if key in _thumbs:
                _thumbs.move_to_end(key)
                return _thumbs[key]
        with Image.open(path) as img:
            arr = overlay.thumbnail(img, size)
    except OSError:
        return None
    with _thumbs_lock:
        _thumbs[key] = arr
        while len(_thumbs) > THUMB_CACHE_ENTRIES:
            _thumbs.popitem(last=False)
    return arr


def _file(run: Run, relative: str | None) -> Path | None:
    if not relative:
        return None
    try:
        return queries.run_file(run, relative)  # resolved and checked to stay inside the run
    except (RunError, UnsafePath):
        return None


def run_file_bytes(run: Run, relative: str | None) -> bytes | None:
    """A run file's bytes by its run-relative path (checked to stay inside the run); None when missing or
    unreadable."""
    path = _file(run, relative)
    try:
        return None if path is None else path.read_bytes()
    except OSError:
        return None


def thumbs(run: Run, relatives: list[str | None], size: int = 192) -> list[np.ndarray | None]:
    """Run images at display size (uint8 [h, w, 3]), decoded in parallel; None for a missing or unreadable one."""
    futures = [_pool.submit(_thumb_file, path, size) if path is not None else None
               for path in (_file(run, r) for r in relatives)]
    return [f.result() if f is not None else None for f in futures]


def thumb(run: Run, relative: str | None, size: int = 192) -> np.ndarray | None:
    path = _file(run, relative)
    return _thumb_file(path, size) if path is not None else None


@st.cache_data(max_entries=4096, show_spinner=False)
def _jpeg(path: str, mtime_ns: int, size: int) -> bytes | None:
    arr = _thumb_file(Path(path), size)
    return None if arr is None else overlay.to_jpeg(arr)


def show_image(run: Run, relative: str | None, caption: str | None = None, size: int = 192) -> None:
    path = _file(run, relative)
    data = None
    if path is not None:
        try:
            data = _jpeg(str(path), path.stat().st_mtime_ns, size)
        except OSError:
            data = None
    if data is None:
        st.caption(f"(image missing: {relative})" if relative else "(no image)")
        if caption:
            st.caption(caption)
        return
    st.image(data, caption=caption)


def heat_bytes(values) -> bytes | None:
    if values is None:
        return None
    return np.asarray(values, np.float32).tobytes()


def format_float(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    try:
        if value != value:  # NaN
            return "-"
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def parse_units(text: str) -> list[int] | None:
    """The Lab's comma-separated units as integers; None after an error message when they are not."""
    try:
        return [int(u) for u in text.replace(" ", "").split(",") if u]
    except ValueError:
        st.error("units must be integers separated by commas")
        return None


def steer_items(run: Run, layer: str, kind: str, units: list[int], strength: float,
                sae=None) -> list[tuple[str, int, float]]:
    """The Lab's (kind, unit, strength) steering items: strength x what 1.0 means for each unit (its largest recorded
    activation, inspector/live.py strength_unit)."""
    items = []
    with guard("strength"):
        for u in units:
            row = queries.unit_row(run, layer, kind, u) if "units" in queries.tables(run) else None
            items.append((kind, u, float(strength) * live.strength_unit(kind, u, row["max"] if row else None, sae)))
    return items


def unit_tiles(run: Run, layer: str, kind: str, image_HW3: np.ndarray, tops: list[dict], step: int) -> None:
    """The Lab's top units of one image (inspector/live.py top_units): each unit's heat-map over the image, four a
    row, with a link to its unit page."""
    cols = st.columns(4)
    small = overlay.thumbnail(image_HW3, 160)
    for i, t in enumerate(tops):
        with cols[i % 4]:
            tile = overlay.overlay_jpeg(small, t["heatmap"].tobytes(), *t["heatmap"].shape, 160)
            st.image(tile, caption=f"{kind} {t['unit']} · mean {t['mean']:.3g} · max {t['max']:.3g}")
            st.page_link(UNIT_PAGE, label=f"open {kind} {t['unit']}",
                         query_params=unit_params(run, layer, kind, t["unit"], step))
