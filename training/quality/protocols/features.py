"""The features every protocol starts from: one pass of the model over a split (pooled backbone features,
standardised concept scores, logits, labels), and the train split's standardisation of them."""
from __future__ import annotations

import torch

from training.model import normalize_uint8, pooled_features


@torch.no_grad()
def dataset_features(model, dataset, batch_size: int = 64, limit: int | None = None):
    """Pooled backbone features ``[N, D]``, the model's standardised concept scores ``[N, M]``, logits
    and labels over ``dataset`` (the first ``limit`` items)."""
    spec = model.backbone.spec
    n = len(dataset) if limit is None else min(limit, len(dataset))
    pooled, scores, logits, labels = [], [], [], []
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([im for im, _ in items])
        feats = model.backbone(normalize_uint8(images, spec.mean, spec.std))
        pooled.append(pooled_features(feats, model.grid))
        s, lg = model.head(model.cbl(feats))
        scores.append(s)
        logits.append(lg)
        labels += [int(y) for _, y in items]
    return torch.cat(pooled), torch.cat(scores), torch.cat(logits), torch.tensor(labels)


def standardised(train: torch.Tensor, *others: torch.Tensor):
    from training.head import standardisation

    mean, std = standardisation(train)
    return mean, std, [(x - mean) / std for x in (train, *others)]
