"""import-sae: copy an SAE checkpoint into a run as one of its layer's SAEs, sae/<layer>/<sae_id>/, in our format.

Everything is checked before the run is touched (the run and its layer, the id, the checkpoint, its width against
the layer's captured width, finite weights, an existing id without overwrite); then the SAE is written whole under
_work/sae-import/<layer>/<sae_id>/ and renamed into place. Its cfg.json keeps the provenance: `source_format`,
`source` (the path as given) and `original_config` (the checkpoint's own config). `capture --sae` / run-all's
features pass and `analyze` then pick it up like a trained SAE (unit kind feature.<sae_id>).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from backend.errors import DifflensError
from backend.run.context import open_run
from backend.run.schema import DEFAULT_SAE, check_sae_id, feature_kind
from backend.stages.capture import check_sae_width
from backend.stages.sae import mark_downstream_stale, swap_in, token_width


def read_checkpoint(path: str | Path):
    """The SAE of a checkpoint directory in any recognised format (sae.formats.read_sae: folded, on the CPU, with
    its provenance); a one-line error when it cannot be read."""
    from sae.formats import read_sae
    from sae.io import SAELoadError

    try:
        return read_sae(Path(path))
    except SAELoadError as exc:
        raise DifflensError(str(exc)) from exc


def import_sae(run: str | Path, path: str | Path, layer: str, sae_id: str = DEFAULT_SAE,
               overwrite: bool = False) -> dict:
    """Import the checkpoint at path as SAE sae_id of layer in run; returns what was written (layer, sae_id, kind,
    dir, source_format, d_in, n_latents, replaced)."""
    ctx = open_run(run, require="capture")
    store = ctx.store
    sae_id = check_sae_id(sae_id)
    if layer not in ctx.layers:
        raise DifflensError(f"{store.root} has no captured layer {layer!r}; captured layers: {', '.join(ctx.layers)}")
    if not Path(path).exists():
        raise DifflensError(f"{path} does not exist; give the directory of an SAE checkpoint")
    existing = (layer, sae_id) in ctx.saes()
    if existing and not overwrite:
        raise DifflensError(f"{store.root} already has an SAE {sae_id!r} for {layer}; pass --overwrite to replace it "
                            "(its feature activity and analysis are then redone), or give another --name")
    ckpt = read_checkpoint(path)
    check_sae_width(layer, int(ckpt.sae.cfg.d_in), token_width(store, layer), "the imported SAE")
    store.remove_stale_temporaries()
    work = store.root / "_work" / "sae-import" / layer / sae_id
    shutil.rmtree(work, ignore_errors=True)
    try:
        from sae.io import save_sae

        save_sae(ckpt.sae, work, extra={"source_format": ckpt.source_format, "source": ckpt.source,
                                        "original_config": ckpt.original_config})
        swap_in(store, layer, sae_id, new=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if existing:
        mark_downstream_stale(store, layer, sae_id)
    return {"layer": layer, "sae_id": sae_id, "kind": feature_kind(sae_id), "dir": store.sae_dir(layer, sae_id),
            "source_format": ckpt.source_format, "d_in": int(ckpt.sae.cfg.d_in),
            "n_latents": int(ckpt.sae.cfg.n_latents), "replaced": existing}
