"""Concept lists (paper 3.1, following Label-free CBM): generate with an LLM, then filter.

Generation (concurrent, retried, resumable LLM requests) is training/clip/llm.py; its names are
re-exported here.

Filtering, in this order, each drop recorded with its reason:

1. ``duplicate``: the same concept (case-insensitive, whitespace-normalised) already kept;
2. ``too_long``: more than ``max_length`` characters (30);
3. ``class_name``: equal to a class name, with or without a leading article (a / an / the);
4. ``similar_to_class``: CLIP text-embedding cosine to some class >= ``class_cutoff`` (0.85);
5. ``similar_to_concept``: cosine to another remaining concept >= ``concept_cutoff`` (0.9); of such a
   pair the one with the higher mean similarity to all remaining concepts is dropped (ties: the later);
6. ``not_in_images``: mean of the top-5 CLIP image-concept cosines over the training images below
   ``top5_cutoff``; computed ``block_size`` images at a time with a running top-5 per concept, so the
   ``[N, M]`` cosine matrix (1.28M x 4741 fp32 = 24 GB for ImageNet) is never built.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .llm import (ARTICLES, PROMPTS, AnswerCache, ConceptGenerationError, LLMEndpoint, generate_concepts,  # noqa: F401
                  normalize_concept, parse_list_answer, strip_article)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- filtering


@dataclass
class FilterSettings:
    max_length: int = 30
    class_cutoff: float = 0.85
    concept_cutoff: float = 0.9
    top5_cutoff: float | None = 0.0  # None: skip the image filter
    top_k: int = 5


@dataclass
class FilterResult:
    kept: list[str]
    dropped: list[dict] = field(default_factory=list)  # {"concept", "reason", ...details}

    def report(self, initial: Sequence[str], classes: Sequence[str], settings: FilterSettings) -> dict:
        reasons: dict[str, int] = {}
        for d in self.dropped:
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
        return {"initial": len(initial), "kept": len(self.kept), "dropped_by_reason": reasons,
                "settings": settings.__dict__, "classes": list(classes), "concepts": self.kept,
                "dropped": self.dropped}


def _drop(result: FilterResult, concept: str, reason: str, **detail) -> None:
    result.dropped.append({"concept": concept, "reason": reason, **detail})


def filter_text_rules(concepts: Sequence[str], classes: Sequence[str], settings: FilterSettings) -> FilterResult:
    """Rules 1-3 (no model needed)."""
    class_forms = {strip_article(normalize_concept(c)) for c in classes}
    result = FilterResult(kept=[])
    seen: set[str] = set()
    for raw in concepts:
        concept = normalize_concept(raw)
        if not concept:
            continue
        if concept in seen:
            _drop(result, concept, "duplicate")
        elif len(concept) > settings.max_length:
            _drop(result, concept, "too_long", length=len(concept), limit=settings.max_length)
        elif strip_article(concept) in class_forms:
            _drop(result, concept, "class_name")
        else:
            result.kept.append(concept)
        seen.add(concept)
    return result


def filter_class_similarity(result: FilterResult, classes: Sequence[str], text_enc: Callable,
                            cutoff: float) -> FilterResult:
    """Rule 4: ``text_enc(list[str]) -> [K, D]`` L2-normalised; drop concepts too close to a class."""
    if not result.kept:
        return result
    sims = text_enc(result.kept) @ text_enc(list(classes)).T  # [M, L]
    best, arg = sims.max(dim=1)
    kept = []
    for i, concept in enumerate(result.kept):
        if float(best[i]) >= cutoff:
            _drop(result, concept, "similar_to_class", to=classes[int(arg[i])], similarity=round(float(best[i]), 4),
                  cutoff=cutoff)
        else:
            kept.append(concept)
    result.kept = kept
    return result


def filter_concept_similarity(result: FilterResult, text_enc: Callable, cutoff: float) -> FilterResult:
    """Rule 5 (Label-free CBM's rule): of a near-duplicate pair drop the one more similar to the rest."""
    if len(result.kept) < 2:
        return result
    emb = text_enc(result.kept)
    sims = (emb @ emb.T).to(torch.float64)
    mean_sim = sims.mean(dim=1)
    removed: set[int] = set()
    # Only the candidate pairs (i < j, cos >= cutoff), in the order of the plain double loop: O(M^2) in
    # torch, not in Python (ImageNet lists have thousands of concepts).
    pairs = torch.triu(sims >= cutoff, diagonal=1).nonzero().tolist()
    for i, j in pairs:
        if i in removed or j in removed:
            continue
        victim, other = (i, j) if float(mean_sim[i]) > float(mean_sim[j]) else (j, i)
        removed.add(victim)
        _drop(result, result.kept[victim], "similar_to_concept", to=result.kept[other],
              similarity=round(float(sims[i, j]), 4), cutoff=cutoff)
    result.kept = [c for k, c in enumerate(result.kept) if k not in removed]
    return result


def top_k_mean(image_embeddings: torch.Tensor, text_emb: torch.Tensor, top_k: int, block_size: int) -> torch.Tensor:
    """Mean of the ``top_k`` best image cosines per concept, ``[M]``, without the ``[N, M]`` matrix: image
    rows ``block_size`` at a time, merged into a running ``[k, M]`` top-k: the dense ``topk``'s values in its
    order, hence its mean (BLAS may round a block's cosines differently from the whole product's, by an ulp)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    text_emb = text_emb.to(torch.float32)
    best = text_emb.new_empty((0, text_emb.shape[0]))
    for start in range(0, image_embeddings.shape[0], block_size):
        sims = image_embeddings[start:start + block_size].to(torch.float32) @ text_emb.T  # [B, M]
        merged = torch.cat([best, sims])
        best = merged.topk(min(top_k, merged.shape[0]), dim=0).values
    return best.mean(dim=0)


def filter_top5(result: FilterResult, image_embeddings: torch.Tensor, text_enc: Callable, cutoff: float,
                top_k: int = 5, block_size: int = 65536) -> FilterResult:
    """Rule 6: ``image_embeddings`` ``[N, D]`` L2-normalised (whole training images, no circle)."""
    if not result.kept:
        return result
    score = top_k_mean(image_embeddings, text_enc(result.kept), top_k, block_size)
    kept = []
    for i, concept in enumerate(result.kept):
        if float(score[i]) < cutoff:
            _drop(result, concept, "not_in_images", top5_mean=round(float(score[i]), 4), cutoff=cutoff)
        else:
            kept.append(concept)
    result.kept = kept
    return result


def filter_concepts(concepts: Sequence[str], classes: Sequence[str], text_enc: Callable,
                    image_embeddings: torch.Tensor | None, settings: FilterSettings) -> FilterResult:
    """All six rules. ``text_enc``: texts -> L2-normalised ``[K, D]``; ``image_embeddings``: ``[N, D]`` or None."""
    result = filter_text_rules(concepts, classes, settings)
    result = filter_class_similarity(result, classes, text_enc, settings.class_cutoff)
    result = filter_concept_similarity(result, text_enc, settings.concept_cutoff)
    if settings.top5_cutoff is not None:
        if image_embeddings is None:
            raise ValueError("the top-5 image filter needs image embeddings (or set top5_cutoff to None)")
        result = filter_top5(result, image_embeddings, text_enc, settings.top5_cutoff, settings.top_k)
    if not result.kept:
        raise ValueError(f"every one of the {len(concepts)} concepts was filtered out "
                         f"({len(result.dropped)} drops); loosen the cut-offs or bring more concepts")
    log.info("concepts: kept %d of %d", len(result.kept), len(concepts))
    return result
