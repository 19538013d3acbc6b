"""Training the spatial concept bottleneck layer (paper 3.3, appendix A.3).

``ConceptBottleneck`` (a bias-free 1x1 conv on grid-resized backbone features) is trained with the
cubic cosine similarity loss against ``P`` from a ``SimilaritySource``, with Adam, on the training
split minus a seeded validation part carved from it. Early stopping watches the validation loss;
the weights of the best epoch are kept. Then the interpretability cutoff drops every concept whose
validation similarity is below a threshold.

Validation similarity of concept ``m``: the cubic cosine similarity over *all* validation images
(not averaged over batches) for every cell, averaged over the cells where it is defined (a cell
where ``P`` is constant over the validation set, e.g. a concept that never reaches a corner, says
nothing about the concept and is skipped). It is computed exactly in two streaming passes (means,
then centred sums), so memory stays ``O(M * Gh * Gw)`` whatever the split size.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch

from .config import CBLCfg
from .features import FeatureCache
from .head import small_op_threads
from .losses import cbl_loss
from .model import ConceptBottleneck
from .runtime import progress as progress_bar, resolve_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class ValSplit:
    """The validation part carved from TRAIN (recorded in the bundle)."""
    train_indices: list[int]
    val_indices: list[int]
    fraction: float
    seed: int

    def record(self) -> dict:
        return {"fraction": self.fraction, "seed": self.seed, "train_count": len(self.train_indices),
                "val_count": len(self.val_indices)}


def carve_validation(n: int, fraction: float, seed: int, labels: torch.Tensor | None = None,
                     views: int = 1) -> ValSplit:
    """Seeded split of ``range(n)``; stratified by ``labels`` when given (every class keeps train images).
    ``views > 1``: items ``i * views + v`` are views of image ``i`` (training/augment.py): the split is
    drawn over images, train keeps every view of its images, validation only view 0 (the image itself),
    so no view of a validation image is trained on and the cut-off judges unwarped images."""
    if views > 1:
        if n % views:
            raise ValueError(f"{n} items are not a whole number of {views} views per image")
        base = carve_validation(n // views, fraction, seed, None if labels is None else labels[::views])
        return ValSplit([i * views + v for i in base.train_indices for v in range(views)],
                        [i * views for i in base.val_indices], fraction, seed)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    if labels is None:
        perm = torch.randperm(n, generator=gen)
        k = max(2, int(round(n * fraction)))
        val = perm[:k]
    else:
        val_parts = []
        for c in labels.unique(sorted=True).tolist():
            members = (labels == c).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=gen)]
            k = min(int(round(len(members) * fraction)), len(members) - 1)
            val_parts.append(members[:k])
        val = torch.cat(val_parts)
    if len(val) < 2 or len(val) >= n:
        raise ValueError(f"cannot carve a validation split of fraction {fraction} from {n} training images")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[val] = True
    return ValSplit(sorted((~mask).nonzero().flatten().tolist()), sorted(val.tolist()), fraction, seed)


@dataclass
class CBLResult:
    weight: torch.Tensor  # [M_kept, D, 1, 1] float32: the kept concepts' rows
    concepts: list[str]  # kept concept names, in weight order
    kept: list[int]  # indices into the source's concept list
    dropped: list[dict]  # {"concept", "val_similarity"} for every concept below the cutoff
    val_similarity: list[float]  # every concept of the source, NaN if undefined
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_loss
    best_epoch: int = 0
    split: ValSplit | None = None

    def record(self) -> dict:
        return {
            "concepts_total": len(self.val_similarity), "concepts_kept": len(self.kept),
            "dropped": self.dropped, "best_epoch": self.best_epoch, "epochs_run": len(self.history),
            "history": self.history,
            "val_similarity": {c: s for c, s in zip(self.concepts, [self.val_similarity[k] for k in self.kept])},
            "validation_split": self.split.record() if self.split else None,
        }


@torch.no_grad()
def validation_similarity(cbl: ConceptBottleneck, cache: FeatureCache, source, indices: list[int],
                          batch_size: int, device: torch.device) -> torch.Tensor:
    """Exact cubic cosine similarity over all ``indices``: ``[M, Gh, Gw]``, NaN where ``P`` is constant."""
    cbl.eval()
    n = 0
    sum_q = sum_p = None
    for b in cache.batches(indices, batch_size):
        q = cbl(b.features.to(device)).double()
        p = source.similarities(b.indices.tolist()).to(device).double()
        sum_q = q.sum(0) if sum_q is None else sum_q + q.sum(0)
        sum_p = p.sum(0) if sum_p is None else sum_p + p.sum(0)
        n += len(q)
    if n < 2:
        raise ValueError("the validation split needs at least 2 images")
    mean_q, mean_p = sum_q / n, sum_p / n
    qp = qq = pp = 0.0
    for b in cache.batches(indices, batch_size):
        q = (cbl(b.features.to(device)).double() - mean_q) ** 3
        p = (source.similarities(b.indices.tolist()).to(device).double() - mean_p) ** 3
        qp, qq, pp = qp + (q * p).sum(0), qq + (q * q).sum(0), pp + (p * p).sum(0)
    sim = qp / (qq.sqrt() * pp.sqrt()).clamp_min(1e-300)
    undefined = (pp <= 1e-300) | (qq <= 1e-300)
    return sim.masked_fill(undefined, float("nan")).float().cpu()


def _per_concept(sim: torch.Tensor) -> torch.Tensor:
    """``[M, Gh, Gw]`` with NaNs -> ``[M]`` mean over defined cells (NaN if none)."""
    return sim.flatten(1).nanmean(dim=1)


def train_cbl(cache: FeatureCache, source, split: ValSplit, cfg: CBLCfg, seed: int = 0,
              device: str | torch.device | None = "auto", progress: bool = True) -> CBLResult:
    """Train the CBL on ``split.train_indices`` of ``cache`` against ``source``; early-stop on ``split.val_indices``."""
    dev = resolve_device(device)
    d, gh, gw = cache.shape
    with small_op_threads(cfg.batch_size * d * gh * gw, dev):
        return _train_cbl(cache, source, split, cfg, seed, dev, progress)


def _train_cbl(cache: FeatureCache, source, split: ValSplit, cfg: CBLCfg, seed: int, dev: torch.device,
               progress: bool) -> CBLResult:
    concepts = list(source.concepts)
    grid = tuple(source.grid)
    if tuple(cache.shape[1:]) != grid:
        raise ValueError(f"feature cache grid {tuple(cache.shape[1:])} differs from the similarity grid {grid}")
    if cfg.batch_size < 2:
        raise ValueError("cbl.batch_size must be >= 2 (the loss compares images within a batch)")
    # Both are indexed by the split's dataset order: a source of another image count (e.g. a CLIP cache
    # of another dataset) would pair features with other images' similarities, or fail mid-epoch.
    if hasattr(source, "__len__") and len(source) != len(cache):
        raise ValueError(f"the similarity source covers {len(source)} images but the feature cache {len(cache)}; "
                         f"both must be built from the same training split")
    gen = seed_everything(seed)
    cbl = ConceptBottleneck(cache.feature_dim, len(concepts), grid).to(dev)
    opt = torch.optim.Adam(cbl.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_loss, best_state, best_epoch, bad = math.inf, copy.deepcopy(cbl.state_dict()), 0, 0
    history: list[dict] = []
    epochs = progress_bar(range(1, cfg.epochs + 1), "cbl", progress, unit="epoch")
    for epoch in epochs:
        cbl.train()
        total, batches = 0.0, 0
        # drop_last: a tiny trailing batch gives a noisy, high-variance similarity
        for b in cache.batches(split.train_indices, cfg.batch_size, shuffle=True, generator=gen,
                               drop_last=len(split.train_indices) > cfg.batch_size):
            p = source.similarities(b.indices.tolist()).to(dev)
            loss = cbl_loss(cbl(b.features.to(dev)), p)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        val_loss = -float(validation_similarity(cbl, cache, source, split.val_indices, cfg.batch_size, dev)
                          .nanmean())
        history.append({"epoch": epoch, "train_loss": total / max(batches, 1), "val_loss": val_loss})
        if progress:
            epochs.set_postfix(train=f"{total / max(batches, 1):.3f}", val=f"{val_loss:.3f}")
        if val_loss < best_loss - 1e-4:
            best_loss, best_state, best_epoch, bad = val_loss, copy.deepcopy(cbl.state_dict()), epoch, 0
        else:
            bad += 1
            if bad >= cfg.patience:
                log.info("cbl: early stop at epoch %d (best %d, val loss %.4f)", epoch, best_epoch, best_loss)
                break
    cbl.load_state_dict(best_state)
    per_concept = _per_concept(validation_similarity(cbl, cache, source, split.val_indices, cfg.batch_size, dev))
    kept, dropped = apply_cutoff(concepts, per_concept, cfg.interpretability_cutoff)
    if not kept:
        raise RuntimeError(f"the interpretability cutoff {cfg.interpretability_cutoff} dropped every concept "
                           f"(best validation similarity {float(per_concept.nan_to_num(-1).max()):.3f}); lower it")
    weight = cbl.conv.weight.detach().cpu()[kept].clone()
    log.info("cbl: kept %d/%d concepts (cutoff %.2f), best epoch %d", len(kept), len(concepts),
             cfg.interpretability_cutoff, best_epoch)
    return CBLResult(weight, [concepts[k] for k in kept], kept, dropped, [float(v) for v in per_concept],
                     history, best_epoch, split)


def apply_cutoff(concepts: list[str], scores: torch.Tensor, cutoff: float) -> tuple[list[int], list[dict]]:
    """Keep concepts with validation similarity ``>= cutoff`` (NaN: never measurable, dropped)."""
    kept, dropped = [], []
    for k, (name, s) in enumerate(zip(concepts, scores.tolist())):
        if s == s and s >= cutoff:
            kept.append(k)
        else:
            dropped.append({"concept": name, "val_similarity": None if s != s else float(s)})
    return kept, dropped


__all__ = ["CBLResult", "ValSplit", "apply_cutoff", "carve_validation", "train_cbl", "validation_similarity"]
