"""Concept lists (paper 3.1, following Label-free CBM): generate with an LLM, then filter.

Generation asks an OpenAI-compatible chat-completions endpoint the paper's three questions per class
(important features, things seen around, superclasses) using only the standard library (urllib).

Filtering, in this order, each drop recorded with its reason:

1. ``duplicate``: the same concept (case-insensitive, whitespace-normalised) already kept;
2. ``too_long``: more than ``max_length`` characters (30);
3. ``class_name``: equal to a class name, with or without a leading article (a / an / the);
4. ``similar_to_class``: CLIP text-embedding cosine to some class >= ``class_cutoff`` (0.85);
5. ``similar_to_concept``: cosine to another remaining concept >= ``concept_cutoff`` (0.9); of such a
   pair the one with the higher mean similarity to all remaining concepts is dropped (ties: the later);
6. ``not_in_images``: mean of the top-5 CLIP image-concept cosines over the training images below
   ``top5_cutoff``.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

PROMPTS = {
    "important": "List the most important features for recognizing something as a \"{cls}\". "
                 "Answer with one short feature per line, without numbering or explanations.",
    "around": "List the things most commonly seen around a \"{cls}\". "
              "Answer with one short item per line, without numbering or explanations.",
    "superclass": "Give superclasses for the word \"{cls}\". "
                  "Answer with one superclass per line, without numbering or explanations.",
}
ARTICLES = ("a", "an", "the")


class ConceptGenerationError(RuntimeError):
    """The LLM endpoint could not be reached or answered something unusable."""


def normalize_concept(text: str) -> str:
    """Lower-case, trimmed, single-spaced, without list markers and trailing punctuation."""
    text = re.sub(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*", "", text)
    text = re.sub(r"\s+", " ", text).strip().strip(".,;:").strip()
    return text.lower()


def strip_article(text: str) -> str:
    words = text.split(" ", 1)
    return words[1] if len(words) == 2 and words[0] in ARTICLES else text


def parse_list_answer(content: str) -> list[str]:
    """An LLM answer (one item per line, or comma-separated on one line) -> normalised items."""
    lines = [line for line in content.splitlines() if line.strip()]
    if len(lines) == 1 and "," in lines[0]:
        lines = lines[0].split(",")
    items = [normalize_concept(line) for line in lines]
    return [item for item in items if item]


# ---------------------------------------------------------------- generation


@dataclass
class LLMEndpoint:
    """An OpenAI-compatible chat-completions endpoint. ``base_url`` like ``https://host/v1``."""
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    temperature: float = 0.0

    def chat(self, prompt: str) -> str:
        url = self.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps({"model": self.model, "temperature": self.temperature,
                           "messages": [{"role": "user", "content": prompt}]}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise ConceptGenerationError(f"LLM endpoint {url} answered HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConceptGenerationError(f"cannot reach the LLM endpoint {url}: {reason} (set --llm-base-url or "
                                         f"OPENAI_BASE_URL, or pass a concept list with --concepts)") from exc
        except json.JSONDecodeError as exc:
            raise ConceptGenerationError(f"LLM endpoint {url} did not answer JSON: {exc}") from exc
        try:
            return payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise ConceptGenerationError(f"LLM endpoint {url}: no choices[0].message.content in the answer "
                                         f"{str(payload)[:200]}") from exc


def generate_concepts(classes: Sequence[str], endpoint: LLMEndpoint) -> tuple[list[str], dict]:
    """The raw concept list (deduplicated, first-seen order) and the per-class answers."""
    concepts: list[str] = []
    seen: set[str] = set()
    answers: dict[str, dict[str, list[str]]] = {}
    for cls in classes:
        answers[cls] = {}
        for kind, template in PROMPTS.items():
            items = parse_list_answer(endpoint.chat(template.format(cls=cls)))
            answers[cls][kind] = items
            for item in items:
                if item not in seen:
                    seen.add(item)
                    concepts.append(item)
        log.info("concepts: %s -> %d items so far", cls, len(concepts))
    if not concepts:
        raise ConceptGenerationError(f"LLM endpoint {endpoint.base_url} returned no concepts")
    return concepts, answers


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


def filter_top5(result: FilterResult, image_embeddings: torch.Tensor, text_enc: Callable, cutoff: float,
                top_k: int = 5) -> FilterResult:
    """Rule 6: ``image_embeddings`` ``[N, D]`` L2-normalised (whole training images, no circle)."""
    if not result.kept:
        return result
    sims = image_embeddings.to(torch.float32) @ text_enc(result.kept).T  # [N, M]
    k = min(top_k, sims.shape[0])
    score = sims.topk(k, dim=0).values.mean(dim=0)
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
