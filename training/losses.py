"""The CBL training loss: cubic cosine similarity across the images of a batch (paper eq. 1).

For every concept ``m`` and grid cell ``(h, w)`` the batch gives two vectors over images,
``q = C[:, m, h, w]`` (concept maps) and ``p = P[:, m, h, w]`` (target similarities). Each is
centred over the batch, cubed element-wise (which emphasises the strongest matches), and the two
are compared by cosine similarity. The loss is minus the mean over ``(m, h, w)``; the paper writes a
sum, the mean only rescales the gradient and keeps the learning rate independent of ``M`` and the grid.
"""
from __future__ import annotations

import torch

# A cell where a vector is constant over the batch (e.g. a concept absent from every image of the
# batch at that cell) has a zero centred vector: its similarity is defined as 0, not NaN.
EPS = 1e-12


def cubic_cosine_similarity(q: torch.Tensor, p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-position cubic cosine similarity across the batch.

    ``q``, ``p``: ``[B, ...]`` (typically ``[B, M, Gh, Gw]`` float32); returns ``[...]``
    (``[M, Gh, Gw]``) in ``[-1, 1]``. Needs ``B >= 2``.
    """
    if q.shape != p.shape:
        raise ValueError(f"concept maps {tuple(q.shape)} and similarities {tuple(p.shape)} differ in shape")
    if q.shape[0] < 2:
        raise ValueError("cubic cosine similarity needs a batch of at least 2 images")
    # Rescale by the per-position max before cubing: cubes of large activations overflow float32
    # and cubes of tiny similarities underflow; cosine is invariant to positive rescaling.
    qc = q.double() if q.dtype == torch.float64 else q.float()
    pc = p.to(qc.dtype)
    qc = qc - qc.mean(dim=0, keepdim=True)
    pc = pc - pc.mean(dim=0, keepdim=True)
    # The scale is detached: the result does not depend on it, so neither does the true gradient.
    qc = (qc / qc.detach().abs().amax(dim=0, keepdim=True).clamp_min(eps)) ** 3
    pc = (pc / pc.detach().abs().amax(dim=0, keepdim=True).clamp_min(eps)) ** 3
    num = (qc * pc).sum(dim=0)
    den = qc.norm(dim=0) * pc.norm(dim=0)
    return num / den.clamp_min(eps)


def cbl_loss(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-mean_{m,h,w} sim(q[m,h,w], p[m,h,w])`` for maps and targets ``[B, M, Gh, Gw]``; a scalar."""
    return -cubic_cosine_similarity(maps, targets).mean()


__all__ = ["cubic_cosine_similarity", "cbl_loss"]
