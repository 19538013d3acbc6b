"""`salfctl eval`'s run: a bundle loaded, its dataset's splits read, every protocol run in turn into one
JSON-ready document (:func:`run_eval`), or the ImageNet-segmentation protocol alone."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..attributions import BASELINES
from .classification import classification
from .concepts import concept_localisation, concept_neurons
from .cost import cost
from .features import dataset_features
from .generalisation import generalisation, per_image, split_summary
from .imagenet_seg import imagenet_segmentation
from .localisation import class_concept_index, localisation, sample
from .rules import rules

log = logging.getLogger(__name__)


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
    f_train = dataset_features(model, train, limit=train_limit)
    f_val = dataset_features(model, val) if val is not None else None
    f_test = dataset_features(model, test)
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
        records = per_image(model, classifier, test, chosen)
        doc["generalisation"]["in_distribution"] = split_summary(records)
    return doc
