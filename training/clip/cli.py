"""`salfctl train concepts` and `salfctl train similarities` (see training/cli.py).

Heavy imports (torch, open_clip) happen inside the commands so that `salfctl --help` stays fast.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer

from salf.cli import EXIT_USAGE, Verbose, command, configure_logging, fail
from salf.contract.grid import PLACEMENTS

log = logging.getLogger(__name__)


def clip_errors() -> dict[type, int]:
    """Expected failures of the CLIP stages (exit 2 with the message)."""
    from training.data.folder import DatasetError

    from .concepts import ConceptGenerationError
    from .encode import ClipWeightsNotFoundError
    from .shards import CacheError

    return {kind: EXIT_USAGE for kind in (ClipWeightsNotFoundError, ConceptGenerationError, DatasetError, CacheError,
                                          FileNotFoundError, ValueError)}


def _load_cfg(config: Optional[str]):
    from training.config import SalfConfig, load_config

    return load_config(config) if config else SalfConfig()


def _apply_clip_overrides(cfg, clip: Optional[str], pretrained: Optional[str], device: Optional[str],
                          batch_size: Optional[int]) -> None:
    if clip:
        cfg.clip.model = clip
    if pretrained:
        cfg.clip.pretrained = pretrained
    if device:
        cfg.clip.device = device
    if batch_size:
        cfg.clip.batch_size = batch_size


def _parse_grid(text: str) -> tuple[int, int]:
    try:
        gh, gw = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"grid must look like 7x7, got {text!r}")
    return gh, gw


def concepts(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for concepts.txt and report.json."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset root: classes, and train images for the "
                                        "top-5 filter."),
    classes_file: Optional[Path] = typer.Option(None, "--classes", help="Class names, one a line (default: "
                                                "DATA/classes.txt)."),
    concepts_file: Optional[Path] = typer.Option(None, "--concepts", help="Start from this concept list "
                                                 "(default: DATA/concepts.txt unless --generate)."),
    generate: bool = typer.Option(False, "--generate", help="Generate the list with an LLM (3 prompts per class)."),
    llm_base_url: Optional[str] = typer.Option(None, "--llm-base-url", envvar="OPENAI_BASE_URL",
                                               help="OpenAI-compatible endpoint, e.g. https://host/v1."),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", envvar="OPENAI_MODEL", help="Chat model name."),
    llm_api_key: Optional[str] = typer.Option(None, "--llm-api-key", envvar="OPENAI_API_KEY",
                                              help="Bearer key (env OPENAI_API_KEY)."),
    llm_timeout: float = typer.Option(60.0, "--llm-timeout", help="Seconds per request."),
    llm_concurrency: int = typer.Option(8, "--llm-concurrency", min=1, help="LLM requests in flight at a time "
                                        "(answers are saved to OUT/llm_answers.jsonl; a rerun asks only for "
                                        "the missing ones)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or JSON file for the clip settings."),
    clip: Optional[str] = typer.Option(None, "--clip", help="open_clip model name (overrides the config)."),
    clip_pretrained: Optional[str] = typer.Option(None, "--clip-pretrained", help="Local weights file or "
                                                  "locally cached tag. Nothing is downloaded."),
    device: Optional[str] = typer.Option(None, "--device", help="auto / cpu / cuda[:k]."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Drop concepts longer than this."),
    class_cutoff: Optional[float] = typer.Option(None, "--class-cutoff", help="Drop if cos to a class >= this."),
    concept_cutoff: Optional[float] = typer.Option(None, "--concept-cutoff", help="Near-duplicate cut-off."),
    top5_cutoff: Optional[float] = typer.Option(None, "--top5-cutoff", help="Drop if the mean top-5 image "
                                                "similarity is below this."),
    no_image_filter: bool = typer.Option(False, "--no-image-filter", help="Skip the top-5 image filter."),
    verbose: Verbose = False,
) -> None:
    """Build the concept list: a user list or an LLM's, filtered as in the paper (3.1)."""
    if verbose:
        configure_logging(1)
    from .concepts import LLMEndpoint, generate_concepts
    from .pipeline import encoder_from_config, read_concept_file, run_concept_stage, settings_from_config, split_images

    cfg = _load_cfg(config)
    _apply_clip_overrides(cfg, clip, clip_pretrained, device, None)
    if classes_file is None and data is None:
        fail("pass --data DATA (its classes.txt) or --classes FILE")
    class_names = read_concept_file(classes_file or Path(data) / "classes.txt")
    out.mkdir(parents=True, exist_ok=True)
    if generate:
        if concepts_file is not None:
            fail("pass either --concepts FILE or --generate, not both")
        if not llm_base_url or not llm_model:
            fail("--generate needs --llm-base-url/OPENAI_BASE_URL and --llm-model/OPENAI_MODEL")
        endpoint = LLMEndpoint(llm_base_url, llm_model, llm_api_key, timeout_s=llm_timeout)
        initial, answers = generate_concepts(class_names, endpoint, max_in_flight=llm_concurrency,
                                             cache_path=out / "llm_answers.jsonl")
        (out / "generated.json").write_text(json.dumps({"endpoint": llm_base_url, "model": llm_model,
                                                        "answers": answers, "concepts": initial}, indent=1) + "\n")
    else:
        source = concepts_file or (Path(data) / "concepts.txt" if data else None)
        if source is None:
            fail("no concept list: pass --concepts FILE, --data DATA with a concepts.txt, or --generate")
        initial = read_concept_file(source)
    settings = settings_from_config(cfg)
    for name, value in (("max_length", max_length), ("class_cutoff", class_cutoff),
                        ("concept_cutoff", concept_cutoff), ("top5_cutoff", top5_cutoff)):
        if value is not None:
            setattr(settings, name, value)
    if no_image_filter:
        settings.top5_cutoff = None
    paths = names = None
    if settings.top5_cutoff is not None:
        if data is None:
            fail("the top-5 image filter needs --data (training images); or pass --no-image-filter")
        paths, names = split_images(data)
    encoder = encoder_from_config(cfg)
    result = run_concept_stage(encoder, initial, class_names, settings, out, paths, names,
                               cfg.clip.batch_size, cfg.clip.num_workers)
    typer.echo(f"{len(result.kept)} of {len(initial)} concepts kept -> {out / 'concepts.txt'} "
               f"(report: {out / 'report.json'})")


def similarities(
    data: Path = typer.Option(..., "--data", help="Dataset root (ImageFolder layout)."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder (e.g. RUN/similarities)."),
    split: str = typer.Option("train", "--split"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Preset or JSON file (grid, radius, clip)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="open_clip model name (overrides the config)."),
    clip_pretrained: Optional[str] = typer.Option(None, "--clip-pretrained", help="Local weights file or "
                                                  "locally cached tag. Nothing is downloaded."),
    grid: Optional[str] = typer.Option(None, "--grid", help="e.g. 7x7 (default: the config's)."),
    radius: Optional[int] = typer.Option(None, "--radius", help="Circle radius in CLIP-input pixels "
                                         "(default: the config's, scaled to the CLIP input size)."),
    grid_placement: Optional[str] = typer.Option(None, "--grid-placement", help="Where the circles' centres "
                                                 "sit: cells or stride (default: the config's grid_placement, "
                                                 "so `train all` with the same config uses this cache)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts per forward pass."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Images per shard."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Image-decoding workers."),
    device: Optional[str] = typer.Option(None, "--device", help="auto / cpu / cuda[:k] (torchrun: cuda:LOCAL_RANK)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto / fp32 / bf16 / fp16."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the image encoder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache built with other settings."),
    verbose: Verbose = False,
) -> None:
    """Red-circle prompt embeddings of every image (paper 3.2): resumable shards + manifest.

    Under torchrun each rank takes its own shards; rerun the same command to resume after a kill.
    """
    if verbose:
        configure_logging(1)
    from .pipeline import clip_radius, encoder_from_config, split_images
    from .similarities import compute_prompt_embeddings

    cfg = _load_cfg(config)
    _apply_clip_overrides(cfg, clip, clip_pretrained, device, batch_size)
    if precision:
        cfg.clip.precision = precision
    if shard_size:
        cfg.clip.shard_size = shard_size
    if workers is not None:
        cfg.clip.num_workers = workers
    if cfg.clip.device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            cfg.clip.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    grid_hw = _parse_grid(grid) if grid else tuple(cfg.grid)
    placement = grid_placement or cfg.grid_placement
    if placement not in PLACEMENTS:
        fail(f"--grid-placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    paths, names = split_images(data, split)
    encoder = encoder_from_config(cfg)
    r = radius if radius is not None else clip_radius(cfg, encoder.image_size)
    manifest = compute_prompt_embeddings(paths, names, encoder, out, grid_hw, r,
                                         shard_size=cfg.clip.shard_size, batch_size=cfg.clip.batch_size,
                                         num_workers=cfg.clip.num_workers, compile=compile or cfg.clip.compile,
                                         overwrite=overwrite, placement=placement)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"prompt embeddings of {len(names)} images ({grid_hw[0]}x{grid_hw[1]} grid, r={r}, "
                   f"{placement} placement) -> {manifest}")


def register(train_app: typer.Typer, data_app: typer.Typer) -> None:
    """Add this part's commands to the `train` and `data` apps."""
    command(train_app, "concepts", errors=clip_errors)(concepts)
    command(train_app, "similarities", errors=clip_errors)(similarities)
