"""A really trained bundle (the `trained_run` pipeline on the synthetic data) through export and a real
Triton: parity on real images, and the test split classified by Triton exactly as by torch."""
import json

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from export.parity import load_images
from export.repository import export_repository
from export.triton_server import TritonServer
from training.bundle import load_bundle
from training.model import normalize_uint8

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _test_split(data_root):
    """Test images in dataset order (class index, file name) with their labels (docs/DESIGN.md)."""
    classes = (data_root / "classes.txt").read_text().split("\n")
    classes = [c for c in classes if c]
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((data_root / "test" / name).glob("*.png")):
            paths.append(path)
            labels.append(label)
    return paths, np.array(labels)


@pytest.fixture(scope="module")
def trained_export(trained_run, synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained_export") / "model_repository"
    report = export_repository(trained_run / "bundle", out, flavour="python", parity_images=synth_data / "test")
    return out, report


def test_parity_on_real_images_of_a_trained_model(trained_export):
    _, report = trained_export
    parity = report.parity
    assert parity["image_sets"] == ["random", "real"] and parity["batch_sizes"] == [1, 7]
    print("trained-model parity:", json.dumps({k: f"{v:.2e} ({parity['ratio'][k]:.3f})"
                                              for k, v in parity["max_abs_diff"].items()}, indent=1))
    assert all(r < 1.0 for r in parity["ratio"].values())
    assert parity["max_abs_diff"]["real/salf_cbm/concept_maps"] <= 1e-5


def test_triton_classifies_the_test_split_like_torch(trained_export, trained_run, synth_data, tmp_path):
    repo, _ = trained_export
    model, meta = load_bundle(trained_run / "bundle")
    paths, labels = _test_split(synth_data)
    images = load_images(paths, meta.backbone.input_size)
    with torch.no_grad():
        ref_maps, _, ref_logits = (t.numpy() for t in model(
            normalize_uint8(torch.from_numpy(images), meta.backbone.mean, meta.backbone.std)))
    with TritonServer(repo, log_path=tmp_path / "triton.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        logits, maps = [], []
        for start in range(0, len(images), 16):
            inp = grpcclient.InferInput("image", [len(images[start:start + 16]), *images.shape[1:]], "UINT8")
            inp.set_data_from_numpy(images[start:start + 16])
            result = client.infer("salf_cbm", [inp])
            logits.append(result.as_numpy("logits"))
            maps.append(result.as_numpy("concept_maps"))
    logits, maps = np.concatenate(logits), np.concatenate(maps)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(logits.argmax(1), ref_logits.argmax(1))
    accuracy = float((logits.argmax(1) == labels).mean())
    report = json.loads((trained_run / "report.json").read_text())
    assert report["test_count"] == len(labels)
    assert accuracy == pytest.approx(report["test_accuracy"], abs=1e-9)
