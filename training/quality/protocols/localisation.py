"""Protocol 2, localisation (Table 2 shape): each method's heatmap of the target class against the object's
silhouette (pixel accuracy, mIoU, mAP, pointing, deletion/insertion), trivial maps as rows too; and the
split sampling and class-concept lookup the other protocols share."""
from __future__ import annotations

import logging

import numpy as np
import torch

from training.model import normalize_uint8

from .. import metrics
from ..attributions import BASELINES, StandardClassifier, baseline_maps, salf_class_maps, salf_concept_class_maps
from .faithfulness import FAITHFULNESS_STEPS, deletion_insertion

log = logging.getLogger(__name__)

KEY_SHAPES = ("circle", "square", "triangle")  # the synthetic set's key objects (training/data/world.py)


def foreground(dataset, i: int) -> np.ndarray | None:
    """The object's silhouette: the dataset's own (:class:`.imagenet_seg.SegmentationSplit`), or on the
    synthetic set the key object's (the union of its shape concepts' masks)."""
    if hasattr(dataset, "foreground_mask"):
        return dataset.foreground_mask(i)
    concepts = getattr(dataset, "concepts", None) or []
    rows = [concepts.index(c) for c in KEY_SHAPES if c in concepts]
    if not rows or not getattr(dataset, "has_masks", False):
        return None
    return dataset.load_masks(i)[rows].any(axis=0)


def sample(dataset, limit: int | None, seed: int) -> list[int]:
    """``limit`` indices of ``dataset`` (all without a limit), a seeded draw in index order: splits are
    sorted by class, so the first N would be a few classes only."""
    n = len(dataset)
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())


CLASS_CONCEPT = "SALF-CBM class concept (paper 4.2)"


def class_concept_index(meta) -> list[int] | None:
    """For a bundle trained in the class-concept mode (``similarity.class_concepts``): the concept index of
    each class's "An image of a {class}" concept; None otherwise."""
    from training.similarity import class_prompts

    template = (meta.similarity or {}).get("class_concepts")
    if not template:
        return None
    prompts = class_prompts(template, list(meta.classes))
    concepts = list(meta.concepts)
    missing = [p for p in prompts if p not in concepts]
    if missing:
        raise ValueError(f"the bundle was trained with class concepts {template!r} but lacks {missing}")
    return [concepts.index(p) for p in prompts]


def localisation(model, classifier: StandardClassifier, dataset, indices: list[int], baselines=BASELINES,
                 batch_size: int = 16, seed: int = 0, keep_examples: int = 4, faithfulness: bool = True,
                 class_concepts: list[int] | None = None) -> dict:
    """``class_concepts``: each class's concept in the class-concept mode (:func:`class_concept_index`);
    its map is then a row of its own (the paper's Table 2 heatmap)."""
    spec = model.backbone.spec
    n = len(indices)
    if n == 0 or foreground(dataset, indices[0]) is None:
        return {"skipped": "the dataset has no object masks (the synthetic set's shape masks)"}
    scores = {"SALF-CBM": metrics.SegmentationScores(), **{b: metrics.SegmentationScores() for b in baselines}}
    if class_concepts is not None:
        scores[CLASS_CONCEPT] = metrics.SegmentationScores()
    unavailable: dict[str, str] = {}
    trivial_names = list(metrics.trivial_maps((2, 2), np.random.default_rng(seed)))
    scores.update({f"trivial: {t}": metrics.SegmentationScores() for t in trivial_names})
    examples = []
    fg_share = []
    curves: dict[str, dict[str, list[float]]] = {}
    for start in range(0, n, batch_size):
        idx = indices[start:start + batch_size]
        items = [dataset[i] for i in idx]
        images = torch.stack([im for im, _ in items])
        labels = torch.tensor([int(y) for _, y in items])
        masks = [foreground(dataset, i) for i in idx]
        fg_share += [float(m.mean()) for m in masks]
        heats = {"SALF-CBM": salf_class_maps(model, images, labels)}
        if class_concepts is not None:
            heats[CLASS_CONCEPT] = salf_concept_class_maps(model, images, torch.tensor(class_concepts)[labels])
        trivial = [metrics.trivial_maps(m.shape, np.random.default_rng([seed, i])) for i, m in zip(idx, masks)]
        for b in baselines:
            if b in unavailable:
                continue
            try:
                heats[b] = baseline_maps(b, classifier, images, labels, spec.mean, spec.std)
            except Exception as exc:  # noqa: BLE001 - a method that cannot run on this backbone says why
                unavailable[b] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                log.warning("%s cannot explain this backbone: %s", b, unavailable[b])
        if faithfulness:
            salf_score = lambda x: model(normalize_uint8(x, spec.mean, spec.std))[2]  # noqa: E731
            std_score = lambda x: classifier(normalize_uint8(x, spec.mean, spec.std))  # noqa: E731
            trivial_batch = {f"trivial: {t}": np.stack([tm[t] for tm in trivial]) for t in trivial_names}
            for name, h in {**heats, **trivial_batch}.items():
                judge = std_score if name in baselines else salf_score  # each method on its own model
                d, ins = deletion_insertion(judge, images, np.asarray(h), labels)
                curves.setdefault(name, {"deletion": [], "insertion": []})
                curves[name]["deletion"] += d.tolist()
                curves[name]["insertion"] += ins.tolist()
        for j, mask in enumerate(masks):
            for name, h in heats.items():
                scores[name].add(h[j], mask)
            for t, h in trivial[j].items():
                scores[f"trivial: {t}"].add(h, mask)
            if len(examples) < keep_examples:
                examples.append({"image": images[j].numpy(), "mask": mask, "label": int(labels[j]),
                                 "heatmaps": {k: v[j] for k, v in heats.items()}})
    rows = {k: v.result() for k, v in scores.items() if k not in unavailable}
    for name, c in curves.items():
        if name in rows:
            rows[name]["deletion_auc"] = float(np.mean(c["deletion"]))
            rows[name]["insertion_auc"] = float(np.mean(c["insertion"]))
    return {"rows": rows, "unavailable": unavailable, "images": n, "foreground_share": float(np.mean(fg_share)),
            "target": "the image's true class", "faithfulness_steps": FAITHFULNESS_STEPS if faithfulness else 0,
            "_examples": examples}
