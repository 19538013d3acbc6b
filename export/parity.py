"""Parity of the exported graphs with the PyTorch model (STYLE.md point 11).

For each batch size (1 and 7 by default) and each image set (random uint8 noise, and real images when
given), ``salf_cbm`` in onnxruntime is compared with :class:`~export.onnx_graphs.UInt8SalfCBM` in
torch on the same uint8 batch, and ``salf_head`` in onnxruntime with ``SalfHead`` on the torch concept
maps. The figure per output is the max abs difference; it passes when

    max|onnx - torch| <= atol + rtol * max|torch|      (fp32; ATOL = RTOL = 1e-4)

i.e. an absolute floor for near-zero outputs plus a bound relative to the output's own scale (logits
of a trained model reach tens; concept maps of a random tiny model are ~1e-4).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from training.model import SalfCBM

from .onnx_graphs import CBM_OUTPUTS, HEAD_OUTPUTS, ExportError, UInt8SalfCBM

log = logging.getLogger(__name__)

ATOL = 1e-4
RTOL = 1e-4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Tolerance:
    atol: float = ATOL
    rtol: float = RTOL

    def bound(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(reference).max(initial=0.0))


def load_images(paths: Iterable[str | Path], input_size: tuple[int, int]) -> np.ndarray:
    """Decode images the way every part does (docs/DESIGN.md): Pillow, RGB, bilinear resize to
    ``(H, W)``; returns uint8 ``[N, H, W, 3]``."""
    from PIL import Image

    h, w = (int(v) for v in input_size)
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                out.append(np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.uint8))
        except (OSError, ValueError) as exc:
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


def _compare(name: str, got: list[np.ndarray], ref: list[torch.Tensor], names: tuple[str, ...],
             tol: Tolerance, figures: dict, failures: list[str]) -> None:
    for out_name, g, r in zip(names, got, ref):
        r = r.detach().cpu().numpy()
        if g.shape != r.shape:
            failures.append(f"{name}/{out_name}: shape {g.shape} != torch {r.shape}")
            continue
        diff = float(np.abs(g - r).max(initial=0.0))
        bound = tol.bound(r)
        key = f"{name}/{out_name}"
        figures[key] = max(figures.get(key, 0.0), diff)
        if not np.isfinite(diff) or diff > bound:
            failures.append(f"{key}: max abs diff {diff:.3g} > {bound:.3g}")


def check_parity(model: SalfCBM, mean, std, input_size: tuple[int, int], cbm_path: Path, head_path: Path,
                 real_images: np.ndarray | None = None, batch_sizes: tuple[int, ...] = (1, 7),
                 tolerance: Tolerance | None = None, seed: int = 0) -> dict:
    """Compare torch and onnxruntime; returns the figures, raises :class:`ExportError` on a failure.

    ``real_images``: uint8 ``[N, H, W, 3]`` (see :func:`load_images`). Returns
    ``{"atol", "rtol", "batch_sizes", "image_sets", "max_abs_diff": {"<set>/<model>/<output>": float}}``.
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
    failures: list[str] = []
    for set_name, images in sets.items():
        for batch in _batches(images, batch_sizes):
            with torch.no_grad():
                ref = wrapped(torch.from_numpy(batch))
                ref_head = model.head(ref[0])
            got = cbm.run(list(CBM_OUTPUTS), {"image": batch})
            _compare(f"{set_name}/salf_cbm", got, list(ref), CBM_OUTPUTS, tol, figures, failures)
            got_head = head.run(list(HEAD_OUTPUTS), {"concept_maps": ref[0].numpy()})
            _compare(f"{set_name}/salf_head", got_head, list(ref_head), HEAD_OUTPUTS, tol, figures, failures)
    result = {"atol": tol.atol, "rtol": tol.rtol, "batch_sizes": list(batch_sizes), "image_sets": list(sets),
              "max_abs_diff": figures}
    if failures:
        raise ExportError("ONNX parity failed (torch vs onnxruntime, fp32): " + "; ".join(failures))
    log.info("parity passed: %s", ", ".join(f"{k}={v:.2e}" for k, v in figures.items()))
    return result
