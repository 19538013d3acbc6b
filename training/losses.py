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


def distributed_cubic_cosine_similarity(q: torch.Tensor, p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """:func:`cubic_cosine_similarity` of the *global* batch when each rank holds some of its images
    (``q``, ``p``: this rank's rows): batch means, per-position scales and the three sums are reduced over
    the ranks (the sums differentiably), so every rank gets the loss of the whole batch, equal to one
    process's up to the order of floating-point sums. With data parallelism this is exact: each rank's
    gradient is W times its share, and DistributedDataParallel's average divides the W back out. The
    arithmetic is float64 (the maps stay float32): a sum split over ranks then rounds ~1e-16, not ~1e-7,
    so runs on different numbers of ranks stay together over many epochs of Adam (measured: CBL weights
    1e-4 apart after 30 epochs in float32)."""
    from .distributed import all_reduce_max, all_reduce_sum, differentiable_sum

    qc = q.double()
    pc = p.to(qc.dtype)
    n = all_reduce_sum(torch.tensor(float(q.shape[0]), dtype=qc.dtype, device=qc.device))
    if float(n) < 2:
        raise ValueError("cubic cosine similarity needs a batch of at least 2 images")
    qc = qc - differentiable_sum(qc.sum(dim=0, keepdim=True)) / n
    pc = pc - all_reduce_sum(pc.sum(dim=0, keepdim=True)) / n

    def scale(x: torch.Tensor) -> torch.Tensor:
        local = x.detach().abs().amax(dim=0, keepdim=True) if x.shape[0] else torch.zeros_like(x[:1])
        return all_reduce_max(local).clamp_min(eps)

    qc = (qc / scale(qc)) ** 3
    pc = (pc / scale(pc)) ** 3
    num = differentiable_sum((qc * pc).sum(dim=0))
    qq = differentiable_sum((qc * qc).sum(dim=0))
    pp = all_reduce_sum((pc * pc).sum(dim=0))
    return num / (qq.clamp_min(1e-300).sqrt() * pp.clamp_min(1e-300).sqrt()).clamp_min(eps)


def cbl_loss(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-mean_{m,h,w} sim(q[m,h,w], p[m,h,w])`` for maps and targets ``[B, M, Gh, Gw]``; a scalar."""
    return -cubic_cosine_similarity(maps, targets).mean()


def distributed_cbl_loss(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`cbl_loss` of the global batch spread over the ranks (:func:`distributed_cubic_cosine_similarity`)."""
    return -distributed_cubic_cosine_similarity(maps, targets).mean()


__all__ = ["cbl_loss", "cubic_cosine_similarity", "distributed_cbl_loss", "distributed_cubic_cosine_similarity"]
