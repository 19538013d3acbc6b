"""Test-time explanations of one image (paper 3.5): predicted class, top concepts by contribution
``W[l, m] * c*_m`` (c* standardised, paper eq. 4), and where each concept is strongest on the grid."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .grid import grid_points
from .model import SalfCBM, normalize_uint8


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
                 target: int | None = None) -> Explanation:
    """Explain one image from its outputs: ``maps [M, Gh, Gw]``, ``scores [M]``, ``logits [L]``, head
    ``weight [L, M]``. ``target``: class to explain (default: the predicted one). Top-``k`` by
    absolute contribution, so strong negative evidence shows too."""
    label = int(logits.argmax()) if target is None else int(target)
    if not 0 <= label < len(classes):
        raise ValueError(f"class index {label} out of range for {len(classes)} classes")
    contrib = weight[label] * scores
    order = contrib.abs().argsort(descending=True)[: min(k, len(concepts))]
    gh, gw = maps.shape[-2:]
    points = grid_points(tuple(input_size), (gh, gw))
    top = []
    for m in order.tolist():
        cell = int(maps[m].flatten().argmax())
        top.append(ConceptContribution(concepts[m], float(contrib[m]), float(scores[m]), (cell // gw, cell % gw),
                                       tuple(int(v) for v in points[cell])))
    prob = float(torch.softmax(logits, dim=0)[label])
    return Explanation(classes[label], label, prob, top)


@torch.no_grad()
def explain_image(model: SalfCBM, image_uint8: torch.Tensor, concepts: list[str], classes: list[str],
                  k: int = 3) -> Explanation:
    """``image_uint8``: ``[H, W, 3]`` at the model's input size (DESIGN preprocessing)."""
    spec = model.backbone.spec
    x = normalize_uint8(image_uint8[None], spec.mean, spec.std).to(next(model.parameters()).device)
    maps, scores, logits = model.eval()(x)
    return explain_maps(maps[0].cpu(), scores[0].cpu(), logits[0].cpu(), model.head.linear.weight.detach().cpu(),
                        concepts, classes, spec.input_size, k)


__all__ = ["ConceptContribution", "Explanation", "explain_image", "explain_maps"]
