"""Backbone feature cache: run the frozen backbone once per split, store grid-resized features in shards.

Layout of a cache folder (``RUN/features/<split>/``)::

    manifest.json              {"version", "key", "complete", "count", "shape": [D, Gh, Gw], "dtype",
                                "shards": [{"file", "start", "count", "bytes", "sha256"}]}
    shard-00000.safetensors    "features" [n, D, Gh, Gw] (fp16 by default), "labels" [n] int64, "indices" [n]
    done-00000.json            the shard's record {"file", "start", "count", "bytes", "sha256"}, written after it

Features are stored already resized to the prompting grid (what the CBL consumes), so a shard of
1024 images of a ResNet-50 at 7x7 is 1024 * 2048 * 49 * 2 bytes = ~200 MB. Every file is written to
a temporary name and renamed. A cache is complete exactly when its manifest says ``complete: true`` and its
``key`` (backbone, weights checksum, grid, split, image count, shard and batch sizes, and the images'
name/size/mtime fingerprint) matches; a manifest with ``complete: false`` is the plan of a run in progress
or killed, which the same call resumes: a shard counts as done when its record exists and the file's size
and SHA-256 match it (so a kill at any point costs at most the shards in flight). Under ``torchrun`` the
shards are split over the ranks (``build_feature_cache``); the bytes do not depend on the number of ranks.
Readers stream one shard at a time, so memory does not grow with the number of images, and check each
shard's size and SHA-256 against the manifest as they read it (the guarantee the CLIP embedding cache
gives too: a truncated or corrupted shard is an error, never silently wrong features).
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .backbones import Backbone
from .model import normalize_uint8, pool_maps, resize_to_grid
from .distributed import barrier, distributed_context
from .runtime import (ChecksumError, atomic_write_json, load_tensors, progress as progress_bar, read_verified,
                      save_tensors)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_VERSION = 2  # 2: shard checksums in the manifest
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class FeatureCacheError(RuntimeError):
    """A feature cache is missing, incomplete or of another configuration."""


@torch.no_grad()
def extract_features(backbone: Backbone, images_uint8: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> grid features float32 ``[B, D, Gh, Gw]`` (normalisation from the spec)."""
    spec = backbone.spec
    device = next(backbone.parameters()).device
    x = normalize_uint8(images_uint8, spec.mean, spec.std).to(device)
    return resize_to_grid(backbone(x), grid).float()


def build_feature_cache(backbone: Backbone, dataset, grid: tuple[int, int], out_dir: str | Path, key: dict,
                        batch_size: int = 64, shard_size: int = 1024, dtype: str = "float16",
                        num_workers: int = 0, progress: bool = True) -> "FeatureCache":
    """Cache the features of every image of ``dataset`` (items: uint8 ``[H, W, 3]``, label).

    Reuses an existing cache whose manifest ``key`` equals ``key``; resumes one of the same key that a killed
    run left incomplete (shards whose record and checksum hold are kept, the rest recomputed); removes the
    shards of another key. ``dtype``: storage precision, one of ``float16`` (default), ``bfloat16``, ``float32``.

    Under ``torchrun`` rank ``k`` of ``W`` extracts the shards ``i`` with ``i % W == k``; each shard is encoded in
    batches of its own (``batch_size`` images from the shard's start), so a shard's bytes depend on the data
    and the backbone only, never on W or on where a run was killed. Rank 0 writes the plan and, after a
    barrier, the final manifest; every rank returns the complete cache.
    """
    out = Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"feature cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    full_key = {**key, "grid": [int(g) for g in grid], "count": len(dataset), "dtype": dtype,
                "shard_size": int(shard_size), "batch_size": int(batch_size)}
    existing = _read_manifest(out)
    if existing is not None and existing.get("complete", True) and _same_cache(existing.get("key"), full_key):
        log.info("feature cache %s is up to date (%d images)", out, existing["count"])
        return FeatureCache(out)
    rank, world, created = distributed_context()
    try:
        if rank == 0:
            _plan(out, full_key, existing)
        barrier(world)
        ranges = [(s, min(s + shard_size, len(dataset))) for s in range(0, len(dataset), shard_size)]
        mine = [i for i in range(len(ranges)) if i % world == rank]
        todo = [i for i in mine if _shard_done(out, i, *ranges[i]) is None]
        log.info("features %s: rank %d/%d, %d shards of mine, %d already complete, %d to extract",
                 out.name, rank, world, len(mine), len(mine) - len(todo), len(todo))
        if todo:
            _extract_shards(backbone, dataset, grid, out, ranges, todo, batch_size, dtype, num_workers, progress)
        barrier(world)
        if rank == 0:
            _write_manifest(out, full_key, ranges, dtype)
        barrier(world)  # no rank reads the manifest before it is complete
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return FeatureCache(out)


def _same_cache(old_key: dict | None, key: dict) -> bool:
    """Keys of caches written before shard/batch sizes were part of the key (format 2) still match."""
    if old_key is None:
        return False
    legacy = {k: v for k, v in key.items() if k not in ("shard_size", "batch_size")}
    return old_key == key or old_key == legacy


def _record_file(index: int) -> str:
    return f"done-{index:05d}.json"


def _shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _plan(out: Path, key: dict, existing: dict | None) -> None:
    """Rank 0, before any rank extracts: drop shards of another key (and every temporary file of a killed
    run), then write the plan, a manifest with ``complete: false`` that readers refuse."""
    out.mkdir(parents=True, exist_ok=True)
    if existing is None or existing.get("key") != key:
        for stale in [*out.glob("shard-*.safetensors"), *out.glob("done-*.json")]:
            stale.unlink()
    for tmp in out.glob(".*.tmp-*"):
        tmp.unlink()
    atomic_write_json(out / MANIFEST, {"version": CACHE_VERSION, "key": key, "complete": False}, indent=1)


def _shard_done(out: Path, index: int, start: int, stop: int) -> dict | None:
    """The shard's record if it is on disk, covers ``start..stop`` and matches its checksum; else None."""
    try:
        rec = json.loads((out / _record_file(index)).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (rec.get("start"), rec.get("count")) != (start, stop - start) or rec.get("file") != _shard_file(index):
        return None
    try:
        read_verified(out, rec)
    except ChecksumError:
        log.warning("feature shard %d of %s is truncated or corrupted; extracting it again", index, out)
        return None
    return rec


def _extract_shards(backbone, dataset, grid, out: Path, ranges, todo: list[int], batch_size: int, dtype: str,
                    num_workers: int, progress: bool) -> None:
    batches = []
    for i in todo:
        first, stop = ranges[i]
        batches += [list(range(s, min(s + batch_size, stop))) for s in range(first, stop, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    loader = progress_bar(loader, f"features {out.name}", progress, unit="batch")
    backbone.eval()
    shard_iter = iter(todo)
    current, feats_parts, label_parts, filled = next(shard_iter), [], [], 0
    for images, labels in loader:
        feats_parts.append(extract_features(backbone, images, grid).to("cpu", DTYPES[dtype]))
        label_parts.append(torch.as_tensor(labels, dtype=torch.int64))
        filled += len(images)
        start, stop = ranges[current]
        if filled == stop - start:
            record = save_tensors(out / _shard_file(current), {"features": torch.cat(feats_parts),
                                                               "labels": torch.cat(label_parts),
                                                               "indices": torch.arange(start, stop)})
            atomic_write_json(out / _record_file(current), {**record, "start": start, "count": stop - start},
                              indent=1, sort_keys=True)  # after the shard: a record means the shard is whole
            feats_parts, label_parts, filled = [], [], 0
            current = next(shard_iter, None)


def _write_manifest(out: Path, key: dict, ranges, dtype: str) -> None:
    shards, shape = [], None
    for i, (start, stop) in enumerate(ranges):
        try:
            rec = json.loads((out / _record_file(i)).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FeatureCacheError(f"feature shard {i} of {out} is missing after every rank finished") from exc
        if (out / rec["file"]).stat().st_size != rec["bytes"]:
            raise FeatureCacheError(f"feature shard {i} of {out} is incomplete after every rank finished")
        shards.append({"file": rec["file"], "bytes": rec["bytes"], "sha256": rec["sha256"], "start": start,
                       "count": stop - start})
    if shards:
        from safetensors import safe_open

        with safe_open(str(out / shards[0]["file"]), framework="pt") as f:
            shape = list(f.get_slice("features").get_shape()[1:])
    manifest = {"version": CACHE_VERSION, "key": key, "complete": True, "count": ranges[-1][1] if ranges else 0,
                "shape": shape, "dtype": dtype, "shards": shards}
    atomic_write_json(out / MANIFEST, manifest, indent=1)
    log.info("cached features of %d images in %d shard(s) at %s", manifest["count"], len(shards), out)


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return doc if doc.get("version") == CACHE_VERSION else None


@dataclass
class FeatureBatch:
    indices: torch.Tensor  # [B] int64, dataset indices of the split
    features: torch.Tensor  # [B, D, Gh, Gw] float32
    labels: torch.Tensor  # [B] int64


class FeatureCache:
    """Reader of a complete cache folder; streams shards (one in memory at a time)."""

    def __init__(self, folder: str | Path, memory_shards: int = 4) -> None:
        """``memory_shards``: how many recently read shards stay in memory (an LRU), so small caches
        are read from disk once while memory stays bounded by ``memory_shards`` shards."""
        self.folder = Path(folder)
        self.memory_shards = int(memory_shards)
        self._lru: "OrderedDict[str, dict[str, torch.Tensor]]" = OrderedDict()
        doc = _read_manifest(self.folder)
        if doc is None or not doc.get("complete", True):  # format 2 wrote its manifest only when complete
            raise FeatureCacheError(f"no complete feature cache at {self.folder} (missing or unreadable {MANIFEST}); "
                                    f"run `salfctl train cbl` (or `train all`) to build it")
        self.manifest = doc
        self.shape: tuple[int, int, int] = tuple(doc["shape"])  # type: ignore[assignment]
        self.shards: list[dict] = doc["shards"]
        for shard in self.shards:
            if not (self.folder / shard["file"]).is_file():
                raise FeatureCacheError(f"feature cache {self.folder} lacks shard {shard['file']}")

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def feature_dim(self) -> int:
        return int(self.shape[0])

    def _load(self, shard: dict) -> dict[str, torch.Tensor]:
        name = shard["file"]
        if name in self._lru:
            self._lru.move_to_end(name)
            return self._lru[name]
        try:
            data = load_tensors(self.folder, shard)
        except ChecksumError as exc:
            raise FeatureCacheError(f"feature cache {self.folder}: {exc}; delete the folder and rerun "
                                    f"`salfctl train cbl` to rebuild it") from exc
        if self.memory_shards > 0:
            self._lru[name] = data
            while len(self._lru) > self.memory_shards:
                self._lru.popitem(last=False)
        return data

    def labels(self) -> torch.Tensor:
        """All labels ``[N]`` int64 (reads one shard at a time)."""
        return torch.cat([self._load(s)["labels"] for s in self.shards])

    def batches(self, indices: Sequence[int] | torch.Tensor | None = None, batch_size: int = 256,
                shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[FeatureBatch]:
        """Stream ``FeatureBatch``es of the selected ``indices`` (default: all).

        With ``shuffle``: shard order and the order inside each shard are permuted (a shard-level
        shuffle, the usual trade-off for streaming); leftovers of one shard are carried into the
        next so batches keep ``batch_size`` images (the loss compares images *within* a batch).
        """
        wanted = torch.ones(len(self), dtype=torch.bool)
        if indices is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
                raise IndexError(f"feature indices must lie in [0, {len(self)})")
            wanted = torch.zeros(len(self), dtype=torch.bool)
            wanted[idx] = True
        order = list(range(len(self.shards)))
        if shuffle:
            order = torch.randperm(len(order), generator=generator).tolist()
        carry: FeatureBatch | None = None
        for k in order:
            shard = self.shards[k]
            sel = wanted[shard["start"]: shard["start"] + shard["count"]]
            if not bool(sel.any()):
                continue
            data = self._load(shard)
            rows = sel.nonzero().flatten()
            if shuffle:
                rows = rows[torch.randperm(len(rows), generator=generator)]
            part = FeatureBatch(data["indices"][rows], data["features"][rows].float(), data["labels"][rows])
            if carry is not None:
                part = FeatureBatch(torch.cat([carry.indices, part.indices]),
                                    torch.cat([carry.features, part.features]), torch.cat([carry.labels, part.labels]))
                carry = None
            n_full = len(part.indices) // batch_size * batch_size
            for s in range(0, n_full, batch_size):
                yield FeatureBatch(part.indices[s:s + batch_size], part.features[s:s + batch_size],
                                   part.labels[s:s + batch_size])
            if n_full < len(part.indices):
                carry = FeatureBatch(part.indices[n_full:], part.features[n_full:], part.labels[n_full:])
        if carry is not None and not drop_last:
            yield carry


def pooled_cache_features(cache: FeatureCache, indices=None, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pooled grid features ``[N, D]`` float32 and labels ``[N]`` for ``indices`` (cache order)."""
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
    """Pooled concept activations (before standardisation) from cached features.

    Returns ``c* [N, M]``, labels ``[N]``, the mean concept map over the selected images
    ``[M, Gh, Gw]`` (the position-blind baseline), and the dataset indices ``[N]`` (ascending).
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


__all__ = ["FeatureBatch", "FeatureCache", "FeatureCacheError", "build_feature_cache", "concept_activations", "extract_features",
           "pooled_cache_features"]
