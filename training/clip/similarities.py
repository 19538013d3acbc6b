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

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from salf.contract.grid import grid_points
from training.runtime import ChecksumError, atomic_write_bytes, atomic_write_json, file_record, read_verified

from .encode import ClipEncoder
from .patch_reuse import PatchReuse, supports_patch_reuse
from .prompts import normalization_constants, prompts_normalized, ring_stencil

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS_KEY = "embeddings"


class CacheError(RuntimeError):
    """The embedding cache is missing, incomplete, corrupted, or was built with other settings."""


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines the bytes of the cache; a resumed run must match it exactly."""
    model: str
    pretrained: str | None
    weights_sha256: str | None
    init_seed: int | None
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grid: tuple[int, int]
    radius: int
    num_images: int
    images_sha256: str  # SHA-256 of the ordered image list (relative paths and file sizes)
    shard_size: int
    batch_size: int  # prompts per forward pass: part of the spec because it fixes the batching
    dim: int
    precision: str
    prompt_path: str = "full"  # "full" or "patch-reuse" (PromptEmbedder): fixes the float rounding
    compiled: bool = False  # torch.compile changes the float rounding too
    dtype: str = "float16"
    placement: str = "stride"  # salf/contract/grid.py

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("image_size", "mean", "std", "grid"):
            d[key] = list(d[key])
        d["centres"] = [list(p) for p in grid_points(self.image_size, self.grid, self.placement)]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CacheSpec":
        d = {k: v for k, v in d.items() if k != "centres"}
        for key in ("image_size", "mean", "std", "grid"):
            d[key] = tuple(d[key])
        return cls(**d)

    @property
    def num_prompts(self) -> int:
        return self.grid[0] * self.grid[1]


def images_digest(names: Sequence[str], paths: Sequence[str | Path] | None = None) -> str:
    """SHA-256 of the ordered image names (and, given ``paths``, each file's size in bytes): pins the
    dataset order the cache rows follow. The sizes make a dataset regenerated under the same names a
    different cache (names alone let a stale cache be resumed or reused); they are the same on every
    node that holds a copy of the dataset, unlike modification times."""
    if paths is not None and len(paths) != len(names):
        raise ValueError(f"{len(paths)} paths but {len(names)} names")
    h = hashlib.sha256()
    for k, name in enumerate(names):
        size = b"" if paths is None else b"\0" + str(Path(paths[k]).stat().st_size).encode()
        h.update(name.encode("utf-8") + size + b"\n")
    return h.hexdigest()


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, num_images)) for s in range(0, num_images, shard_size)]


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def record_file(index: int) -> str:
    return f"shard-{index:05d}.json"


def shard_complete(out_dir: Path, index: int, start: int, stop: int) -> dict | None:
    """The shard's record if the shard on disk is complete and intact, else None (log says why)."""
    rec_path, path = out_dir / record_file(index), out_dir / shard_file(index)
    if not rec_path.is_file() or not path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("shard %d: unreadable record %s; recomputing", index, rec_path)
        return None
    if (rec.get("start"), rec.get("stop")) != (start, stop):
        log.warning("shard %d: record covers %s..%s, expected %d..%d; recomputing",
                    index, rec.get("start"), rec.get("stop"), start, stop)
        return None
    try:
        read_verified(out_dir, {**rec, "file": shard_file(index)})
    except ChecksumError:
        log.warning("shard %d: %s is truncated or corrupted (size/checksum mismatch); recomputing", index, path)
        return None
    return rec


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


def distributed_context() -> tuple[int, int, bool]:
    """``(rank, world_size, initialised_here)`` from torchrun's environment; (0, 1, False) without a launcher."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad RANK/WORLD_SIZE in the environment: {rank}/{world}")
    created = False
    if world > 1:
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend)
            created = True
    return rank, world, created


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


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


def _shard_bytes(emb: torch.Tensor, start: int, stop: int) -> bytes:
    from safetensors.torch import save

    # One metadata key only: safetensors writes a metadata map in hash order, which varies between
    # processes, and the shard bytes must not (a resumed run is byte-identical to an uninterrupted one).
    return save({EMBEDDINGS_KEY: emb.contiguous()}, metadata={"images": f"{start}:{stop}"})


def _plan_batches(ranges: list[tuple[int, int]], images_per_batch: int) -> list[list[int]]:
    batches = []
    for start, stop in ranges:
        for s in range(start, stop, images_per_batch):
            batches.append(list(range(s, min(s + images_per_batch, stop))))
    return batches


def _read_spec(manifest: Path) -> CacheSpec:
    try:
        old = json.loads(manifest.read_text())
        if old.get("format_version") != FORMAT_VERSION:
            raise KeyError(f"format_version {old.get('format_version')} != {FORMAT_VERSION}")
        return CacheSpec.from_dict(old["spec"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CacheError(f"{manifest}: unreadable manifest ({exc}); remove the folder or pass --overwrite") from exc


def _check_or_write_plan(out_dir: Path, spec: CacheSpec, rank: int, overwrite: bool) -> None:
    """Refuse a cache made with other settings (unless ``overwrite``: then its shards are removed), and
    (rank 0) write the plan: the manifest with ``complete: false``."""
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        try:
            old_spec = _read_spec(manifest)
        except CacheError:
            if not overwrite:
                raise
            old_spec = None
        if old_spec != spec:
            if not overwrite:
                diff = {k: (v, spec.to_dict()[k]) for k, v in old_spec.to_dict().items() if spec.to_dict()[k] != v}
                raise CacheError(f"{out_dir} holds a cache built with other settings {diff} (old, new); "
                                 f"use another folder or pass --overwrite")
            if rank == 0:
                log.warning("similarities: --overwrite: removing the shards of %s made with other settings", out_dir)
                for p in list(out_dir.glob("shard-*")):
                    p.unlink()
    if rank == 0:
        # Temporary files of a killed run are never part of the cache; no rank writes before this returns.
        for stale in out_dir.glob(".*.tmp-*"):
            stale.unlink()
        atomic_write_json(manifest, {"format_version": FORMAT_VERSION, "spec": spec.to_dict(),
                                     "complete": False, "shards": []}, indent=1, sort_keys=True)


# How the work is done, not what is computed (the rounding may differ, the quantities do not).
BATCHING_KEYS = ("shard_size", "batch_size", "prompt_path", "compiled")


def _adopt_batching(out_dir: Path, spec: CacheSpec, overwrite: bool) -> CacheSpec:
    """An existing cache of the same images/model/geometry keeps its shard and batch sizes, so a run with
    other sizes resumes or reuses it (and stays byte-identical) instead of refusing it."""
    if overwrite or not (out_dir / MANIFEST).is_file():
        return spec
    try:
        old = CacheSpec.from_dict(json.loads((out_dir / MANIFEST).read_text())["spec"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return spec  # _check_or_write_plan reports the unreadable manifest
    adopted = replace(spec, **{k: getattr(old, k) for k in BATCHING_KEYS})
    if adopted == old and adopted != spec:
        log.info("similarities: keeping the cache's shard_size=%d, batch_size=%d, prompt path %s",
                 old.shard_size, old.batch_size, old.prompt_path)
        return adopted
    return spec


def build_spec(encoder: ClipEncoder, names: Sequence[str], grid: tuple[int, int], radius: int,
               shard_size: int, batch_size: int, path: str = "full", compiled: bool = False,
               paths: Sequence[str | Path] | None = None, placement: str = "stride") -> CacheSpec:
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
                              overwrite: bool = False, placement: str = "stride") -> Path:
    """Run (or resume) the similarity stage; returns the manifest path (complete once every rank is done).

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
                          paths, placement)
        spec = _adopt_batching(out, spec, overwrite)
        if rank == 0:
            _check_or_write_plan(out, spec, rank, overwrite)
        _barrier(world)
        if rank != 0:
            _check_or_write_plan(out, spec, rank, overwrite=False)
        ranges = shard_ranges(spec.num_images, spec.shard_size)
        mine = [i for i in range(len(ranges)) if i % world == rank]
        todo = [i for i in mine if shard_complete(out, i, *ranges[i]) is None]
        log.info("similarities: rank %d/%d, %d shards of mine, %d already complete, %d to compute",
                 rank, world, len(mine), len(mine) - len(todo), len(todo))
        if todo:
            _encode_shards(paths, encoder, out, spec, ranges, todo, num_workers, compile)
        _barrier(world)
        if rank == 0:
            _write_final_manifest(out, spec, ranges)
        _barrier(world)  # no rank returns before the manifest it will read is complete
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
            _write_shard(out, current, start, stop, torch.cat(parts).cpu())
            parts, filled = [], 0
            current = next(shard_iter, None)


def _write_shard(out: Path, index: int, start: int, stop: int, emb: torch.Tensor) -> None:
    data = _shard_bytes(emb, start, stop)
    atomic_write_bytes(out / shard_file(index), data)
    record = {"index": index, "start": start, "stop": stop, **file_record(out / shard_file(index), data)}
    atomic_write_json(out / record_file(index), record, indent=1, sort_keys=True)
    log.info("similarities: shard %d (images %d..%d) written", index, start, stop)


def _write_final_manifest(out: Path, spec: CacheSpec, ranges) -> None:
    """Collect the shard records. Each rank has just checksummed (or written) its own shards, so rank 0
    checks presence, coverage and size only: re-hashing an ImageNet cache (~64 GB) on one rank would
    cost minutes; readers verify every shard's checksum anyway."""
    records = []
    for i, (start, stop) in enumerate(ranges):
        rec_path, path = out / record_file(i), out / shard_file(i)
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CacheError(f"shard {i}: record {rec_path} missing or unreadable after all ranks finished") from exc
        if (rec.get("start"), rec.get("stop")) != (start, stop) or not path.is_file() \
                or path.stat().st_size != rec.get("bytes"):
            raise CacheError(f"shard {i} ({path}) is missing or incomplete after all ranks finished")
        records.append(rec)
    atomic_write_json(out / MANIFEST, {"format_version": FORMAT_VERSION, "spec": spec.to_dict(),
                                       "complete": True, "shards": records}, indent=1, sort_keys=True)
    log.info("similarities: cache complete in %s (%d images, %d shards)", out, spec.num_images, len(ranges))
