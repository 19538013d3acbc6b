"""Protocol 6, generalisation: the shifted split scored like the test split, broken down by the object's
share of the frame, and the two-object images (top-2 classes, per-object Explain Anything)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.model import normalize_uint8

from .. import metrics
from ..attributions import BASELINES, StandardClassifier, salf_class_maps
from .concepts import concept_localisation
from .localisation import foreground, localisation, sample
from .rules import defining_concepts

SIZE_BUCKETS = ((0.0, 0.05, "object < 5% of the frame"), (0.05, 0.15, "5-15%"), (0.15, 1.01, ">= 15%"))


@torch.no_grad()
def per_image(model, classifier: StandardClassifier, dataset, indices: list[int], batch_size: int = 32) -> dict:
    """Per image of ``dataset[indices]``: the object's share of the frame, whether the SALF-CBM and the
    standard dense model classify it right, and whether the SALF-CBM class heatmap (true class) points
    inside the object."""
    spec = model.backbone.spec
    out = {"share": [], "salf": [], "standard": [], "pointing": []}
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        items = [dataset[i] for i in idx]
        images = torch.stack([im for im, _ in items])
        labels = torch.tensor([int(y) for _, y in items])
        x = normalize_uint8(images, spec.mean, spec.std)
        logits = model(x)[2]
        out["salf"] += (logits.argmax(1) == labels).tolist()
        out["standard"] += (classifier(x).argmax(1) == labels).tolist()
        heats = salf_class_maps(model, images, labels)
        for j, i in enumerate(idx):
            mask = foreground(dataset, i)
            out["share"].append(float(mask.mean()))
            out["pointing"].append(metrics.pointing_hit(heats[j], mask))
    return {k: np.asarray(v) for k, v in out.items()}


def split_summary(records: dict) -> dict:
    """Accuracy, pointing, object share and the size breakdown of :func:`per_image` records."""
    return {"images": int(len(records["salf"])), "salf_accuracy": float(records["salf"].mean()),
            "standard_accuracy": float(records["standard"].mean()),
            "salf_pointing": float(records["pointing"].mean()), "by_object_size": _buckets(records),
            "foreground_share": float(records["share"].mean())}


def _buckets(records: dict) -> dict:
    rows = {}
    for lo, hi, name in SIZE_BUCKETS:
        sel = (records["share"] >= lo) & (records["share"] < hi)
        if sel.any():
            rows[name] = {"images": int(sel.sum()), "salf_accuracy": float(records["salf"][sel].mean()),
                          "standard_accuracy": float(records["standard"][sel].mean()),
                          "salf_pointing": float(records["pointing"][sel].mean())}
    return rows


@torch.no_grad()
def pairs(model, classifier: StandardClassifier, dataset, concepts: list[str], classes: list[str],
          batch_size: int = 32) -> dict:
    """Two-object images: are the top-2 classes the two objects' classes (SALF-CBM and the standard dense
    model), and per object, Explain Anything on its silhouette (the gateway's math: the mask projected
    onto the grid, ``a = maps @ w``): does the head on the region's mean concept activations (standardised
    like the image's) name the object's class, and are its defining concepts the region's top ones."""
    from salf.contract.explain import project_region, region_activations

    spec = model.backbone.spec
    defining = defining_concepts(classes)
    weight = model.head.linear.weight.detach().numpy().astype(np.float64)
    bias = model.head.linear.bias.detach().numpy().astype(np.float64)
    mean = model.head.concept_mean.numpy().astype(np.float64)
    std = model.head.concept_std.numpy().astype(np.float64)
    top2 = {"SALF-CBM": [], "standard dense": []}
    region_class, region_concepts = [], []
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(len(dataset), start + batch_size)))
        images = torch.stack([dataset[i][0] for i in idx])
        x = normalize_uint8(images, spec.mean, spec.std)
        maps, _, logits = model(x)
        for name, lg in (("SALF-CBM", logits), ("standard dense", classifier(x))):
            top = lg.topk(2, dim=1).indices.tolist()
            top2[name] += [set(t) == set(dataset.load_objects(i)[0]) for t, i in zip(top, idx)]
        for j, i in enumerate(idx):
            object_classes, silhouettes = dataset.load_objects(i)
            for c, sil in zip(object_classes, silhouettes):
                if not sil.any():
                    continue
                a = region_activations(maps[j].numpy(), project_region(sil, model.grid)) / float(sil.sum())
                region_class.append(int(np.argmax(weight @ ((a - mean) / std) + bias)) == c)
                wanted = [concepts.index(d) for d in defining.get(classes[c], []) if d in concepts]
                if wanted:
                    top = np.argsort(-a, kind="stable")[:len(wanted) + 1]
                    region_concepts.append(float(np.mean([w in top for w in wanted])))
    return {"images": len(dataset), "top2_both_classes": {k: float(np.mean(v)) for k, v in top2.items()},
            "region_class": float(np.mean(region_class)) if region_class else float("nan"),
            "region_defining_in_top": float(np.mean(region_concepts)) if region_concepts else float("nan"),
            "objects": len(region_class)}


def generalisation(model, classifier: StandardClassifier, data: str | Path, size: tuple[int, int], concepts: list[str],
                   classes: list[str], baselines=BASELINES, limit: int | None = None, seed: int = 0,
                   faithfulness: bool = True, class_concepts: list[int] | None = None) -> dict:
    """The shifted splits (``salfctl data synth``): single-object images of other sizes, aspect ratios,
    object scales and backgrounds scored like the test split (accuracy, the Table 2 localisation with
    every baseline on the objects' silhouettes, concept localisation), accuracy and pointing by the
    object's share of the frame, and the two-object images (:func:`pairs`). Images are squashed to the
    model's input size (the preprocessing of training and serving); the scores are computed there, which
    for pixel accuracy, IoU, AP and pointing equals scoring at the image's own size up to resampling."""
    from training.data.folder import ImageFolderSplit

    root = Path(data)
    if not (root / "shifted").is_dir():
        return {"skipped": "the dataset has no shifted split (`salfctl data synth` writes one)"}
    shifted = ImageFolderSplit(root, "shifted", size)
    chosen = sample(shifted, limit, seed)
    records = per_image(model, classifier, shifted, chosen)
    out = split_summary(records)
    out["localisation"] = localisation(model, classifier, shifted, chosen, baselines, seed=seed, keep_examples=0,
                                       faithfulness=faithfulness, class_concepts=class_concepts)
    out["concepts_localisation"] = concept_localisation(model, concepts, shifted, chosen)
    if (root / "shifted-pairs").is_dir():
        out["pairs"] = pairs(model, classifier, ImageFolderSplit(root, "shifted-pairs", size), concepts, classes)
    return out
