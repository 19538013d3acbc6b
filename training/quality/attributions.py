"""Class heatmaps of the SALF-CBM and of the paper's baselines, on the same backbone and images.

* SALF-CBM: ``sum_m W[c, m] * map_m`` (the class's contribution-weighted concept maps), upsampled
  bilinearly to the image. One forward pass gives every class's map.
* Baselines explain the *standard* model of Table 1: the same frozen backbone with a dense linear head
  on its pooled features (:class:`StandardClassifier`). GradCAM, GradCAM++, ScoreCAM and FullGrad from
  the ``grad-cam`` package (target layer: the backbone's last convolution), Integrated Gradients and
  LRP from ``captum`` (|attribution| summed over colour channels). LRP needs every layer to have a
  rule in captum; where the backbone has one without (a resize, an op captum cannot see through), the
  method reports why instead of a number.
Every method returns ``[B, H, W]`` float heatmaps for the requested classes.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.model import SalfCBM, normalize_uint8, pooled_features

log = logging.getLogger(__name__)

from .baselines import BASELINES  # noqa: E402 - the names live where the CLI can read them without torch


class StandardClassifier(nn.Module):
    """Backbone -> pooled features (the grid-resized map averaged, as Table 1's standard heads see it)
    -> standardised -> dense linear head. Takes normalised float images ``[B, 3, H, W]``."""

    def __init__(self, model: SalfCBM, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.grid = model.grid
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.backbone(x), self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((self.pooled(x) - self.mean) / self.std)


def last_conv(module: nn.Module) -> nn.Module:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(module).__name__} has no Conv2d layer for the CAM methods")
    return convs[-1]


@torch.no_grad()
def salf_class_maps(model: SalfCBM, images: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """uint8 images ``[B, H, W, 3]`` -> ``[B, H, W]`` contribution-weighted class heatmaps."""
    spec = model.backbone.spec
    maps, _, _ = model(normalize_uint8(images, spec.mean, spec.std))
    weight = model.head.linear.weight[classes]  # [B, M]
    heat = torch.einsum("bm,bmhw->bhw", weight, maps)
    return F.interpolate(heat[:, None], size=tuple(images.shape[1:3]), mode="bilinear",
                         align_corners=False)[:, 0].numpy()


@torch.no_grad()
def salf_concept_class_maps(model: SalfCBM, images: torch.Tensor, concepts: torch.Tensor) -> np.ndarray:
    """The class-concept mode's heatmaps (paper 4.2): concept ``concepts[b]``'s map of image ``b``,
    upsampled to ``[B, H, W]``."""
    spec = model.backbone.spec
    maps, _, _ = model(normalize_uint8(images, spec.mean, spec.std))
    heat = maps[torch.arange(len(images)), concepts]
    return F.interpolate(heat[:, None], size=tuple(images.shape[1:3]), mode="bilinear",
                         align_corners=False)[:, 0].numpy()


def baseline_maps(method: str, classifier: StandardClassifier, images: torch.Tensor, classes: torch.Tensor,
                  mean, std, ig_steps: int = 16) -> np.ndarray:
    """``method`` (one of :data:`BASELINES`) on uint8 ``images`` for ``classes``: ``[B, H, W]``."""
    x = normalize_uint8(images, mean, std)
    targets = [int(c) for c in classes]
    if method in ("GradCAM", "GradCAM++", "ScoreCAM", "FullGrad"):
        from pytorch_grad_cam import FullGrad, GradCAM, GradCAMPlusPlus, ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        kind = {"GradCAM": GradCAM, "GradCAM++": GradCAMPlusPlus, "ScoreCAM": ScoreCAM, "FullGrad": FullGrad}[method]
        layers = [] if method == "FullGrad" else [last_conv(classifier.backbone)]
        with kind(model=classifier, target_layers=layers) as cam:
            if method == "ScoreCAM":
                cam.batch_size = 32
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
        return np.asarray(out, dtype=np.float64)
    if method == "Integrated Gradients":
        from captum.attr import IntegratedGradients

        attr = IntegratedGradients(classifier).attribute(x, baselines=torch.zeros_like(x), target=targets,
                                                          n_steps=ig_steps, internal_batch_size=len(x) * ig_steps)
        return attr.abs().sum(dim=1).detach().numpy()
    if method == "LRP":
        from captum.attr import LRP

        attr = LRP(classifier).attribute(x.clone().requires_grad_(True), target=targets)
        return attr.abs().sum(dim=1).detach().numpy()
    raise ValueError(f"unknown method {method!r}; choose from {BASELINES}")


def seconds_per_image(fn, images: torch.Tensor, repeats: int = 3) -> float:
    """Median wall time of ``fn(images)`` over ``repeats`` runs (after one warm-up), per image."""
    fn(images)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / len(images)
