"""The gateway's domain layer: Predict, Explain, ExplainRegion, Intervene, model info and rules on
plain Python/numpy values. The gRPC servicer (serving/convert.py) only converts protobuf to these
types and back; validation errors are raised here as :class:`InvalidArgument`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from salf.contract import explain
from salf.contract.regions import default_radius
from salf.contract.repository import ModelSpec

from .backends import Backend
from .budget import Budget, as_budget
from .cache import TTLCache
from .errors import InvalidArgument, NotFound, echo
from .ids import ExplanationIds
from .images import MAX_PIXELS, box_mask, decode_image, decode_mask, points_mask, require_nonempty

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the gateway; everything is checked before the work is allocated.

    ``max_pixels``: images and masks (header checked before decoding). ``max_edits``: edits per
    Intervene (None: the model's concept count, at least 16). ``max_points``: points of one region.
    ``point_area_factor``: the disks of a points region may cover at most this many times the image's
    area in total (a huge radius times many points would otherwise cost points x image)."""
    max_pixels: int = MAX_PIXELS
    max_edits: int | None = None
    max_points: int = 1024
    point_area_factor: float = 4.0

    def edits_for(self, num_concepts: int) -> int:
        return self.max_edits if self.max_edits is not None else max(16, num_concepts)


# ------------------------------------------------------------------ domain values

@dataclass(frozen=True)
class Region:
    """A region of interest as the client sent it: exactly one of ``mask_png``, ``box``
    ``(x0, y0, x1, y1)`` or ``points`` ``[(x, y), ...]`` (with ``radius`` px, 0 = model default)."""
    mask_png: bytes | None = None
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] | None = None
    radius: float = 0.0


@dataclass(frozen=True)
class Edit:
    """One intervention: concept by ``name`` or ``index``, a region and ``beta``."""
    region: Region
    beta: float
    name: str | None = None
    index: int | None = None


@dataclass(frozen=True)
class ClassScore:
    index: int
    name: str
    probability: float
    logit: float


@dataclass(frozen=True)
class Contribution:
    index: int
    name: str
    contribution: float
    weight: float
    score: float
    heatmap: np.ndarray | None  # [h, w] float32 at the image's own size
    grid_map: np.ndarray | None = None  # [Gh, Gw] float32, the concept map itself


@dataclass(frozen=True)
class Activation:
    index: int
    name: str
    activation: float
    mean_activation: float


@dataclass(frozen=True)
class CachedMaps:
    """What an ``explanation_id`` refers to: ``maps [M, Gh, Gw]`` in the model's maps dtype (float32 or
    float16), ``scores [M]`` and ``logits [L]`` float32, and the image's own ``size (h, w)``. (A Predict's
    forward has ``maps=None`` and is never cached.)"""
    maps: np.ndarray | None
    scores: np.ndarray
    logits: np.ndarray
    size: tuple[int, int]

    def nbytes(self) -> int:
        return self.maps.nbytes + self.scores.nbytes + self.logits.nbytes


@dataclass
class PredictResult:
    classes: list[ClassScore]
    size: tuple[int, int]
    concept_scores: np.ndarray | None = None  # [M] float32 c*, when asked for


@dataclass
class ExplainResult:
    explanation_id: str
    target: ClassScore
    predictions: list[ClassScore]
    concepts: list[Contribution]
    size: tuple[int, int]
    available: int = 0  # concepts with a non-zero weight for the target (top_k is capped by it)
    requested: list[Contribution] = field(default_factory=list)  # concepts asked for by name


@dataclass
class RegionResult:
    explanation_id: str
    concepts: list[Activation]
    area: int
    size: tuple[int, int]


@dataclass
class InterveneResult:
    explanation_id: str
    before: list[ClassScore]
    after: list[ClassScore]
    predicted_before: ClassScore
    predicted_after: ClassScore
    logits_before: np.ndarray
    logits_after: np.ndarray
    region_concepts: list[Activation] = field(default_factory=list)


# ------------------------------------------------------------------ validation helpers

def resolve_top_k(k: int, n: int, what: str) -> int:
    """0 -> ``min(DEFAULT_TOP_K, n)``; 1..n -> k; anything else is :class:`InvalidArgument`."""
    if k == 0:
        return min(DEFAULT_TOP_K, n)
    if not 1 <= k <= n:
        raise InvalidArgument(f"top_k {k} is out of range: the model has {n} {what}; use 1..{n}, or 0 for the default")
    return int(k)


def _resolve_index(name: str | None, index: int | None, names: tuple[str, ...], what: str) -> int:
    if name is not None and name != "":
        try:
            return names.index(name)
        except ValueError:
            preview = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise InvalidArgument(f"unknown {what} {echo(name)}; the model has {len(names)}: {preview}") from None
    if index is None:
        raise InvalidArgument(f"no {what} given: set its name or index")
    if not 0 <= index < len(names):
        raise InvalidArgument(f"{what} index {index} is out of range 0..{len(names) - 1}")
    return int(index)


# ------------------------------------------------------------------ the gateway

class Gateway:
    """The served model: ``spec`` (metadata and head weights), an inference ``backend`` and the
    concept-map ``cache`` behind explanation ids."""

    def __init__(self, spec: ModelSpec, backend: Backend, cache: TTLCache, limits: Limits | None = None,
                 drift=None, metrics=None, ids: ExplanationIds | None = None) -> None:
        self.spec = spec
        self.backend = backend
        self.cache = cache
        self.limits = limits or Limits()
        self.drift = drift  # serving.drift.DriftTracker or None
        self.metrics = metrics
        self.ids = ids or ExplanationIds()  # content-addressed ids (serving/ids.py)
        self._model_identity = (int(spec.version), spec.bundle_sha256, spec.maps_dtype)

    # ---------------------------------------------------------- shared steps

    def _decode(self, image: bytes, budget: Budget):
        budget.check("decoding the image")
        return decode_image(image, self.spec.input_size, self.limits.max_pixels)

    def _infer(self, decoded, budget: Budget, maps: bool = True) -> CachedMaps:
        """The forward pass; ``maps=False`` (Predict) asks the backend for scores and logits only, and the
        entry's ``maps`` is then None (never cached)."""
        concept_maps, scores, logits = self.backend.infer(decoded.model_input[None], budget.left("inference"), maps=maps)
        if self.drift is not None:
            self.drift.observe(scores[0], self.metrics)
        return CachedMaps(None if concept_maps is None else concept_maps[0], scores[0], logits[0], decoded.size)

    def _explained(self, image: bytes, budget: Budget) -> tuple[str, CachedMaps]:
        """The image's content-addressed id and its maps: from the cache when this replica already holds
        them (no forward pass), else computed and stored under that id."""
        decoded = self._decode(image, budget)
        explanation_id = self.ids.id_for(self._model_identity, decoded.size, decoded.model_input)
        entry = self.cache.get(explanation_id)
        if entry is None:
            entry = self._infer(decoded, budget)
            self.cache.put(explanation_id, entry)
        return explanation_id, entry

    def _maps_for(self, explanation_id: str, image: bytes, budget: Budget) -> tuple[str, CachedMaps]:
        """Cached maps of ``explanation_id``, or a fresh forward pass on the resent ``image``."""
        if explanation_id:
            entry = self.cache.get(explanation_id)
            if entry is not None:
                return explanation_id, entry
            if not image:
                raise NotFound(f"explanation_id {echo(explanation_id)} is unknown or expired; resend the image")
        elif not image:
            raise InvalidArgument("send an image or an explanation_id")
        return self._explained(image, budget)

    def _class_scores(self, logits: np.ndarray, order: list[int] | None = None, k: int | None = None) -> list[ClassScore]:
        probs = explain.softmax(logits)
        if order is None:
            order = explain.top_k_desc(probs, k if k is not None else len(logits))
        return [ClassScore(i, self.spec.classes[i], float(probs[i]), float(logits[i])) for i in order]

    def region_mask(self, region: Region, size: tuple[int, int], budget: Budget | None = None) -> np.ndarray:
        """The region as a non-empty bool mask ``[h, w]`` at the image's own ``size``."""
        if region.mask_png is not None:
            mask = decode_mask(region.mask_png, size, self.limits.max_pixels)
        elif region.box is not None:
            mask = box_mask(region.box, size)
        elif region.points is not None:
            radius = region.radius or self._default_radius(size)
            self._check_points_cost(len(region.points), radius, size)
            mask = points_mask(list(region.points), radius, size, check=budget.check if budget else None)
        else:
            raise InvalidArgument("region is missing: give a mask_png, a box or points")
        return require_nonempty(mask)

    def _check_points_cost(self, n: int, radius: float, size: tuple[int, int]) -> None:
        """Refuse a points region before drawing it when its count or its disks' total area is too large."""
        if n > self.limits.max_points:
            raise InvalidArgument(f"points region has {n} points; at most {self.limits.max_points} are accepted "
                                  f"(send a mask_png for a region drawn with many points)")
        h, w = size
        if not (math.isfinite(radius) and radius > 0):
            raise InvalidArgument(f"points radius must be a positive number of pixels, got {radius}")
        side = 2 * min(radius, max(h, w)) + 3
        cost = n * min(side * side, h * w)
        if cost > self.limits.point_area_factor * h * w and n > 1:
            raise InvalidArgument(f"points region of {n} points of radius {radius:g} px would cover about "
                                  f"{cost / (h * w):.0f}x the {w}x{h} image; use fewer points, a smaller radius, "
                                  f"or send a mask_png")

    def _default_radius(self, size: tuple[int, int]) -> float:
        return default_radius(size, self.spec.input_size, self.spec.grid, self.spec.radius)

    def _activations(self, maps: np.ndarray, mask: np.ndarray, k: int, budget: Budget | None = None) -> list[Activation]:
        weights = explain.project_region(mask, self.spec.grid, check=budget.check if budget else None)
        a = explain.region_activations(maps, weights)
        area = float(mask.sum())
        return [Activation(i, self.spec.concepts[i], float(a[i]), float(a[i] / area)) for i in explain.top_k_desc(a, k)]

    # ---------------------------------------------------------- RPCs

    def predict(self, image: bytes, top_k: int = 0, timeout_s: float | Budget | None = None,
                concept_scores: bool = False) -> PredictResult:
        """The top-k classes; ``concept_scores``: also every concept's global activation c*. No concept maps
        travel from the backend and nothing is cached: an explanation is Explain's job. ``timeout_s``:
        seconds, or the request's :class:`Budget` (deadline and cancellation); the same for every RPC below."""
        budget = as_budget(timeout_s)
        k = resolve_top_k(top_k, self.spec.num_classes, "classes")
        entry = self._infer(self._decode(image, budget), budget, maps=False)
        return PredictResult(self._class_scores(entry.logits, k=k), entry.size,
                             entry.scores if concept_scores else None)

    def explain(self, image: bytes, class_name: str | None = None, class_index: int | None = None,
                top_k: int = 0, heatmaps: bool = True, timeout_s: float | Budget | None = None,
                concepts: list[str] | tuple[str, ...] = ()) -> ExplainResult:
        """Contribution scores for the predicted class (or the requested one) and heatmaps of the
        top-k contributing concepts (paper 3.5)."""
        budget = as_budget(timeout_s)
        k = resolve_top_k(top_k, self.spec.num_concepts, "concepts")
        if len(concepts) > self.spec.num_concepts:
            raise InvalidArgument(f"{len(concepts)} concepts requested; the model has {self.spec.num_concepts}")
        extra = [_resolve_index(name, None, self.spec.concepts, "concept") for name in concepts]
        wants_class = (class_name is not None and class_name != "") or class_index is not None
        requested = _resolve_index(class_name, class_index, self.spec.classes, "class") if wants_class else None
        explanation_id, entry = self._explained(image, budget)
        target = int(np.argmax(entry.logits)) if requested is None else requested
        chosen = explain.top_contributors(self.spec.weight, entry.scores, target, k)
        budget.check("heatmaps")
        shown = chosen + extra
        ups = explain.upsample(entry.maps[shown], entry.size) if heatmaps and shown else None
        s = explain.contributions(self.spec.weight, entry.scores, target)
        contributions = [Contribution(m, self.spec.concepts[m], float(s[m]), float(self.spec.weight[target, m]),
                                      float(entry.scores[m]), None if ups is None else ups[j], entry.maps[m])
                         for j, m in enumerate(shown)]
        concepts, requested = contributions[:len(chosen)], contributions[len(chosen):]
        predictions = self._class_scores(entry.logits, k=min(DEFAULT_TOP_K, self.spec.num_classes))
        return ExplainResult(explanation_id, self._class_scores(entry.logits, order=[target])[0], predictions,
                             concepts, entry.size, int(np.count_nonzero(self.spec.weight[target])), requested)

    def explain_region(self, region: Region, explanation_id: str = "", image: bytes = b"", top_k: int = 0,
                       timeout_s: float | Budget | None = None) -> RegionResult:
        """Explain Anything (paper 3.6): top-k concepts by ``a(x, m | I) = sum(I * upsample(c(x)[m]))``."""
        budget = as_budget(timeout_s)
        k = resolve_top_k(top_k, self.spec.num_concepts, "concepts")
        explanation_id, entry = self._maps_for(explanation_id, image, budget)
        mask = self.region_mask(region, entry.size, budget)
        return RegionResult(explanation_id, self._activations(entry.maps, mask, k, budget), int(mask.sum()),
                            entry.size)

    def intervene(self, edits: list[Edit], explanation_id: str = "", image: bytes = b"", top_k: int = 0,
                  timeout_s: float | Budget | None = None) -> InterveneResult:
        """Local intervention (paper 3.6): ``c[m] += beta * I_grid`` for each edit on the cached maps,
        then only the head runs, on the unedited and the edited maps together (one batch), so the
        deltas are exactly ``head(edited) - head(maps)``. With float16 maps the edited maps are rounded
        to float16 too: the head sees what the Triton hop carries."""
        budget = as_budget(timeout_s)
        if not edits:
            raise InvalidArgument("intervene needs at least one edit (concept, region, beta)")
        max_edits = self.limits.edits_for(self.spec.num_concepts)
        if len(edits) > max_edits:
            raise InvalidArgument(f"intervene has {len(edits)} edits; at most {max_edits} are accepted for this "
                                  f"model ({self.spec.num_concepts} concepts)")
        # One top_k for the region's concepts; the class lists show as many classes as exist up to it.
        k_concepts = resolve_top_k(top_k, self.spec.num_concepts, "concepts")
        k_classes = min(k_concepts, self.spec.num_classes)
        resolved = []
        for n, e in enumerate(edits):
            if not math.isfinite(e.beta):
                raise InvalidArgument(f"edit {n}: beta must be a finite number, got {e.beta}")
            resolved.append((_resolve_index(e.name, e.index, self.spec.concepts, "concept"), e))
        explanation_id, entry = self._maps_for(explanation_id, image, budget)
        union = np.zeros(entry.size, dtype=bool)
        grid_edits = []
        for n, (m, e) in enumerate(resolved):
            budget.check(f"edit {n} of {len(resolved)}")
            try:
                mask = self.region_mask(e.region, entry.size, budget)
            except InvalidArgument as exc:
                raise InvalidArgument(f"edit {n}: {exc}") from None
            union |= mask
            grid_edits.append((m, float(e.beta), explain.grid_coverage(mask, self.spec.grid, check=budget.check)))
        # The head's batch: [0] the maps as they are, [1] edited (written in place: no further copies).
        batch = np.empty((2, *entry.maps.shape), dtype=entry.maps.dtype)
        batch[0] = entry.maps
        edited = explain.apply_edits(entry.maps, grid_edits, out=batch[1])
        # A finite but huge beta (float32 reaches 3.4e38) overflows the maps or the head's pooling and
        # standardisation to inf, and the answer to NaN probabilities: refuse it as the user error it is.
        betas = ", ".join(f"{e.beta:g}" for e in edits)
        if not np.isfinite(edited[sorted({m for m, _, _ in grid_edits})]).all():
            raise InvalidArgument(f"beta too large: the edited concept maps overflow float32 (betas {betas})")
        _, logits = self.backend.infer_head(batch, budget.left("the head"))
        before, after = logits[0], logits[1]
        if not np.isfinite(after).all():
            raise InvalidArgument(f"beta too large: the head's logits on the edited maps are not finite (betas {betas})")
        return InterveneResult(
            explanation_id=explanation_id,
            before=self._class_scores(before, k=k_classes),
            after=self._class_scores(after, k=k_classes),
            predicted_before=self._class_scores(before, k=1)[0],
            predicted_after=self._class_scores(after, k=1)[0],
            logits_before=before,
            logits_after=after,
            region_concepts=self._activations(edited, union, k_concepts, budget),
        )

    def class_rules(self, class_name: str = "") -> list[tuple[int, float, list[tuple[int, float]]]]:
        """``[(class index, bias, [(concept index, weight), ...])]``, non-zero weights by |weight|."""
        rules = explain.class_rules(self.spec.weight)
        indices = range(self.spec.num_classes) if not class_name else [_resolve_index(class_name, None, self.spec.classes, "class")]
        return [(l, float(self.spec.bias[l]), rules[l]) for l in indices]
