"""The ImageNet-segmentation protocol (paper Table 2): ``gtsegs_ijcv.mat`` read as a split localisation
scores, the predicted class explained."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.model import normalize_uint8

from ..attributions import BASELINES
from .localisation import localisation, sample


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
    from ..readers import ImageNetSegmentation

    split = SegmentationSplit(ImageNetSegmentation(path), input_size, model)
    explained = "the standard dense model" if classifier is not None else "the SALF-CBM itself"
    out = localisation(model, classifier if classifier is not None else SalfLogits(model).eval(), split,
                       sample(split, limit, seed), baselines, seed=seed, keep_examples=0,
                       class_concepts=class_concepts)
    out.update(file=str(path), target="the SALF-CBM's predicted class", baselines_explain=explained)
    return out
