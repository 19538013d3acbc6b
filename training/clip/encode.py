"""CLIP models for the concept and similarity stages: load by name + tag or local weights, encode.

Which weights is separate from which architecture (STYLE.md point 2): ``model`` is any open_clip
architecture name (plus the tiny test configs in ``training/clip/configs``), ``pretrained`` is a
local weights file or an open_clip tag. A tag is only ever resolved from the local cache: this module
never downloads. ``pretrained=None`` builds a randomly initialised model (tests, benchmarks).
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from training.runtime import resolve_device, sha256_file

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
_configs_registered = False


class ClipWeightsNotFoundError(FileNotFoundError):
    """The requested CLIP weights are neither a local file nor a tag present in the local cache."""


def register_local_configs() -> None:
    """Make the project's open_clip model configs (``training/clip/configs/*.json``) known to open_clip."""
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True


def _cached_tag_file(model: str, tag: str, cache_dir: str | None) -> tuple[str | None, dict, str]:
    """Local file of an open_clip pretrained tag, if already cached; never touches the network.

    Returns ``(path or None, tag config, where it was looked for)``.
    """
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model, tag)
    if not cfg:
        return None, {}, ""
    if cfg.get("file"):
        return (cfg["file"] if os.path.isfile(cfg["file"]) else None), cfg, cfg["file"]
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        candidates = [filename] if filename else ["open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for name in candidates:
            hit = try_to_load_from_cache(repo_id=repo, filename=name, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit, cfg, f"hf-hub cache {repo}/{name}"
        return None, cfg, f"hf-hub cache for {repo}/{candidates[0]}"
    url = cfg.get("url", "")
    root = cache_dir or os.path.expanduser("~/.cache/clip")
    path = os.path.join(root, os.path.basename(url))
    return (path if os.path.isfile(path) else None), cfg, path


def resolve_weights(model: str, pretrained: str | None, cache_dir: str | None = None) -> tuple[str | None, dict]:
    """``pretrained`` (local path or tag) -> (local weights file or None for random init, tag config).

    Raises ``ClipWeightsNotFoundError`` naming the path when nothing local matches.
    """
    if pretrained is None or pretrained == "":
        return None, {}
    if os.path.isfile(pretrained):
        return pretrained, {}
    path, tag_cfg, where = _cached_tag_file(model, pretrained, cache_dir)
    if path is not None:
        return path, tag_cfg
    if tag_cfg:
        raise ClipWeightsNotFoundError(
            f"CLIP weights for {model!r} tag {pretrained!r} are not cached locally (looked in {where}); "
            f"nothing is downloaded: pass a local weights file with --clip-pretrained /path/to/weights")
    raise ClipWeightsNotFoundError(
        f"CLIP weights file {pretrained!r} not found (and it is not a known open_clip tag of {model!r}); "
        f"nothing is downloaded: pass an existing local weights file")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 autocast on GPU, fp32 on CPU. Half precisions fall back to fp32 on CPU."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be one of auto/fp32/bf16/fp16, got {precision!r}")
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            log.warning("precision %s requested on %s: using fp32 (autocast is for GPUs here)", precision, device)
        return "fp32"
    return "bf16" if precision == "auto" else precision


@dataclass
class ClipEncoder:
    """A loaded open_clip model with its preprocessing facts.

    ``image_size`` is ``(H, W)`` of the CLIP input; ``mean``/``std`` are per-channel for images in [0, 1].
    """
    model: torch.nn.Module
    tokenizer: object
    name: str
    pretrained: str | None
    weights_sha256: str | None
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    precision: str  # resolved: fp32 / bf16 / fp16
    init_seed: int | None = None  # seed of a random init (no weights), recorded in cache manifests

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 ``[..., 3, H, W]`` -> float32 normalised with the model's mean/std."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images_uint8.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images_uint8.device).view(3, 1, 1)
        return (images_uint8.to(torch.float32) / 255.0 - mean) / std

    @torch.no_grad()
    def encode_normalized(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float ``[B, 3, H, W]`` -> L2-normalised embeddings ``[B, D]`` float32 (on the model's device)."""
        with self.autocast():
            feats = self.model.encode_image(images.to(self.device, non_blocking=True))
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_images_uint8(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` (already at ``image_size``) -> ``[N, D]`` float32 L2-normalised, on CPU."""
        out = []
        for i in range(0, images.shape[0], batch_size):
            chunk = self.normalize(images[i:i + batch_size].to(self.device))
            out.append(self.encode_normalized(chunk).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> ``[M, D]`` float32 L2-normalised text embeddings, on CPU."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            with self.autocast():
                feats = self.model.encode_text(tokens)
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model.visual, "proj", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[1])
        return int(self.model.visual.output_dim)


def _as_hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def load_clip(model: str, pretrained: str | None = None, device: str | None = "auto",
              precision: str = "auto", cache_dir: str | None = None, seed: int = 0) -> ClipEncoder:
    """Build an open_clip model in eval mode. ``pretrained``: local file, locally cached tag, or None.

    With no weights the model is randomly initialised from ``seed`` (so that separate processes, e.g. a
    resumed similarity stage, build the same model).
    """
    import open_clip

    register_local_configs()
    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; known include: "
                         f"{', '.join(m for m in open_clip.list_models() if m.startswith(('ViT-B', 'salf')))} ...")
    dev = resolve_device(device)
    weights, tag_cfg = resolve_weights(model, pretrained, cache_dir)
    force_pp = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg} or None
    if weights is None:
        log.warning("CLIP %s is randomly initialised (no --clip-pretrained): similarities carry no meaning "
                    "beyond tests and benchmarks", model)
    # Built on the CPU under a forked RNG: a random init is reproducible and leaves the caller's RNG alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = open_clip.create_model(model, pretrained=weights, device="cpu", force_preprocess_cfg=force_pp)
    net = net.to(dev).eval()
    pp = open_clip.get_model_preprocess_cfg(net)
    return ClipEncoder(
        model=net, tokenizer=open_clip.get_tokenizer(model), name=model, pretrained=pretrained,
        weights_sha256=sha256_file(weights) if weights else None, image_size=_as_hw(pp["size"]),
        mean=tuple(float(v) for v in pp["mean"]), std=tuple(float(v) for v in pp["std"]),
        device=dev, precision=resolve_precision(precision, dev), init_seed=None if weights else seed)
