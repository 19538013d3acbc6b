"""The SALF-CBM network: backbone -> grid resize -> 1x1 CBL -> concept maps -> pool -> standardise -> head.

Shapes used throughout: ``B`` images, ``D`` backbone channels, ``M`` concepts, ``L`` classes,
``Gh x Gw`` the prompting grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone

POOLINGS = ("avg", "softmax")


def resize_to_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, D, h, w]`` -> ``[B, D, Gh, Gw]``, bilinear (paper 3.3), ``align_corners=False``."""
    if tuple(features.shape[-2:]) == tuple(grid):
        return features
    return F.interpolate(features, size=tuple(grid), mode="bilinear", align_corners=False)


def pooled_features(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, D, h, w]`` backbone features -> ``[B, D]``: resized to the grid, averaged (what the standard
    heads of the dense baseline and of Table 1 see)."""
    return resize_to_grid(features, grid).mean(dim=(2, 3))


def pool_maps(maps: torch.Tensor, pooling: str) -> torch.Tensor:
    """Concept maps ``[B, M, Gh, Gw]`` -> global activations ``c*`` ``[B, M]``.

    ``avg``: spatial mean (paper default). ``softmax``: ``sum_hw x * softmax_hw(x)``, the pooling of
    the authors' released inference code.
    """
    flat = maps.flatten(2)
    if pooling == "avg":
        return flat.mean(dim=2)
    if pooling == "softmax":
        return (flat * torch.softmax(flat, dim=2)).sum(dim=2)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


class SalfHead(nn.Module):
    """Concept maps -> (standardised concept scores ``[B, M]``, logits ``[B, L]``).

    This is the part local intervention re-runs: ``scores = (pool(maps) - mean) / std`` and
    ``logits = scores @ W.T + b``.
    """

    def __init__(self, num_concepts: int, num_classes: int, pooling: str = "avg") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.pooling = pooling
        self.register_buffer("concept_mean", torch.zeros(num_concepts))
        self.register_buffer("concept_std", torch.ones(num_concepts))
        self.linear = nn.Linear(num_concepts, num_classes)

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (pool_maps(maps, self.pooling) - self.concept_mean) / self.concept_std
        return scores, self.linear(scores)


class ConceptBottleneck(nn.Module):
    """Backbone features -> concept maps ``[B, M, Gh, Gw]`` via a bias-free 1x1 conv on the grid."""

    def __init__(self, in_channels: int, num_concepts: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.conv = nn.Conv2d(in_channels, num_concepts, kernel_size=1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(resize_to_grid(features, self.grid))


class SalfCBM(nn.Module):
    """Full model. ``forward(x)`` takes *normalised* float images ``[B, 3, H, W]`` and returns
    ``(concept_maps [B, M, Gh, Gw], concept_scores [B, M], logits [B, L])``.
    """

    def __init__(self, backbone: Backbone, feature_dim: int, num_concepts: int, num_classes: int,
                 grid: tuple[int, int] = (7, 7), pooling: str = "avg") -> None:
        super().__init__()
        self.backbone = backbone
        self.cbl = ConceptBottleneck(feature_dim, num_concepts, grid)
        self.head = SalfHead(num_concepts, num_classes, pooling)

    @property
    def grid(self) -> tuple[int, int]:
        return self.cbl.grid

    def concept_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbl(self.backbone(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps = self.concept_maps(x)
        scores, logits = self.head(maps)
        return maps, scores, logits


def normalize_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 (what clients send) -> normalised ``[B, 3, H, W]`` float32."""
    x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
