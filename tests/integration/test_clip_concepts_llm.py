"""Concept generation against a real HTTP server speaking chat completions, and `salfctl train concepts`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from training.clip.concepts import PROMPTS, ConceptGenerationError, LLMEndpoint, generate_concepts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _answer(prompt: str) -> str:
    if "superclasses" in prompt:
        return "1. Animal\n2. Mammal"
    if "seen around" in prompt:
        return "- a leash\n- grass\n- a very long thing that nobody could ever draw"
    return "red fur, four legs, a tail"


def test_generation_asks_the_three_prompts_per_class(chat_server):
    chat_server.answer = _answer
    endpoint = LLMEndpoint(chat_server.base_url, "test-model", api_key="sk-test", timeout_s=10)
    concepts, answers = generate_concepts(["dog", "cat"], endpoint)
    assert concepts == ["red fur", "four legs", "a tail", "a leash", "grass",
                        "a very long thing that nobody could ever draw", "animal", "mammal"]
    assert len(chat_server.requests) == 6
    asked = [r["body"]["messages"][0]["content"] for r in chat_server.requests]
    # requests run concurrently (any arrival order); the concept list above keeps the sequential order
    assert sorted(asked) == sorted(PROMPTS[k].format(cls=c) for c in ("dog", "cat")
                                   for k in ("important", "around", "superclass"))
    assert all(r["auth"] == "Bearer sk-test" and r["body"]["model"] == "test-model" for r in chat_server.requests)
    assert answers["cat"]["superclass"] == ["animal", "mammal"]


def test_unreachable_endpoint_is_a_clear_error():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = LLMEndpoint(f"http://127.0.0.1:{port}/v1", "m", timeout_s=5)
    with pytest.raises(ConceptGenerationError, match=rf"cannot reach the LLM endpoint http://127.0.0.1:{port}/v1"):
        generate_concepts(["dog"], endpoint)


def test_http_error_names_the_status(chat_server):
    endpoint = LLMEndpoint(chat_server.base_url.replace("/v1", "/v2"), "m", timeout_s=5)
    with pytest.raises(ConceptGenerationError, match="HTTP 404"):
        generate_concepts(["dog"], endpoint)


def _salfctl(args, env_extra=None, cwd=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", "from clients.salfctl import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=110, cwd=cwd)


def test_cli_generate_and_filter_offline_image_filter(chat_server, clip_small_data, tmp_path):
    """`salfctl train concepts --generate` with the endpoint from the environment, filters incl. top-5."""
    chat_server.answer = _answer
    out = tmp_path / "concepts"
    res = _salfctl(["train", "concepts", "--data", str(clip_small_data), "--generate", "--out", str(out),
                    "--config", "tiny-clip-cpu"],
                   {"OPENAI_BASE_URL": chat_server.base_url, "OPENAI_MODEL": "m", "OPENAI_API_KEY": "k"})
    assert res.returncode == 0, res.stderr
    kept = (out / "concepts.txt").read_text().split("\n")[:-1]
    report = json.loads((out / "report.json").read_text())
    assert "a very long thing that nobody could ever draw" not in kept
    assert report["dropped_by_reason"]["too_long"] == 1
    assert report["kept"] == len(kept) and set(kept) <= {"red fur", "four legs", "a tail", "a leash", "grass",
                                                         "animal", "mammal"}
    assert (out / "generated.json").is_file() and (out / "image_embeddings.safetensors").is_file()
    assert len(chat_server.requests) == 3 * 8  # three prompts for each of the 8 synthetic classes


def test_cli_unreachable_endpoint_exits_with_message(clip_small_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _salfctl(["train", "concepts", "--data", str(clip_small_data), "--generate", "--out",
                    str(tmp_path / "c"), "--llm-base-url", f"http://127.0.0.1:{port}/v1", "--llm-model", "m"])
    assert res.returncode == 2
    assert "cannot reach the LLM endpoint" in res.stderr and str(port) in res.stderr
