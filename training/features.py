"""Backbone feature cache: run the frozen backbone once per split part, store grid-resized features in shards.

Layout of a cache folder (``RUN/features/<part>/``, parts ``train``, ``val`` and ``test``)::

    manifest.json              {"version", "key", "complete", "count", "shape": [D, Gh, Gw], "dtype",
                                "items": {"file", "bytes", "sha256"},
                                "shards": [{"file", "start", "count", "bytes", "sha256"}]}
    items.safetensors          "items" [N] int64: the dataset index of every row, in row order
    shard-00000.safetensors    "features" [n, D, Gh, Gw] (fp16 by default), "labels" [n] int64, "indices" [n]
    done-00000.json            the shard's record {"file", "start", "count", "bytes", "sha256"}, written after it

Row order: the part's dataset indices in a seeded random order (``order_seed``), so a shard, and a batch
read from a run of rows, mixes classes (an ImageFolder is sorted by class). Features are stored already
resized to the prompting grid (what the CBL consumes), so a shard of 1024 images of a ResNet-50 at 7x7 is
1024 * 2048 * 49 * 2 bytes = ~200 MB. Every file is written to a temporary name and renamed. A cache is
complete exactly when its manifest says ``complete: true`` and its ``key`` (backbone, weights checksum, grid,
part, the items' checksum and order seed, shard and batch sizes, and the images' name/size/mtime
fingerprint) matches; a manifest with ``complete: false`` is the plan of a run in progress or killed, which
the same call resumes: a shard counts as done when its record exists and the file's size and SHA-256 match
it (so a kill at any point costs at most the shards in flight). Under ``torchrun`` the shards still to do
are split over the ranks (``build_feature_cache``); the bytes do not depend on the number of ranks.
Reading is training/feature_reader.py: rows straight from the files, memory independent of the cache size.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from .backbones import Backbone
from .distributed import barrier, broadcast_object, distributed_context
from .feature_reader import (CACHE_VERSION, MANIFEST, FeatureBatch, FeatureCache, FeatureCacheError,
                             concept_activations, pooled_cache_features, read_manifest)
from .model import normalize_uint8, resize_to_grid
from .runtime import ChecksumError, atomic_write_json, progress as progress_bar, read_verified, save_tensors

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ITEMS = "items.safetensors"


@torch.no_grad()
def extract_features(backbone: Backbone, images_uint8: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> grid features float32 ``[B, D, Gh, Gw]`` (normalisation from the spec)."""
    spec = backbone.spec
    device = next(backbone.parameters()).device
    x = normalize_uint8(images_uint8, spec.mean, spec.std).to(device)
    return resize_to_grid(backbone(x), grid).float()


def shuffled_items(items: Sequence[int], seed: int) -> list[int]:
    """``items`` in the seeded random order a cache stores them in (a pure function of items and seed)."""
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(int(seed)))
    return [int(items[i]) for i in perm.tolist()]


def items_digest(items: Sequence[int]) -> str:
    return hashlib.sha256(torch.as_tensor(list(items), dtype=torch.int64).numpy().tobytes()).hexdigest()


def build_feature_cache(backbone: Backbone, dataset, grid: tuple[int, int], out_dir: str | Path, key: dict,
                        batch_size: int = 64, shard_size: int = 1024, dtype: str = "float16",
                        num_workers: int = 0, progress: bool = True, items: Sequence[int] | None = None,
                        order_seed: int | None = None) -> FeatureCache:
    """Cache the features of ``items`` of ``dataset`` (items: uint8 ``[H, W, 3]``, label); default every index.

    ``order_seed``: store the items in that seeded random order (:func:`shuffled_items`); None keeps the
    given order. Reuses an existing cache whose manifest ``key`` equals this one; resumes one of the same key
    that a killed run left incomplete (shards whose record and checksum hold are kept, the rest recomputed);
    removes the shards of another key. ``dtype``: storage precision, ``float16`` (default), ``bfloat16`` or
    ``float32``.

    Under ``torchrun`` rank 0 plans (checks which shards are done) and the shards still to do are dealt
    out round-robin; each shard is encoded in batches of its own (``batch_size`` images from the shard's
    start), so a shard's bytes depend on the data and the backbone only, never on W or on where a run was
    killed. Rank 0 writes the plan and, after a barrier, the final manifest; every rank returns the cache.
    """
    out = Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"feature cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    items = list(range(len(dataset))) if items is None else [int(i) for i in items]
    if order_seed is not None:
        items = shuffled_items(items, order_seed)
    full_key = {**key, "grid": [int(g) for g in grid], "count": len(items), "dtype": dtype,
                "shard_size": int(shard_size), "batch_size": int(batch_size), "items": items_digest(items),
                "order_seed": order_seed}
    existing = read_manifest(out)
    if existing is not None and existing.get("complete") and existing.get("key") == full_key:
        log.info("feature cache %s is up to date (%d images)", out, existing["count"])
        return FeatureCache(out)
    rank, world, created = distributed_context()
    try:
        ranges = [(s, min(s + shard_size, len(items))) for s in range(0, len(items), shard_size)]
        pending = _plan(out, full_key, existing, items, ranges) if rank == 0 else None
        pending = broadcast_object(pending)
        mine = pending[rank::world]
        log.info("features %s: rank %d/%d, %d of %d shards to extract, %d of them mine",
                 out.name, rank, world, len(pending), len(ranges), len(mine))
        if mine:
            _extract_shards(backbone, dataset, items, grid, out, ranges, mine, batch_size, dtype, num_workers,
                            progress)
        barrier(world)
        if rank == 0:
            _write_manifest(out, full_key, ranges, dtype)
        barrier(world)  # no rank reads the manifest before it is complete
        return FeatureCache(out)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _record_file(index: int) -> str:
    return f"done-{index:05d}.json"


def _shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _plan(out: Path, key: dict, existing: dict | None, items: list[int], ranges) -> list[int]:
    """Rank 0, before any rank extracts: drop shards of another key (and every temporary file of a killed
    run), write the items and the plan (a manifest with ``complete: false`` that readers refuse); returns
    the shards still to extract (checked once, here, not by every rank)."""
    out.mkdir(parents=True, exist_ok=True)
    if existing is None or existing.get("key") != key:
        for stale in [*out.glob("shard-*.safetensors"), *out.glob("done-*.json"), out / ITEMS]:
            stale.unlink(missing_ok=True)
    for tmp in out.glob(".*.tmp-*"):
        tmp.unlink()
    record = save_tensors(out / ITEMS, {"items": torch.tensor(items, dtype=torch.int64)})
    atomic_write_json(out / MANIFEST, {"version": CACHE_VERSION, "key": key, "complete": False, "items": record},
                      indent=1)
    return [i for i, (s, e) in enumerate(ranges) if _shard_done(out, i, s, e) is None]


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


def _extract_shards(backbone, dataset, items: list[int], grid, out: Path, ranges, todo: list[int],
                    batch_size: int, dtype: str, num_workers: int, progress: bool) -> None:
    batches = []
    for i in todo:
        first, stop = ranges[i]
        batches += [items[s:min(s + batch_size, stop)] for s in range(first, stop, batch_size)]
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
            record = save_tensors(out / _shard_file(current), {
                "features": torch.cat(feats_parts), "labels": torch.cat(label_parts),
                "indices": torch.tensor(items[start:stop], dtype=torch.int64)})
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
    plan = read_manifest(out) or {}
    manifest = {"version": CACHE_VERSION, "key": key, "complete": True, "count": ranges[-1][1] if ranges else 0,
                "shape": shape, "dtype": dtype, "items": plan.get("items"), "shards": shards}
    atomic_write_json(out / MANIFEST, manifest, indent=1)
    log.info("cached features of %d images in %d shard(s) at %s", manifest["count"], len(shards), out)


__all__ = ["FeatureBatch", "FeatureCache", "FeatureCacheError", "build_feature_cache", "concept_activations",
           "extract_features", "pooled_cache_features", "shuffled_items"]
