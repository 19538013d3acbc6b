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
from pathlib import Path

import torch

from .config import CBLCfg
from .features import FeatureCache
from .head import small_op_threads
from .losses import distributed_cbl_loss
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
    items: int | None = None  # how many items the split was carved from (views included)

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
                        [i * views for i in base.val_indices], fraction, seed, n)
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
    return ValSplit(sorted((~mask).nonzero().flatten().tolist()), sorted(val.tolist()), fraction, seed, n)


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
def validation_similarity(cbl, cache: FeatureCache, source, indices: list[int] | None, batch_size: int,
                          device: torch.device, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Exact cubic cosine similarity over all ``indices`` (default: the whole cache): ``[M, Gh, Gw]``, NaN
    where ``P`` is constant. ``part=(rank, world)``: this rank computes its rows of each batch and the sums
    are reduced over the ranks (equal to one process's up to the order of float64 sums)."""
    from .distributed import all_reduce_sum

    cbl.eval()
    zeros = torch.zeros((cbl.conv.weight.shape[0], *tuple(source.grid)), dtype=torch.float64, device=device)
    n, sum_q, sum_p = torch.zeros((), dtype=torch.float64, device=device), zeros.clone(), zeros.clone()
    for b in cache.batches(indices, batch_size, part=part):
        q = cbl(b.features.to(device)).double()
        p = targets(source, b.indices, device).double()
        sum_q, sum_p, n = sum_q + q.sum(0), sum_p + p.sum(0), n + len(q)
    n, sum_q, sum_p = (all_reduce_sum(t) for t in (n, sum_q, sum_p))
    if float(n) < 2:
        raise ValueError("the validation split needs at least 2 images")
    mean_q, mean_p = sum_q / n, sum_p / n
    qp, qq, pp = zeros.clone(), zeros.clone(), zeros.clone()
    for b in cache.batches(indices, batch_size, part=part):
        q = (cbl(b.features.to(device)).double() - mean_q) ** 3
        p = (targets(source, b.indices, device).double() - mean_p) ** 3
        qp, qq, pp = qp + (q * p).sum(0), qq + (q * q).sum(0), pp + (p * p).sum(0)
    qp, qq, pp = (all_reduce_sum(t) for t in (qp, qq, pp))
    sim = qp / (qq.sqrt() * pp.sqrt()).clamp_min(1e-300)
    undefined = (pp <= 1e-300) | (qq <= 1e-300)
    return sim.masked_fill(undefined, float("nan")).float().cpu()


def targets(source, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The source's ``P`` for ``indices`` on ``device``, formed there when the source can (``device=``)."""
    import inspect

    if "device" in inspect.signature(source.similarities).parameters:
        return source.similarities(indices.tolist(), device=device)
    return source.similarities(indices.tolist()).to(device)


def _per_concept(sim: torch.Tensor) -> torch.Tensor:
    """``[M, Gh, Gw]`` with NaNs -> ``[M]`` mean over defined cells (NaN if none)."""
    return sim.flatten(1).nanmean(dim=1)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The batch order of ``epoch``: a function of the seed and the epoch only (so a resumed run, and any
    number of ranks, see the same batches)."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0]))


def train_cbl(cache: FeatureCache, source, split: ValSplit, cfg: CBLCfg, seed: int = 0,
              device: str | torch.device | None = "auto", progress: bool = True,
              val_cache: FeatureCache | None = None, checkpoint: str | Path | None = None) -> CBLResult:
    """Train the CBL on ``split.train_indices`` of ``cache`` against ``source``; early-stop on
    ``split.val_indices`` (read from ``val_cache`` when given, else from ``cache``).

    Under ``torchrun`` the model is wrapped in DistributedDataParallel and each rank computes its rows
    ``rank::W`` of every global batch; the loss is the global batch's (losses.distributed_cbl_loss).
    ``checkpoint``: a file written (by rank 0) after every epoch with the weights, the optimiser, the
    best state and the early-stopping counters; a run of the same configuration resumes from it, to the
    same result as an uninterrupted run (batch order comes from :func:`epoch_generator`).
    """
    dev = resolve_device(device)
    d, gh, gw = cache.shape
    with small_op_threads(cfg.batch_size * d * gh * gw, dev):
        return _train_cbl(cache, val_cache or cache, source, split, cfg, seed, dev, progress,
                          None if checkpoint is None else Path(checkpoint))


def _check_inputs(cache: FeatureCache, val_cache: FeatureCache, source, cfg: CBLCfg, split: ValSplit,
                  world: int) -> None:
    grid = tuple(source.grid)
    for c in (cache, val_cache):
        if tuple(c.shape[1:]) != grid:
            raise ValueError(f"feature cache grid {tuple(c.shape[1:])} differs from the similarity grid {grid}")
    if cfg.batch_size < 2 * world:
        raise ValueError(f"cbl.batch_size must be >= 2 per rank (the loss compares images within a batch); "
                         f"got {cfg.batch_size} for {world} rank(s)")
    # The source is indexed by the split's dataset order: a source of another image count (e.g. a CLIP cache
    # of another dataset) would pair features with other images' similarities, or fail mid-epoch.
    n_images = split.items if split.items is not None else len(split.train_indices) + len(split.val_indices)
    if hasattr(source, "__len__") and len(source) not in (len(cache), n_images):
        raise ValueError(f"the similarity source covers {len(source)} images but the features {n_images}; "
                         f"both must be built from the same training split")


def _train_cbl(cache: FeatureCache, val_cache: FeatureCache, source, split: ValSplit, cfg: CBLCfg, seed: int,
               dev: torch.device, progress: bool, checkpoint: Path | None) -> CBLResult:
    from .distributed import rank_world

    rank, world = rank_world()
    concepts = list(source.concepts)
    grid = tuple(source.grid)
    _check_inputs(cache, val_cache, source, cfg, split, world)
    seed_everything(seed)
    cbl = ConceptBottleneck(cache.feature_dim, len(concepts), grid).to(dev)
    model = cbl
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(cbl, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.Adam(cbl.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckey = _checkpoint_key(cache, val_cache, concepts, cfg, seed, split)
    state = _resume(checkpoint, ckey, cbl, opt) or {
        "epoch": 0, "best_loss": math.inf, "best_state": copy.deepcopy(cbl.state_dict()), "best_epoch": 0,
        "bad": 0, "history": [], "stopped": False}
    part = (rank, world)
    epochs = progress_bar(range(state["epoch"] + 1, cfg.epochs + 1), "cbl", progress and rank == 0, unit="epoch")
    for epoch in ([] if state["stopped"] else epochs):
        model.train()
        total, batches = 0.0, 0
        gen = epoch_generator(seed, epoch)
        # drop_last: a tiny trailing batch gives a noisy, high-variance similarity
        for b in cache.batches(split.train_indices, cfg.batch_size, shuffle=True, generator=gen,
                               drop_last=len(split.train_indices) > cfg.batch_size, part=part, prefetch=2):
            p = targets(source, b.indices, dev)
            loss = distributed_cbl_loss(model(b.features.to(dev)), p)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        val_loss = -float(validation_similarity(cbl, val_cache, source, split.val_indices, cfg.batch_size, dev,
                                                part).nanmean())
        state["history"].append({"epoch": epoch, "train_loss": total / max(batches, 1), "val_loss": val_loss})
        if progress and rank == 0:
            epochs.set_postfix(train=f"{total / max(batches, 1):.3f}", val=f"{val_loss:.3f}")
        state["epoch"] = epoch
        if val_loss < state["best_loss"] - 1e-4:
            state.update(best_loss=val_loss, best_state=copy.deepcopy(cbl.state_dict()), best_epoch=epoch, bad=0)
        else:
            state["bad"] += 1
            if state["bad"] >= cfg.patience:
                log.info("cbl: early stop at epoch %d (best %d, val loss %.4f)", epoch, state["best_epoch"],
                         state["best_loss"])
                state["stopped"] = True
        _save_checkpoint(checkpoint, ckey, cbl, opt, state, rank)
        if state["stopped"]:
            break
    cbl.load_state_dict(state["best_state"])
    per_concept = _per_concept(validation_similarity(cbl, val_cache, source, split.val_indices, cfg.batch_size, dev,
                                                     part))
    kept, dropped = apply_cutoff(concepts, per_concept, cfg.interpretability_cutoff)
    if not kept:
        raise RuntimeError(f"the interpretability cutoff {cfg.interpretability_cutoff} dropped every concept "
                           f"(best validation similarity {float(per_concept.nan_to_num(-1).max()):.3f}); lower it")
    weight = cbl.conv.weight.detach().cpu()[kept].clone()
    log.info("cbl: kept %d/%d concepts (cutoff %.2f), best epoch %d", len(kept), len(concepts),
             cfg.interpretability_cutoff, state["best_epoch"])
    return CBLResult(weight, [concepts[k] for k in kept], kept, dropped, [float(v) for v in per_concept],
                     state["history"], state["best_epoch"], split)


def _checkpoint_key(cache, val_cache, concepts, cfg: CBLCfg, seed: int, split: ValSplit) -> dict:
    """What a checkpoint must have been trained with to be resumed (the number of ranks is not part of it)."""
    from dataclasses import asdict

    return {"train_features": cache.manifest["key"], "val_features": val_cache.manifest["key"],
            "concepts": concepts, "cfg": asdict(cfg), "seed": seed, "split": split.record()}


def _resume(path: Path | None, key: dict, cbl, opt) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        doc = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn file cannot happen (atomic rename); anything unreadable is restarted
        log.warning("cbl checkpoint %s is unreadable (%s); training from the start", path, exc)
        return None
    if doc.get("key") != key:
        log.info("cbl checkpoint %s is of another configuration; training from the start", path)
        return None
    cbl.load_state_dict(doc["model"])
    opt.load_state_dict(doc["optimizer"])
    log.info("cbl: resuming after epoch %d from %s", doc["state"]["epoch"], path)
    return doc["state"]


def _save_checkpoint(path: Path | None, key: dict, cbl, opt, state: dict, rank: int) -> None:
    if path is None or rank != 0:
        return
    import io

    from .runtime import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"key": key, "model": cbl.state_dict(), "optimizer": opt.state_dict(), "state": state}, buf)
    atomic_write_bytes(path, buf.getvalue())


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
