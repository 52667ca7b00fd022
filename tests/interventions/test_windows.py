"""Step windows: specs, rescaling an active window to another step count, strength schedules, one-line errors."""

from __future__ import annotations

import pytest
from intervention_runs import one_line

from backend.errors import DifflensError
from backend.interventions.windows import parse_steps, rescale_window, step_window, strength_schedule


def test_windows_rescale_and_active_window():
    assert rescale_window(5, 9, 20, 20) == (5, 9)
    assert rescale_window(10, 19, 20, 4) == (2, 3)
    assert rescale_window(0, 0, 20, 4) == (0, 0)
    assert step_window("active", 4, active=(10, 19), run_steps=20) == (2, 3)
    assert step_window("all", 4) == (0, 3) and step_window("late", 20) == (10, 19)
    assert parse_steps("3-8") == (3, 8) and parse_steps("2:5") == (2, 5) and parse_steps("all") == "all"
    with pytest.raises(DifflensError) as e:
        step_window((3, 9), 4)
    assert "outside" in one_line(e)
    with pytest.raises(DifflensError) as e:
        step_window("active", 4, active=(-1, -1))
    assert "never active" in one_line(e)


def test_bad_windows_are_one_line_errors():
    cases = [
        (lambda: strength_schedule(float("inf"), (0, 1), 4), "finite"),
        (lambda: parse_steps("soon"), "not understood"),
    ]
    for fn, match in cases:
        with pytest.raises(DifflensError) as e:
            fn()
        assert match in one_line(e), match
