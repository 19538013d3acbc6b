"""Pictures of explanations: heatmaps as jet overlays on the image, the ROI outline, PNG via Pillow."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colormap: values ``[h, w]`` in [0, 1] -> uint8 RGB ``[h, w, 3]`` (0 blue, 0.5 green, 1 red)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def heatmap_values(heatmap) -> np.ndarray:
    """``salf.v1.Heatmap`` -> float32 ``[h, w]``: the float16 payload when present, else the PNG
    rescaled to [min, max]."""
    h, w = int(heatmap.height), int(heatmap.width)
    if heatmap.float16:
        return np.frombuffer(heatmap.float16, dtype="<f2").reshape(h, w).astype(np.float32)
    if heatmap.png:
        grey = np.asarray(Image.open(io.BytesIO(heatmap.png)).convert("L"), dtype=np.float32) / 255.0
        return (heatmap.min + grey * (heatmap.max - heatmap.min)).astype(np.float32)
    raise ValueError("heatmap carries neither PNG nor float16 data (request heatmaps='png' or 'float16')")


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (all zeros for a constant map)."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values, dtype=np.float64)


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Jet-coloured ``values`` ``[h, w]`` (min-max normalised) blended over RGB ``image`` ``[h, w, 3]`` uint8."""
    if image.shape[:2] != values.shape:
        raise ValueError(f"heatmap {values.shape} does not match the image {image.shape[:2]}")
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * jet(normalise(values)).astype(np.float64)
    return np.round(blended).astype(np.uint8)


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Bool ``[h, w]``: the pixels of ``mask`` within ``width`` pixels of its border (4-neighbourhood)."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def draw_outline(image: np.ndarray, mask: np.ndarray, colour=(255, 255, 255), width: int = 2) -> np.ndarray:
    """``image`` ``[h, w, 3]`` uint8 with the ROI ``mask``'s outline painted in ``colour``."""
    out = image.copy()
    out[outline(mask, width)] = colour
    return out


def save_png(path: str | Path, array: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path
