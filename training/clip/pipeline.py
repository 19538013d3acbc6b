"""The CLIP stages as one call for `salfctl train all`: concepts -> prompt embeddings -> ``ClipSimilarity``.

Run layout (DESIGN.md)::

    RUN/concepts/concepts.txt          the filtered concept list (input to the CBL)
    RUN/concepts/report.json           what was dropped and why
    RUN/concepts/image_embeddings.safetensors   whole-image CLIP embeddings for the top-5 filter (reused)
    RUN/similarities/                  prompt-embedding shards + manifest.json (resumable)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from training.config import SalfConfig
from training.data.folder import DatasetError, ImageFolderSplit, read_dataset_info
from training.runtime import atomic_write_bytes, atomic_write_json, atomic_write_text

from .concepts import FilterResult, FilterSettings, filter_concepts
from .encode import ClipEncoder, load_clip
from .shards import check_placement, images_digest
from .similarities import compute_prompt_embeddings, default_workers, image_batches
from .source import ClipSimilarity, EmbeddingCache

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"


def encoder_from_config(cfg: SalfConfig) -> ClipEncoder:
    """The preset's CLIP; ``clip.device`` "auto" follows the run's ``device`` (so ``--device cpu`` holds)."""
    c = cfg.clip
    device = c.device if c.device != "auto" else getattr(cfg, "device", "auto")
    return load_clip(c.model, c.pretrained, device=device, precision=c.precision, seed=cfg.seed)


def clip_radius(cfg: SalfConfig, clip_size: tuple[int, int]) -> int:
    """The preset's radius is in backbone-input pixels; circles are drawn at the CLIP input size."""
    backbone_h = cfg.backbone.input_size[0]
    if backbone_h == clip_size[0]:
        return int(cfg.radius)
    radius = max(2, round(cfg.radius * clip_size[0] / backbone_h))
    log.info("radius %d at %d px -> %d at the CLIP input size %d px", cfg.radius, backbone_h, radius, clip_size[0])
    return radius


def split_images(data_root: str | Path, split: str = TRAIN_SPLIT) -> tuple[list[Path], list[str]]:
    """Image paths of a split in dataset order, and their names relative to the dataset root."""
    ds = ImageFolderSplit(data_root, split)
    root = Path(ds.root)
    return ds.paths, [p.relative_to(root).as_posix() for p in ds.paths]


def read_concept_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    concepts = [line for line in lines if line and not line.startswith("#")]
    if not concepts:
        raise ValueError(f"list file {path} is empty")
    return concepts


def starting_concepts(cfg: SalfConfig, data_root: str | Path) -> tuple[list[str], str]:
    """cfg.concepts (a file) if set, else the dataset's concepts.txt."""
    if cfg.concepts:
        return read_concept_file(cfg.concepts), str(cfg.concepts)
    info = read_dataset_info(data_root)
    if info.concepts is None:
        raise DatasetError(f"dataset {data_root} has no concepts.txt and the config names no concept list; "
                           f"write one with `salfctl train concepts` and set `concepts` in the config")
    return info.concepts, str(Path(data_root) / "concepts.txt")


@torch.no_grad()
def whole_image_embeddings(encoder: ClipEncoder, paths: Sequence[Path], names: Sequence[str],
                           cache_file: Path | None = None, batch_size: int = 256,
                           num_workers: int | None = None) -> torch.Tensor:
    """CLIP embeddings of the plain images: float32 ``[N, D]``, L2-normalised. Reused from ``cache_file``
    when it was made by the same model, weights and image list."""
    from safetensors.torch import load_file, save

    key = {"model": encoder.name, "weights": str(encoder.weights_sha256 or f"random:{encoder.init_seed}"),
           "images": images_digest(names, paths), "size": json.dumps(list(encoder.image_size))}
    if cache_file is not None and cache_file.is_file():
        from safetensors import safe_open

        with safe_open(str(cache_file), framework="pt") as fh:
            if fh.metadata() == key:
                return load_file(str(cache_file))["embeddings"]
    batches = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    workers = default_workers(encoder.device) if num_workers is None else num_workers
    out = [encoder.encode_images_uint8(images, batch_size) for images in
           image_batches(paths, encoder.image_size, batches, workers, encoder.device.type == "cuda")]
    emb = torch.cat(out)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_file, save({"embeddings": emb.contiguous()}, metadata=key))
    return emb


def settings_from_config(cfg: SalfConfig) -> FilterSettings:
    c = cfg.clip
    return FilterSettings(max_length=c.max_concept_length, class_cutoff=c.class_similarity_cutoff,
                          concept_cutoff=c.concept_similarity_cutoff, top5_cutoff=c.top5_cutoff)


def run_concept_stage(encoder: ClipEncoder, concepts: Sequence[str], classes: Sequence[str],
                      settings: FilterSettings, out_dir: Path, paths: Sequence[Path] | None = None,
                      names: Sequence[str] | None = None, batch_size: int = 256,
                      num_workers: int | None = None) -> FilterResult:
    """Filter ``concepts``; writes ``out_dir/concepts.txt`` and ``out_dir/report.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image_emb = None
    if settings.top5_cutoff is not None:
        if not paths:
            raise ValueError("the top-5 image filter needs training images (pass --data, or disable it)")
        image_emb = whole_image_embeddings(encoder, paths, names or [str(p) for p in paths],
                                           out_dir / "image_embeddings.safetensors", batch_size, num_workers)
    class_texts = [c.replace("_", " ") for c in classes]  # folder names use underscores for spaces
    result = filter_concepts(concepts, class_texts, encoder.encode_text, image_emb, settings)
    atomic_write_text(out_dir / "concepts.txt", "\n".join(result.kept) + "\n")
    report = result.report(concepts, classes, settings)
    report["clip"] = {"model": encoder.name, "pretrained": encoder.pretrained,
                      "weights_sha256": encoder.weights_sha256}
    atomic_write_json(out_dir / "report.json", report, indent=1)
    log.info("concepts: %d kept, %d dropped -> %s", len(result.kept), len(result.dropped), out_dir)
    return result


def build_clip_source(cfg: SalfConfig, data_root: str | Path, run_dir: str | Path) -> tuple[ClipSimilarity, list[str]]:
    """Concept filtering + (resumable) similarity stage on the train split; returns the CBL's source.

    The source's indices are the dataset order of ``ImageFolderSplit(data_root, "train")``.
    """
    run_dir = Path(run_dir)
    check_placement(run_dir / "similarities", cfg.grid_placement)  # before any CLIP work
    encoder = encoder_from_config(cfg)
    paths, names = split_images(data_root)
    info = read_dataset_info(data_root)
    if cfg.similarity.class_concepts:  # paper 4.2: "An image of a {class}" for every class, never filtered
        from training.similarity import class_prompts

        kept = class_prompts(cfg.similarity.class_concepts, info.classes)
        out = run_dir / "concepts"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "concepts.txt", "\n".join(kept) + "\n")
        atomic_write_json(out / "report.json", {"class_concepts": cfg.similarity.class_concepts, "kept": kept,
                                                "filters": "skipped (class-concept mode)"}, indent=1)
        log.info("concepts: %d class concepts from %r (filters skipped)", len(kept), cfg.similarity.class_concepts)
    else:
        concepts, origin = starting_concepts(cfg, data_root)
        log.info("concepts: %d from %s", len(concepts), origin)
        kept = run_concept_stage(encoder, concepts, info.classes, settings_from_config(cfg), run_dir / "concepts",
                                 paths, names, cfg.clip.batch_size, cfg.clip.num_workers).kept
    compute_prompt_embeddings(paths, names, encoder, run_dir / "similarities", cfg.grid,
                              clip_radius(cfg, encoder.image_size), shard_size=cfg.clip.shard_size,
                              batch_size=cfg.clip.batch_size, num_workers=cfg.clip.num_workers,
                              compile=cfg.clip.compile, placement=cfg.grid_placement)
    cache = EmbeddingCache(run_dir / "similarities")
    source = ClipSimilarity(cache, list(kept), encoder.encode_text(list(kept)))
    return source, list(kept)
