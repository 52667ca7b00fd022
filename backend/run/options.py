"""Command-line options generated from the config dataclasses, so their defaults and help are written once.

`config_options(Opt("capture"), Opt("sae", ["k"], prefix="sae-"))` adds to a Typer command one option per chosen
field (`--steps`, `--sae-k`): its type from the field, its help from the field's docstring plus the dataclass
default, its value None unless given (a field that is a table of settings, such as [dream.feature], has no option:
--set dream.feature.lr=0.5 reaches it). The command receives them as one `overrides` dict of dotted keys
({"capture.steps": 10}), ready for backend.run.config.resolve (defaults < saved run config < --config < options).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Annotated

import typer

from backend.run.config import SECTIONS, RunConfig, field_docs, section_class


@dataclass(frozen=True)
class Opt:
    section: str
    """Config section ("" for the top level: name, runs_dir, model, prompts, device, dtype)."""
    fields: tuple[str, ...] | list[str] | None = None
    """Fields to expose (None: every field of the section)."""
    prefix: str = ""
    """Option-name prefix, e.g. "sae-" gives --sae-k."""
    rename: dict | None = None
    """field -> option name without dashes, e.g. {"layers": "layer"}."""


def _default_text(section: str, name: str):
    cls = section_class(section)
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if section == "" and name in ("name", "runs_dir", "model", "prompts", "device", "dtype"):
        value = getattr(RunConfig(), name)
    return value


def _option_type(tp):
    if tp is bool:
        return bool | None
    if typing.get_origin(tp) is list:
        return list[typing.get_args(tp)[0]] | None
    return tp | None


def _params(opt: Opt) -> list[tuple[str, inspect.Parameter]]:
    cls = section_class(opt.section)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if opt.section == "" and f.name in SECTIONS:
            continue
        if opt.fields is not None and f.name not in opt.fields:
            continue
        if hints[f.name] is dict:  # a table of settings (e.g. [dream.feature]): --set section.table.key=value
            continue
        flag = (opt.rename or {}).get(f.name, opt.prefix + f.name).replace("_", "-")
        default = _default_text(opt.section, f.name)
        shown = "[]" if default == [] else ("''" if default == "" else default)
        help_text = f"{docs.get(f.name, '')} [default: {shown}]".strip()
        tp = hints[f.name]
        decl = f"--{flag}/--no-{flag}" if tp is bool else f"--{flag}"
        param = (opt.section + "." if opt.section else "") + f.name
        py_name = "opt__" + param.replace(".", "__")
        ann = Annotated[_option_type(tp), typer.Option(decl, help=help_text, show_default=False)]
        out.append((param, inspect.Parameter(py_name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)))
    return out


def config_options(*opts: Opt):
    """Decorator: add the options of `opts` to a command taking `overrides: dict` (see the module docstring)."""

    def decorate(fn):
        generated = [p for opt in opts for p in _params(opt)]
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.name != "overrides"]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            overrides = {param: kwargs.pop(p.name) for param, p in generated}
            return fn(*args, overrides=overrides, **kwargs)

        params = own + [p for _, p in generated]
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {**{k: v for k, v in hints.items() if k != "overrides"},
                                   **{p.name: p.annotation for _, p in generated}}
        del wrapper.__wrapped__  # typer must read the new signature, not the wrapped function's
        return wrapper

    return decorate
