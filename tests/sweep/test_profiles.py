"""Infrastructure profiles: the shipped ones load, every key is documented, bad profiles are one-line errors."""

from __future__ import annotations

import dataclasses

import pytest

from backend.errors import DifflensError
from backend.run.config import field_docs
from backend.sweep.profiles import InfraProfile, load_profile, profile_names


def test_shipped_profiles_load_and_every_key_is_documented():
    assert {"local", "example-cluster"} <= set(profile_names())
    cluster = load_profile("example-cluster")
    assert cluster.partition == "gpu" and cluster.gpus_per_node == 4 and cluster.tasks_per_node == 4
    assert cluster.time_minutes() == 240 and any("activate" in line for line in cluster.setup)
    assert load_profile("local").cpus_per_task >= 1
    docs = field_docs(InfraProfile)
    assert all(docs.get(f.name) for f in dataclasses.fields(InfraProfile))


def test_a_profile_by_path_and_time_limits(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('partition = "debug"\ntime_limit = "1-02:30:00"\n')
    assert load_profile(str(path)).time_minutes() == 24 * 60 + 150


@pytest.mark.parametrize("text, message", [
    ("partitoin = 'x'", "unknown key(s) partitoin; valid keys: partition"),
    ("gpus_per_node = 'four'", "gpus_per_node must be int"),
    ("time_limit = '4 hours'", "is not HH:MM:SS"),
    ("tasks_per_node = 0", "tasks_per_node must be at least 1"),
])
def test_bad_profiles_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(DifflensError) as err:
        load_profile(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_profile_lists_the_profiles():
    with pytest.raises(DifflensError, match=r"unknown profile 'nope'; profiles: .*example-cluster, local"):
        load_profile("nope")
