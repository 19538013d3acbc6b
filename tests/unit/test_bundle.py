import json

import pytest
import torch

from tests.fixtures.bundles import make_random_bundle
from training.bundle import BundleError, load_bundle


def test_round_trip_preserves_outputs(tmp_path):
    path = make_random_bundle(tmp_path / "b", pooling="softmax")
    model, meta = load_bundle(path)
    again, _ = load_bundle(path)
    x = torch.randn(2, 3, 64, 64)
    maps, scores, logits = model(x)
    assert maps.shape == (2, 6, 7, 7) and scores.shape == (2, 6) and logits.shape == (2, 3)
    for a, b in zip(model(x), again(x)):
        assert torch.equal(a, b)
    assert meta.pooling == "softmax" and meta.concepts[0] == "concept 0"


def test_corrupted_weights_are_rejected(tmp_path):
    path = make_random_bundle(tmp_path / "b")
    w = path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupted"):
        load_bundle(path)


def test_other_format_version_is_rejected(tmp_path):
    path = make_random_bundle(tmp_path / "b")
    doc = json.loads((path / "bundle.json").read_text())
    doc["format_version"] = 99
    (path / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(path)


def test_missing_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="not a SALF-CBM bundle"):
        load_bundle(tmp_path / "nothing")
