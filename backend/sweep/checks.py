"""What a sweep checks before anything runs, beyond its configs (grid.py): that no run directory holds another run,
and (local executor) every run's layers, prompts and SAE settings against the model, loaded once."""

from __future__ import annotations

from backend.errors import DifflensError
from backend.run.manifest import is_run
from backend.run.store import RunStore
from backend.sweep.grid import SweepPlan


def check_run_dirs(plan: SweepPlan) -> None:
    """A one-line error when a run's directory exists and holds something else than this run (another run's
    capture, or files that are not a run): the sweep would be refused there half-way."""
    from backend.stages.capture import run_identity

    for run in plan.runs:
        cfg = plan.config(run)
        root = cfg.out_dir
        if is_run(root):
            if (RunStore(root).read_manifest() or {}).get("identity") != run_identity(cfg):
                raise DifflensError(f"{root} holds a run with another config (model, prompts, dtype or capture "
                                    "settings); choose another sweep --name, or delete it")
        elif root.exists() and any(root.iterdir()):
            raise DifflensError(f"{root} exists and is not a difflens run; choose another sweep --name")


def check_models(plan: SweepPlan) -> None:
    """Every run's layers, prompts and SAE settings against its model (each model loaded once), as run-all checks
    them before its first write."""
    from backend.models import load_model, parse_dtype
    from backend.models.layers import layer_channels
    from backend.run import distributed
    from backend.stages.capture import plan as capture_plan
    from backend.stages.sae import check_train_config

    models = {}
    for run in plan.runs:
        cfg = plan.config(run)
        key = (cfg.model, cfg.device, cfg.dtype)
        if key not in models:
            distributed.check_device(cfg.device)
            models[key] = load_model(cfg.model, device=distributed.local_device(cfg.device),
                                     dtype=parse_dtype(cfg.dtype))
        checked = capture_plan(cfg, model=models[key])
        for layer in cfg.sae.layers or checked.cfg.capture.layers:
            check_train_config(cfg.sae.train_config(), layer_channels(models[key], layer), layer)
