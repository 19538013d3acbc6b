"""Concept filters (training/clip/concepts.py) on hand-made cases.

Similarity rules are tested with hand-made unit embeddings (a random tiny CLIP gives every pair of texts
a cosine near 0.9, so it cannot exercise the cut-offs meaningfully); one test runs the whole filter with
the real tiny open_clip text and image encoders.
"""
from __future__ import annotations

import math

import pytest
import torch

from training.clip.concepts import (FilterSettings, filter_concept_similarity, filter_concepts, filter_text_rules,
                                    filter_top5, normalize_concept, parse_list_answer, FilterResult,
                                    filter_class_similarity)

pytestmark = pytest.mark.timeout(60)


def _table_encoder(table: dict[str, list[float]]):
    """texts -> L2-normalised rows looked up in ``table`` (raises on an unknown text)."""
    def enc(texts):
        rows = torch.tensor([table[t] for t in texts], dtype=torch.float32)
        return torch.nn.functional.normalize(rows, dim=1)
    return enc


def _unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a), 0.0]


def _reasons(result):
    return {d["concept"]: d["reason"] for d in result.dropped}


def test_text_rules_length_class_names_articles_duplicates():
    classes = ["dog", "striped circle", "An Apple"]
    concepts = ["Dog", "a dog", "the striped circle", "apple", "an apple tree", "red fur", "red fur ",
                "x" * 31, "y" * 30, "- whiskers", "2. tail"]
    res = filter_text_rules(concepts, classes, FilterSettings())
    assert res.kept == ["an apple tree", "red fur", "y" * 30, "whiskers", "tail"]
    assert _reasons(res) == {"dog": "class_name", "a dog": "class_name", "the striped circle": "class_name",
                             "apple": "class_name", "red fur": "duplicate", "x" * 31: "too_long"}
    assert [d["reason"] for d in res.dropped].count("class_name") == 4


def test_class_similarity_cutoff_is_inclusive():
    table = {"puppy": _unit(0), "kennel": _unit(30), "bone": _unit(90), "dog": _unit(math.degrees(math.acos(0.85)))}
    enc = _table_encoder(table)
    res = filter_class_similarity(FilterResult(kept=["puppy", "kennel", "bone"]), ["dog"], enc, 0.85)
    # cos(puppy, dog) = 0.85 exactly (>= cut-off: dropped); cos(kennel, dog) = cos(1.6 deg) ~ 1: dropped
    assert res.kept == ["bone"]
    assert {d["concept"]: d["to"] for d in res.dropped} == {"puppy": "dog", "kennel": "dog"}


def test_near_duplicates_drop_the_one_more_similar_to_the_rest():
    # a and b are near-duplicates (cos 0.92); a sits closer to c and d, so a is dropped and b kept.
    table = {"a": [1.0, 0.1, 0.0], "b": [1.0, -0.3, 0.0], "c": [0.6, 1.0, 0.0], "d": [0.0, 1.0, 0.3],
             "e": [0.0, 0.0, 1.0]}
    enc = _table_encoder(table)
    emb = enc(list(table))
    assert float(emb[0] @ emb[1]) >= 0.9
    res = filter_concept_similarity(FilterResult(kept=list(table)), enc, 0.9)
    assert res.kept == ["b", "c", "d", "e"]
    assert res.dropped == [{"concept": "a", "reason": "similar_to_concept", "to": "b",
                            "similarity": round(float(emb[0] @ emb[1]), 4), "cutoff": 0.9}]


def test_top5_filter_uses_the_mean_of_the_five_best_images():
    text = {"seen": [1.0, 0.0], "rare": [0.0, 1.0]}
    enc = _table_encoder(text)
    # 10 images: "rare" is strong in only 2 of them -> its top-5 mean is (1 + 1 + 0 + 0 + 0) / 5 = 0.4
    images = torch.tensor([[1.0, 0.0]] * 8 + [[0.0, 1.0]] * 2)
    res = filter_top5(FilterResult(kept=["seen", "rare"]), images, enc, cutoff=0.5)
    assert res.kept == ["seen"]
    assert res.dropped[0]["reason"] == "not_in_images" and res.dropped[0]["top5_mean"] == pytest.approx(0.4)


def test_everything_filtered_is_an_error():
    with pytest.raises(ValueError, match="filtered out"):
        filter_concepts(["dog"], ["dog"], _table_encoder({}), None, FilterSettings(top5_cutoff=None))


def test_llm_answer_parsing():
    assert parse_list_answer("1. Red fur\n- A long tail.\n\n* whiskers") == ["red fur", "a long tail", "whiskers"]
    assert parse_list_answer("animal, mammal,  pet") == ["animal", "mammal", "pet"]
    assert normalize_concept("  •  Big   Ears; ") == "big ears"


def test_full_filter_with_the_real_tiny_clip(tiny_clip):
    concepts = ["red fur", "Red fur", "a dog", "a very long concept name that goes on", "whiskers", "tail"]
    images = torch.nn.functional.normalize(torch.randn(12, tiny_clip.embed_dim, generator=torch.Generator()
                                                       .manual_seed(0)), dim=1)
    settings = FilterSettings(class_cutoff=1.01, concept_cutoff=1.01, top5_cutoff=-1.0)
    res = filter_concepts(concepts, ["dog"], tiny_clip.encode_text, images, settings)
    assert res.kept == ["red fur", "whiskers", "tail"]
    report = res.report(concepts, ["dog"], settings)
    assert report["dropped_by_reason"] == {"duplicate": 1, "class_name": 1, "too_long": 1}
    # With cut-offs low enough every remaining concept is similar to the class under a random text encoder.
    strict = FilterSettings(class_cutoff=-1.0, top5_cutoff=None)
    with pytest.raises(ValueError, match="filtered out"):
        filter_concepts(concepts, ["dog"], tiny_clip.encode_text, None, strict)


def test_near_duplicate_cluster_keeps_one():
    """Three mutual near-duplicates and one distinct concept: the cluster collapses to a single concept."""
    table = {"x": [1.0, 0.05, 0.0], "y": [1.0, 0.0, 0.05], "z": [1.0, -0.05, 0.0], "w": [0.0, 1.0, 0.0]}
    res = filter_concept_similarity(FilterResult(kept=list(table)), _table_encoder(table), 0.9)
    assert len(res.kept) == 2 and "w" in res.kept
    assert sorted(d["concept"] for d in res.dropped) == sorted(set("xyz") - set(res.kept))
