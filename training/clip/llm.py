"""Concept generation with an LLM (paper 3.1, following Label-free CBM): the paper's three questions per
class (important features, things seen around, superclasses) asked of an OpenAI-compatible
chat-completions endpoint using only the standard library (urllib), and the answers parsed into
normalised items.

At ImageNet scale (3 x 1000 requests) the requests run concurrently, ``max_in_flight`` at a time; each is
retried ``retries`` times with exponential backoff (``backoff_s``, doubling, plus jitter) on transient
errors (HTTP 429 / 5xx, connection errors, timeouts), never on other HTTP errors or unusable answers;
after a failure nothing new is asked. With ``cache_path`` every answer is appended (and fsynced) to a
JSON-lines file as it arrives, a torn last line is ignored, and a rerun asks only for the missing
(class, prompt) pairs. The list is the sequential one whatever the completion order or the cache.
Filtering the list is training/clip/concepts.py.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import random
import re
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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
    """The LLM endpoint could not be reached or answered something unusable. ``transient``: worth retrying
    (HTTP 429 / 5xx, connection errors, timeouts), not for other HTTP errors or unusable answers."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


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
            raise ConceptGenerationError(f"LLM endpoint {url} answered HTTP {exc.code}: {detail}",
                                         transient=exc.code == 429 or exc.code >= 500) from exc
        except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            # A URLError whose reason is a string (e.g. an unknown URL scheme) will not heal by itself.
            transient = not isinstance(exc, urllib.error.URLError) or isinstance(reason, OSError)
            raise ConceptGenerationError(f"cannot reach the LLM endpoint {url}: {reason} (set --llm-base-url or "
                                         f"OPENAI_BASE_URL, or pass a concept list with --concepts)",
                                         transient=transient) from exc
        except json.JSONDecodeError as exc:
            raise ConceptGenerationError(f"LLM endpoint {url} did not answer JSON: {exc}") from exc
        try:
            return payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise ConceptGenerationError(f"LLM endpoint {url}: no choices[0].message.content in the answer "
                                         f"{str(payload)[:200]}") from exc


Key = tuple[str, str]  # (class, kind of prompt)


def _prompt(key: Key) -> str:
    cls, kind = key
    return PROMPTS[kind].format(cls=cls)


class AnswerCache:
    """The raw LLM answers as JSON lines ``{"class", "kind", "model", "prompt", "answer"}``, one per answer.

    Each line is appended, flushed and fsynced as its answer arrives. Only newline-terminated lines count:
    ``load`` ignores the torn last line of a killed run and cuts it off, so that appends start a fresh
    line. A line asked of another model or with another prompt text is not reused.
    """

    def __init__(self, path: Path | str, model: str):
        self.path, self.model = Path(path), model

    def load(self) -> dict[Key, str]:
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        valid = data.rfind(b"\n") + 1
        if valid < len(data):
            log.warning("concepts: %s ends in a torn line (%d bytes); ignored", self.path, len(data) - valid)
            os.truncate(self.path, valid)
        answers: dict[Key, str] = {}
        for number, line in enumerate(data[:valid].splitlines(), 1):
            try:
                row = json.loads(line)
                key = (row["class"], row["kind"])
                if row["model"] == self.model and key[1] in PROMPTS and row["prompt"] == _prompt(key):
                    answers[key] = row["answer"]
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("concepts: %s line %d is not an answer (%s); ignored", self.path, number, exc)
        return answers

    def append(self, key: Key, answer: str) -> None:
        row = {"class": key[0], "kind": key[1], "model": self.model, "prompt": _prompt(key), "answer": answer}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(json.dumps(row).encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())


def _chat_with_retries(endpoint: LLMEndpoint, prompt: str, retries: int, backoff_s: float,
                       stop: threading.Event) -> str:
    """``endpoint.chat``, retried ``retries`` times on transient errors, ``backoff_s`` * 2^attempt apart."""
    for attempt in range(retries + 1):
        if stop.is_set():  # another request failed for good: give up
            raise CancelledError()
        try:
            return endpoint.chat(prompt)
        except ConceptGenerationError as exc:
            if not exc.transient or attempt == retries:
                raise
            delay = backoff_s * 2 ** attempt * (1 + 0.1 * random.random())
            log.warning("concepts: %s; retry %d of %d in %.2f s", exc, attempt + 1, retries, delay)
            stop.wait(delay)
    raise AssertionError("unreachable")


def _ask_all(keys: Sequence[Key], endpoint: LLMEndpoint, max_in_flight: int, retries: int, backoff_s: float,
             on_answer: Callable[[Key, str], None]) -> tuple[dict[Key, str], dict[Key, ConceptGenerationError]]:
    """At most ``max_in_flight`` requests at a time; after the first failure nothing new is asked (the
    requests in flight finish, and their answers count; queued ones see ``stop`` and end at once, which
    also keeps ``as_completed`` from waiting on futures cancelled in the queue). -> (answers, failures)."""
    answers: dict[Key, str] = {}
    failures: dict[Key, ConceptGenerationError] = {}
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="llm") as pool:
        futures = {pool.submit(_chat_with_retries, endpoint, _prompt(key), retries, backoff_s, stop): key
                   for key in keys}
        try:
            for future in as_completed(futures):
                key = futures[future]
                try:
                    answers[key] = future.result()
                    on_answer(key, answers[key])
                    if len(answers) % 100 == 0:
                        log.info("concepts: %d of %d answers", len(answers), len(keys))
                except CancelledError:
                    pass
                except ConceptGenerationError as exc:
                    failures[key] = exc
                    stop.set()
        finally:  # also on an unexpected error or Ctrl-C: ask nothing more
            stop.set()
    return answers, failures


def generate_concepts(classes: Sequence[str], endpoint: LLMEndpoint, *, max_in_flight: int = 8, retries: int = 4,
                      backoff_s: float = 1.0, cache_path: Path | str | None = None) -> tuple[list[str], dict]:
    """The raw concept list (deduplicated, first-seen order) and the per-class answers; concurrent, retried
    and resumable from ``cache_path`` as the module docstring says, with the sequential result."""
    if max_in_flight < 1 or retries < 0 or backoff_s < 0:
        raise ValueError(f"need max_in_flight >= 1, retries >= 0 and backoff_s >= 0; got {max_in_flight}, "
                         f"{retries}, {backoff_s}")
    keys = list(dict.fromkeys((cls, kind) for cls in classes for kind in PROMPTS))
    cache = AnswerCache(cache_path, endpoint.model) if cache_path is not None else None
    raw = cache.load() if cache else {}
    missing = [key for key in keys if key not in raw]
    if cache:
        log.info("concepts: %d of %d answers in %s, asking for %d", len(keys) - len(missing), len(keys),
                 cache.path, len(missing))
    asked, failures = _ask_all(missing, endpoint, max_in_flight, retries, backoff_s,
                               cache.append if cache else lambda key, answer: None)
    if failures:
        key = next(k for k in missing if k in failures)
        saved = (f"; {len(keys) - len(missing) + len(asked)} of {len(keys)} answers are saved in {cache.path}, "
                 f"a rerun asks only for the rest" if cache else "")
        raise ConceptGenerationError(f"{failures[key]} [class {key[0]!r}, prompt {key[1]!r}{saved}]",
                                     transient=failures[key].transient) from failures[key]
    raw.update(asked)
    concepts: list[str] = []
    seen: set[str] = set()
    answers: dict[str, dict[str, list[str]]] = {}
    for cls in classes:
        answers[cls] = {}
        for kind in PROMPTS:
            items = parse_list_answer(raw[(cls, kind)])
            answers[cls][kind] = items
            for item in items:
                if item not in seen:
                    seen.add(item)
                    concepts.append(item)
    log.info("concepts: %d classes -> %d items", len(classes), len(concepts))
    if not concepts:
        raise ConceptGenerationError(f"LLM endpoint {endpoint.base_url} returned no concepts")
    return concepts, answers
