"""Reading a feature cache (training/features.py writes it): rows straight from the shard files.

A cache holds the items of one split part (dataset indices, the manifest's ``items`` file) in a seeded
random order, so consecutive rows mix classes. Readers never load a whole shard: a batch's rows are read
with ``pread`` from the safetensors file (a ResNet-50 row is 2048 x 7 x 7 x 2 bytes = 200 KB, so reading
row by row wastes nothing, and neither memory maps nor shard copies make the resident set grow with the
dataset). Integrity: when a cache is opened, each rank checks the SHA-256 of its share of the shards
(``i % W == rank``), so one pass over the cache, spread over the ranks, happens before any row is used.

Batches (:meth:`FeatureCache.batches`) are *global*: their composition is a function of the selection,
the batch size and the generator, never of the number of ranks; ``part=(rank, world)`` returns the
rows ``rank::world`` of each global batch, which is what a rank of a data-parallel stage computes on.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .model import pool_maps
from .runtime import ChecksumError, read_verified

MANIFEST = "manifest.json"
CACHE_VERSION = 3  # 3: items in a seeded random order (items file), row reads
NP_DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "I64": np.int64}  # BF16: raw bits


class FeatureCacheError(RuntimeError):
    """A feature cache is missing, incomplete or of another configuration."""


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return doc if doc.get("version") == CACHE_VERSION else None


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """``(data_start, header)`` of a safetensors file: where the tensors' bytes begin and each one's
    ``dtype``, ``shape`` and ``data_offsets`` (the format: an 8-byte little-endian header length, a JSON
    header, the data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


@dataclass
class FeatureBatch:
    indices: torch.Tensor  # [B] int64, dataset indices of the split
    features: torch.Tensor  # [B, D, Gh, Gw] float32
    labels: torch.Tensor  # [B] int64


class _Shard:
    """Row reads of one shard file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start, self.header = safetensors_layout(path)
        self.fd: int | None = None

    def rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ascending or not) of tensor ``name``; consecutive rows are read in one call."""
        spec = self.header[name]
        dtype = np.dtype(NP_DTYPES[spec["dtype"]])
        shape = spec["shape"]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((len(rows), *shape[1:]), dtype=dtype)
        if not len(rows):
            return out
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        flat = out.reshape(len(rows), -1).view(np.uint8).reshape(len(rows), row_bytes)
        base = self.start + spec["data_offsets"][0]
        k = 0
        while k < len(sorted_rows):  # runs of consecutive rows: one pread each
            j = k + 1
            while j < len(sorted_rows) and sorted_rows[j] == sorted_rows[j - 1] + 1:
                j += 1
            data = os.pread(self.fd, row_bytes * (j - k), base + int(sorted_rows[k]) * row_bytes)
            if len(data) != row_bytes * (j - k):
                raise FeatureCacheError(f"{self.path} is shorter than its header says (truncated?)")
            flat[order[k:j]] = np.frombuffer(data, np.uint8).reshape(j - k, row_bytes)
            k = j
        if spec["dtype"] == "BF16":  # numpy has no bfloat16: widen the raw bits through torch
            return torch.from_numpy(out).view(torch.bfloat16).float().numpy()
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class FeatureCache:
    """Reader of a complete cache folder. ``verify``: check this rank's share of the shards' SHA-256."""

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        from .distributed import rank_world

        self.folder = Path(folder)
        doc = read_manifest(self.folder)
        if doc is None or not doc.get("complete", False):
            raise FeatureCacheError(f"no complete feature cache at {self.folder} (missing or unreadable {MANIFEST}); "
                                    f"run `salfctl train cbl` (or `train all`) to build it")
        self.manifest = doc
        self.shape: tuple[int, int, int] = tuple(doc["shape"])  # type: ignore[assignment]
        self.shards: list[dict] = doc["shards"]
        for shard in self.shards:
            if not (self.folder / shard["file"]).is_file():
                raise FeatureCacheError(f"feature cache {self.folder} lacks shard {shard['file']}")
        try:
            from safetensors.torch import load

            self.items = load(read_verified(self.folder, doc["items"]))["items"]
            if verify:
                rank, world = rank_world()
                for i in range(rank, len(self.shards), world):
                    read_verified(self.folder, self.shards[i])
        except ChecksumError as exc:
            raise FeatureCacheError(f"feature cache {self.folder}: {exc}; delete the folder and rerun "
                                    f"`salfctl train cbl` to rebuild it") from exc
        self._open: dict[int, _Shard] = {}
        self._shard_of = torch.repeat_interleave(torch.arange(len(self.shards)),
                                                 torch.tensor([s["count"] for s in self.shards], dtype=torch.long))
        self._position = None  # dataset index -> row position, built on first use

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def feature_dim(self) -> int:
        return int(self.shape[0])

    def positions(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Row positions of dataset ``indices`` (an error for an index the cache does not hold)."""
        if self._position is None:
            size = int(self.items.max()) + 1 if len(self.items) else 0
            self._position = torch.full((size,), -1, dtype=torch.long)
            self._position[self.items] = torch.arange(len(self.items))
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self._position)):
            raise IndexError(f"dataset indices outside the items of feature cache {self.folder}")
        pos = self._position[idx]
        if bool((pos < 0).any()):
            raise IndexError(f"feature cache {self.folder} does not hold dataset index "
                             f"{int(idx[(pos < 0).nonzero()[0]])} (another split part?)")
        return pos

    def _shard(self, k: int) -> _Shard:
        if k not in self._open:
            self._open[k] = _Shard(self.folder / self.shards[k]["file"])
        return self._open[k]

    def read(self, positions: torch.Tensor) -> FeatureBatch:
        """The rows at ``positions`` (in that order)."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        feats = np.empty((len(positions), *self.shape), dtype=np.float32)
        labels = np.empty(len(positions), dtype=np.int64)
        shard_ids = self._shard_of[positions]
        for k in shard_ids.unique().tolist():
            sel = (shard_ids == k).nonzero().flatten()
            local = (positions[sel] - self.shards[k]["start"]).numpy()
            sh = self._shard(k)
            feats[sel.numpy()] = sh.rows("features", local)
            labels[sel.numpy()] = sh.rows("labels", local)
        return FeatureBatch(self.items[positions], torch.from_numpy(feats), torch.from_numpy(labels))

    def labels(self, indices=None) -> torch.Tensor:
        """Labels of dataset ``indices`` (default: every row, in row order)."""
        pos = torch.arange(len(self)) if indices is None else self.positions(indices)
        return torch.cat([self.read(pos[s:s + 65536]).labels for s in range(0, len(pos), 65536)]) if len(pos) \
            else torch.zeros(0, dtype=torch.long)

    def global_batches(self, indices=None, batch_size: int = 256, shuffle: bool = False,
                       generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[torch.Tensor]:
        """Row positions of each batch: the selection in row order, or with ``shuffle`` shard order and the
        order inside each shard permuted (rows are already in a seeded random order, so this is a
        full shuffle in effect); leftovers of one shard carry into the next so batches stay full."""
        selected = torch.ones(len(self), dtype=torch.bool)
        if indices is not None:
            selected = torch.zeros(len(self), dtype=torch.bool)
            selected[self.positions(indices)] = True
        order = torch.randperm(len(self.shards), generator=generator).tolist() if shuffle else range(len(self.shards))
        pending = torch.zeros(0, dtype=torch.long)
        for k in order:
            s = self.shards[k]
            rows = selected[s["start"]: s["start"] + s["count"]].nonzero().flatten() + s["start"]
            if shuffle:
                rows = rows[torch.randperm(len(rows), generator=generator)]
            pending = torch.cat([pending, rows])
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                pending = pending[batch_size:]
        if len(pending) and not drop_last:
            yield pending

    def batches(self, indices=None, batch_size: int = 256, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False,
                part: tuple[int, int] = (0, 1), prefetch: int = 0) -> Iterator[FeatureBatch]:
        """Stream ``FeatureBatch``es of dataset ``indices`` (default: all); ``part=(rank, world)``: this
        rank's rows ``rank::world`` of each global batch (see :meth:`global_batches`). ``prefetch``: read
        that many batches ahead in a background thread (``pread`` releases the GIL, so reading overlaps
        the consumer's compute); the batches and their order are the same."""
        rank, world = part
        mine = (positions[rank::world] for positions in self.global_batches(indices, batch_size, shuffle, generator,
                                                                            drop_last))
        if prefetch <= 0:
            for positions in mine:
                yield self.read(positions)
            return
        yield from _prefetched(mine, self.read, prefetch)

    def close(self) -> None:
        for sh in self._open.values():
            sh.close()
        self._open.clear()

    def __del__(self) -> None:  # file descriptors, not memory
        try:
            self.close()
        except Exception:
            pass


def _prefetched(items: Iterator, read, depth: int) -> Iterator:
    """``read(item)`` for each item, computed up to ``depth`` ahead in a thread; exceptions re-raised here,
    and the thread stops when the consumer does."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(read(item)):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=work, name="feature-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            out = q.get()
            if out is done:
                return
            if isinstance(out, BaseException):
                raise out
            yield out
    finally:
        stop.set()
        thread.join(timeout=5)


def pooled_cache_features(cache: FeatureCache, indices=None, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pooled grid features ``[N, D]`` float32 and labels ``[N]`` for ``indices`` (ascending dataset
    index order). Holds ``N x D`` in memory: for small parts (tests, evaluation subsets)."""
    xs, ys, idx = [], [], []
    for b in cache.batches(indices, batch_size):
        xs.append(b.features.mean(dim=(2, 3)))
        ys.append(b.labels)
        idx.append(b.indices)
    order = torch.cat(idx).argsort()
    return torch.cat(xs)[order], torch.cat(ys)[order]


@torch.no_grad()
def concept_activations(cache: FeatureCache, cbl_weight: torch.Tensor, pooling: str, indices=None,
                        batch_size: int = 512, device: torch.device | str = "cpu"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled concept activations (before standardisation) from cached features, in memory (small parts;
    the head stage streams them to an activation file instead, training/activations.py).

    Returns ``c* [N, M]``, labels ``[N]``, the mean concept map over the selected images ``[M, Gh, Gw]``
    and the dataset indices ``[N]`` (ascending).
    """
    w = cbl_weight.to(device)
    xs, ys, idx = [], [], []
    map_sum, n = None, 0
    for b in cache.batches(indices, batch_size):
        maps = F.conv2d(b.features.to(device), w)
        xs.append(pool_maps(maps, pooling).cpu())
        ys.append(b.labels)
        idx.append(b.indices)
        s = maps.sum(0).cpu()
        map_sum = s if map_sum is None else map_sum + s
        n += len(maps)
    order = torch.cat(idx).argsort()
    return torch.cat(xs)[order], torch.cat(ys)[order], map_sum / max(n, 1), torch.cat(idx)[order]
