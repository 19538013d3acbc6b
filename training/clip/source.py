"""``ClipSimilarity``: the CLIP similarity source of the CBL trainer (DESIGN.md, similarity sources).

``P[n, m, h, w] = cos(E_I(x_n^(h,w)), E_T(t_m))`` is formed per batch from the cached L2-normalised
prompt embeddings ``[N, Gh*Gw, D]`` (fp16 on disk) and the L2-normalised concept text embeddings
``[M, D]``; no logit scale, and P is never stored.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from training.runtime import ChecksumError, read_verified

from .shards import EMBEDDINGS_KEY, FORMAT_VERSION, MANIFEST, CacheError, CacheSpec, shard_ranges

log = logging.getLogger(__name__)

PRELOAD_LIMIT_BYTES = 4 << 30  # caches up to this size are held in RAM; larger ones are memory-mapped


class EmbeddingCache:
    """Read side of the prompt-embedding cache. Every shard's SHA-256 is checked when it is first read.

    ``gather(indices) -> float16 [B, G, D]``; ``indices`` are dataset indices of the split the cache covers.
    """

    def __init__(self, cache_dir: str | Path, preload: bool | None = None) -> None:
        self.dir = Path(cache_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise CacheError(f"no embedding cache at {self.dir} (missing {MANIFEST}); run `salfctl train similarities`")
        try:
            manifest = json.loads(path.read_text())
            version = manifest.get("format_version")
            if version != FORMAT_VERSION:
                raise CacheError(f"{path}: cache format version {version}, this code reads {FORMAT_VERSION}; "
                                 f"recompute it with `salfctl train similarities --overwrite`")
            if not manifest.get("complete"):
                raise CacheError(f"embedding cache {self.dir} is incomplete; rerun `salfctl train similarities` "
                                 f"to resume it")
            self.spec = CacheSpec.from_dict(manifest["spec"])
            self.shards = manifest["shards"]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CacheError(f"{path}: unreadable manifest ({exc!r})") from exc
        if [(s["start"], s["stop"]) for s in self.shards] != shard_ranges(self.spec.num_images, self.spec.shard_size):
            raise CacheError(f"{path}: shards do not cover images 0..{self.spec.num_images} in order")
        self._starts = np.array([s["start"] for s in self.shards], dtype=np.int64)
        total = sum(s["bytes"] for s in self.shards)
        self.preload = total <= PRELOAD_LIMIT_BYTES if preload is None else preload
        self._handles: dict[int, object] = {}
        self._all: torch.Tensor | None = None
        if self.preload:
            self._all = torch.cat([self._read_shard(i) for i in range(len(self.shards))])

    @property
    def grid(self) -> tuple[int, int]:
        return self.spec.grid

    def __len__(self) -> int:
        return self.spec.num_images

    def _verified_bytes(self, i: int) -> bytes:
        rec = self.shards[i]
        try:
            return read_verified(self.dir, rec)
        except ChecksumError as exc:
            raise CacheError(f"embedding shard {self.dir / rec['file']} is truncated or corrupted (checksum "
                             f"mismatch); rerun `salfctl train similarities` to recompute it") from exc

    def _read_shard(self, i: int) -> torch.Tensor:
        from safetensors.torch import load

        return load(self._verified_bytes(i))[EMBEDDINGS_KEY]

    def _handle(self, i: int):
        if i not in self._handles:
            from safetensors import safe_open

            self._verified_bytes(i)  # checksum once, then read rows through a memory map
            self._handles[i] = safe_open(str(self.dir / self.shards[i]["file"]), framework="pt")
        return self._handles[i]

    def gather(self, indices: Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"image index out of range 0..{len(self) - 1}: {idx.min().item()}..{idx.max().item()}")
        if self._all is not None:
            return self._all[idx]
        shard_of = np.searchsorted(self._starts, idx.numpy(), side="right") - 1
        rows = []
        for n, s in zip(idx.tolist(), shard_of.tolist()):
            local = n - self.shards[s]["start"]
            rows.append(self._handle(s).get_slice(EMBEDDINGS_KEY)[local:local + 1])
        return torch.cat(rows) if rows else torch.empty(0, self.spec.num_prompts, self.spec.dim,
                                                        dtype=torch.float16)


class ClipSimilarity:
    """SimilaritySource backed by the CLIP prompt-embedding cache.

    ``similarities(indices) -> P`` float32 ``[B, M, Gh, Gw]`` with values in [-1, 1].
    """

    def __init__(self, cache: EmbeddingCache, concepts: Sequence[str], text_embeddings: torch.Tensor) -> None:
        text = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if text.ndim != 2 or text.shape[0] != len(concepts):
            raise ValueError(f"text embeddings {tuple(text.shape)} do not match {len(concepts)} concepts")
        if text.shape[1] != cache.spec.dim:
            raise ValueError(f"text embedding dim {text.shape[1]} != image embedding dim {cache.spec.dim}")
        self.cache = cache
        self.concepts = list(concepts)
        self.grid = tuple(cache.grid)
        self.text = torch.nn.functional.normalize(text, dim=-1)

    def __len__(self) -> int:
        return len(self.cache)

    def similarities(self, indices: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        """``P`` on ``device`` (default CPU): the fp16 embeddings travel to the device and the product runs
        there (per cell the cache holds D = 512 fp16 values where P holds M = 4741 float32: ~19x fewer bytes
        cross the bus)."""
        dev = torch.device(device or "cpu")
        if self.text.device != dev:
            self.text = self.text.to(dev)
        emb = self.cache.gather(indices).to(dev, non_blocking=True).to(torch.float32)  # [B, G, D]
        p = torch.einsum("bgd,md->bmg", emb, self.text)
        return p.reshape(p.shape[0], p.shape[1], *self.grid).contiguous()

    def subset(self, keep: Sequence[int]) -> "ClipSimilarity":
        """The same source restricted to the concepts at positions ``keep`` (after interpretability cut-offs)."""
        keep = list(keep)
        return ClipSimilarity(self.cache, [self.concepts[i] for i in keep], self.text[keep].cpu())
