"""The features pass's bookkeeping: which SAEs' feature activity a run holds, and what a new pass must record.

A run may hold several SAEs per layer (sae/<layer>/<sae_id>/); each SAE's feature activity is its own partition,
tables/activity/layer=<layer>/kind=<feature kind>/. The `features` stage record says which of them are complete:

    sae_ids    {layer: {sae_id: sha256 of its sae.safetensors, 16 hex}}  the SAEs whose activity the run holds
               (and, while a pass runs, those it is recording)
    saes       {layer: {sae_id: the SAE directory it was read from}}
    recording  {layer: [sae_id, ...]}  the SAEs of the last pass (incomplete while the stage is not done)

A pass records only the SAEs it is given that the run does not already hold with the same weights, so recording a
second SAE of a layer never touches the first one's activity (nor, through the analysis' per-partition keys, its
analysis tables). Format-2 records ({layer: digest}) read as the layer's default SAE.
"""

from __future__ import annotations

from backend.run.schema import DEFAULT_SAE, feature_kind

SAEKey = tuple[str, str]
"""(layer, sae_id)."""


def encoder_key(key) -> SAEKey:
    """An encoders dict key as (layer, sae_id): a plain layer name is the layer's default SAE."""
    return tuple(key) if isinstance(key, tuple) else (key, DEFAULT_SAE)


def by_sae(encoders: dict | None) -> dict:
    """encoders keyed by (layer, sae_id) (callers may key the default SAE by its layer alone)."""
    return {encoder_key(k): v for k, v in (encoders or {}).items()}


def nested(flat: dict[SAEKey, object]) -> dict[str, dict[str, object]]:
    """{(layer, sae_id): v} -> {layer: {sae_id: v}} (the manifest's form)."""
    out: dict[str, dict] = {}
    for (layer, sae_id), value in sorted(flat.items()):
        out.setdefault(layer, {})[sae_id] = value
    return out


def flat(record_field: dict | None) -> dict[SAEKey, object]:
    """{layer: {sae_id: v}} (format 3) or {layer: v} (format 2: the default SAE) -> {(layer, sae_id): v}."""
    out = {}
    for layer, value in (record_field or {}).items():
        if isinstance(value, dict):
            out |= {(layer, sae_id): v for sae_id, v in value.items()}
        else:
            out[(layer, DEFAULT_SAE)] = value
    return out


def recording(record: dict) -> set[SAEKey]:
    return {(layer, i) for layer, ids in (record.get("recording") or {}).items() for i in ids}


def held(record: dict) -> dict[SAEKey, str]:
    """{(layer, sae_id): digest} of the SAEs whose feature activity the run holds complete."""
    ids = flat(record.get("sae_ids"))
    if record.get("status") != "done":
        ids = {k: v for k, v in ids.items() if k not in recording(record)}
    return ids


def to_record(record: dict, identities: dict[SAEKey, str]) -> dict[SAEKey, str]:
    """The SAEs among `identities` a features pass must record: those the run does not hold with these weights."""
    have = held(record)
    return {k: v for k, v in identities.items() if have.get(k) != v}


def partition_rel(layer: str, sae_id: str) -> str:
    return f"tables/activity/layer={layer}/kind={feature_kind(sae_id)}"


def begin_fields(record: dict, identities: dict[SAEKey, str], paths: dict[SAEKey, str]) -> tuple[dict, list[str]]:
    """(the stage record fields of a pass recording `identities`, the activity partitions to clear first: this
    pass's SAEs' and an interrupted earlier pass's)."""
    kept = {k: v for k, v in held(record).items() if k not in identities}
    kept_paths = {k: v for k, v in flat(record.get("saes")).items() if k in kept}
    unfinished = recording(record) - set(kept) if record.get("status") != "done" else set()
    clear = sorted({partition_rel(*k) for k in set(identities) | unfinished})
    fields = {"sae_ids": nested(kept | identities), "saes": nested(kept_paths | paths),
              "recording": {layer: sorted(ids) for layer, ids in nested(identities).items()}}
    return fields, clear


def forget(record: dict, layer: str, sae_id: str) -> dict:
    """The record's fields without one SAE (replaced: its activity is gone)."""
    return {name: nested({k: v for k, v in flat(record.get(name)).items() if k != (layer, sae_id)})
            for name in ("sae_ids", "saes")}
