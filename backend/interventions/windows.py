"""When and how hard an intervention acts: step windows and per-step strength schedules.

This module owns
  - the Steps spec (`parse_steps`): "active" (the unit's first..last active step in the run, from its `units` row),
    "all", "late" (the second half of the trajectory) or an inclusive (first, last) window;
  - `step_window`: the inclusive window a spec selects in an n-step generation, and `rescale_window`, which maps a
    window of the run's trajectory onto one with another step count (an "active" window captured at 20 steps
    covers the same part of a 4-step trajectory);
  - `strength_schedule` (strength at the window's steps, 0 elsewhere: the strength_by_step of a steering edit),
    `describe_window` (how a window is written in the `interventions` table: "all" or "3-12");
  - `check_finite`, the one check that a strength, scale or factor is a finite number.
"""

from __future__ import annotations

import math

from backend.errors import DifflensError

Steps = str | tuple[int, int]
"""Steps spec: "active" (the unit's first..last active step in the run), "all", "late" (the second half of the
trajectory), or an inclusive (first, last) window."""


def check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise DifflensError(f"{name} must be a finite number; got {value}")
    return value


def parse_steps(text: str | tuple[int, int] | None) -> Steps:
    """ "active", "all", "late", "a-b" / "a:b" (inclusive) or a (first, last) tuple -> a Steps spec."""
    if text is None:
        return "active"
    if isinstance(text, tuple | list):
        first, last = (int(v) for v in text)
        return (first, last)
    text = str(text).strip()
    if text in ("active", "all", "late"):
        return text
    for sep in ("-", ":"):
        if sep in text:
            a, b = text.split(sep, 1)
            try:
                return (int(a), int(b))
            except ValueError:
                break
    raise DifflensError(f"steps {text!r} not understood; use active, all, late, or a window like 3-8 (inclusive)")


def rescale_window(first: int, last: int, n_from: int, n_to: int) -> tuple[int, int]:
    """An inclusive step window of an n_from-step trajectory as the steps covering it in an n_to-step one."""
    if n_from == n_to:
        return first, last
    lo = math.floor(first * n_to / n_from)
    hi = math.ceil((last + 1) * n_to / n_from) - 1
    return max(0, lo), min(n_to - 1, max(lo, hi))


def step_window(steps: Steps, n_steps: int, active: tuple[int, int] | None = None,
                run_steps: int | None = None) -> tuple[int, int]:
    """The inclusive window a Steps spec selects in an n_steps trajectory (active: the unit's run window)."""
    if steps == "all":
        return 0, n_steps - 1
    if steps == "late":
        return n_steps // 2, n_steps - 1
    if steps == "active":
        if active is None:
            raise DifflensError("steps=active needs the unit's active steps from the run's units table")
        first, last = active
        if first < 0:
            raise DifflensError("the unit is never active in this run (dead), so it has no active steps; "
                                "steer at steps all or a window like 3-8")
        return rescale_window(first, last, run_steps or n_steps, n_steps)
    first, last = steps
    if not 0 <= first <= last < n_steps:
        raise DifflensError(f"step window {first}-{last} is outside 0..{n_steps - 1} (inclusive, first <= last)")
    return first, last


def strength_schedule(strength: float, window: tuple[int, int], n_steps: int) -> list[float]:
    """strength at the window's steps, 0 elsewhere: the strength_by_step of steering_edit."""
    check_finite("strength", strength)
    return [float(strength) if window[0] <= s <= window[1] else 0.0 for s in range(n_steps)]


def describe_window(window: tuple[int, int], n_steps: int) -> str:
    return "all" if window == (0, n_steps - 1) else f"{window[0]}-{window[1]}"
