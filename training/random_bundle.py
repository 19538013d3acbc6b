"""A SALF-CBM of any configuration with random weights, written as a real bundle: for serving,
export and benchmarks at sizes no dataset here can train (the paper's ImageNet ResNet-50: M = 4741
concepts, L = 1000 classes, 30 non-zero weights per class).

What is random and how (seeded, so two runs on one machine write the same bundle):
- the backbone: the preset's architecture with random initialisation (``weights="random"``), the
  preset's own weights (``"preset"``, e.g. ``torchvision:IMAGENET1K_V1``, which must be in the local
  torch hub cache), or a local checkpoint path (``.safetensors`` or a state dict);
- the concept bottleneck: the 1x1 convolution's default (Kaiming-uniform) initialisation;
- the head: per class, ``nonzero_per_class`` concepts drawn without replacement, weights N(0, 1) with
  their sign kept, bias N(0, 0.1); the standardisation (concept mean/std) N(0, 0.1) and U(0.5, 1.5),
  so the head sees standardised activations of the same order as a trained model's.
Names: ``concept 0 .. M-1`` and ``class_0 .. class_L-1`` unless name files are given (one per line).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

WEIGHT_CHOICES = ("random", "preset")


def random_bundle(out: str | Path, backbone, *, num_concepts: int, num_classes: int, nonzero_per_class: int,
                  grid=(7, 7), radius: int = 32, pooling: str = "avg", seed: int = 0,
                  concepts: list[str] | None = None, classes: list[str] | None = None) -> Path:
    """Write the bundle of a random SALF-CBM on ``backbone`` (a :class:`training.backbones.BackboneSpec`)."""
    import torch

    from .backbones import build_backbone
    from .bundle import BundleMeta, save_bundle
    from .model import SalfCBM

    if num_concepts < 1 or num_classes < 1:
        raise ValueError(f"need at least one concept and one class, got {num_concepts} and {num_classes}")
    if not 1 <= nonzero_per_class <= num_concepts:
        raise ValueError(f"nonzero_per_class must be in [1, {num_concepts}], got {nonzero_per_class}")
    concepts = list(concepts) if concepts is not None else [f"concept {i}" for i in range(num_concepts)]
    classes = list(classes) if classes is not None else [f"class_{i}" for i in range(num_classes)]
    if len(concepts) != num_concepts or len(classes) != num_classes:
        raise ValueError(f"{len(concepts)} concept names for {num_concepts} concepts, "
                         f"{len(classes)} class names for {num_classes} classes")
    torch.manual_seed(seed)
    net = build_backbone(backbone)
    d = net.feature_shape()[0]
    model = SalfCBM(net, d, num_concepts, num_classes, tuple(grid), pooling).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.zeros(num_classes, num_concepts)
        for row in range(num_classes):
            picked = torch.randperm(num_concepts, generator=gen)[:nonzero_per_class]
            w[row, picked] = torch.randn(nonzero_per_class, generator=gen)
        model.head.linear.weight.copy_(w)
        model.head.linear.bias.copy_(torch.randn(num_classes, generator=gen) * 0.1)
        model.head.concept_mean.copy_(torch.randn(num_concepts, generator=gen) * 0.1)
        model.head.concept_std.copy_(torch.rand(num_concepts, generator=gen) + 0.5)
    meta = BundleMeta(backbone=backbone, feature_dim=d, concepts=concepts, classes=classes, grid=tuple(grid),
                      radius=radius, pooling=pooling, similarity={"source": "random"},
                      training={"seed": seed, "random": True, "backbone_weights": backbone.weights or "random",
                                "nonzero_per_class": nonzero_per_class})
    return save_bundle(out, model, meta)


def from_config(out: str | Path, config: str, *, classes: int | None = None, concepts: int | None = None,
                nonzero_per_class: int | None = None, weights: str = "random", seed: int | None = None,
                concept_names: Path | None = None, class_names: Path | None = None) -> Path:
    """:func:`random_bundle` at a preset's configuration (backbone, layer, input size, grid, radius,
    pooling, head sparsity). Sizes default to the names files' lengths, else the paper's ImageNet
    figures (4741 concepts, 1000 classes)."""
    from .config import load_config

    cfg = load_config(config)
    concept_list = _names(concept_names)
    class_list = _names(class_names)
    m = concepts or (len(concept_list) if concept_list else 4741)
    n = classes or (len(class_list) if class_list else 1000)
    spec = cfg.backbone
    if weights == "random":
        spec = replace(spec, weights=None)
    elif weights != "preset":
        if not Path(weights).is_file():
            raise FileNotFoundError(f"backbone weights {weights} do not exist (or use 'random' / 'preset')")
        spec = replace(spec, weights=str(weights))
    k = nonzero_per_class or min(cfg.head.target_nonzero_per_class, m)
    return random_bundle(out, spec, num_concepts=m, num_classes=n, nonzero_per_class=k, grid=cfg.grid,
                         radius=cfg.radius, pooling=cfg.pooling, seed=cfg.seed if seed is None else seed,
                         concepts=concept_list, classes=class_list)


def _names(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no names")
    return names
