"""Infrastructure profiles: where and with what resources a sweep's runs execute, as TOML files
(configs/infra/<name>.toml), chosen with `sweep --profile NAME` (a name from configs/infra/ or a path to a .toml).

Nothing about a cluster is written in code: the partition, account, resources and setup lines all come from the
profile. Every key is a field of InfraProfile below (documented there); a key it does not have is an error.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import DifflensError
from backend.run.config import field_docs, read_toml

PROFILES_DIR = Path(__file__).resolve().parents[2] / "configs" / "infra"
TIME_LIMIT = re.compile(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)")


@dataclass
class InfraProfile:
    """Resources of each run of a sweep (one SLURM array task per run)."""

    partition: str = ""
    """SLURM partition (empty: the cluster's default)."""
    account: str = ""
    """SLURM account charged (empty: your default)."""
    qos: str = ""
    """SLURM quality of service (empty: the default)."""
    nodes: int = 1
    """Nodes per run."""
    gpus_per_node: int = 0
    """GPUs per node (0: a CPU job)."""
    tasks_per_node: int = 1
    """Processes per node, one per GPU: each is a rank of the run (SLURM_PROCID; backend/run/distributed.py)."""
    cpus_per_task: int = 2
    """CPU cores per process (also its torch threads; the local executor uses this many threads)."""
    mem_gb: float = 16.0
    """Memory per node, in GB (0: the partition's default)."""
    time_limit: str = "04:00:00"
    """Wall-clock limit per run: HH:MM:SS or D-HH:MM:SS. A run that hits it resumes when resubmitted."""
    array_parallelism: int = 16
    """Runs of the array that may run at once."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each task (module load ..., source .venv/bin/activate, export ...)."""
    constraint: str = ""
    """SLURM --constraint (node features, e.g. a100); empty: none."""

    def time_minutes(self) -> int:
        match = TIME_LIMIT.fullmatch(self.time_limit.strip())
        if not match:
            raise DifflensError(f"profile time_limit {self.time_limit!r} is not HH:MM:SS or D-HH:MM:SS")
        days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
        return max(1, days * 1440 + hours * 60 + minutes + (1 if seconds else 0))


def profile_names(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def profile_path(name: str, directory: Path = PROFILES_DIR) -> Path:
    """The file of a profile given by name (configs/infra/<name>.toml) or path; a one-line error listing the
    profiles when there is none."""
    given = Path(name)
    if given.suffix == ".toml" and given.is_file():
        return given
    path = directory / f"{name}.toml"
    if path.is_file():
        return path
    raise DifflensError(f"unknown profile {name!r}; profiles: {', '.join(profile_names(directory)) or 'none'} (in "
                        f"{directory}), or give a path to a .toml")


def load_profile(name: str, directory: Path = PROFILES_DIR) -> InfraProfile:
    """An InfraProfile from its TOML (one-line errors for an unknown profile, key or type, or a bad value)."""
    path = profile_path(name, directory)
    data = read_toml(path)
    fields = {f.name: f for f in dataclasses.fields(InfraProfile)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DifflensError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    defaults = InfraProfile()
    for key, value in data.items():
        want = type(getattr(defaults, key))
        ok = isinstance(value, want) or (want is float and isinstance(value, int))
        if not ok or (want is not bool and isinstance(value, bool)):
            raise DifflensError(f"{path}: {key} must be {want.__name__} (got {value!r}): "
                                f"{field_docs(InfraProfile)[key]}")
    profile = InfraProfile(**data)
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "array_parallelism"):
        if getattr(profile, key) < 1:
            raise DifflensError(f"{path}: {key} must be at least 1 (got {getattr(profile, key)})")
    if profile.gpus_per_node < 0 or profile.mem_gb < 0:
        raise DifflensError(f"{path}: gpus_per_node and mem_gb must be >= 0")
    if not all(isinstance(line, str) for line in profile.setup):
        raise DifflensError(f"{path}: setup must be a list of shell lines (strings)")
    profile.time_minutes()
    return profile
