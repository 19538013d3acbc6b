"""Drawings of explanations, shared by every part that draws one (Pillow and numpy only): the composed
explanation figure (`salfctl explain --out`, the explorer's download), the decision-rules plot (`salfctl
rules --plot`, the evaluation report), annotated video frames, and their pieces (the jet colormap, a
region's outline).

On the ground floor, beside ``salf.contract``, so the clients and the training package's evaluation
report import the same functions without one part importing the other.

Heatmaps are drawn from the *grid* maps the gateway returns (``ConceptContribution.grid_map``),
upsampled bilinearly (``align_corners=False``, the gateway's own convention, ``salf.contract.explain``)
straight to the display size: a 6000x4500 photo costs a 256-px panel, never a full-size array.

Scale: ``common`` (default) maps every panel through one range, the min and max over all shown maps,
so a concept that is barely there looks cold next to one that is strongly there; ``per-map`` stretches
each panel to its own range (shapes compare, strengths do not), and each panel then says its range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from salf.contract.explain import upsample

SCALES = ("common", "per-map")
PANEL = 256  # longer side of each panel, pixels
PAD = 8
TITLE_H = 34
BAR_H = 14


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colormap: values ``[h, w]`` in [0, 1] -> uint8 RGB ``[h, w, 3]`` (0 blue, 0.5 green, 1 red)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


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


@dataclass(frozen=True)
class Panel:
    """One concept: ``name``, ``contribution`` S = W * c*, its grid map ``[Gh, Gw]``."""
    name: str
    contribution: float
    grid_map: np.ndarray


def display_size(size: tuple[int, int], longest: int = PANEL) -> tuple[int, int]:
    """``(h, w)`` scaled so the longer side is ``longest`` pixels (aspect kept, at least 1 px)."""
    h, w = size
    f = longest / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def value_range(maps: list[np.ndarray]) -> tuple[float, float]:
    """The common scale: min and max over every map (a constant set gets a unit-wide range)."""
    lo = min(float(np.min(m)) for m in maps)
    hi = max(float(np.max(m)) for m in maps)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(img) > 0


def compose(rgb: np.ndarray, panels: list[Panel], title: str, mask: np.ndarray | None = None,
            scale: str = "common", alpha: float = 0.6) -> Image.Image:
    """The figure for one image: ``rgb`` uint8 ``[h, w, 3]`` at its own size, ``panels`` (top concepts),
    ``mask`` bool ``[h, w]`` (the region, outlined) or None."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    dh, dw = display_size(rgb.shape[:2])
    base = np.asarray(Image.fromarray(rgb).resize((dw, dh), Image.BILINEAR))
    grey = np.repeat(np.asarray(Image.fromarray(base).convert("L"))[..., None], 3, axis=2).astype(np.float64)
    small_mask = _resize_mask(mask, (dh, dw)) if mask is not None else None
    heats = [upsample(np.asarray(p.grid_map, dtype=np.float32), (dh, dw)) for p in panels]
    common = value_range([p.grid_map for p in panels]) if panels else (0.0, 1.0)
    tiles, labels = [], []
    image_tile = draw_outline(base, small_mask, (255, 0, 0)) if small_mask is not None else base
    tiles.append(image_tile)
    labels.append(("image" + (" + region" if small_mask is not None else ""), ""))
    for p, heat in zip(panels, heats):
        lo, hi = common if scale == "common" else value_range([p.grid_map])
        norm = np.clip((heat - lo) / (hi - lo), 0.0, 1.0)
        # over the grey image: the colours are the heatmap's alone
        tile = np.round((1 - alpha) * grey + alpha * jet(norm)).astype(np.uint8)
        if small_mask is not None:
            tile = draw_outline(tile, small_mask)
        tiles.append(tile)
        sub = f"S={p.contribution:+.3f}" + (f"  [{lo:.2g}, {hi:.2g}]" if scale == "per-map" else "")
        labels.append((p.name, sub))
    n = len(tiles)
    width = PAD + n * (dw + PAD)
    height = TITLE_H + PAD + TITLE_H + dh + PAD + BAR_H + 22
    fig = Image.new("RGB", (max(width, 360), height), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((PAD, 6), title, fill="black", font=_font(16))
    for k, (tile, (name, sub)) in enumerate(zip(tiles, labels)):
        x = PAD + k * (dw + PAD)
        y = TITLE_H + PAD
        draw.text((x, y), _fit(draw, name, dw, 13), fill="black", font=_font(13))
        draw.text((x, y + 15), sub, fill="dimgray", font=_font(11))
        fig.paste(Image.fromarray(tile), (x, y + TITLE_H))
    _colour_bar(draw, fig, y=TITLE_H + PAD + TITLE_H + dh + PAD, x0=PAD + dw + PAD, x1=width - PAD,
                scale=scale, value_range=common)
    return fig


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, size: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    font = _font(size)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _colour_bar(draw, fig: Image.Image, y: int, x0: int, x1: int, scale: str, value_range) -> None:
    if x1 - x0 < 40:
        return
    ramp = jet(np.tile(np.linspace(0.0, 1.0, x1 - x0)[None, :], (BAR_H, 1)))
    fig.paste(Image.fromarray(ramp), (x0, y))
    font = _font(11)
    if scale == "common":
        lo, hi = value_range
        draw.text((x0, y + BAR_H + 3), f"{lo:.3g}", fill="black", font=font)
        right = f"{hi:.3g}  concept-map value (common scale)"
    else:
        draw.text((x0, y + BAR_H + 3), "min", fill="black", font=font)
        right = "max of each map (per-map scale)"
    draw.text((x1 - draw.textlength(right, font=font), y + BAR_H + 3), right, fill="black", font=font)


def rules_figure(rules: list[tuple[str, list[tuple[str, float]]]], title: str = "decision rules",
                 max_classes: int = 20) -> Image.Image:
    """The sparse decision rules as a flow (paper Fig. 3): concepts on the left, classes on the right,
    one line per non-zero weight, its width by |weight| (largest = 10 px), green for positive, red for
    negative. ``rules``: ``[(class name, [(concept name, weight), ...]), ...]``; at most ``max_classes``."""
    rules = rules[:max_classes]
    concepts: list[str] = []
    for _, terms in rules:
        for name, _ in terms:
            if name not in concepts:
                concepts.append(name)
    row_h, top = 22, 44
    height = top + max(len(concepts), len(rules), 1) * row_h + PAD
    width = 760
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((PAD, 8), title, fill="black", font=_font(16))
    font = _font(12)
    left_x, right_x = 230, width - 230

    def y_of(k: int, n: int) -> int:
        span = height - top - PAD
        return int(top + (k + 0.5) * span / max(n, 1))

    biggest = max((abs(w) for _, terms in rules for _, w in terms), default=1.0) or 1.0
    for c, (class_name, terms) in enumerate(rules):
        yc = y_of(c, len(rules))
        for name, weight in sorted(terms, key=lambda t: abs(t[1])):
            yk = y_of(concepts.index(name), len(concepts))
            colour = (40, 150, 60) if weight > 0 else (200, 40, 40)
            draw.line([(left_x + 6, yk), (right_x - 6, yc)], fill=colour, width=max(1, round(10 * abs(weight) / biggest)))
    for k, name in enumerate(concepts):
        y = y_of(k, len(concepts))
        text = _fit(draw, name, left_x - 2 * PAD, 12)
        draw.text((left_x - PAD - draw.textlength(text, font=font), y - 7), text, fill="black", font=font)
    for c, (class_name, _) in enumerate(rules):
        draw.text((right_x + PAD, y_of(c, len(rules)) - 7), _fit(draw, class_name, 230 - 2 * PAD, 12), fill="black",
                  font=font)
    return fig


def overlay_frame(rgb: np.ndarray, grid_map: np.ndarray, value_range: tuple[float, float], label: str,
                  alpha: float = 0.6) -> np.ndarray:
    """One annotated video frame: ``rgb`` at display size with the concept's heatmap (``grid_map``
    upsampled, on the video's common ``value_range``) over its grey version, and ``label`` at the top."""
    h, w = rgb.shape[:2]
    grey = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2).astype(np.float64)
    lo, hi = value_range
    norm = np.clip((upsample(np.asarray(grid_map, np.float32), (h, w)) - lo) / (hi - lo), 0.0, 1.0)
    img = Image.fromarray(np.round((1 - alpha) * grey + alpha * jet(norm)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, w, 18], fill=(0, 0, 0))
    draw.text((4, 3), label, fill="white", font=_font(12))
    return np.asarray(img)
