"""The head's design matrices out of core: activations written once to an fp16 file, read in row blocks.

At ImageNet size the head's input is 1.15M x 4741 pooled concept activations (21.9 GB in fp32); the dense
baseline's is 1.15M x 2048 pooled backbone features. Neither is held in memory. :func:`write_activations`
streams a feature cache once and writes, per split part, three files in ``RUN/head/<name>/``::

    values.f16     [N, M] float16, row-major, no header (``np.memmap(path, np.float16, "r", shape=(N, M))``
                   reads it): the activations minus ``shift``
    labels.i64     [N] int64
    meta.json      {"key", "n", "m", "block_rows", "shift", "mean", "std", "dtype", "complete"}

``shift`` is the mean of the first block (every rank computes it): storing ``c - shift`` keeps fp16's
relative precision where the values vary, not in a common offset. ``mean``/``std`` (of ``c``, float64 sums
reduced over the ranks) standardise the rows as they are read. Rows are written in blocks of
``block_rows`` in the cache's row order; under ``torchrun`` rank k writes blocks ``j % W == k`` into the one
shared file (``pwrite`` at the block's offset), so the file is the same bytes for any W.

:class:`Design` is what the solver (training/head.py) sees: the rank's row blocks, standardised, on the
device; :class:`TensorDesign` wraps in-memory tensors (tests, small data) in the same interface. When a
rank's part fits ``resident_bytes`` its fp16 blocks stay on the device after the first pass; otherwise
every pass streams them from the file (page cache), so host memory does not grow with N.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum, barrier, rank_world
from .model import pool_maps
from .runtime import atomic_write_json

log = logging.getLogger(__name__)

VALUES, LABELS, META = "values.f16", "labels.i64", "meta.json"


class Design:
    """Rows ``X [N, M]`` (standardised) and labels ``y [N]`` spread over the ranks, in blocks."""
    n: int  # rows over all ranks
    m: int
    device: torch.device

    def blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``(x float32 [b, M], y int64 [b])`` blocks on ``device``."""
        raise NotImplementedError

    def class_counts(self, num_classes: int) -> torch.Tensor:
        counts = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        for _, y in self.blocks():
            counts += torch.bincount(y, minlength=num_classes).to(counts)
        return all_reduce_sum(counts)


class TensorDesign(Design):
    """In-memory ``x``/``y`` as one block (or blocks of ``block_rows``): the solver's ops on one block are
    those of a plain full-batch implementation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, block_rows: int | None = None):
        self.x, self.y = x.to(device, torch.float32), y.to(device, torch.int64)
        self.n, self.m, self.device = int(x.shape[0]), int(x.shape[1]), device
        self.block_rows = block_rows or max(self.n, 1)

    def blocks(self):
        for s in range(0, self.n, self.block_rows):
            yield self.x[s:s + self.block_rows], self.y[s:s + self.block_rows]


class FileDesign(Design):
    """The rank's blocks (``j % W == rank``) of an activation folder, standardised on the fly."""

    def __init__(self, folder: str | Path, device: torch.device, resident_bytes: int = 0) -> None:
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        if self.meta is None:
            raise FileNotFoundError(f"no complete activation file in {self.folder}")
        self.n, self.m, self.device = int(self.meta["n"]), int(self.meta["m"]), device
        self.block_rows = int(self.meta["block_rows"])
        mean = torch.tensor(self.meta["mean"], dtype=torch.float64)
        self.offset = (mean - torch.tensor(self.meta["shift"], dtype=torch.float64)).float().to(device)
        self.std = torch.tensor(self.meta["std"], dtype=torch.float32).to(device)
        rank, world = rank_world()
        self.mine = list(range(rank, -(-self.n // self.block_rows), world))
        part_bytes = sum(min(self.block_rows, self.n - j * self.block_rows) for j in self.mine) * self.m * 2
        self.resident = part_bytes <= resident_bytes
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _read(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``j``'s raw fp16 values and labels, read into buffers reused from block to block (on the CPU
        they are views of those buffers; on another device, copies there)."""
        start = j * self.block_rows
        rows = min(self.block_rows, self.n - start)
        if not hasattr(self, "_vbuf"):
            self._vbuf = np.empty((self.block_rows, self.m), dtype=np.float16)
            self._lbuf = np.empty(self.block_rows, dtype=np.int64)
        for name, buf, width in ((VALUES, self._vbuf, self.m * 2), (LABELS, self._lbuf, 8)):
            with open(self.folder / name, "rb") as f:
                f.seek(start * width)
                if f.readinto(memoryview(buf[:rows]).cast("B")) != rows * width:
                    raise OSError(f"{self.folder / name} is shorter than its meta.json says")
        vals, labels = torch.from_numpy(self._vbuf[:rows]), torch.from_numpy(self._lbuf[:rows])
        if self.device.type == "cpu" and not self.resident:
            return vals, labels
        return vals.to(self.device, copy=True), labels.to(self.device, copy=True)

    def blocks(self):
        """The rank's blocks, standardised into one float32 buffer: a block is valid until the next is asked
        for (consumers reduce it at once; clone it to keep it)."""
        if self._cache is None and self.resident:
            self._cache = [self._read(j) for j in self.mine]
        source = self._cache if self._cache is not None else (self._read(j) for j in self.mine)
        xbuf = None
        for vals, labels in source:
            if xbuf is None:
                xbuf = torch.empty(min(self.block_rows, self.n), self.m, dtype=torch.float32, device=self.device)
            x = xbuf[:len(vals)]
            x.copy_(vals)
            x.sub_(self.offset).div_(self.std)
            yield x, labels


def block_histogram(d: Design) -> np.ndarray:
    """``salf.contract.drift.histogram`` of the design's standardised rows, accumulated block by block and
    over the ranks (integer counts, so equal to the histogram of the whole matrix)."""
    from salf.contract.drift import bin_counts

    counts = None
    for xb, _ in d.blocks():
        c = torch.from_numpy(bin_counts(xb.cpu().numpy()))
        counts = c if counts is None else counts + c
    if counts is None:
        from salf.contract.drift import BINS

        counts = torch.zeros(d.m, BINS, dtype=torch.float64)
    return (all_reduce_sum(counts) / max(d.n, 1)).numpy()


def read_meta(folder: Path) -> dict | None:
    try:
        doc = json.loads((Path(folder) / META).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if doc.get("complete") else None


def _pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@torch.no_grad()
def write_activations(cache, out: str | Path, key: dict, weight: torch.Tensor | None, pooling: str,
                      rows: torch.Tensor | None = None, block_rows: int = 16384,
                      device: torch.device | str = "cpu", progress: bool = False, read_rows: int = 256) -> tuple[Path, torch.Tensor | None]:
    """Write the pooled concept activations (``weight``: the CBL's ``[M, D, 1, 1]``) or, with ``weight=None``,
    the average-pooled backbone features of the cache rows ``rows`` (positions; default all) to ``out``.

    Reused when ``out/meta.json`` has the same ``key``. Returns ``(out, mean_map)``: the mean concept map
    over the rows ``[M, Gh, Gw]`` (None for features), which is also stored as ``mean_map.pt``.
    """
    out = Path(out)
    full_key = {**key, "block_rows": int(block_rows), "weight": None if weight is None else
                _digest(weight), "pooling": pooling, "rows": None if rows is None else _digest(rows)}
    meta = read_meta(out)
    if meta is not None and meta.get("key") == full_key:
        return out, (torch.load(out / "mean_map.pt") if (out / "mean_map.pt").is_file() else None)
    rank, world = rank_world()
    positions = torch.arange(len(cache)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    n = len(positions)
    dev = torch.device(device)
    w = None if weight is None else weight.to(dev)

    def compute(j: int):
        """Block ``j``'s pooled values, map sum and labels, its features read ``read_rows`` at a time (a
        ResNet-50 block of 16384 rows would be 6.6 GB of float32 features at once)."""
        vals, map_sum, labels = [], None, []
        block = positions[j * block_rows:(j + 1) * block_rows]
        for s in range(0, len(block), read_rows):
            b = cache.read(block[s:s + read_rows])
            feats = b.features.to(dev)
            labels.append(b.labels)
            if w is None:
                vals.append(feats.mean(dim=(2, 3)))
                continue
            maps = F.conv2d(feats, w)
            vals.append(pool_maps(maps, pooling))
            map_sum = maps.sum(0) if map_sum is None else map_sum + maps.sum(0)
        return torch.cat(vals), map_sum, torch.cat(labels)

    first, _, _ = compute(0)
    shift = first.double().mean(dim=0)
    m = first.shape[1]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / META).unlink(missing_ok=True)
        for name, size in ((VALUES, n * m * 2), (LABELS, n * 8)):
            with open(out / name, "wb") as f:
                f.truncate(size)
    barrier()
    total = torch.zeros(m, dtype=torch.float64, device=dev)
    total_sq = torch.zeros(m, dtype=torch.float64, device=dev)
    map_sum = None
    blocks = range(rank, -(-n // block_rows), world)
    if progress and rank == 0:
        from .runtime import progress as bar

        blocks = bar(blocks, f"activations {out.name}", True, unit="block")
    for j in blocks:
        vals, maps, labels = compute(j)
        stored = (vals.double() - shift).to(torch.float16)
        back = stored.double()
        total += back.sum(0)
        total_sq += (back * back).sum(0)
        if maps is not None:
            map_sum = maps.double() if map_sum is None else map_sum + maps.double()
        _pwrite(out / VALUES, j * block_rows * m * 2, stored.cpu().numpy().tobytes())
        _pwrite(out / LABELS, j * block_rows * 8, labels.numpy().astype(np.int64).tobytes())
    total, total_sq = all_reduce_sum(total), all_reduce_sum(total_sq)
    mean_map = None
    if weight is not None:
        gh, gw = cache.shape[1:]
        map_sum = map_sum if map_sum is not None else torch.zeros(m, gh, gw, dtype=torch.float64, device=dev)
        mean_map = (all_reduce_sum(map_sum) / max(n, 1)).float().cpu()
    mean_stored = total / n
    var = (total_sq / n - mean_stored ** 2).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-6)  # the floor of head.standardisation
    barrier()  # every block is on disk before the meta says complete
    if rank == 0:
        if mean_map is not None:
            torch.save(mean_map, out / "mean_map.pt")
        atomic_write_json(out / META, {"key": full_key, "n": n, "m": int(m), "block_rows": int(block_rows),
                                       "shift": shift.cpu().tolist(), "mean": (mean_stored + shift).cpu().tolist(),
                                       "std": std.cpu().tolist(), "dtype": "float16", "complete": True})
    barrier()
    log.info("activations of %d rows x %d written to %s", n, m, out)
    return out, mean_map


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


__all__ = ["Design", "FileDesign", "block_histogram", "TensorDesign", "read_meta", "write_activations"]
