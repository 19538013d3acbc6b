"""Protocol 3, concepts: concept maps against each concept's mask (IoU, pointing) beside a position-blind
baseline; and the concept neurons (paper 4.3, C.2): top-k retrieval against the best backbone channel."""
from __future__ import annotations

import numpy as np
import torch

from training.evaluate import THRESHOLD_RULES, IoUAccumulator, threshold_maps
from training.model import normalize_uint8

from .. import metrics


@torch.no_grad()
def concept_localisation(model, concepts: list[str], dataset, indices: list[int], batch_size: int = 32) -> dict:
    if not getattr(dataset, "has_masks", False) or dataset.concepts is None:
        return {"skipped": "the dataset has no concept masks"}
    rows = {c: dataset.concepts.index(c) for c in concepts if c in dataset.concepts}
    names = list(rows)
    if not names:
        return {"skipped": "none of the model's concepts has a mask in the dataset"}
    sel = [concepts.index(c) for c in names]
    spec = model.backbone.spec
    device = next(model.parameters()).device  # the model's; the maps are scored on the CPU
    n = len(indices)
    all_maps, all_masks = [], []
    for start in range(0, n, batch_size):
        idx = indices[start:start + batch_size]
        images = torch.stack([dataset[i][0] for i in idx])
        maps, _, _ = model(normalize_uint8(images.to(device), spec.mean, spec.std))
        all_maps.append(maps[:, sel].cpu())
        all_masks += [torch.from_numpy(dataset.load_masks(i)[[rows[c] for c in names]]) for i in idx]
    maps = torch.cat(all_maps)
    mean_map = maps.mean(dim=0)
    size = tuple(all_masks[0].shape[1:])
    out = {}
    for which, source in (("SALF-CBM", maps), ("position-blind", mean_map[None].expand_as(maps))):
        iou = {r: IoUAccumulator(len(names)) for r in THRESHOLD_RULES}
        hits = np.zeros(len(names))
        present = np.zeros(len(names))
        for k in range(len(all_masks)):
            up = torch.nn.functional.interpolate(source[k:k + 1].float(), size=size, mode="bilinear",
                                                 align_corners=False)[0]
            for r in THRESHOLD_RULES:
                iou[r].add(threshold_maps(source[k:k + 1], size, r)[0], all_masks[k])
            for m in range(len(names)):
                if all_masks[k][m].any():
                    present[m] += 1
                    hits[m] += metrics.pointing_hit(up[m].numpy(), all_masks[k][m].numpy())
        with np.errstate(invalid="ignore", divide="ignore"):
            pointing = np.where(present > 0, hits / np.maximum(present, 1), np.nan)
        out[which] = {"iou_half": dict(zip(names, iou["half"].per_concept().tolist())),
                      "iou_mean_rule": dict(zip(names, iou["mean"].per_concept().tolist())),
                      "pointing": dict(zip(names, pointing.tolist()))}
    summary = {w: {k: float(np.nanmean(list(v.values()))) for k, v in d.items()} for w, d in out.items()}
    return {"per_concept": out, "mean": summary, "images": n}


# ------------------------------------------------------------------ concept neurons (paper 4.3, C.2)
def _presence(dataset, indices: list[int], rows: list[int]) -> np.ndarray:
    """bool ``[N, len(rows)]``: is each concept's mask non-empty in each image."""
    return np.stack([dataset.load_masks(i)[rows].reshape(len(rows), -1).any(axis=1) for i in indices])


def concept_neurons(concepts: list[str], train_ds, test_ds, train_feats, test_feats, k: int = 50,
                    keep_gallery: int = 6, gallery_k: int = 5, train_indices: list[int] | None = None) -> dict:
    """Each concept neuron's top-k test images by its global activation, with precision@k against the
    concept's presence (its mask non-empty); baseline: the backbone channel that best retrieves the
    concept on the *train* split (top-k precision, ties by mean activation gap), scored the same way
    on test. ``k`` 50: at 5 every neuron and channel scored 1.0 on the demo's test split (a concept is
    in 12-50% of its images), so 5 told nothing; the gallery shows the top ``gallery_k``.
    ``*_feats``: :func:`.features.dataset_features` tuples (pooled backbone features, concept scores, ...);
    ``train_indices``: the train items ``train_feats`` holds, in its order (default: the first
    ``len(train_feats[0])``; pass the draw of ``--train-limit``); ``test_feats`` holds the whole test split."""
    k = max(1, min(k, len(test_feats[0]), len(train_feats[0])))
    if not getattr(test_ds, "has_masks", False) or test_ds.concepts is None:
        return {"skipped": "the dataset has no concept masks"}
    names = [c for c in concepts if c in test_ds.concepts]
    if not names:
        return {"skipped": "none of the model's concepts has a mask in the dataset"}
    rows = [test_ds.concepts.index(c) for c in names]
    present_te = _presence(test_ds, list(range(len(test_ds))), rows)
    present_tr = _presence(train_ds, list(train_indices) if train_indices is not None
                           else list(range(len(train_feats[0]))), rows)
    scores_te = test_feats[1].numpy()
    chan_tr, chan_te = train_feats[0].numpy(), test_feats[0].numpy()
    top_tr = np.argsort(-chan_tr, axis=0, kind="stable")[:k]  # [k, D]: each channel's top-k train images
    out, gallery = {}, {}
    for j, name in enumerate(names):
        m = concepts.index(name)
        top = np.argsort(-scores_te[:, m], kind="stable")[:k]
        channel_prec = present_tr[top_tr, j].mean(axis=0)  # [D]
        gap = chan_tr[present_tr[:, j]].mean(axis=0) - chan_tr[~present_tr[:, j]].mean(axis=0) \
            if present_tr[:, j].any() and (~present_tr[:, j]).any() else np.zeros(chan_tr.shape[1])
        best = int(np.lexsort((-gap, -channel_prec))[0])
        top_c = np.argsort(-chan_te[:, best], kind="stable")[:k]
        out[name] = {"precision_at_k": float(present_te[top, j].mean()), "channel": best,
                     "channel_precision_at_k": float(present_te[top_c, j].mean()),
                     "present_share": float(present_te[:, j].mean())}
        if len(gallery) < keep_gallery:
            gallery[name] = [int(i) for i in top[:gallery_k]]
    mean = {key: float(np.mean([v[key] for v in out.values()])) for key in
            ("precision_at_k", "channel_precision_at_k", "present_share")}
    return {"k": k, "per_concept": out, "mean": mean, "_gallery": gallery}
