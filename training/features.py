"""Backbone feature cache: run the frozen backbone once per split, store grid-resized features in shards.

Layout of a cache folder (``RUN/features/<split>/``)::

    manifest.json              {"version", "key", "count", "shape": [D, Gh, Gw], "dtype",
                                "shards": [{"file", "start", "count", "bytes", "sha256"}]}
    shard-00000.safetensors    "features" [n, D, Gh, Gw] (fp16 by default), "labels" [n] int64, "indices" [n]

Features are stored already resized to the prompting grid (what the CBL consumes), so a shard of
1024 images of a ResNet-50 at 7x7 is 1024 * 2048 * 49 * 2 bytes = ~200 MB. Every file is written to
a temporary name and renamed, and the manifest is written last: a cache is complete exactly when its
manifest exists and its ``key`` (backbone, weights checksum, grid, split, image count, and the
images' name/size/mtime fingerprint) matches.
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
from .runtime import ChecksumError, atomic_write_json, load_tensors, progress as progress_bar, save_tensors

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

    Reuses an existing cache whose manifest ``key`` equals ``key``; otherwise rebuilds it.
    ``dtype``: storage precision, one of ``float16`` (default), ``bfloat16``, ``float32``.
    """
    out = Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"feature cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    full_key = {**key, "grid": [int(g) for g in grid], "count": len(dataset), "dtype": dtype}
    existing = _read_manifest(out)
    if existing is not None and existing.get("key") == full_key:
        log.info("feature cache %s is up to date (%d images)", out, existing["count"])
        return FeatureCache(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an incomplete cache must never look complete
    for stale in out.glob("shard-*.safetensors"):
        stale.unlink()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    loader = progress_bar(loader, f"features {out.name}", progress, unit="batch")
    backbone.eval()
    shards: list[dict] = []
    buf_f: list[torch.Tensor] = []
    buf_y: list[torch.Tensor] = []
    pending = 0
    start = 0
    shape: list[int] | None = None

    def flush() -> None:
        nonlocal buf_f, buf_y, pending, start
        feats, labels = torch.cat(buf_f), torch.cat(buf_y)
        name = f"shard-{len(shards):05d}.safetensors"
        record = save_tensors(out / name, {"features": feats, "labels": labels,
                                           "indices": torch.arange(start, start + len(labels))})
        shards.append({**record, "start": start, "count": int(len(labels))})
        start += len(labels)
        buf_f, buf_y, pending = [], [], 0

    for images, labels in loader:
        feats = extract_features(backbone, images, grid).to("cpu", DTYPES[dtype])
        shape = list(feats.shape[1:])
        # split batches so that every shard holds exactly shard_size images (the last one fewer)
        while len(feats):
            take = min(shard_size - pending, len(feats))
            buf_f.append(feats[:take])
            buf_y.append(torch.as_tensor(labels[:take], dtype=torch.int64))
            feats, labels = feats[take:], labels[take:]
            pending += take
            if pending == shard_size:
                flush()
    if pending:
        flush()
    manifest = {"version": CACHE_VERSION, "key": full_key, "count": start, "shape": shape, "dtype": dtype,
                "shards": shards}
    atomic_write_json(out / MANIFEST, manifest, indent=1)
    log.info("cached features of %d images in %d shard(s) at %s", start, len(shards), out)
    return FeatureCache(out)


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
        if doc is None:
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
