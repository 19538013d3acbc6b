"""The repository contract (salf.contract.repository): what export writes the gateway reads back, and
the reader refuses what it cannot serve (another format version first of all)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export.repository import export_repository, head_arrays
from salf.contract import repository as contract
from salf.contract.repository import RepositoryError, load_model_spec
from serving.backends import EmbeddedBackend
from tests.fixtures.bundles import make_random_bundle
from training.bundle import load_bundle

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract-repo")
    bundle = make_random_bundle(root / "bundle", num_concepts=5, num_classes=4, input_size=(48, 40), grid=(6, 5),
                                pooling="softmax", seed=7)
    export_repository(bundle, root / "repo", flavour="python", parity=False)
    return bundle, root / "repo"


def _copy(repo, tmp_path):
    out = tmp_path / "repo"
    shutil.copytree(repo, out)
    return out


def _edit_metadata(repo, **changes):
    """The same change to the latest version's metadata and its top-level copy."""
    for path in (repo / contract.METADATA_FILE, contract.version_dir(repo, 1) / contract.METADATA_FILE):
        doc = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                doc.pop(key)
            else:
                doc[key] = value
        path.write_text(json.dumps(doc))


def test_export_writes_what_the_serving_loader_reads(exported):
    bundle, repo = exported
    model, meta = load_bundle(bundle)
    spec = load_model_spec(repo)
    assert spec.format_version == contract.FORMAT_VERSION and spec.flavour == "python"
    assert spec.input_size == (48, 40) and spec.grid == (6, 5) and spec.pooling == "softmax"
    assert spec.concepts == tuple(meta.concepts) and spec.classes == tuple(meta.classes)
    want = head_arrays(model)
    for name in ("weight", "bias", "concept_mean", "concept_std"):
        np.testing.assert_array_equal(getattr(spec, name), getattr(want, name))
    for model_name in contract.MODELS:
        assert spec.onnx_path(model_name).is_file()
    # the gateway's backend runs the graphs under the contract's tensor names
    backend = EmbeddedBackend(spec)
    maps, scores, logits = backend.infer(np.zeros((2, 48, 40, 3), np.uint8))
    assert maps.shape == (2, 5, 6, 5) and scores.shape == (2, 5) and logits.shape == (2, 4)
    backend.close()


@pytest.mark.parametrize("changes, message", [
    ({"format_version": 2}, "format_version 2; this reader supports (1,)"),
    ({"format_version": None}, "format_version None"),
    ({"grid": None}, "lacks the key 'grid'"),
    ({"grid": [7]}, "'grid' must be [height, width]"),
    ({"pooling": "max"}, "pooling 'max' is not one of"),
    ({"concepts": []}, "'concepts' must be a non-empty list"),
    ({"classes": ["a", "a", "b", "c"]}, "'classes' lists a name twice"),
])
def test_the_reader_refuses_what_it_cannot_serve(exported, tmp_path, changes, message):
    repo = _copy(exported[1], tmp_path)
    _edit_metadata(repo, **changes)
    with pytest.raises(RepositoryError) as info:
        load_model_spec(repo)
    assert message in str(info.value)


def test_maps_dtype_is_read_from_the_graphs_io_and_must_agree(exported, tmp_path):
    repo = _copy(exported[1], tmp_path)
    assert load_model_spec(repo).maps_dtype == "float32"
    doc = json.loads((repo / contract.METADATA_FILE).read_text())
    models = doc["models"]
    models["salf_cbm"]["outputs"]["concept_maps"]["dtype"] = "float16"
    _edit_metadata(repo, models=models)
    with pytest.raises(RepositoryError, match="'float16' out of salf_cbm and 'float32' into salf_head"):
        load_model_spec(repo)
    models["salf_head"]["inputs"]["concept_maps"]["dtype"] = "float16"
    _edit_metadata(repo, models=models)
    assert load_model_spec(repo).maps_dtype == "float16"
    for m in ("salf_cbm", "salf_head"):
        models[m]["outputs" if m == "salf_cbm" else "inputs"]["concept_maps"]["dtype"] = "float64"
    _edit_metadata(repo, models=models)
    with pytest.raises(RepositoryError, match="one of \\('float32', 'float16'\\)"):
        load_model_spec(repo)


def test_head_that_does_not_fit_the_metadata_is_refused(exported, tmp_path):
    repo = _copy(exported[1], tmp_path)
    _edit_metadata(repo, concepts=["a", "b", "c"])
    with pytest.raises(RepositoryError, match=r"'head.weight' has shape \(4, 5\), expected \(4, 3\)"):
        load_model_spec(repo)


def test_the_writer_validates_with_the_reader_rules(tmp_path):
    with pytest.raises(RepositoryError, match="pooling 'median'"):
        contract.metadata_document(model_version=1, flavour="python", input_size=(8, 8), mean=(0, 0, 0), std=(1, 1, 1), grid=(2, 2),
                                   radius=2, pooling="median", concepts=["a"], classes=["b"], backbone={}, clip=None,
                                   max_batch_size=4, opset=18, models={}, head_sha256="", bundle_weights_sha256="",
                                   metrics={}, parity=None)
    assert not (tmp_path / contract.METADATA_FILE).exists()


def test_not_a_repository(tmp_path):
    with pytest.raises(RepositoryError, match="not a SALF-CBM model repository"):
        load_model_spec(tmp_path)
    (tmp_path / contract.METADATA_FILE).write_text("{broken")
    with pytest.raises(RepositoryError, match="is not valid JSON"):
        load_model_spec(tmp_path)
