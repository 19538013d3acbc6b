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
             train_limit: int | None = None, imagenet_seg: str | Path | None = None,
             device: str | torch.device | None = "cpu", num_workers: int = 0) -> dict | None:
    """Every protocol on ``bundle`` with ``data`` (train split for the heads, val when present, test for
    the scores); ``limit``: test images for localisation (default all, a seeded draw otherwise);
    ``train_limit``: train images for the heads' fit (the standard models' and the SALF-CBM dense head)
    and the concept neurons' channel baseline, a seeded draw of that many (the same draw as ``limit``'s,
    :func:`.localisation.sample`: train splits are sorted by class, so the first N would be a few classes);
    default every train image.

    ``device`` (``training.runtime.resolve_device``: ``auto``, ``cpu``, ``cuda``...): the model runs there
    for the feature passes over the train, val and test splits (:func:`.features.dataset_features`,
    ``num_workers`` decoding processes), the part that grows with the dataset; the protocols after them
    run on the CPU, on the ``limit`` sample (their heatmaps, ``training/quality/attributions.py``, are
    numpy from the model's outputs). The library default is ``cpu``; ``salfctl eval``'s is ``auto``.

    Under ``torchrun`` every rank computes its share of the feature passes and receives all of them; the
    protocols then run on rank 0 alone, and the other ranks return None."""
    from training.bundle import load_bundle
    from training.data.folder import ImageFolderSplit
    from training.distributed import distributed_context
    from training.runtime import resolve_device

    torch.manual_seed(seed)
    dev = resolve_device(device)
    model, meta = load_bundle(bundle)
    size = meta.backbone.input_size
    train = ImageFolderSplit(data, "train", size)
    test = ImageFolderSplit(data, "test", size)
    val = ImageFolderSplit(data, "val", size) if (Path(data) / "val").is_dir() else None
    chosen = sample(test, limit, seed)
    n_test = len(chosen)
    train_chosen = sample(train, train_limit, seed)
    rank, world, created = distributed_context()  # one process group for the three passes (it sets the GPU)
    try:
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())  # torchrun: this rank's GPU
        model.to(dev)
        log.info("features of train (%d images)%s and test on %s%s", len(train_chosen), " and val" if val else "",
                 dev, f", rank {rank} of {world}" if world > 1 else "")
        f_train = dataset_features(model, train, indices=train_chosen, num_workers=num_workers)
        f_val = dataset_features(model, val, num_workers=num_workers) if val is not None else None
        f_test = dataset_features(model, test, num_workers=num_workers)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return None
    model.cpu()  # the protocols below run on the CPU (see the docstring)
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
    doc["concept_neurons"] = concept_neurons(list(meta.concepts), train, test, f_train, f_test,
                                           train_indices=train_chosen)
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
