"""Exact shortcut for ViT image encoders: embed each image's patches once, redo only the ring's patches.

A ViT's patch embedding (``conv1``, kernel = stride = patch size, no padding) maps every patch
independently. The 49 prompts of an image differ from the image only in the patches a ring touches
(about 9 of 49 for r=16 at 112 px with 16-px patches), so the prompt patch embeddings are the image's
patch embeddings with those few patches re-embedded from the ringed pixels. Nothing else changes: the
rest of open_clip's ``VisionTransformer.forward`` (class token, positions, ln_pre, transformer, pooling,
projection) runs unmodified on the assembled ``[B*G, C, gh, gw]`` patch embeddings.

This avoids materialising the ``[B*G, 3, H, W]`` prompt tensor and ~80% of the patch-embedding FLOPs:
negligible for ViT-B/16 on a GPU (0.7% of its FLOPs) but a real share of a small model on a CPU. Results
equal the full path up to float rounding (the same dot products in other batch shapes; tested against
the naive loop). With ``torch.compile`` only the transformer (>98% of a ViT-B's FLOPs) is compiled.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def supports_patch_reuse(visual: nn.Module) -> bool:
    """True for open_clip ``VisionTransformer``-style towers with a non-overlapping patch conv."""
    conv = getattr(visual, "conv1", None)
    return (isinstance(conv, nn.Conv2d) and hasattr(visual, "_embeds") and tuple(conv.kernel_size) == tuple(conv.stride)
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1) and conv.groups == 1)


class _GivenPatchEmbeddings(nn.Module):
    """Stands in for ``conv1`` for one forward: returns the patch embeddings assembled beforehand."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x only carries the batch size
        return self.tokens


@contextmanager
def _swapped(visual: nn.Module, **modules: nn.Module):
    """Temporarily replace submodules of ``visual`` (restored even if the forward raises)."""
    saved = {name: getattr(visual, name) for name in modules}
    for name, module in modules.items():
        setattr(visual, name, module)
    try:
        yield
    finally:
        for name, module in saved.items():
            setattr(visual, name, module)


class PatchReuse:
    """Per-geometry tables for one stencil. ``stencil`` bool ``[G, H, W]`` on the model's device."""

    def __init__(self, visual: nn.Module, stencil: torch.Tensor) -> None:
        conv: nn.Conv2d = visual.conv1
        self.visual = visual
        ph, pw = conv.kernel_size
        g, h, w = stencil.shape
        self.gh, self.gw, self.ph, self.pw, self.num_prompts = h // ph, w // pw, ph, pw, g
        # Pixels past the last full patch are dropped by the strided conv; they never matter.
        rings = stencil[:, :self.gh * ph, :self.gw * pw].reshape(g, self.gh, ph, self.gw, pw).permute(0, 1, 3, 2, 4)
        touched = rings.flatten(3).any(dim=3)  # [G, gh, gw]
        self.pairs = touched.nonzero()  # [K, 3]: (prompt, patch row, patch col)
        self.ring_patches = rings[self.pairs[:, 0], self.pairs[:, 1], self.pairs[:, 2]]  # [K, ph, pw]

    def patch_embeddings(self, norm: torch.Tensor, red: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` -> prompt patch embeddings ``[B*G, C, gh, gw]``."""
        conv: nn.Conv2d = self.visual.conv1
        b = norm.shape[0]
        k = self.pairs.shape[0]
        clean = conv(norm)  # [B, C, gh, gw]
        c = clean.shape[1]
        patches = norm[:, :, :self.gh * self.ph, :self.gw * self.pw].reshape(
            b, 3, self.gh, self.ph, self.gw, self.pw).permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, 3, ph, pw]
        picked = patches[:, self.pairs[:, 1], self.pairs[:, 2]]  # [B, K, 3, ph, pw]
        ringed = torch.where(self.ring_patches[None, :, None], red.view(1, 1, 3, 1, 1), picked)
        redone = conv(ringed.reshape(b * k, 3, self.ph, self.pw)).reshape(b, k, c).to(clean.dtype)
        tokens = clean.permute(0, 2, 3, 1)[:, None].expand(b, self.num_prompts, self.gh, self.gw, c).clone()
        tokens[:, self.pairs[:, 0], self.pairs[:, 1], self.pairs[:, 2]] = redone  # [B, K, C] in place
        return tokens.reshape(b * self.num_prompts, self.gh, self.gw, c).permute(0, 3, 1, 2)

    def encode_image(self, model: nn.Module, norm: torch.Tensor, red: torch.Tensor,
                     transformer: nn.Module | None = None) -> torch.Tensor:
        """``model.encode_image`` of all B*G prompts of ``norm`` ``[B, 3, H, W]`` -> ``[B*G, D]`` (unnormalised).

        ``transformer``: a stand-in for ``visual.transformer`` for this call (e.g. its ``torch.compile``d
        version, so the heavy part is compiled while this eager bookkeeping is not).
        """
        tokens = self.patch_embeddings(norm, red)
        carrier = norm.new_empty(tokens.shape[0], 0)  # conv1 is replaced: only the batch size is read
        swaps = {"conv1": _GivenPatchEmbeddings(tokens)}
        if transformer is not None:
            swaps["transformer"] = transformer
        with _swapped(self.visual, **swaps):
            return model.encode_image(carrier)
