"""`salfctl eval`: a trained SALF-CBM against the paper's protocols (sections 4.1-4.2, Tables 1-2) and
the standard heatmap methods, on a dataset in the DESIGN layout. Each protocol returns a JSON-ready
dict; :func:`run_eval` runs them all, :mod:`training.quality.report` prints and renders them.

1. **classification** (Table 1 shape): on the same frozen backbone, a standard dense and a standard
   sparse head on the pooled backbone features, and the SALF-CBM's dense and sparse heads on its
   standardised concept scores (the sparse one is the bundle's own head); test accuracy, mean non-zero
   weights per class, and accuracy at NEC = 5 (the regularisation path refit to at most 5 non-zero
   weights per class), so sparsity compares across methods. Same solver as training (GLM-SAGA-style
   elastic net, alpha 0.99).
2. **localisation** (Table 2 shape): each method's heatmap of the image's true class against the
   object's silhouette; pixel accuracy, mIoU and mAP (training/quality/metrics.py) and the pointing
   game; the baselines explain the standard dense model (attributions.py); trivial maps are rows too.
3. **concepts**: per-concept IoU (maps thresholded at half their range, and at their mean) and the
   pointing game against each concept's mask, next to a position-blind baseline (the concept's mean
   map over the split).
4. **rules**: the share of each class's head weight on its defining concepts (synthetic set).
5. **cost**: seconds per explained image, SALF-CBM (one forward: every concept map, the class map and
   five upsampled heatmaps) against GradCAM and Integrated Gradients on the same backbone and batch.
6. **generalisation**: the same scores on the shifted split (other sizes, aspect ratios, object scales,
   backgrounds) beside the test split's, broken down by the object's share of the frame, and the
   two-object images: top-2 classes and per-object Explain Anything.

Supervision: the table says what the CBL was trained on (the bundle's similarity source). With the
``masks`` source the concept maps were supervised with the synthetic set's own concept masks (the
key object's shape masks among them): localisation on that set is then not zero-shot.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from training.evaluate import THRESHOLD_RULES, IoUAccumulator, threshold_maps
from training.model import normalize_uint8, pooled_features

from . import metrics
from .attributions import (BASELINES, StandardClassifier, baseline_maps, salf_class_maps, salf_concept_class_maps,
                           seconds_per_image)

log = logging.getLogger(__name__)

NEC = 5
ALPHA = 0.99
KEY_SHAPES = ("circle", "square", "triangle")  # the synthetic set's key objects (training/data/synth.py)


# ------------------------------------------------------------------ features
@torch.no_grad()
def _features(model, dataset, batch_size: int = 64, limit: int | None = None):
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


def _standardised(train: torch.Tensor, *others: torch.Tensor):
    from training.head import standardisation

    mean, std = standardisation(train)
    return mean, std, [(x - mean) / std for x in (train, *others)]


# ------------------------------------------------------------------ 1. classification
def classification(model, train, test, num_classes: int, val=None) -> tuple[dict, StandardClassifier]:
    from training.head import accuracy, fit_dense, fit_path

    f_tr, s_tr, _, y_tr = train
    f_te, s_te, logits_te, y_te = test
    f_va = s_va = y_va = None
    if val is not None:
        f_va, s_va, _, y_va = val
    f_mean, f_std, fs = _standardised(f_tr, f_te, *( [f_va] if f_va is not None else []))
    f_tr_z, f_te_z = fs[0], fs[1]
    f_va_z = fs[2] if f_va is not None else None
    own = model.head.linear.weight.detach()
    budget = max(1, int((own != 0).sum(dim=1).max()))
    rows = {}

    def row(name, fit, x_te, concepts=None):
        nz = (fit.weight != 0).sum(dim=1).float()
        rows[name] = {"accuracy": accuracy(x_te, y_te, fit.weight, fit.bias), "nonzero_per_class": float(nz.mean()),
                      "concepts": concepts}

    dense = fit_dense(f_tr_z, y_tr, num_classes, 1e-3, f_va_z, y_va)
    row("standard dense", dense, f_te_z)
    row("standard sparse", fit_path(f_tr_z, y_tr, num_classes, ALPHA, budget, x_val=f_va_z, y_val=y_va), f_te_z)
    row("SALF-CBM dense", fit_dense(s_tr, y_tr, num_classes, 1e-3, s_va, y_va), s_te, s_tr.shape[1])
    kept = int((own != 0).any(dim=0).sum())
    rows["SALF-CBM sparse (the bundle's head)"] = {
        "accuracy": float((logits_te.argmax(1) == y_te).float().mean()),
        "nonzero_per_class": float((own != 0).sum(dim=1).float().mean()), "concepts": kept}
    nec = {"standard": fit_path(f_tr_z, y_tr, num_classes, ALPHA, NEC, x_val=f_va_z, y_val=y_va),
           "SALF-CBM": fit_path(s_tr, y_tr, num_classes, ALPHA, NEC, x_val=s_va, y_val=y_va)}
    for name, fit in nec.items():
        key = next(k for k in rows if k.startswith(name) and ("sparse" in k))
        rows[key][f"accuracy_nec{NEC}"] = accuracy(f_te_z if name == "standard" else s_te, y_te, fit.weight, fit.bias)
    classifier = StandardClassifier(model, f_mean, f_std, dense.weight, dense.bias).eval()
    return {"rows": rows, "sparse_budget_per_class": budget, "nec": NEC, "test_images": int(len(y_te))}, classifier


# ------------------------------------------------------------------ 2. localisation
def foreground(dataset, i: int) -> np.ndarray | None:
    """The object's silhouette: the dataset's own (:class:`SegmentationSplit`), or on the synthetic set the
    key object's (the union of its shape concepts' masks)."""
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


# ------------------------------------------------------------------ faithfulness
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


# ------------------------------------------------------------------ 3. concepts
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
    n = len(indices)
    all_maps, all_masks = [], []
    for start in range(0, n, batch_size):
        idx = indices[start:start + batch_size]
        images = torch.stack([dataset[i][0] for i in idx])
        maps, _, _ = model(normalize_uint8(images, spec.mean, spec.std))
        all_maps.append(maps[:, sel])
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
                    keep_gallery: int = 6, gallery_k: int = 5) -> dict:
    """Each concept neuron's top-k test images by its global activation, with precision@k against the
    concept's presence (its mask non-empty); baseline: the backbone channel that best retrieves the
    concept on the *train* split (top-k precision, ties by mean activation gap), scored the same way
    on test. ``k`` 50: at 5 every neuron and channel scored 1.0 on the demo's test split (a concept is
    in 12-50% of its images), so 5 told nothing; the gallery shows the top ``gallery_k``.
    ``*_feats``: :func:`_features` tuples (pooled backbone features, concept scores, ...)."""
    k = max(1, min(k, len(test_feats[0]), len(train_feats[0])))
    if not getattr(test_ds, "has_masks", False) or test_ds.concepts is None:
        return {"skipped": "the dataset has no concept masks"}
    names = [c for c in concepts if c in test_ds.concepts]
    if not names:
        return {"skipped": "none of the model's concepts has a mask in the dataset"}
    rows = [test_ds.concepts.index(c) for c in names]
    present_te = _presence(test_ds, list(range(len(test_ds))), rows)
    present_tr = _presence(train_ds, list(range(len(train_feats[0]))), rows)
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


# ------------------------------------------------------------------ 4. rules
def defining_concepts(classes: list[str]) -> dict[str, list[str]]:
    """The synthetic set's class -> its defining concepts (shape + texture, or circle + string/grass)."""
    from training.data.synth import CLASSES

    rules = {}
    for rule in CLASSES:
        if rule.name in classes:
            extra = rule.texture if rule.texture else ("string" if rule.placement == "balloon" else "grass")
            rules[rule.name] = [rule.shape, extra]
    return rules


def rules(model, concepts: list[str], classes: list[str]) -> dict:
    defining = defining_concepts(classes)
    if defining and not any(x in concepts for d in defining.values() for x in d):
        return {"skipped": "none of the classes' defining concepts is among the model's (a class-concept model?)"}
    if not defining:
        return {"skipped": "no defining concepts known for these classes (the synthetic set's)"}
    w = model.head.linear.weight.detach().numpy()
    idx = {classes.index(c): [concepts.index(x) for x in d if x in concepts] for c, d in defining.items()}
    share = metrics.weight_share(w, idx)
    per_class = {classes[k]: v for k, v in share.items()}
    top = {classes[k]: [(concepts[m], float(w[k, m])) for m in np.argsort(-np.abs(w[k]))[:4] if w[k, m] != 0]
           for k in idx}
    terms = {c: [(concepts[m], float(w[k, m])) for m in np.argsort(-np.abs(w[k]), kind="stable") if w[k, m] != 0]
             for k, c in enumerate(classes)}
    return {"share": per_class, "mean_share": float(np.nanmean(list(per_class.values()))),
            "defining": defining, "top_weights": top, "terms": terms}


# ------------------------------------------------------------------ 5. cost
def cost(model, classifier: StandardClassifier, dataset, batch: int = 8, repeats: int = 3) -> dict:
    spec = model.backbone.spec
    images = torch.stack([dataset[i][0] for i in range(min(batch, len(dataset)))])

    @torch.no_grad()
    def salf(x):
        maps, scores, logits = model(normalize_uint8(x, spec.mean, spec.std))
        target = logits.argmax(1)
        contrib = model.head.linear.weight[target] * scores
        top = contrib.topk(min(5, maps.shape[1]), dim=1).indices
        chosen = torch.stack([maps[b, top[b]] for b in range(len(x))])
        return torch.nn.functional.interpolate(chosen, size=tuple(x.shape[1:3]), mode="bilinear", align_corners=False)

    def with_target(method):
        def run(x):
            with torch.no_grad():
                target = classifier(normalize_uint8(x, spec.mean, spec.std)).argmax(1)
            return baseline_maps(method, classifier, x, target, spec.mean, spec.std)
        return run

    out = {"batch": len(images), "seconds_per_image": {"SALF-CBM": seconds_per_image(salf, images, repeats)}}
    for method in ("GradCAM", "Integrated Gradients"):
        out["seconds_per_image"][method] = seconds_per_image(with_target(method), images, repeats)
    base = out["seconds_per_image"]["SALF-CBM"]
    out["times_cheaper"] = {k: v / base for k, v in out["seconds_per_image"].items() if k != "SALF-CBM"}
    return out


# ------------------------------------------------------------------ 6. generalisation
SIZE_BUCKETS = ((0.0, 0.05, "object < 5% of the frame"), (0.05, 0.15, "5-15%"), (0.15, 1.01, ">= 15%"))


@torch.no_grad()
def _per_image(model, classifier: StandardClassifier, dataset, indices: list[int], batch_size: int = 32) -> dict:
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


def _split_summary(records: dict) -> dict:
    """Accuracy, pointing, object share and the size breakdown of :func:`_per_image` records."""
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
    records = _per_image(model, classifier, shifted, chosen)
    out = _split_summary(records)
    out["localisation"] = localisation(model, classifier, shifted, chosen, baselines, seed=seed, keep_examples=0,
                                       faithfulness=faithfulness, class_concepts=class_concepts)
    out["concepts_localisation"] = concept_localisation(model, concepts, shifted, chosen)
    if (root / "shifted-pairs").is_dir():
        out["pairs"] = pairs(model, classifier, ImageFolderSplit(root, "shifted-pairs", size), concepts, classes)
    return out


# ------------------------------------------------------------------ ImageNet-segmentation (paper Table 2)
class SegmentationSplit:
    """(image, object mask) pairs (``readers.ImageNetSegmentation``) as :func:`localisation` reads a split:
    images squashed to the model's input (bilinear, the serving preprocessing), masks resized nearest;
    the label of an image is the SALF-CBM's predicted class (the file has no labels: the protocol
    explains the predicted class)."""

    has_masks = True
    concepts = None

    def __init__(self, reader, input_size: tuple[int, int], model) -> None:
        self.reader, self.input_size, self.model = reader, tuple(input_size), model
        self._predicted: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.reader)

    def _image(self, i: int) -> np.ndarray:
        from PIL import Image

        from salf.contract.images import model_input

        return model_input(Image.fromarray(self.reader[i][0]), self.input_size)

    @torch.no_grad()
    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self._image(i))
        if i not in self._predicted:
            spec = self.model.backbone.spec
            self._predicted[i] = int(self.model(normalize_uint8(image[None], spec.mean, spec.std))[2].argmax())
        return image, self._predicted[i]

    def foreground_mask(self, i: int) -> np.ndarray:
        from training.data.folder import resize_masks_nearest

        return resize_masks_nearest(self.reader[i][1][None], self.input_size)[0]


class SalfLogits(torch.nn.Module):
    """The SALF-CBM as a plain classifier (normalised images -> logits) for the gradient baselines when
    no standard head can be fitted (no train split): GradCAM & co. then explain the SALF-CBM itself."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.backbone = model, model.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[2]


def imagenet_segmentation(model, path: str | Path, input_size: tuple[int, int], classifier=None,
                          baselines=BASELINES, limit: int | None = None, seed: int = 0,
                          class_concepts: list[int] | None = None) -> dict:
    """Table 2 on ``gtsegs_ijcv.mat`` (:class:`readers.ImageNetSegmentation`): every heatmap of the
    predicted class against the annotated object. ``classifier``: the standard model the baselines
    explain (default: the SALF-CBM itself, :class:`SalfLogits`)."""
    from .readers import ImageNetSegmentation

    split = SegmentationSplit(ImageNetSegmentation(path), input_size, model)
    explained = "the standard dense model" if classifier is not None else "the SALF-CBM itself"
    out = localisation(model, classifier if classifier is not None else SalfLogits(model).eval(), split,
                       sample(split, limit, seed), baselines, seed=seed, keep_examples=0,
                       class_concepts=class_concepts)
    out.update(file=str(path), target="the SALF-CBM's predicted class", baselines_explain=explained)
    return out


# ------------------------------------------------------------------ all of it
def run_imagenet_segmentation(bundle: str | Path, path: str | Path, limit: int | None = None, baselines=BASELINES,
                              seed: int = 0) -> dict:
    """Only the ImageNet-segmentation protocol (no dataset to fit a standard head on)."""
    from training.bundle import load_bundle

    torch.manual_seed(seed)
    model, meta = load_bundle(bundle)
    return {"bundle": str(bundle), "seed": seed, "supervision": (meta.similarity or {}).get("source", "unknown"),
            "concepts": list(meta.concepts), "classes": list(meta.classes),
            "class_concepts": (meta.similarity or {}).get("class_concepts"),
            "imagenet_segmentation": imagenet_segmentation(model, path, meta.backbone.input_size, None, baselines,
                                                           limit, seed, class_concept_index(meta))}


def run_eval(bundle: str | Path, data: str | Path, limit: int | None = None, baselines=BASELINES, seed: int = 0,
             train_limit: int | None = None, imagenet_seg: str | Path | None = None) -> dict:
    """Every protocol on ``bundle`` with ``data`` (train split for the heads, val when present, test for
    the scores); ``limit``: test images for localisation (default all); ``train_limit``: train images."""
    from training.bundle import load_bundle
    from training.data.folder import ImageFolderSplit

    torch.manual_seed(seed)
    model, meta = load_bundle(bundle)
    size = meta.backbone.input_size
    train = ImageFolderSplit(data, "train", size)
    test = ImageFolderSplit(data, "test", size)
    val = ImageFolderSplit(data, "val", size) if (Path(data) / "val").is_dir() else None
    chosen = sample(test, limit, seed)
    n_test = len(chosen)
    log.info("features of train%s and test", " and val" if val else "")
    f_train = _features(model, train, limit=train_limit)
    f_val = _features(model, val) if val is not None else None
    f_test = _features(model, test)
    doc = {"bundle": str(bundle), "data": str(data), "seed": seed,
           "supervision": (meta.similarity or {}).get("source", "unknown"),
           "concepts": list(meta.concepts), "classes": list(meta.classes)}
    log.info("1/5 classification")
    doc["classification"], classifier = classification(model, f_train, f_test, len(meta.classes), f_val)
    log.info("2/5 localisation on %d test images", n_test)
    class_concepts = class_concept_index(meta)
    doc["class_concepts"] = (meta.similarity or {}).get("class_concepts")
    doc["localisation"] = localisation(model, classifier, test, chosen, baselines, seed=seed,
                                       class_concepts=class_concepts)
    log.info("3/5 concept localisation")
    doc["concepts_localisation"] = concept_localisation(model, list(meta.concepts), test, chosen)
    log.info("concept neurons")
    doc["concept_neurons"] = concept_neurons(list(meta.concepts), train, test, f_train, f_test)
    log.info("4/5 rules")
    doc["rules"] = rules(model, list(meta.concepts), list(meta.classes))
    log.info("5/5 cost of an explanation")
    doc["cost"] = cost(model, classifier, test)
    log.info("generalisation: the shifted splits")
    doc["generalisation"] = generalisation(model, classifier, data, size, list(meta.concepts), list(meta.classes),
                                           baselines, limit=limit, seed=seed, class_concepts=class_concepts)
    if imagenet_seg is not None:
        log.info("ImageNet-segmentation: %s", imagenet_seg)
        doc["imagenet_segmentation"] = imagenet_segmentation(model, imagenet_seg, size, classifier, baselines, limit,
                                                             seed, class_concepts)
    if "skipped" not in doc["generalisation"]:
        # the in-distribution figures the shifted ones sit beside (the same definitions, on the test split)
        records = _per_image(model, classifier, test, chosen)
        doc["generalisation"]["in_distribution"] = _split_summary(records)
    return doc
