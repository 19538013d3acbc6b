"""Content-addressed explanation ids (serving/ids.py): a keyed hash of the model and the decoded image."""
import numpy as np
import pytest

from serving.ids import ExplanationIds

KEY = "k" * 32
MODEL = (1, "sha-of-bundle", "float32")


def _input(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def test_same_key_same_id_anything_else_another():
    a, b = ExplanationIds(KEY), ExplanationIds(KEY)
    x = _input()
    assert a.id_for(MODEL, (80, 60), x) == b.id_for(MODEL, (80, 60), x.copy())
    assert len(a.id_for(MODEL, (80, 60), x)) == 32 and a.shared
    others = {a.id_for(MODEL, (80, 60), _input(1)), a.id_for((2, "sha-of-bundle", "float32"), (80, 60), x),
              a.id_for((1, "sha-of-bundle", "float16"), (80, 60), x), a.id_for(MODEL, (60, 80), x),
              ExplanationIds("q" * 32).id_for(MODEL, (80, 60), x)}
    assert a.id_for(MODEL, (80, 60), x) not in others and len(others) == 5


def test_without_a_key_each_process_draws_its_own(monkeypatch):
    monkeypatch.delenv("SALF_ID_KEY", raising=False)
    a, b = ExplanationIds.from_env(), ExplanationIds.from_env()
    assert not a.shared and a.id_for(MODEL, (8, 8), _input()) != b.id_for(MODEL, (8, 8), _input())
    monkeypatch.setenv("SALF_ID_KEY", KEY)
    assert ExplanationIds.from_env().id_for(MODEL, (8, 8), _input()) == ExplanationIds(KEY).id_for(MODEL, (8, 8), _input())


def test_a_short_key_is_refused():
    with pytest.raises(ValueError, match="at least 16 characters"):
        ExplanationIds("short")
