"""Concept filters (training/clip/concepts.py) on hand-made cases, and LLM generation against a real server.

Similarity rules are tested with hand-made unit embeddings (a random tiny CLIP gives every pair of texts
a cosine near 0.9, so it cannot exercise the cut-offs meaningfully); one test runs the whole filter with
the real tiny open_clip text and image encoders. Generation (concurrency, retries, resume) talks to a
real chat-completions HTTP server on a free localhost port whose answers and failures the tests script.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from training.clip.concepts import (PROMPTS, ConceptGenerationError, FilterResult, FilterSettings, LLMEndpoint,
                                    filter_class_similarity, filter_concept_similarity, filter_concepts,
                                    filter_text_rules, filter_top5, generate_concepts, normalize_concept,
                                    parse_list_answer, top_k_mean)

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


# ---------------------------------------------------------------- blockwise top-5


def _dense_top_k_mean(images: torch.Tensor, text: torch.Tensor, k: int) -> torch.Tensor:
    """The formula before blocking: the whole [N, M] matrix, then topk over the images."""
    sims = images.to(torch.float32) @ text.T
    return sims.topk(min(k, sims.shape[0]), dim=0).values.mean(dim=0)


def _dyadic(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Entries k/8 (|k| <= 8): every dot product is exact in fp32, so no summation order (the BLAS kernel
    picked for a block's shape) can change a single bit of the cosines. Many ties, too."""
    return (torch.randint(-8, 9, (n, d), generator=torch.Generator().manual_seed(seed)) / 8).to(dtype)


def _random_unit(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _names_and_encoder(text: torch.Tensor):
    names = [f"c{i}" for i in range(text.shape[0])]
    return names, (lambda texts: text[[names.index(t) for t in texts]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blockwise_top5_is_exactly_the_dense_top5(dtype):
    images, text = _dyadic(1003, 16, 0, dtype), _dyadic(37, 16, 1)
    dense = _dense_top_k_mean(images, text, 5)
    for block_size in (1, 4, 97, 1003, 4096):  # 4 and 97 do not divide 1003
        assert torch.equal(top_k_mean(images, text, 5, block_size), dense), block_size
    names, enc = _names_and_encoder(text)
    cutoff = float(dense.median())  # some concepts sit exactly on the cut-off (kept: >=)
    res = filter_top5(FilterResult(kept=list(names)), images, enc, cutoff, block_size=97)
    assert res.kept == [n for n, v in zip(names, dense.tolist()) if v >= cutoff]
    assert res.dropped == [{"concept": n, "reason": "not_in_images", "top5_mean": round(v, 4), "cutoff": cutoff}
                           for n, v in zip(names, dense.tolist()) if v < cutoff]


def test_blockwise_top5_on_real_valued_embeddings():
    """With real-valued embeddings MKL/cuBLAS may round a block's cosines differently from the whole
    matrix's (ulp level); the merge itself is exact, so the scores agree to 1e-6 and so do the decisions."""
    images, text = _random_unit(1003, 64, 0), _random_unit(37, 64, 1)
    dense = _dense_top_k_mean(images, text, 5)
    blocked = top_k_mean(images, text, 5, 97)
    assert torch.allclose(blocked, dense, rtol=0, atol=1e-6)
    ordered = dense.sort().values
    cutoff = float(ordered[17] + ordered[18]) / 2
    assert float(ordered[18] - ordered[17]) > 1e-5
    names, enc = _names_and_encoder(text)
    res = filter_top5(FilterResult(kept=list(names)), images, enc, cutoff, block_size=97)
    assert res.kept == [n for n, v in zip(names, dense.tolist()) if v >= cutoff] and len(res.kept) == 19
    assert [d["top5_mean"] for d in res.dropped] == pytest.approx([v for v in dense.tolist() if v < cutoff],
                                                                   abs=1e-4)


def test_blockwise_top5_with_fewer_images_than_k():
    images, text = _dyadic(3, 8, 2), _dyadic(4, 8, 3)
    expected = (images @ text.T).mean(dim=0)  # k = 5 > N = 3: the mean over all three images
    assert torch.allclose(top_k_mean(images, text, 5, 2), expected)
    assert torch.equal(top_k_mean(images, text, 5, 2), _dense_top_k_mean(images, text, 5))
    names, enc = _names_and_encoder(text)
    assert filter_top5(FilterResult(kept=list(names)), images, enc, -100.0, block_size=2).kept == names
    with pytest.raises(ValueError, match="block_size"):
        top_k_mean(images, text, 5, 0)


# ---------------------------------------------------------------- generation against a real server


class _LLMServer:
    """A chat-completions server on 127.0.0.1:<free port>. ``status(cls, kind, n)`` scripts the HTTP status
    of the n-th request (1-based) for a prompt, ``delay(cls, kind, n)`` its seconds before answering. Counts
    requests per prompt and records the most requests in flight at once."""

    def __init__(self):
        self.status = lambda cls, kind, n: 200
        self.delay = lambda cls, kind, n: 0.0
        self.counts: Counter = Counter()
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @staticmethod
    def answer(cls: str, kind: str) -> str:
        return f"{kind} of {cls}\n- shared {kind}\n2. everywhere"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
                cls = re.search(r'"([^"]+)"', prompt).group(1)
                kind = next(k for k, t in PROMPTS.items() if t.format(cls=cls) == prompt)
                with server.lock:
                    server.counts[cls, kind] += 1
                    n = server.counts[cls, kind]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay(cls, kind, n))
                    status = server.status(cls, kind, n)
                    content = server.answer(cls, kind)
                    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                                      if status == 200 else {"error": f"scripted {status}"}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def log_message(self, *args):
                pass

        return Handler

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@pytest.fixture
def llm():
    server = _LLMServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=5)


def _endpoint(server: _LLMServer, timeout_s: float = 5.0, model: str = "m") -> LLMEndpoint:
    return LLMEndpoint(server.base_url, model, timeout_s=timeout_s)


CLASSES = ["dog", "cat", "fox", "owl", "elk", "bee"]


def _expected(classes):
    """The sequential result: classes in order, kinds in PROMPTS order, first-seen dedup."""
    answers = {c: {k: parse_list_answer(_LLMServer.answer(c, k)) for k in PROMPTS} for c in classes}
    concepts = list(dict.fromkeys(item for c in classes for k in PROMPTS for item in answers[c][k]))
    return concepts, answers


def test_generation_is_concurrent_bounded_and_in_sequential_order(llm):
    # Early prompts answer slowest, so requests complete roughly in reverse order.
    llm.delay = lambda cls, kind, n: 0.02 * (len(CLASSES) - CLASSES.index(cls))
    concepts, answers = generate_concepts(CLASSES, _endpoint(llm), max_in_flight=4)
    assert 1 < llm.max_in_flight <= 4
    assert llm.total == 3 * len(CLASSES)
    assert (concepts, answers) == _expected(CLASSES)
    assert concepts[:4] == ["important of dog", "shared important", "everywhere", "around of dog"]
    assert list(answers) == CLASSES and all(list(a) == list(PROMPTS) for a in answers.values())
    llm.counts.clear()
    llm.max_in_flight = 0
    assert generate_concepts(CLASSES, _endpoint(llm), max_in_flight=1) == (concepts, answers)
    assert llm.max_in_flight == 1


def test_transient_errors_are_retried_and_others_are_not(llm):
    def flaky(cls, kind, n):
        if kind == "important" and n <= 2:
            return 503
        return 429 if kind == "around" and n == 1 else 200

    # 503 twice, 429 once, a timeout once: all retried; the answers are as if nothing had happened.
    llm.status = flaky
    llm.delay = lambda cls, kind, n: 3.0 if kind == "superclass" and n == 1 else 0.0
    concepts, _ = generate_concepts(["dog"], _endpoint(llm, timeout_s=1.0), backoff_s=0.01)
    assert concepts == _expected(["dog"])[0]
    assert llm.counts == {("dog", "important"): 3, ("dog", "around"): 2, ("dog", "superclass"): 2}

    llm.counts.clear()
    llm.delay = lambda cls, kind, n: 0.0
    llm.status = lambda cls, kind, n: 503
    with pytest.raises(ConceptGenerationError, match="HTTP 503") as err:
        generate_concepts(["dog"], _endpoint(llm), retries=2, backoff_s=0.01, max_in_flight=1)
    assert err.value.transient and llm.counts[("dog", "important")] == 3  # 1 + 2 retries, then given up

    llm.counts.clear()
    llm.status = lambda cls, kind, n: 400 if kind == "around" else 200
    with pytest.raises(ConceptGenerationError, match=r"HTTP 400.*class 'dog', prompt 'around'") as err:
        generate_concepts(["dog"], _endpoint(llm), backoff_s=0.01)
    assert not err.value.transient and llm.counts[("dog", "around")] == 1


def test_unreachable_endpoint_is_transient():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = LLMEndpoint(f"http://127.0.0.1:{port}/v1", "m", timeout_s=2)
    with pytest.raises(ConceptGenerationError, match="cannot reach the LLM endpoint") as err:
        endpoint.chat("hello")
    assert err.value.transient
    with pytest.raises(ConceptGenerationError, match="cannot reach the LLM endpoint"):
        generate_concepts(["dog", "cat"], endpoint, retries=1, backoff_s=0.01)


def _cached_keys(path) -> list[tuple[str, str]]:
    return [(row["class"], row["kind"]) for row in map(json.loads, path.read_text().splitlines())]


def test_a_rerun_asks_only_for_the_missing_answers(llm, tmp_path):
    cache = tmp_path / "out" / "llm_answers.jsonl"
    classes = ["dog", "cat", "fox", "owl"]
    llm.status = lambda cls, kind, n: 400 if cls == "owl" else 200  # the last class fails for good
    with pytest.raises(ConceptGenerationError, match=r"HTTP 400.*class 'owl'.*9 of 12 answers are saved"):
        generate_concepts(classes, _endpoint(llm), max_in_flight=2, cache_path=cache)
    # Every request before the failing one was started before it failed, so all of their answers are saved.
    assert sorted(_cached_keys(cache)) == sorted((c, k) for c in classes[:3] for k in PROMPTS)
    with cache.open("a") as f:  # a killed run's half-written line
        f.write(json.dumps({"class": "owl", "kind": "important", "model": "m", "prompt": "x", "answer": "y"})[:40])

    llm.status = lambda cls, kind, n: 200
    llm.counts.clear()
    resumed = generate_concepts(classes, _endpoint(llm), max_in_flight=2, cache_path=cache)
    assert llm.counts == {("owl", kind): 1 for kind in PROMPTS}
    assert sorted(_cached_keys(cache)) == sorted((c, k) for c in classes for k in PROMPTS)  # torn line gone

    llm.counts.clear()
    fresh = generate_concepts(classes, _endpoint(llm), cache_path=tmp_path / "fresh.jsonl")
    assert resumed == fresh == _expected(classes) and llm.total == 12
    llm.counts.clear()
    assert generate_concepts(classes, _endpoint(llm), cache_path=cache) == fresh and llm.total == 0
    generate_concepts(classes, _endpoint(llm, model="other"), cache_path=cache)  # another model's answers
    assert llm.total == 12


def test_cli_generate_saves_answers_and_resumes(llm, tmp_path):
    from typer.testing import CliRunner

    from clients.salfctl import app

    classes, out = tmp_path / "classes.txt", tmp_path / "c"
    classes.write_text("dog\ncat\n")

    def run(concurrency: str):
        return CliRunner().invoke(app, ["train", "concepts", "--out", str(out), "--classes", str(classes),
                                        "--generate", "--llm-base-url", llm.base_url, "--llm-model", "m",
                                        "--llm-concurrency", concurrency, "--config", "tiny-clip-cpu",
                                        "--no-image-filter"])

    res = run("2")
    assert res.exit_code == 0, res.output
    assert llm.total == 6 and 1 <= llm.max_in_flight <= 2
    assert sorted(_cached_keys(out / "llm_answers.jsonl")) == sorted(itertools.product(["dog", "cat"], PROMPTS))
    assert json.loads((out / "generated.json").read_text())["concepts"] == _expected(["dog", "cat"])[0]
    res = run("2")
    assert res.exit_code == 0, res.output
    assert llm.total == 6  # everything came from OUT/llm_answers.jsonl
    assert run("0").exit_code == 2
