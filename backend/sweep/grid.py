"""The grid of a sweep: `section.key=V1,V2,...` arguments, their combinations, each combination's run name and its
config under the one config rule (defaults < --config < --set < the combination), every one validated before
anything runs.

A value is read as TOML, as `--set` reads it (`8`, `1e-3`, `true`, `"x"`, `[1, 2]`), and as a plain string when it
is not TOML; commas inside brackets or quotes do not split values (`capture.layers=["a"],["a","b"]`). Runs are
named `<sweep>-<key><value>-...` in the grid's order (`demo-k8-expansion4`): the key is the field's name (with its
section, `sae_batch_size`, when two swept keys share a name) and the value's text keeps letters, digits and `.`
(anything else becomes `_`), so names are readable, filesystem-safe and the same on every call.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import DifflensError
from backend.run.config import RUN_NAME, RunConfig, parse_set, resolve, validate

NOT_SWEPT = ("name", "runs_dir")
"""Keys a grid may not vary: every run of a sweep is named by the sweep and lives in one runs directory."""
GRID_ARG = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)=(.+)", re.S)


def split_values(text: str) -> list[str]:
    """V1,V2,... split at the commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_grid(items: list[str]) -> dict[str, list]:
    """["sae.k=8,16", "sae.expansion=4,8"] -> {"sae.k": [8, 16], "sae.expansion": [4, 8]} (one-line errors for a
    malformed argument, a key given twice, a key that cannot be swept, an empty or repeated value)."""
    grid: dict[str, list] = {}
    for item in items:
        match = GRID_ARG.fullmatch(item.strip())
        if not match:
            raise DifflensError(f"sweep takes KEY=V1,V2,... arguments, e.g. sae.k=8,16,32; got {item!r}")
        key, text = match.groups()
        if key in grid:
            raise DifflensError(f"sweep: {key} is given twice; give all its values once: {key}=V1,V2,...")
        if key in NOT_SWEPT:
            raise DifflensError(f"sweep: {key} cannot be swept (every run of a sweep is named by the sweep, under one "
                                "runs directory); give it with --name / --set")
        texts = split_values(text)
        if any(not t for t in texts):
            raise DifflensError(f"sweep: {item!r} has an empty value; separate values with single commas")
        values = [parse_set([f"{key}={t}"])[key] for t in texts]
        if len({repr(v) for v in values}) < len(values):
            raise DifflensError(f"sweep: {key} repeats a value ({text}); give each value once")
        grid[key] = values
    return grid


def combinations(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def value_text(value) -> str:
    """A value as a run-name part: TOML-ish text with anything but letters, digits and '.' made '_'."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):
        text = "+".join(value_text(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+]", "_", text).replace("+", "_")


def key_labels(keys: list[str]) -> dict[str, str]:
    """Run-name label of each swept key: its field name, or section_field when two keys share a field name."""
    short = {k: k.rpartition(".")[2] for k in keys}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {k: (s if counts[s] == 1 else k.replace(".", "_")) for k, s in short.items()}


def run_name(sweep: str, combo: dict) -> str:
    labels = key_labels(list(combo))
    return "-".join([sweep] + [f"{labels[k]}{value_text(v)}" for k, v in combo.items()])


@dataclass
class SweepRun:
    name: str
    overrides: dict
    """The combination: dotted config keys and their values."""


@dataclass
class SweepPlan:
    """A validated sweep: the base config (resolved), the grid and its runs."""

    name: str
    base: dict
    grid: dict[str, list]
    runs: list[SweepRun]
    config_file: str | None = None
    sets: dict = field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        return Path(self.base["runs_dir"])

    def config(self, run: SweepRun) -> RunConfig:
        """The run's config: the base config under its combination (the one config rule), validated."""
        return validate(resolve(saved=self.base, overrides={**run.overrides, "name": run.name}, where="sweep grid"))

    def run(self, name: str) -> SweepRun:
        for r in self.runs:
            if r.name == name:
                return r
        raise DifflensError(f"sweep {self.name} has no run {name!r}; its runs: {', '.join(r.name for r in self.runs)}")


def plan_sweep(grid_items: list[str], config_file: str | Path | None = None, sets: dict | None = None,
               name: str | None = None) -> SweepPlan:
    """Parse and validate a sweep: the base config (--config, --set), the grid, every run's config and name. Touches
    no file; every problem is a one-line DifflensError."""
    grid = parse_grid(grid_items)
    if not grid:
        raise DifflensError("sweep needs at least one KEY=V1,V2,... argument, e.g. sae.k=8,16,32")
    base_cfg = validate(resolve(file=config_file, overrides=sets or {}, where="--set"))
    sweep = name or base_cfg.name
    if not RUN_NAME.fullmatch(sweep):
        raise DifflensError(f"sweep name {sweep!r} is not a plain directory name: use letters, digits, '.', '_' and "
                            "'-'")
    runs = [SweepRun(run_name(sweep, combo), combo) for combo in combinations(grid)]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DifflensError(f"sweep: two combinations get the same run name ({', '.join(twice)}); give values whose "
                            "letters and digits differ")
    plan = SweepPlan(sweep, base_cfg.to_dict(), grid, runs, None if config_file is None else str(config_file),
                     dict(sets or {}))
    for run in runs:
        plan.config(run)  # unknown keys and bad values, before anything runs
    return plan
