"""Drawing the synthetic world (training/data/world.py): shape silhouettes and textures, then a
layered canvas (backgrounds, grass, a balloon's string, key objects, distractors) whose owner map
gives the concept masks; :func:`render`, :func:`render_shifted` and :func:`render_pair` draw one
image of the in-distribution, ``shifted`` and ``shifted-pairs`` splits from a given generator.
"""
from __future__ import annotations

import numpy as np

from .world import (BACKGROUNDS, CLASSES, COLOURS, CONCEPT_INDEX, CONCEPTS, DISTRACTOR_SHAPES,
                    IN_DISTRIBUTION_RADIUS, SHIFT, TEXTURES, ClassRule, Shift)


# ----------------------------------------------------------------------------- geometry
def _rotated(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets from ``(cy, cx)`` in a frame rotated by ``theta`` radians."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    return dx * c + dy * s, -dx * s + dy * c


def _convex_polygon(yy: np.ndarray, xx: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Boolean mask of the convex polygon with ``vertices`` ``[K, 2]`` as ``(y, x)`` in any winding."""
    inside_pos = np.ones(np.broadcast(yy, xx).shape, dtype=bool)
    inside_neg = inside_pos.copy()
    for k in range(len(vertices)):
        (y0, x0), (y1, x1) = vertices[k], vertices[(k + 1) % len(vertices)]
        cross = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        inside_pos &= cross >= 0
        inside_neg &= cross <= 0
    return inside_pos | inside_neg


def _triangle_vertices(cy: float, cx: float, r: float, theta: float) -> np.ndarray:
    angles = theta - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    return np.stack([cy + r * np.sin(angles), cx + r * np.cos(angles)], axis=1)


def shape_mask(shape: str, size: tuple[int, int], cy: float, cx: float, r: float, theta: float) -> np.ndarray:
    """Silhouette ``[H, W]`` bool of ``shape`` centred at ``(cy, cx)`` with outer radius ``r`` px."""
    h, w = size
    yy, xx = np.ogrid[:h, :w]
    yy = yy.astype(np.float32)
    xx = xx.astype(np.float32)
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "ring":
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    u, v = _rotated(yy, xx, cy, cx, theta)
    if shape == "square":
        half = 0.8 * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "cross":
        arm, thick = 0.95 * r, 0.3 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= thick)) | ((np.abs(v) <= arm) & (np.abs(u) <= thick))
    if shape == "triangle":  # a larger circumradius gives it about the area of the square
        return _convex_polygon(yy, xx, _triangle_vertices(cy, cx, 1.2 * r, theta))
    if shape == "star":  # hexagram: two overlapping triangles
        return (_convex_polygon(yy, xx, _triangle_vertices(cy, cx, r, theta))
                | _convex_polygon(yy, xx, _triangle_vertices(cy, cx, r, theta + np.pi / 3)))
    raise ValueError(f"unknown shape {shape!r}")


def texture_pattern(kind: str, size: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """``[H, W]`` bool: True where the texture's light second colour shows."""
    h, w = size
    yy, xx = np.ogrid[:h, :w]
    yy = yy.astype(np.float32) + rng.uniform(0, 16)
    xx = xx.astype(np.float32) + rng.uniform(0, 16)
    if kind == "stripes":
        period = rng.uniform(6.0, 8.0) * scale
        theta = rng.uniform(0, np.pi)
        t = xx * np.cos(theta) + yy * np.sin(theta)
        return np.mod(t, period) < period / 2
    if kind == "dots":
        period = rng.uniform(7.5, 9.0) * scale
        dy = np.mod(yy, period) - period / 2
        dx = np.mod(xx, period) - period / 2
        return dy * dy + dx * dx <= (0.3 * period) ** 2
    if kind == "checker":
        cell = rng.uniform(4.5, 5.5) * scale
        return (np.floor(yy / cell) + np.floor(xx / cell)).astype(np.int64) % 2 == 0
    raise ValueError(f"unknown texture {kind!r}")


# ----------------------------------------------------------------------------- painting
def _muted_colour(rng: np.random.Generator, spread: float = 18.0) -> np.ndarray:
    """A greyish colour: backgrounds never use the saturated object palette."""
    return np.clip(rng.uniform(70, 190) + rng.uniform(-spread, spread, size=3), 0, 255)


def _background(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``[H, W, 3]`` float32 background of the given kind."""
    h, w = size
    if kind == "plain":
        return np.broadcast_to(_muted_colour(rng), (h, w, 3)).astype(np.float32)
    if kind == "gradient":
        c0, c1 = _muted_colour(rng, 30), _muted_colour(rng, 30)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        t = xx / max(w - 1, 1) * np.cos(theta) + yy / max(h - 1, 1) * np.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)
    if kind == "noise":
        block = int(rng.integers(3, 7))
        coarse = rng.normal(0, 28, size=(h // block + 1, w // block + 1, 1))
        coarse = np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)[:h, :w]
        base = _muted_colour(rng, 10)
        return (base + coarse + rng.normal(0, 12, size=(h, w, 1))).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


def _shifted_background(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``[H, W, 3]`` float32 background of a kind the in-distribution splits never have (muted too)."""
    h, w = size
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    if kind == "vignette":  # light centre, darker rim
        c0, c1 = _muted_colour(rng, 20), _muted_colour(rng, 20) * 0.55
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        t = np.sqrt(((yy - cy) / h) ** 2 + ((xx - cx) / w) ** 2)
        t = np.clip(t / max(float(t.max()), 1e-6), 0, 1)[..., None]
        return (c0 * (1 - t) + c1 * t).astype(np.float32)
    if kind == "blotches":  # a few soft blobs of other muted colours
        out = np.broadcast_to(_muted_colour(rng, 15), (h, w, 3)).astype(np.float32).copy()
        for _ in range(int(rng.integers(3, 7))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            sigma = rng.uniform(0.12, 0.3) * min(h, w)
            weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma * sigma))[..., None]
            out = out * (1 - weight) + _muted_colour(rng, 25) * weight
        return out.astype(np.float32)
    if kind == "two-tone":  # two colours either side of a random line
        c0, c1 = _muted_colour(rng, 25), _muted_colour(rng, 25)
        theta = rng.uniform(0, np.pi)
        d = (xx - rng.uniform(0.3, 0.7) * w) * np.cos(theta) + (yy - rng.uniform(0.3, 0.7) * h) * np.sin(theta)
        return np.where((d > 0)[..., None], c0, c1).astype(np.float32)
    raise ValueError(f"unknown shifted background {kind!r}")


def _object_colour(rng: np.random.Generator) -> tuple[str, np.ndarray]:
    name = str(rng.choice(list(COLOURS)))
    return name, np.clip(np.array(COLOURS[name], np.float32) + rng.uniform(-15, 15, size=3), 0, 255)


class _Canvas:
    """An image and its concept masks, painted layer by layer (later layers occlude earlier ones).

    Occlusion is tracked as a map of which layer owns each pixel; the masks are built once at the
    end (cheaper than clearing every concept plane for every layer).
    """

    def __init__(self, background: np.ndarray, concepts: list[str]) -> None:
        """``background``: float32 ``[H, W, 3]``; ``concepts``: what it shows (none for a shifted kind)."""
        self.size = background.shape[:2]
        self.image = background.copy()
        self.owner = np.zeros(self.size, dtype=np.int16)
        self.layers: list[list[int]] = [[CONCEPT_INDEX[name] for name in concepts]]

    def paint(self, silhouette: np.ndarray, colour: np.ndarray, concepts: list[str]) -> int:
        """Paint a layer; return its index (``owner == index`` is what is still visible of it)."""
        self.image[silhouette] = colour if colour.ndim == 1 else colour[silhouette]
        self.owner[silhouette] = len(self.layers)
        self.layers.append([CONCEPT_INDEX[name] for name in concepts])
        return len(self.layers) - 1

    def masks(self) -> np.ndarray:
        """bool ``[M, H, W]``: pixel (y, x) shows concept m iff its top layer carries m."""
        table = np.zeros((len(self.layers), len(CONCEPTS)), dtype=bool)
        for layer, ids in enumerate(self.layers):
            table[layer, ids] = True
        return np.ascontiguousarray(table.T[:, self.owner])

    def finish(self, rng: np.random.Generator) -> np.ndarray:
        noisy = self.image + rng.normal(0, 3.0, size=self.image.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _grass(canvas: _Canvas, rng: np.random.Generator, scale: float) -> int:
    """Paint a grass band along the bottom; return the band's top row."""
    h, w = canvas.size
    top = int(round(h * rng.uniform(0.16, 0.22)))
    top = h - top
    blades = rng.integers(0, max(2, int(round(5 * scale))), size=w)  # ragged top edge
    yy = np.arange(h)[:, None]
    silhouette = yy >= (top - blades)[None, :]
    base = np.array([50, 115, 40], np.float32) + rng.uniform(-10, 10, size=3)
    shade = np.where(np.arange(w) % 3 == 0, -25.0, 0.0)[None, :, None]  # vertical blade stripes
    colour = np.broadcast_to(base, (h, w, 3)) + shade
    canvas.paint(silhouette, colour.astype(np.float32), ["grass"])
    return top


def _string(canvas: _Canvas, top: tuple[float, float], length: float, drift: float, scale: float) -> None:
    """A thin dark line hanging down from ``top`` (the balloon's string)."""
    h, w = canvas.size
    y0, x0 = top
    yy, xx = np.ogrid[:h, :w]
    t = (yy - y0) / max(length, 1.0)
    x_line = x0 + drift * t
    half_width = max(1.0, 1.0 * scale)
    silhouette = (t >= 0) & (t <= 1) & (np.abs(xx - x_line) <= half_width)
    canvas.paint(silhouette, np.array([35, 35, 35], np.float32), ["string"])


def _position(rule: ClassRule, rng: np.random.Generator, r: float, size: tuple[int, int],
              grass_top: int | None) -> tuple[float, float]:
    """Where a key object of radius ``r`` goes: ``(cy, cx)`` by the class's placement."""
    h, w = size
    cx = rng.uniform(r, w - r)
    if rule.placement == "balloon":
        cy = rng.uniform(r + 1, max(r + 1, 0.38 * h))
    elif rule.placement == "ball":
        if grass_top is None:
            raise ValueError("a ball rests on grass: paint the grass first")
        cy = grass_top - 0.6 * r
    else:
        cy = rng.uniform(r, h - r)
    return cy, cx


def _box(rule: ClassRule, cy: float, cx: float, r: float, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(y0, x0, y1, x1)`` that holds the key object, a balloon's longest string included."""
    h, w = size
    extent = 1.2 * r if rule.shape == "triangle" else r
    if rule.placement == "balloon":
        return cy - extent, cx - extent - 0.06 * w, cy + 0.9 * r + 0.3 * h, cx + extent + 0.06 * w
    return cy - extent, cx - extent, cy + extent, cx + extent


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float], margin: float = 2.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _key_object(canvas: _Canvas, rule: ClassRule, rng: np.random.Generator, scale: float,
                grass_top: int | None, radius: tuple[float, float] = IN_DISTRIBUTION_RADIUS,
                avoid: tuple[tuple[float, float, float, float], ...] = ()
                ) -> tuple[tuple[float, float, float], tuple[float, float, float, float], int]:
    """Paint the class's key object, radius ``radius`` times the short side, clear of the boxes in
    ``avoid`` (it shrinks when 20 draws find no room); return its bounding circle ``(cy, cx, extent)``,
    its box and its layer."""
    h, w = canvas.size
    s = min(h, w)
    r = rng.uniform(*radius) * s
    cy, cx = _position(rule, rng, r, canvas.size, grass_top)
    attempts = 0
    while avoid and any(_overlaps(_box(rule, cy, cx, r, canvas.size), b) for b in avoid):
        attempts += 1
        if attempts % 20 == 0:
            r *= 0.8
        if attempts > 200:
            raise ValueError(f"no room for a {rule.name} beside {len(avoid)} object(s) in a {w}x{h} image")
        cy, cx = _position(rule, rng, r, canvas.size, grass_top)
    if rule.placement == "balloon":
        _string(canvas, (cy + 0.9 * r, cx), rng.uniform(0.2, 0.3) * h, rng.uniform(-0.06, 0.06) * w, scale)
    theta = rng.uniform(0, 2 * np.pi)
    silhouette = shape_mask(rule.shape, canvas.size, cy, cx, r, theta)
    colour_name, colour = _object_colour(rng)
    concepts = [rule.shape, colour_name]
    fill = colour
    if rule.texture is not None:
        light = texture_pattern(TEXTURES[rule.texture], canvas.size, scale, rng)
        tint = 0.35 * colour + 0.65 * 255.0
        fill = np.where(light[..., None], tint, colour).astype(np.float32)
        concepts.append(rule.texture)
    layer = canvas.paint(silhouette, fill, concepts)
    extent = 1.2 * r if rule.shape == "triangle" else r  # triangles use a 1.2 r circumradius
    if rule.placement == "balloon":
        extent = r + 0.3 * h  # keep distractors off the string
    return (cy, cx, extent), _box(rule, cy, cx, r, canvas.size), layer


def _distractors(canvas: _Canvas, rng: np.random.Generator, *keys: tuple[float, float, float]) -> None:
    """1-3 small solid rings/crosses/stars that do not overlap the key object(s)."""
    h, w = canvas.size
    s = min(h, w)
    placed = list(keys)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(0.07, 0.11) * s
        for _attempt in range(30):
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
            if all((cy - py) ** 2 + (cx - px) ** 2 > (r + pr + 2) ** 2 for py, px, pr in placed):
                break
        else:
            continue  # no room: fewer distractors in this image
        shape = str(rng.choice(DISTRACTOR_SHAPES))
        colour_name, colour = _object_colour(rng)
        canvas.paint(shape_mask(shape, canvas.size, cy, cx, r, rng.uniform(0, 2 * np.pi)), colour,
                     [shape, colour_name])
        placed.append((cy, cx, r))


def render(class_id: int, size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image of class ``class_id``: (uint8 ``[H, W, 3]``, bool masks ``[M, H, W]``)."""
    rule = CLASSES[class_id]
    scale = min(size) / 112.0
    background = str(rng.choice(list(BACKGROUNDS)))
    canvas = _Canvas(_background(BACKGROUNDS[background], size, rng), [background])
    grass_top = _grass(canvas, rng, scale) if rule.placement == "ball" else None
    # The key object is painted before the distractors but they never overlap it; painting it first
    # lets the distractor placement know where it is.
    key, _, _ = _key_object(canvas, rule, rng, scale, grass_top)
    _distractors(canvas, rng, key)
    return canvas.finish(rng), canvas.masks()


def shifted_size(rng: np.random.Generator, shift: Shift = SHIFT) -> tuple[int, int]:
    """``(H, W)`` of a shifted image: short side and log-uniform aspect ratio from ``shift``."""
    short = int(rng.integers(shift.short_side[0], shift.short_side[1] + 1))
    aspect = float(np.exp(rng.uniform(np.log(shift.aspect[0]), np.log(shift.aspect[1]))))
    return (short, int(round(short * aspect))) if aspect >= 1 else (int(round(short / aspect)), short)


def _shifted_canvas(size: tuple[int, int], rng: np.random.Generator, shift: Shift) -> _Canvas:
    kind = str(rng.choice(list(shift.backgrounds)))
    return _Canvas(_shifted_background(kind, size, rng), [])


def render_shifted(class_id: int, rng: np.random.Generator, shift: Shift = SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """One image of the ``shifted`` split (its size drawn too): (uint8 image, bool masks ``[M, H, W]``)."""
    rule = CLASSES[class_id]
    size = shifted_size(rng, shift)
    scale = min(size) / 112.0
    canvas = _shifted_canvas(size, rng, shift)
    grass_top = _grass(canvas, rng, scale) if rule.placement == "ball" else None
    top = shift.balloon_radius if rule.placement == "balloon" else shift.key_radius[1]
    key, _, _ = _key_object(canvas, rule, rng, scale, grass_top, (shift.key_radius[0], top))
    _distractors(canvas, rng, key)
    return canvas.finish(rng), canvas.masks()


def render_pair(class_id: int, rng: np.random.Generator, shift: Shift = SHIFT
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image of ``shifted-pairs``: a key object of ``class_id`` and one of another class drawn by
    ``rng``. Returns (uint8 image, masks ``[M, H, W]``, objects bool ``[2, H, W]``, classes int ``[2]``)."""
    other = int(rng.choice([c for c in range(len(CLASSES)) if c != class_id]))
    rules = [CLASSES[class_id], CLASSES[other]]
    size = shifted_size(rng, shift)
    scale = min(size) / 112.0
    canvas = _shifted_canvas(size, rng, shift)
    grass_top = _grass(canvas, rng, scale) if any(r.placement == "ball" for r in rules) else None
    keys, boxes, layers = [], [], []
    for rule in rules:
        key, box, layer = _key_object(canvas, rule, rng, scale, grass_top, shift.pair_radius, tuple(boxes))
        keys.append(key)
        boxes.append(box)
        layers.append(layer)
    _distractors(canvas, rng, *keys)
    objects = np.stack([canvas.owner == layer for layer in layers])
    return canvas.finish(rng), canvas.masks(), objects, np.array([class_id, other], dtype=np.int64)
