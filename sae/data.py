"""Training data for SAEs: a shuffling, resumable reader over token shards `part-*.npy` ([N, D]).

A shard's numpy dtype says how to read it: float16 (or float32) holds the values; uint16 holds bfloat16 bit
patterns (numpy has no bfloat16: a run captured in bfloat16 stores its tokens so, meta.json "dtype": "bfloat16",
docs/run-format.md). Batches are float32 either way.

Shards are memory-mapped and read in chunks. Each epoch permutes the chunks; consecutive groups of
`window_chunks` chunks form a window that is loaded, shuffled row-wise, and cut into batches. Everything is a
function of (seed, epoch, window), so the reader's position is just (epoch, window, offset) and a resumed
run sees exactly the batches it would have seen. Memory holds one window (bounded), never all shards.
Make windows much larger than a batch: the rows of a window that do not fill a last batch are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class SAEDataError(ValueError):
    """Activation shards that cannot be trained on (missing, empty, non-finite, wrong width or dtype)."""


SHARD_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16)}
"""Token shard dtype name (meta.json "dtype") -> the numpy dtype of its .npy (bfloat16: uint16 bit patterns)."""


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float values -> bfloat16 bit patterns (uint16), rounded to nearest even as torch rounds; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # rounding could carry a NaN's payload into the sign bit or make it inf: a quiet NaN instead
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def shard_dtype_name(array: np.ndarray) -> str | None:
    """The dtype name of a shard array (SHARD_DTYPES), None for a dtype no shard has."""
    return next((name for name, dt in SHARD_DTYPES.items() if array.dtype == dt), None)


def as_float32(rows: np.ndarray) -> np.ndarray:
    """Shard rows as float32 values (bfloat16 bit patterns decoded)."""
    return from_bfloat16_bits(rows) if rows.dtype == np.uint16 else np.asarray(rows, dtype=np.float32)


@dataclass
class ReaderState:
    epoch: int = 0
    window: int = 0
    offset: int = 0


def find_shards(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    shards = sorted(directory.glob("part-*.npy"))
    if not shards:
        raise SAEDataError(f"no activation shards (part-*.npy) in {directory}; run `python cli.py capture` first")
    return shards


class ShardReader:
    """Batches [B, D] float32 from token shards (float16, float32 or bfloat16), shuffled through a bounded window."""

    def __init__(self, shards: list[Path], batch_size: int, seed: int = 0, chunk_rows: int = 4096,
                 window_chunks: int = 32, check_finite: bool = True):
        if not shards:
            raise SAEDataError("empty shard set: nothing to train on")
        self.shards = [Path(s) for s in shards]
        self.batch_size = batch_size
        self.seed = seed
        self.window_chunks = window_chunks
        self.check_finite = check_finite
        self.arrays = [np.load(s, mmap_mode="r") for s in self.shards]
        self._check_dtypes()
        widths = {a.shape[1] for a in self.arrays if a.ndim == 2}
        if any(a.ndim != 2 for a in self.arrays) or len(widths) != 1:
            raise SAEDataError(f"shards under {self.shards[0].parent} are not all [N, D] of one width D")
        self.d = widths.pop()
        self.chunks = [(i, start, min(start + chunk_rows, a.shape[0]))
                       for i, a in enumerate(self.arrays) for start in range(0, a.shape[0], chunk_rows)]
        self.n_rows = sum(a.shape[0] for a in self.arrays)
        if self.n_rows == 0:
            raise SAEDataError(f"the shards under {self.shards[0].parent} hold no rows")
        if self.n_rows < batch_size:
            raise SAEDataError(f"{self.n_rows} token rows under {self.shards[0].parent}, fewer than one batch "
                               f"of {batch_size}; capture more or lower the batch size")
        self.state = ReaderState()
        self._checked: set[int] = set()

    def _check_dtypes(self) -> None:
        """Every shard of a dtype shards have, and of the dtype its directory's meta.json names (when it has one)."""
        metas: dict[Path, dict] = {}
        for path, array in zip(self.shards, self.arrays, strict=True):
            name = shard_dtype_name(array)
            if name is None:
                raise SAEDataError(f"{path} holds {array.dtype} values; token shards are float16, float32 or "
                                   "bfloat16 (stored as uint16)")
            if path.parent not in metas:
                metas[path.parent] = read_meta(path.parent)
            said = metas[path.parent].get("dtype")
            if said is not None and said != name:
                raise SAEDataError(f"{path} holds {name} but {path.parent / 'meta.json'} says {said}; recapture "
                                   "the layer")

    @classmethod
    def from_dir(cls, directory: str | Path, batch_size: int, **kw) -> ShardReader:
        return cls(find_shards(directory), batch_size, **kw)

    def _chunk_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))

    def _n_windows(self) -> int:
        return -(-len(self.chunks) // self.window_chunks)

    def _load_window(self, epoch: int, window: int) -> np.ndarray:
        order = self._chunk_order(epoch)[window * self.window_chunks:(window + 1) * self.window_chunks]
        parts = []
        for c in sorted(order):  # read in file order; the row permutation below does the shuffling
            shard, start, stop = self.chunks[c]
            part = as_float32(self.arrays[shard][start:stop])
            if self.check_finite and c not in self._checked:
                if not np.isfinite(part).all():
                    bad = int(np.argwhere(~np.isfinite(part).all(1))[0, 0]) + start
                    raise SAEDataError(f"{self.shards[shard]} holds NaN/Inf activations (first at row {bad}); "
                                       "recapture that layer or drop the shard")
                self._checked.add(c)
            parts.append(part)
        rows = np.concatenate(parts)
        perm = np.random.default_rng([self.seed, epoch, window, 1]).permutation(len(rows))
        return rows[perm]

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Endless batches. A window's last rows that do not fill a batch are skipped in that epoch."""
        yielded_this_epoch = 0
        while True:
            st = self.state
            rows = self._load_window(st.epoch, st.window)
            while st.offset + self.batch_size <= len(rows):
                batch = rows[st.offset:st.offset + self.batch_size]
                st.offset += self.batch_size
                yielded_this_epoch += 1
                yield torch.from_numpy(np.ascontiguousarray(batch))
            st.window, st.offset = st.window + 1, 0
            if st.window >= self._n_windows():
                if yielded_this_epoch == 0:
                    raise SAEDataError(f"no window of {self.n_rows} rows fills a batch of {self.batch_size}; "
                                       "lower the batch size or raise window_chunks")
                st.window, st.epoch, yielded_this_epoch = 0, st.epoch + 1, 0

    def estimate_stats(self, max_rows: int = 65536) -> tuple[np.ndarray, float]:
        """Per-channel mean and the scale making E||x - mean|| = sqrt(D), from an evenly spaced sample."""
        rng = np.random.default_rng([self.seed, 7])
        picks = rng.choice(len(self.chunks), size=min(len(self.chunks), 64), replace=False)
        rows = np.concatenate([as_float32(self.arrays[self.chunks[c][0]][self.chunks[c][1]:self.chunks[c][2]])
                               for c in picks])[:max_rows].astype(np.float64)
        if not np.isfinite(rows).all():
            raise SAEDataError(f"NaN/Inf activations in the shards under {self.shards[0].parent}")
        mean = rows.mean(0)
        norm = np.linalg.norm(rows - mean, axis=1).mean()
        return mean.astype(np.float32), float(np.sqrt(self.d) / max(norm, 1e-12))


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}
