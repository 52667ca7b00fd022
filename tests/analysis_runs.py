"""Hand-made run directories for the analysis tests: generations, steps and activity written through RunStore,
exactly as capture lays them out, without a model."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from backend.run.store import RunStore


def make_run(root, gens: list[dict], n_steps: int, activity: dict[tuple[str, str], dict[str, np.ndarray]],
             shard_gens: int = 2, n_latents: dict[str, int] | None = None) -> RunStore:
    """gens: dicts with gen_id, prompt, seed, group, attributes; activity[(layer, kind)]: columns gen_id, step,
    unit, mean, max (features: active rows only). Each layer's rows are split into shards of shard_gens
    generations, sorted like capture's (unit, step, gen_id)."""
    store = RunStore(root)
    store.root.mkdir(parents=True, exist_ok=True)
    store.write_manifest({"config": {"model": "demo", "capture": {}}, "stages": {"capture": {"status": "done"}}})
    store.write_table_shard("generations", "part-0000000", pa.table({
        "gen_id": np.array([g["gen_id"] for g in gens], np.int32),
        "prompt": [g["prompt"] for g in gens],
        "seed": np.array([g["seed"] for g in gens], np.int64),
        "group": [g["group"] for g in gens],
        "attributes": [json.dumps(g.get("attributes", {}), sort_keys=True) for g in gens],
        "image": [f"images/{g['gen_id']:06d}.png" for g in gens],
        "n_steps": np.full(len(gens), n_steps, np.int16),
        "guidance": np.full(len(gens), 1.0, np.float32),
        "negative_prompt": pa.nulls(len(gens), pa.string()), "control_image": pa.nulls(len(gens), pa.string()),
        "image_path": pa.nulls(len(gens), pa.string()), "class_label": pa.nulls(len(gens), pa.string()),
    }))
    store.write_table("steps", pa.table({"step": np.arange(n_steps, dtype=np.int16),
                                         "timestep": np.linspace(999, 0, n_steps).astype(np.float32)}))
    gen_ids = sorted(g["gen_id"] for g in gens)
    for (layer, kind), cols in activity.items():
        for first in range(0, len(gen_ids), shard_gens):
            mine = np.isin(cols["gen_id"], gen_ids[first:first + shard_gens])
            order = np.lexsort((cols["gen_id"][mine], cols["step"][mine], cols["unit"][mine]))
            store.write_table_shard("activity", f"part-{gen_ids[first]:07d}", pa.table({
                "gen_id": cols["gen_id"][mine][order].astype(np.int32),
                "step": cols["step"][mine][order].astype(np.int16),
                "unit": cols["unit"][mine][order].astype(np.int32),
                "mean": cols["mean"][mine][order].astype(np.float32),
                "max": cols["max"][mine][order].astype(np.float32),
            }), layer=layer, kind=kind)
    for layer, n in (n_latents or {}).items():
        (store.sae_dir(layer)).mkdir(parents=True, exist_ok=True)
        (store.sae_dir(layer) / "cfg.json").write_text(json.dumps({"d_in": 4, "n_latents": n}))
    return store


def dense_activity(mean_NSU: np.ndarray, max_NSU: np.ndarray | None = None, gen_ids=None) -> dict[str, np.ndarray]:
    """Channel-style rows for every (generation, step, unit) of [N, S, U] arrays."""
    n, s, u = mean_NSU.shape
    gen_ids = np.arange(n) if gen_ids is None else np.asarray(gen_ids)
    g, st, un = np.meshgrid(gen_ids, np.arange(s), np.arange(u), indexing="ij")
    max_NSU = mean_NSU + 1 if max_NSU is None else max_NSU
    return {"gen_id": g.ravel(), "step": st.ravel(), "unit": un.ravel(), "mean": mean_NSU.ravel(),
            "max": max_NSU.ravel()}


def sparse_activity(mean_NSU: np.ndarray, max_NSU: np.ndarray) -> dict[str, np.ndarray]:
    """Feature-style rows: only where max > 0."""
    rows = dense_activity(mean_NSU, max_NSU)
    keep = rows["max"] > 0
    return {k: v[keep] for k, v in rows.items()}


def gens_for(n: int, groups: list[str], seeds_per_prompt: int = 1, attributes=None) -> list[dict]:
    """n generations: prompt i // seeds_per_prompt, seed i % seeds_per_prompt, groups cycling over prompts."""
    out = []
    for i in range(n):
        p = i // seeds_per_prompt
        attrs = attributes(p) if attributes else {}
        out.append({"gen_id": i, "prompt": f"prompt {p}", "seed": i % seeds_per_prompt,
                    "group": groups[p % len(groups)], "attributes": attrs})
    return out
