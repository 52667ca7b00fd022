"""Training state as safetensors + JSON: model and optimizer tensors, counters, RNG — never a pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _atomic(path: Path, write) -> None:
    """write(tmp) then rename onto path; a failed write leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state_dict into named tensors and JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {f"opt.{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor)}
    scalars = {f"{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items()
               if not isinstance(v, torch.Tensor)}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for name, v in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write state.safetensors then state.json (the JSON, written last, marks the checkpoint complete)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(directory / "state.safetensors", lambda p: save_file(tensors, str(p)))
    _atomic(directory / "state.json", lambda p: p.write_text(json.dumps(meta)))


def load_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    directory = Path(directory)
    if not (directory / "state.json").exists():
        return None
    return load_file(str(directory / "state.safetensors")), json.loads((directory / "state.json").read_text())
