"""Parity of the exported graphs with the PyTorch model (STYLE.md point 11).

For each batch size (1 and 7 by default) and each image set (random uint8 noise, and real images when
given), ``salf_cbm`` in onnxruntime is compared with :class:`~export.onnx_graphs.UInt8SalfCBM` in
torch on the same uint8 batch, and ``salf_head`` in onnxruntime with ``SalfHead`` on the torch concept
maps. The figure per output is the max abs difference; every element must be within its bound
(fp32; ATOL = RTOL = 1e-4):

- ``concept_maps``:   ``maps_atol + rtol * max|maps|``: a bound relative to the output's own scale
  (maps of a random tiny model are ~1e-4, of a trained one ~1) plus a tiny floor (MAPS_ATOL, for
  all-zero maps). The general ``atol`` (1e-4) is NOT used here: on a random tiny model it is as large
  as the maps themselves, so a CBL off by 20% (or a wrong resize) passed parity, and the score and
  logit bounds, which grow with the measured maps difference, passed it on too.
- ``concept_scores``: ``atol + rtol * max|scores| + (rounding_m + pooled_err_m) / std_m`` per concept.
  Standardisation ``(pool - mean) / std`` cancels: a trained concept with ``std_m`` 2e-4 and
  ``|mean_m|`` 0.3 turns one ulp of the pooled value (3e-8) into 1.6e-4 of score, whichever runtime
  is right. ``rounding_m`` allows ``ULPS`` ulps of ``max(|pool_m|, |mean_m|)``; ``pooled_err_m`` is the
  measured maps difference of that concept (twice it, covering softmax pooling; zero for
  ``salf_head``, which gets identical maps).
- ``logits``:         ``atol + rtol * max|logits| + |W| @ score_bound`` (the head is linear).

With float16 maps (``maps_dtype``, docs/DESIGN.md "Maps dtype") the maps bound adds float16's own
rounding, ``2^-11 * |torch map| + 2^-25`` per element (half an ulp, subnormals included); a map beyond
float16's range (65504) is inf and fails. ``salf_head`` is then fed the float16 maps and compared with
torch's head on the same values; ``salf_cbm``'s scores and logits are computed from the float32 maps
inside the graph and keep their float32 bounds.

The figures reported are the max abs differences and the worst ``diff / bound`` ratio (< 1 passes).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from salf.contract.repository import CBM_OUTPUTS, CONCEPT_MAPS, HEAD_OUTPUTS, IMAGE
from training.model import SalfCBM

from .onnx_graphs import ExportError, UInt8SalfCBM

log = logging.getLogger(__name__)

ATOL = 1e-4
RTOL = 1e-4
MAPS_ATOL = 1e-7  # measured torch-vs-onnxruntime maps differences: ~1e-6 of max|maps| (tiny CNN and ViT)
ULPS = 16  # rounding budget of pooling + standardisation, in fp32 ulps of the pooled value
EPS32 = float(np.finfo(np.float32).eps)
FP16_HALF_ULP = 2.0 ** -11  # float16 round-to-nearest: relative error of a normal value
FP16_SUBNORMAL = 2.0 ** -25  # absolute error below float16's smallest normal (2^-14)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Tolerance:
    atol: float = ATOL
    rtol: float = RTOL
    maps_atol: float = MAPS_ATOL

    def bound(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(reference).max(initial=0.0))

    def maps_bound(self, maps: np.ndarray) -> float:
        """Bound on the concept maps: relative to their own scale (module docstring)."""
        return self.maps_atol + self.rtol * float(np.abs(maps).max(initial=0.0))


def load_images(paths: Iterable[str | Path], input_size: tuple[int, int]) -> np.ndarray:
    """Decode images the way every part does (``salf.contract.images``); returns uint8 ``[N, H, W, 3]``."""
    from salf.contract.images import ImageDecodeError, load_image

    out = []
    for path in paths:
        try:
            out.append(load_image(path, input_size))
        except ImageDecodeError as exc:
            raise ValueError(f"cannot read parity image {path}: {exc}") from exc
    if not out:
        raise ValueError("no parity images given")
    return np.stack(out)


def find_images(root: str | Path, limit: int = 14) -> list[Path]:
    """Up to ``limit`` image files under ``root`` (sorted, recursive): e.g. a dataset's test split."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"parity image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files[:limit]


def _batches(images: np.ndarray, batch_sizes: tuple[int, ...]) -> list[np.ndarray]:
    """One batch per size, cycling through ``images`` when there are fewer than the batch size."""
    out = []
    for b in batch_sizes:
        idx = np.arange(b) % len(images)
        out.append(images[idx])
    return out


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _head_bounds(scores: np.ndarray, logits: np.ndarray, model: SalfCBM, tol: Tolerance,
                 pooled_err: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Bounds ``[M]`` on the scores and ``[L]`` on the logits (module docstring)."""
    head = model.head
    std = head.concept_std.detach().cpu().numpy().astype(np.float64)
    mean = head.concept_mean.detach().cpu().numpy().astype(np.float64)
    weight = np.abs(head.linear.weight.detach().cpu().numpy().astype(np.float64))
    pooled = scores.astype(np.float64) * std + mean  # [B, M]
    rounding = ULPS * EPS32 * np.maximum(np.abs(pooled).max(axis=0), np.abs(mean))
    score_bound = tol.bound(scores) + (rounding + pooled_err) / std
    return score_bound, tol.bound(logits) + weight @ score_bound


def _compare(key: str, got: np.ndarray, ref: np.ndarray, bound, figures: dict, ratios: dict,
             failures: list[str]) -> None:
    """Record the max abs diff and worst diff/bound ratio of one output; ``bound`` broadcasts over it."""
    if got.shape != ref.shape:
        failures.append(f"{key}: shape {got.shape} != torch {ref.shape}")
        return
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    worst = float(diff.max(initial=0.0))
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), diff.shape)
    within = bool(np.all(diff <= bound))  # False for NaN/inf too
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.where(bound > 0, diff / bound, np.inf).max(initial=0.0)) if diff.size else 0.0
    figures[key] = max(figures.get(key, 0.0), worst)
    ratios[key] = max(ratios.get(key, 0.0), ratio)
    if not within:
        failures.append(f"{key}: max abs diff {worst:.3g} exceeds its bound (worst diff/bound {ratio:.3g})")


def _compare_batch(set_name: str, batch: np.ndarray, model: SalfCBM, wrapped: UInt8SalfCBM, cbm, head,
                   tol: Tolerance, figures: dict, ratios: dict, failures: list[str], maps_dtype: str = "float32") -> None:
    with torch.no_grad():
        maps, scores, logits = (t.numpy() for t in wrapped(torch.from_numpy(batch)))
        head_maps = maps.astype(maps_dtype)  # what salf_head receives from salf_cbm
        h_scores, h_logits = (t.numpy() for t in model.head(torch.from_numpy(head_maps.astype(np.float32))))
    got = dict(zip(CBM_OUTPUTS, cbm.run(list(CBM_OUTPUTS), {IMAGE: batch})))
    prefix = f"{set_name}/salf_cbm"
    maps_bound = tol.maps_bound(maps)
    if maps_dtype == "float16":
        maps_bound = maps_bound + FP16_HALF_ULP * np.abs(maps.astype(np.float64)) + FP16_SUBNORMAL
        if got["concept_maps"].dtype != np.float16:
            failures.append(f"{prefix}/concept_maps: dtype {got['concept_maps'].dtype}, expected float16")
    _compare(f"{prefix}/concept_maps", got["concept_maps"], maps, maps_bound, figures, ratios, failures)
    if got["concept_maps"].shape == maps.shape:
        pooled_err = 2.0 * np.abs(got["concept_maps"].astype(np.float32) - maps.astype(maps_dtype).astype(np.float32)
                                  ).reshape(len(batch), maps.shape[1], -1).max(axis=(0, 2))
        s_bound, l_bound = _head_bounds(scores, logits, model, tol, pooled_err)
        _compare(f"{prefix}/concept_scores", got["concept_scores"], scores, s_bound, figures, ratios, failures)
        _compare(f"{prefix}/logits", got["logits"], logits, l_bound, figures, ratios, failures)
    got_head = dict(zip(HEAD_OUTPUTS, head.run(list(HEAD_OUTPUTS), {CONCEPT_MAPS: head_maps})))
    s_bound, l_bound = _head_bounds(h_scores, h_logits, model, tol)
    prefix = f"{set_name}/salf_head"
    _compare(f"{prefix}/concept_scores", got_head["concept_scores"], h_scores, s_bound, figures, ratios, failures)
    _compare(f"{prefix}/logits", got_head["logits"], h_logits, l_bound, figures, ratios, failures)


def check_parity(model: SalfCBM, mean, std, input_size: tuple[int, int], cbm_path: Path, head_path: Path,
                 real_images: np.ndarray | None = None, batch_sizes: tuple[int, ...] = (1, 7),
                 tolerance: Tolerance | None = None, seed: int = 0, maps_dtype: str = "float32") -> dict:
    """Compare torch and onnxruntime; returns the figures, raises :class:`ExportError` on a failure.

    ``real_images``: uint8 ``[N, H, W, 3]`` (see :func:`load_images`). Returns
    ``{"atol", "rtol", "maps_atol", "ulps", "batch_sizes", "image_sets", "max_abs_diff": {"<set>/<model>/<output>": float},
    "ratio": {same keys: worst diff / bound, < 1}}``.
    """
    tol = tolerance or Tolerance()
    h, w = (int(v) for v in input_size)
    rng = np.random.default_rng(seed)
    sets = {"random": rng.integers(0, 256, size=(max(batch_sizes), h, w, 3), dtype=np.uint8)}
    if real_images is not None:
        if real_images.dtype != np.uint8 or real_images.shape[1:] != (h, w, 3):
            raise ValueError(f"real images must be uint8 [N, {h}, {w}, 3], got {real_images.dtype} {list(real_images.shape)}")
        sets["real"] = real_images
    cbm, head = _session(cbm_path), _session(head_path)
    wrapped = UInt8SalfCBM(model, mean, std).eval()
    figures: dict[str, float] = {}
    ratios: dict[str, float] = {}
    failures: list[str] = []
    for set_name, images in sets.items():
        for batch in _batches(images, batch_sizes):
            _compare_batch(set_name, batch, model, wrapped, cbm, head, tol, figures, ratios, failures, maps_dtype)
    result = {"atol": tol.atol, "rtol": tol.rtol, "maps_atol": tol.maps_atol, "ulps": ULPS, "maps_dtype": maps_dtype,
              "batch_sizes": list(batch_sizes),
              "image_sets": list(sets), "max_abs_diff": figures, "ratio": ratios}
    if failures:
        raise ExportError(f"ONNX parity failed (torch vs onnxruntime, {maps_dtype} maps): " + "; ".join(failures))
    log.info("parity passed: %s", ", ".join(f"{k}={v:.2e}" for k, v in figures.items()))
    return result
