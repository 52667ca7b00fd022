"""run-all: every stage in order on one config, each resuming where it stopped.

capture -> sae (train the configured SAEs of each layer, splice test) -> features (capture pass recording the feature
activity of every SAE of the run the run does not hold yet: trained, configured or imported)
-> analysis (profiles, peaks, examples, frequencies, comparisons, concepts, plots; rank 0 only)
-> interventions (steered priors, feature edits, concept steering, block ablation, deep dream; rank 0 only)
-> atlas (steered priors and dreams of the [atlas] units, batched across units; rank 0 only: spread a large atlas
   over ranks with `torchrun ... cli.py atlas`)
-> causal_map (the demo's causal map, reduced by default; when [interventions] and [causal_map] are enabled)
On an image-classifier run (backend/models/classifier.py) the interventions stage is class steering (each class's
best unit steered towards it: backend/stages/class_steering.py) and the atlas, which steers image generation, is
skipped with one note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from backend.run import distributed
from backend.run.config import RunConfig


@dataclass
class RunAllSummary:
    out_dir: Path
    stages: dict[str, object] = field(default_factory=dict)


def run_all(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> RunAllSummary:
    """Run every stage into cfg.out_dir; a finished stage is skipped, an interrupted one resumes."""
    from backend.models.layers import layer_channels
    from backend.run.context import open_run
    from backend.run.store import RunStore
    from backend.stages.capture import SAEEncoder, capture, kind_of, plan
    from backend.stages.sae import check_train_config, train_saes

    summary = RunAllSummary(cfg.out_dir)
    if cfg.atlas.enabled:
        from backend.interventions.atlas import check_settings

        check_settings(cfg.atlas, cfg.prior, cfg.dream)
    with distributed.distributed(cfg.device):  # one process group for every stage under torchrun / srun
        checked = plan(cfg, device=distributed.local_device(cfg.device))  # every stage's settings, before any write
        for layer in cfg.sae.layers or checked.cfg.capture.layers:
            for sae_id in cfg.sae.sae_ids():
                check_train_config(cfg.sae.train_config(sae_id), layer_channels(checked.model, layer), layer)
        summary.stages["capture"] = capture(checked.cfg, overwrite=overwrite, model=checked.model, progress=progress)

        def run_now():  # the run as the last stage left it, with the model loaded once for every stage
            return open_run(cfg.out_dir, model=checked.model)

        summary.stages["sae"] = train_saes(run_now(), cfg.sae, overwrite=overwrite, progress=progress)
        if cfg.sae.record_features:
            store = RunStore(cfg.out_dir)
            encoders = {(layer, sae_id): SAEEncoder(store.sae_dir(layer, sae_id),
                                                    device=distributed.local_device(cfg.device))
                        for layer, sae_id in store.saes() if layer in checked.cfg.capture.layers}
            summary.stages["features"] = capture(checked.cfg, encoders=encoders, model=checked.model,
                                                 progress=progress)
        if distributed.from_env().is_main:  # analysis needs no collectives: the other ranks are done here
            from backend.stages.analysis import analyze
            from backend.stages.interventions import run_interventions

            summary.stages["analysis"] = analyze(run_now(), cfg.analysis, progress=progress)
            generative = kind_of(checked.model) != "classifier"
            if not generative and cfg.interventions.enabled:
                from backend.stages.class_steering import run_class_steering

                summary.stages["class_steering"] = run_class_steering(cfg.out_dir, checked.cfg.capture.layers,
                                                                      progress=progress)
            if not generative and cfg.atlas.enabled:
                from tqdm.auto import tqdm

                tqdm.write("note: the atlas is skipped: its priors and dreams steer image generation, and this run's "
                           "model is an image classifier")
            if cfg.interventions.enabled and generative:
                summary.stages["interventions"] = run_interventions(run_now(), cfg.interventions, progress=progress)
            if cfg.atlas.enabled and generative:
                from backend.stages.atlas import run_atlas

                summary.stages["atlas"] = run_atlas(run_now(), cfg.atlas, cfg.prior, cfg.dream, progress=progress,
                                                    dist=distributed.Dist())
            if cfg.interventions.enabled and cfg.causal_map.enabled and generative:
                from backend.stages.causal_map import run_causal_map

                summary.stages["causal_map"] = run_causal_map(run_now(), cfg.causal_map, progress=progress)
    return summary
