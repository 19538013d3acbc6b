"""The prompt-embedding cache on disk (``RUN/similarities/``, format in ``similarities.py``): its spec, the
manifest, shard names and records, the completeness check a resumed run relies on, and the writes.

Reading it is ``source.py`` (``EmbeddingCache``); computing it is ``similarities.py``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from salf.contract.grid import grid_points
from training.runtime import ChecksumError, atomic_write_bytes, atomic_write_json, file_record, read_verified

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


def shard_bytes(emb: torch.Tensor, start: int, stop: int) -> bytes:
    from safetensors.torch import save

    # One metadata key only: safetensors writes a metadata map in hash order, which varies between
    # processes, and the shard bytes must not (a resumed run is byte-identical to an uninterrupted one).
    return save({EMBEDDINGS_KEY: emb.contiguous()}, metadata={"images": f"{start}:{stop}"})


def read_spec(manifest: Path) -> CacheSpec:
    try:
        old = json.loads(manifest.read_text())
        if old.get("format_version") != FORMAT_VERSION:
            raise KeyError(f"format_version {old.get('format_version')} != {FORMAT_VERSION}")
        return CacheSpec.from_dict(old["spec"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CacheError(f"{manifest}: unreadable manifest ({exc}); remove the folder or pass --overwrite") from exc


def check_placement(out_dir: Path, placement: str) -> None:
    """Refuse, with the flag that fixes it, a cache in ``out_dir`` built with another grid placement than the
    run's: the cache is usually made by `salfctl train similarities` (perhaps under torchrun) and then
    consumed by `salfctl train all`, and a silent rebuild would throw away hours of CLIP forwards."""
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return
    built = read_spec(manifest).placement
    if built != placement:
        raise CacheError(
            f"{out_dir} was built with grid placement {built!r} but this run's config asks for {placement!r}: "
            f"pass --grid-placement {built} to this command to train on that cache, or rebuild it with "
            f"`salfctl train similarities --grid-placement {placement} --overwrite ...`")


def check_or_write_plan(out_dir: Path, spec: CacheSpec, rank: int, overwrite: bool) -> None:
    """Refuse a cache made with other settings (unless ``overwrite``: then its shards are removed), and
    (rank 0) write the plan: the manifest with ``complete: false``."""
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        try:
            old_spec = read_spec(manifest)
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


def adopt_batching(out_dir: Path, spec: CacheSpec, overwrite: bool) -> CacheSpec:
    """An existing cache of the same images/model/geometry keeps its shard and batch sizes, so a run with
    other sizes resumes or reuses it (and stays byte-identical) instead of refusing it."""
    if overwrite or not (out_dir / MANIFEST).is_file():
        return spec
    try:
        old = CacheSpec.from_dict(json.loads((out_dir / MANIFEST).read_text())["spec"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return spec  # check_or_write_plan reports the unreadable manifest
    adopted = replace(spec, **{k: getattr(old, k) for k in BATCHING_KEYS})
    if adopted == old and adopted != spec:
        log.info("similarities: keeping the cache's shard_size=%d, batch_size=%d, prompt path %s",
                 old.shard_size, old.batch_size, old.prompt_path)
        return adopted
    return spec


def write_shard(out: Path, index: int, start: int, stop: int, emb: torch.Tensor) -> None:
    data = shard_bytes(emb, start, stop)
    atomic_write_bytes(out / shard_file(index), data)
    record = {"index": index, "start": start, "stop": stop, **file_record(out / shard_file(index), data)}
    atomic_write_json(out / record_file(index), record, indent=1, sort_keys=True)
    log.info("similarities: shard %d (images %d..%d) written", index, start, stop)


def write_final_manifest(out: Path, spec: CacheSpec, ranges) -> None:
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
