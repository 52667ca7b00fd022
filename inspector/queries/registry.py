"""The query registry and its result cache.

A query is a function `fn(db, *args)` over a run's Database (inspector/db.py) registered with `@query`; pages call
the returned function with a Run instead, and its result is cached (`st.cache_data`) on (query, run path, run
signature, arguments), so a finished stage is picked up and nothing stale is served (inspector/runs.py).
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from inspector.db import cached_database, database
from inspector.runs import Run

QUERIES: dict[str, Callable] = {}
"""Query name -> fn(db, *args)."""


@st.cache_data(max_entries=4096, show_spinner=False)
def _cached(name: str, path: str, sig: str, label: str, args: tuple):
    return QUERIES[name](cached_database(path, sig, label), *args)


def query(fn: Callable) -> Callable:
    """Register fn(db, *args) as a query: the returned function takes (run, *args) and caches on
    (name, run path, signature, args); `.uncached(run, *args)` runs the SQL every time (benchmarks), `.on(db, *args)`
    is fn itself (for queries made of other queries, which share the caller's cache entry)."""
    name = fn.__name__
    if name in QUERIES:
        raise ValueError(f"two queries named {name!r}")
    QUERIES[name] = fn

    def call(run: Run, *args):
        return _cached(name, run.path, run.sig, run.arg, tuple(args))

    call.uncached = lambda run, *args: fn(database(run), *args)
    call.on = fn
    call.__name__ = name
    call.__qualname__ = name
    call.__doc__ = fn.__doc__
    return call
