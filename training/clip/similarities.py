"""Similarity stage: red-circle prompt embeddings of every training image, in resumable shards.

Output (``RUN/similarities/``)::

    manifest.json            {"format_version", "spec": {...}, "complete": bool, "shards": [...]}
    shard-00000.safetensors  "embeddings": float16 [n, Gh*Gw, D], L2-normalised (rows = dataset order)
    shard-00000.json         {"index", "start", "stop", "file", "bytes", "sha256"}  (written after the shard)

P (images x concepts x grid) is never written: ``ClipSimilarity`` forms it per batch (DESIGN.md).

Resumability. Shards are written to a temporary name, fsynced and renamed, then their record is
written the same way; a shard counts as done only when its record exists and the file's size and
SHA-256 match it, so a kill at any point leaves either a complete shard or one that is recomputed
(a truncated or corrupted file fails its checksum). Each shard is encoded in batches that depend on
the shard alone, so a resumed run writes the same bytes as an uninterrupted one. Under ``torchrun``
rank ``k`` of ``W`` takes the shards ``i`` with ``i % W == k``; rank 0 writes the final manifest after
a barrier. A single process with no launcher is rank 0 of 1.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from training.distributed import barrier, distributed_context

from .encode import ClipEncoder
from .patch_reuse import PatchReuse, supports_patch_reuse
from .prompts import normalization_constants, prompts_normalized, ring_stencil
from .shards import (MANIFEST, CacheSpec, adopt_batching, check_or_write_plan, images_digest, shard_complete,
                     shard_ranges, write_final_manifest, write_shard)

log = logging.getLogger(__name__)


def load_image_uint8(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """DESIGN.md preprocessing (the loaders' one definition): uint8 ``[H, W, 3]`` at ``size = (H, W)``."""
    from salf.contract.images import load_image

    return load_image(path, size)


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], size: tuple[int, int]) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(load_image_uint8(self.paths[i], self.size)).permute(2, 0, 1)


def image_batches(paths: Sequence[Path], size: tuple[int, int], batches: list[list[int]],
                  num_workers: int, pin_memory: bool):
    """Yield uint8 ``[b, 3, H, W]`` tensors for the given index batches, decoded by ``num_workers`` workers."""
    loader = torch.utils.data.DataLoader(
        _Images(paths, size), batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)
    yield from loader


def default_workers(device: torch.device) -> int:
    """Decoding workers: none on CPU (the encoder needs the cores), several when a GPU does the encoding."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def prompt_path(encoder: ClipEncoder) -> str:
    """'patch-reuse' (ViT towers) or 'full' (materialised prompts: other towers)."""
    return "patch-reuse" if supports_patch_reuse(encoder.model.visual) else "full"


class PromptEmbedder:
    """Encodes images into L2-normalised red-circle prompt embeddings on the encoder's device.

    ``path`` 'full' draws the B*G prompts (``prompts_normalized``) and runs the image encoder on them;
    'patch-reuse' (``patch_reuse.py``) re-embeds only the patches the rings touch. Both equal Algorithm 1
    up to float rounding; the cache records which one made it.
    """

    def __init__(self, encoder: ClipEncoder, grid: tuple[int, int], radius: int, compile: bool = False,
                 path: str | None = None, placement: str = "stride") -> None:
        self.encoder, self.grid, self.radius = encoder, grid, radius
        self.stencil = ring_stencil(encoder.image_size, grid, radius, device=encoder.device, placement=placement)
        self.constants = normalization_constants(encoder.mean, encoder.std, encoder.device)
        self.path = path or prompt_path(encoder)
        if self.path not in ("full", "patch-reuse"):
            raise ValueError(f"unknown prompt path {self.path!r}")
        if self.path == "patch-reuse":
            if not supports_patch_reuse(encoder.model.visual):
                raise ValueError(f"{encoder.name}: its image tower has no non-overlapping patch conv to reuse")
            self.reuse = PatchReuse(encoder.model.visual, self.stencil)
        self.forward = encoder.encode_normalized
        self.transformer = None
        if compile:
            # Compiled once per shape; shards end with a smaller batch, which costs one more compile. The
            # shared model is not modified: compiled callables are used by this embedder only.
            if self.path == "patch-reuse":
                self.transformer = torch.compile(encoder.model.visual.transformer)
            else:
                self.forward = torch.compile(encoder.encode_normalized)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, dtype: torch.dtype = torch.float16, to_cpu: bool = True) -> torch.Tensor:
        """uint8 ``[b, 3, H, W]`` -> ``[b, G, D]`` in ``dtype`` (float16: the cache's), on the CPU unless
        ``to_cpu`` is False (then on the device: no host sync per batch)."""
        b = images.shape[0]
        images = images.to(self.encoder.device, non_blocking=True)
        if self.path == "patch-reuse":
            mean_t, std_t, red = self.constants
            norm = (images.to(torch.float32) / 255.0 - mean_t) / std_t
            with self.encoder.autocast():
                feats = self.reuse.encode_image(self.encoder.model, norm, red, self.transformer)
            emb = torch.nn.functional.normalize(feats.float(), dim=-1)
        else:
            emb = self.forward(prompts_normalized(images, self.stencil, constants=self.constants))
        emb = emb.reshape(b, self.grid[0] * self.grid[1], -1).to(dtype)
        return emb.cpu() if to_cpu else emb


def _plan_batches(ranges: list[tuple[int, int]], images_per_batch: int) -> list[list[int]]:
    batches = []
    for start, stop in ranges:
        for s in range(start, stop, images_per_batch):
            batches.append(list(range(s, min(s + images_per_batch, stop))))
    return batches


def build_spec(encoder: ClipEncoder, names: Sequence[str], grid: tuple[int, int], radius: int,
               shard_size: int, batch_size: int, path: str = "full", compiled: bool = False,
               paths: Sequence[str | Path] | None = None, *, placement: str) -> CacheSpec:
    dim = encoder.embed_dim
    return CacheSpec(model=encoder.name, pretrained=encoder.pretrained, weights_sha256=encoder.weights_sha256,
                     init_seed=encoder.init_seed, image_size=tuple(encoder.image_size), mean=tuple(encoder.mean),
                     std=tuple(encoder.std), grid=(int(grid[0]), int(grid[1])), radius=int(radius),
                     num_images=len(names), images_sha256=images_digest(names, paths), shard_size=int(shard_size),
                     batch_size=int(batch_size), dim=dim, precision=encoder.precision, prompt_path=path,
                     compiled=bool(compiled), placement=placement)


def compute_prompt_embeddings(paths: Sequence[str | Path], names: Sequence[str], encoder: ClipEncoder,
                              out_dir: str | Path, grid: tuple[int, int], radius: int, shard_size: int = 1024,
                              batch_size: int = 256, num_workers: int | None = None, compile: bool = False,
                              overwrite: bool = False, *, placement: str) -> Path:
    """Run (or resume) the similarity stage; returns the manifest path (complete once every rank is done).

    ``placement`` (``salf.contract.grid.PLACEMENTS``) has no default on purpose: it is part of the cache's
    spec, and a default that differs from the training config's ``grid_placement`` made `salfctl train
    similarities` write a cache `salfctl train all` then refused.

    ``paths``: image files in dataset order; ``names``: their stable names (relative paths) for the
    manifest digest. ``batch_size`` counts prompts per forward pass (images per batch = batch_size // G).
    """
    if len(paths) != len(names):
        raise ValueError(f"{len(paths)} paths but {len(names)} names")
    if len(paths) == 0:
        raise ValueError("no images to encode")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world, created = distributed_context()
    try:
        spec = build_spec(encoder, names, grid, radius, shard_size, batch_size, prompt_path(encoder), compile,
                          paths, placement=placement)
        spec = adopt_batching(out, spec, overwrite)
        if rank == 0:
            check_or_write_plan(out, spec, rank, overwrite)
        barrier(world)
        if rank != 0:
            check_or_write_plan(out, spec, rank, overwrite=False)
        ranges = shard_ranges(spec.num_images, spec.shard_size)
        mine = [i for i in range(len(ranges)) if i % world == rank]
        todo = [i for i in mine if shard_complete(out, i, *ranges[i]) is None]
        log.info("similarities: rank %d/%d, %d shards of mine, %d already complete, %d to compute",
                 rank, world, len(mine), len(mine) - len(todo), len(todo))
        if todo:
            _encode_shards(paths, encoder, out, spec, ranges, todo, num_workers, compile)
        barrier(world)
        if rank == 0:
            write_final_manifest(out, spec, ranges)
        barrier(world)  # no rank returns before the manifest it will read is complete
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return out / MANIFEST


def _encode_shards(paths, encoder: ClipEncoder, out: Path, spec: CacheSpec, ranges, todo: list[int],
                   num_workers: int | None, compile: bool) -> None:
    embedder = PromptEmbedder(encoder, spec.grid, spec.radius, compile=spec.compiled, path=spec.prompt_path,
                              placement=spec.placement)
    per_batch = max(1, spec.batch_size // spec.num_prompts)
    batches = _plan_batches([ranges[i] for i in todo], per_batch)
    workers = default_workers(encoder.device) if num_workers is None else num_workers
    shard_iter = iter(todo)
    current, parts, filled = next(shard_iter), [], 0
    for images in image_batches(paths, spec.image_size, batches, workers, encoder.device.type == "cuda"):
        parts.append(embedder.encode(images, to_cpu=False))  # stays on the device until the shard is full
        filled += images.shape[0]
        start, stop = ranges[current]
        if filled == stop - start:
            write_shard(out, current, start, stop, torch.cat(parts).cpu())
            parts, filled = [], 0
            current = next(shard_iter, None)


