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


def _edit_meta(path, **changes):
    doc = json.loads((path / "bundle.json").read_text())
    doc.update(changes)
    (path / "bundle.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("weights", [None, {"file": "weights.safetensors"}, {"file": "../x.safetensors", "sha256": "0"},
                                     {"file": "/etc/passwd", "sha256": "0"}])
def test_bad_weights_entry_is_a_bundle_error(tmp_path, weights):
    # before: a missing entry raised a bare KeyError, and a path outside the bundle was followed
    path = make_random_bundle(tmp_path / "b")
    _edit_meta(path, weights=weights)
    with pytest.raises(BundleError, match='needs "weights"'):
        load_bundle(path)


def test_non_object_bundle_json_is_a_bundle_error(tmp_path):
    path = make_random_bundle(tmp_path / "b")
    (path / "bundle.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="JSON object"):
        load_bundle(path)


def test_metadata_that_disagrees_with_the_weights_is_a_bundle_error(tmp_path):
    # bundle.json says width 16, the (intact, checksummed) weights are of a width-8 backbone
    path = make_random_bundle(tmp_path / "b", width=8)
    doc = json.loads((path / "bundle.json").read_text())
    _edit_meta(path, backbone={**doc["backbone"], "width": 16})
    with pytest.raises(BundleError, match="backbone weights do not fit"):
        load_bundle(path)


def test_unknown_pooling_is_a_bundle_error(tmp_path):
    path = make_random_bundle(tmp_path / "b")
    _edit_meta(path, pooling="max")
    with pytest.raises(BundleError, match="cannot be built.*pooling"):
        load_bundle(path)
