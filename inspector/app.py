"""difflens inspector: `streamlit run inspector/app.py [-- --runs DIR]` (or `python cli.py inspect`).

The entry point: finds the runs, offers the run selector (kept in the URL as `?run=`), and hands over to the page
chosen with st.navigation. Pages read precomputed tables through the query layer (inspector/queries/) only; nothing
here imports the backend's model code (the Lab page loads a model lazily, on request).
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import streamlit as st  # noqa: E402

from inspector import queries, ui  # noqa: E402


def main() -> None:
    st.set_page_config(page_title="difflens inspector", page_icon=":material/biotech:", layout="wide")
    root = queries.runs_root()
    st.session_state[ui.ROOT_KEY] = str(root)
    names = queries.list_runs(root)

    ui.seed_from_url({"run": (ui.RUN_KEY, str)})
    if names:
        ui.clamp_state(ui.RUN_KEY, names)
        label = {n: (Path(root).name if n == "." else n) for n in names}
        st.sidebar.selectbox("Run", names, key=ui.RUN_KEY, format_func=label.get,
                             help=f"Runs found under {root}")
        ui.write_url({"run": st.session_state.get(ui.RUN_KEY)})
    else:
        st.session_state.pop(ui.RUN_KEY, None)
    st.sidebar.caption(f"runs directory: `{root}`")

    pages = [
        st.Page("views/overview.py", title="Overview", icon=":material/dashboard:", default=True),
        st.Page("views/units.py", title="Units", icon=":material/table_rows:"),
        st.Page("views/unit.py", title="Unit", icon=":material/scatter_plot:"),
        st.Page("views/atlas.py", title="Atlas", icon=":material/apps:"),
        st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:"),
        st.Page("views/sae_compare.py", title="SAEs", icon=":material/join_inner:"),
        st.Page("views/ablation.py", title="Ablation", icon=":material/grid_view:"),
        st.Page("views/causal_map.py", title="Causal map", icon=":material/hub:"),
        st.Page("views/lab.py", title="Lab", icon=":material/science:"),
        st.Page("views/sweep.py", title="Sweep", icon=":material/tune:"),
    ]
    st.navigation(pages).run()


main()
