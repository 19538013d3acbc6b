"""`salfctl train backbone`: train the backbone with a linear classifier on pooled features.

No pre-trained weights can be downloaded on the project's machines, so the demo first trains the
small ``salf_tinycnn`` on the synthetic training split: it stands in for the pre-trained backbone
a user brings. The result is ``RUN/backbone/backbone.safetensors`` (the adapter's state dict,
loadable as ``BackboneSpec.weights``) and ``RUN/backbone/backbone.json`` (spec, epochs, accuracy,
SHA-256). The classifier is thrown away: SALF-CBM only keeps the frozen feature extractor.

A broader pre-training task (``backbone_train.concept_presence``): besides the downstream classes, a
second linear head predicts which of the dataset's concepts each image shows (image-level presence
from its masks, no locations; binary cross-entropy). The paper's backbones are pre-trained on a task far
broader than the CBM's classes (ImageNet's labels name colours, textures and scenes), so their
features encode concepts the downstream classes never ask for; a stand-in trained on the 8 downstream
classes alone has no reason to encode colour or background, and the CBL cannot find them. Presence
labels move with the zoom augmentation (the masks are warped with the image, at a quarter of its
resolution).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .augment import AffineRange, warp_batch
from .backbones import Backbone, BackboneSpec, build_backbone
from .config import BackboneTrainCfg
from .runtime import atomic_write_json, progress as progress_bar, resolve_device, save_tensors, seed_everything
from .model import normalize_uint8

log = logging.getLogger(__name__)

WEIGHTS_FILE = "backbone.safetensors"
META_FILE = "backbone.json"


@dataclass
class BackboneTrainResult:
    path: Path  # the weights file
    train_accuracy: float
    seconds: float


class _Classifier(nn.Module):
    """Backbone -> global average pool -> linear layer (the usual pre-training head), and optionally a
    second linear layer for concept presence (``num_concepts`` logits)."""

    def __init__(self, backbone: Backbone, num_classes: int, num_concepts: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_shape()[0], num_classes)
        self.presence = nn.Linear(backbone.feature_shape()[0], num_concepts) if num_concepts else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled = self.backbone(x).mean(dim=(2, 3))
        return self.fc(pooled), (self.presence(pooled) if self.presence is not None else None)


class _WithMasks(torch.utils.data.Dataset):
    """Items ``(image, label, masks)``: the split's concept masks at a quarter of the input size (nearest),
    small enough to warp with the batch."""

    def __init__(self, split) -> None:
        self.split = split
        h, w = split.input_size
        self.size = (max(1, h // 4), max(1, w // 4))
        self._masks: dict[int, torch.Tensor] = {}  # read once: every epoch needs them (1600 x 19 x 28 x 28 bits)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        from .data.folder import resize_masks_nearest

        image, label = self.split[i]
        if i not in self._masks:
            self._masks[i] = torch.from_numpy(resize_masks_nearest(self.split.load_masks(i), self.size))
        return image, label, self._masks[i]


def augment(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Light augmentation of a normalised batch ``[B, 3, H, W]``: random translation by up to ``pad``
    pixels (reflect-pad + crop) and horizontal flips. No vertical flips: some classes are defined
    by where an object is (balloon up, ball down)."""
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)


def train_backbone(spec: BackboneSpec, dataset, num_classes: int, cfg: BackboneTrainCfg, out_dir: str | Path,
                   seed: int = 0, device: str | torch.device | None = "auto", num_workers: int = 0,
                   progress: bool = True) -> BackboneTrainResult:
    """Train ``spec``'s backbone (from its current weights) plus a linear classifier on ``dataset``
    (items: uint8 ``[H, W, 3]``, label); write the backbone to ``out_dir``. Cross-entropy, AdamW,
    cosine learning-rate decay."""
    if cfg.epochs < 1:
        raise ValueError("backbone_train.epochs must be >= 1")
    dev = resolve_device(device)
    gen = seed_everything(seed)
    presence = bool(cfg.concept_presence)
    if presence and not (getattr(dataset, "has_masks", False) and dataset.concepts):
        raise ValueError("backbone_train.concept_presence needs a dataset with concept masks (concepts.txt + masks/)")
    num_concepts = len(dataset.concepts) if presence else 0
    model = _Classifier(build_backbone(spec), num_classes, num_concepts).to(dev)
    loader = torch.utils.data.DataLoader(_WithMasks(dataset) if presence else dataset, batch_size=cfg.batch_size,
                                         shuffle=True, generator=gen, num_workers=num_workers,
                                         drop_last=len(dataset) > cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * len(loader),
                                                pct_start=0.15)
    pad = max(1, spec.input_size[0] // 16) if cfg.augment else 0
    zoom = AffineRange(zoom=tuple(cfg.zoom)) if cfg.zoom else None
    start = time.perf_counter()
    epochs = progress_bar(range(cfg.epochs), "backbone", progress, unit="epoch")
    correct = seen = 0
    for _ in epochs:
        model.train()
        correct = seen = 0
        for batch in loader:
            images, labels = batch[0], batch[1]
            masks = batch[2].float() if presence else None
            x = normalize_uint8(images, spec.mean, spec.std)
            if cfg.augment and zoom is not None and masks is not None:
                x, masks = warp_batch(x, gen, zoom, masks)
            elif cfg.augment and zoom is not None:
                x = warp_batch(x, gen, zoom)
            elif cfg.augment:
                x = augment(x, gen, pad)  # a pad-crop shift keeps what is present (masks unused)
            x, labels = x.to(dev), labels.to(dev)
            logits, presence_logits = model(x)
            loss = F.cross_entropy(logits, labels)
            if presence:
                target = (masks.flatten(2) > 0.5).any(dim=2).float().to(dev)
                loss = loss + F.binary_cross_entropy_with_logits(presence_logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        if progress:
            epochs.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / max(seen, 1):.3f}")
    seconds = time.perf_counter() - start
    path = save_backbone(model.backbone, out_dir, {"epochs": cfg.epochs, "lr": cfg.lr, "seed": seed,
                                                    "train_accuracy_last_epoch": correct / max(seen, 1),
                                                    "seconds": seconds})
    log.info("backbone trained in %.0f s (last-epoch train accuracy %.3f) -> %s", seconds, correct / max(seen, 1), path)
    return BackboneTrainResult(path, correct / max(seen, 1), seconds)


def save_backbone(backbone: Backbone, out_dir: str | Path, info: dict) -> Path:
    """Write the adapter's weights (atomically) and ``backbone.json``; returns the weights path."""
    out = Path(out_dir)
    path = out / WEIGHTS_FILE
    record = save_tensors(path, backbone.state_dict())
    spec = replace(backbone.spec, weights=str(path.resolve()))
    atomic_write_json(out / META_FILE, {"spec": spec.to_dict(), "sha256": record["sha256"], "training": info})
    return path


__all__ = ["BackboneTrainResult", "augment", "save_backbone", "train_backbone"]
