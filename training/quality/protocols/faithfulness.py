"""Faithfulness of a heatmap: deletion and insertion curves of the class probability (Petsiuk et al. 2018)."""
from __future__ import annotations

import numpy as np
import torch

from .. import metrics

FAITHFULNESS_STEPS = 16


@torch.no_grad()
def deletion_insertion(score, images: torch.Tensor, heats: np.ndarray, labels: torch.Tensor,
                       steps: int = FAITHFULNESS_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUCs ``[B]`` of the class probability (Petsiuk et al. 2018): pixels in
    heatmap order (hottest first) are replaced by the image's mean colour (deletion), or put back onto a
    canvas of that colour (insertion), in ``steps`` equal shares; ``score(uint8 [N, H, W, 3]) -> logits``.
    Deletion: lower is better; insertion: higher is better."""
    b, h, w, _ = images.shape
    fractions = np.linspace(0.0, 1.0, steps + 1)
    fill = images.float().mean(dim=(1, 2), keepdim=True).round().to(torch.uint8).expand_as(images)
    rank = np.empty((b, h * w), dtype=np.int64)
    for j in range(b):
        rank[j, metrics.deletion_order(heats[j])] = np.arange(h * w)
    rank_t = torch.from_numpy(rank).view(b, h, w, 1)
    curves = {"deletion": np.zeros((b, steps + 1)), "insertion": np.zeros((b, steps + 1))}
    for k, frac in enumerate(fractions):
        chosen = rank_t < int(round(frac * h * w))  # the hottest share of the pixels
        for name, x in (("deletion", torch.where(chosen, fill, images)), ("insertion", torch.where(chosen, images, fill))):
            probs = torch.softmax(score(x).float(), dim=1)
            curves[name][:, k] = probs[torch.arange(b), labels].numpy()
    return metrics.curve_auc(fractions, curves["deletion"]), metrics.curve_auc(fractions, curves["insertion"])
