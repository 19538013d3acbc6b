"""Test-time explanation of one image for the training report (paper 3.5): predicted class, top concepts
by contribution ``W[l, m] * c*_m`` (c* standardised, paper eq. 4) and where each concept is strongest on
the grid. The ranking is the gateway's (:func:`salf.contract.explain.top_contributors`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from salf.contract import explain as math
from salf.contract.grid import grid_points


@dataclass
class ConceptContribution:
    concept: str
    contribution: float  # W[l, m] * c*_m
    score: float  # standardised pooled activation c*_m
    cell: tuple[int, int]  # (h, w) grid cell where the concept map is largest
    pixel: tuple[int, int]  # (y, x) centre of that cell at the model's input resolution


@dataclass
class Explanation:
    predicted: str
    predicted_index: int
    probability: float
    top: list[ConceptContribution]

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """Human-readable, one concept per line."""
        lines = [f"predicted {self.predicted!r} (p={self.probability:.2f}); top concepts by contribution W[l,m]*c*_m:"]
        for c in self.top:
            lines.append(f"  {c.concept:<22} contribution {c.contribution:+.3f} (c*={c.score:+.2f}), strongest at "
                         f"grid cell (h={c.cell[0]}, w={c.cell[1]}) = pixel (y={c.pixel[0]}, x={c.pixel[1]})")
        return "\n".join(lines)


def explain_maps(maps: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor,
                 concepts: list[str], classes: list[str], input_size: tuple[int, int], k: int = 3,
                 target: int | None = None, placement: str = "stride") -> Explanation:
    """Explain one image from its outputs: ``maps [M, Gh, Gw]``, ``scores [M]``, ``logits [L]``, head
    ``weight [L, M]``. ``target``: class to explain (default: the predicted one). The top-``k`` concepts
    with a non-zero weight for the class, by absolute contribution (strong negative evidence shows too).
    ``placement``: the grid's (salf/contract/grid.py), for the pixel each cell is reported at."""
    maps, scores, logits, weight = (t.detach().cpu().numpy() for t in (maps, scores, logits, weight))
    label = int(logits.argmax()) if target is None else int(target)
    if not 0 <= label < len(classes):
        raise ValueError(f"class index {label} out of range for {len(classes)} classes")
    contrib = math.contributions(weight, scores, label)
    gh, gw = maps.shape[-2:]
    points = grid_points(tuple(input_size), (gh, gw), placement)
    top = []
    for m in math.top_contributors(weight, scores, label, k):
        cell = int(np.argmax(maps[m]))
        top.append(ConceptContribution(concepts[m], float(contrib[m]), float(scores[m]), (cell // gw, cell % gw),
                                       tuple(int(v) for v in points[cell])))
    return Explanation(classes[label], label, float(math.softmax(logits)[label]), top)


__all__ = ["ConceptContribution", "Explanation", "explain_maps"]
