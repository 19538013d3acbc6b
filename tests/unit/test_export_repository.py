"""Bundle -> ONNX graphs -> Triton repository: layout, graph contract, metadata, parity, failures."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file

from export.onnx_graphs import OPSET, ExportError, export_cbm
from export.parity import Tolerance, check_parity, find_images, load_images
from export.repository import export_repository, read_repository_metadata
from tests.fixtures.bundles import make_random_bundle
from training.bundle import BundleError, load_bundle, sha256_file

pytestmark = pytest.mark.timeout(120)


def _io(model: onnx.ModelProto, values) -> list[tuple[str, int, list]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        out.append((v.name, t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]))
    return out


@pytest.fixture(scope="module")
def softmax_export(tmp_path_factory, synth_data):
    """A softmax-pooling bundle with a non-square input, exported (onnxruntime flavour) with real images."""
    root = tmp_path_factory.mktemp("softmax")
    bundle = make_random_bundle(root / "bundle", num_concepts=5, num_classes=4, input_size=(48, 80), grid=(5, 6),
                                pooling="softmax", seed=3)
    report = export_repository(bundle, root / "repo", flavour="onnxruntime", parity_images=synth_data / "test")
    return bundle, root / "repo", report


def test_graph_contract_exact_names_dtypes_and_dynamic_batch(softmax_export):
    _, repo, _ = softmax_export
    cbm = onnx.load(repo / "salf_cbm" / "1" / "model.onnx")
    onnx.checker.check_model(cbm, full_check=True)
    assert _io(cbm, cbm.graph.input) == [("image", onnx.TensorProto.UINT8, ["batch", 48, 80, 3])]
    assert _io(cbm, cbm.graph.output) == [
        ("concept_maps", onnx.TensorProto.FLOAT, ["batch", 5, 5, 6]),
        ("concept_scores", onnx.TensorProto.FLOAT, ["batch", 5]),
        ("logits", onnx.TensorProto.FLOAT, ["batch", 4])]
    head = onnx.load(repo / "salf_head" / "1" / "model.onnx")
    assert _io(head, head.graph.input) == [("concept_maps", onnx.TensorProto.FLOAT, ["batch", 5, 5, 6])]
    assert [o.name for o in head.graph.output] == ["concept_scores", "logits"]
    for graph in (cbm, head):
        assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}


def test_graphs_are_clean_no_dead_or_identity_nodes(softmax_export):
    _, repo, report = softmax_export
    for name in ("salf_cbm", "salf_head"):
        graph = onnx.load(repo / name / "1" / "model.onnx").graph
        consumed = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [o for n in graph.node for o in n.output if o and o not in consumed]
        assert dead == [], f"{name} has dead outputs {dead}"
        ops = {n.op_type for n in graph.node}
        assert not ops & {"Identity", "Constant", "BatchNormalization"}, ops  # folded by the exporter/optimizer
        assert report.models[name]["graph"]["nodes"] == len(graph.node)
    assert "Softmax" in report.models["salf_head"]["graph"]["ops"]


def test_parity_figures_cover_random_and_real_images_at_batch_1_and_7(softmax_export):
    _, _, report = softmax_export
    parity = report.parity
    assert parity["batch_sizes"] == [1, 7] and parity["image_sets"] == ["random", "real"]
    figures, ratios = parity["max_abs_diff"], parity["ratio"]
    for image_set in ("random", "real"):
        for key in ("salf_cbm/concept_maps", "salf_cbm/concept_scores", "salf_cbm/logits",
                    "salf_head/concept_scores", "salf_head/logits"):
            # a random tiny model is well conditioned: fp32 rounding level, far inside the bounds
            assert 0.0 <= figures[f"{image_set}/{key}"] <= 1e-5, (image_set, key, figures)
            assert 0.0 <= ratios[f"{image_set}/{key}"] < 0.1, (image_set, key, ratios)


def test_onnx_matches_torch_on_real_images_at_other_batch_sizes(softmax_export, synth_data):
    """Independent of the built-in check: batch 3 of real images through the written file."""
    bundle, repo, _ = softmax_export
    model, meta = load_bundle(bundle)
    images = load_images(find_images(synth_data / "test", limit=3), meta.backbone.input_size)
    session = ort.InferenceSession(str(repo / "salf_cbm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    maps, scores, logits = session.run(None, {"image": images})
    from training.model import normalize_uint8

    with torch.no_grad():
        ref = model(normalize_uint8(torch.from_numpy(images), meta.backbone.mean, meta.backbone.std))
    for got, want in zip((maps, scores, logits), ref):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    assert maps.shape == (3, 5, 5, 6) and logits.shape == (3, 4)


def test_metadata_and_head_file_describe_the_bundle(softmax_export):
    bundle, repo, report = softmax_export
    model, meta = load_bundle(bundle)
    doc = read_repository_metadata(repo)
    bundle_doc = json.loads((bundle / "bundle.json").read_text())
    assert doc["format_version"] == 1 and doc["flavour"] == "onnxruntime" and doc["opset"] == OPSET
    assert doc["input"] == {"name": "image", "dtype": "uint8", "layout": "NHWC"}
    assert doc["input_size"] == [48, 80] and doc["grid"] == [5, 6] and doc["pooling"] == "softmax"
    assert doc["mean"] == list(meta.backbone.mean) and doc["std"] == list(meta.backbone.std)
    assert doc["radius"] == meta.radius and doc["concepts"] == meta.concepts and doc["classes"] == meta.classes
    assert doc["bundle"]["weights_sha256"] == bundle_doc["weights"]["sha256"]
    assert doc["parity"] == report.parity
    for name in ("salf_cbm", "salf_head"):
        assert doc["models"][name]["sha256"] == sha256_file(repo / doc["models"][name]["onnx"])
        assert doc["models"][name]["exporter"] == "torchscript"
    assert doc["models"]["salf_cbm"]["outputs"]["concept_maps"] == {"dtype": "float32", "dims": [-1, 5, 5, 6]}
    assert json.loads((repo / "concepts.json").read_text()) == meta.concepts
    assert json.loads((repo / "classes.json").read_text()) == meta.classes
    assert doc["head"]["sha256"] == sha256_file(repo / "head.safetensors")
    head = load_file(str(repo / "head.safetensors"))
    assert {k: (v.dtype, v.shape) for k, v in head.items()} == {
        "head.weight": (np.float32, (4, 5)), "head.bias": (np.float32, (4,)),
        "concept_mean": (np.float32, (5,)), "concept_std": (np.float32, (5,))}
    np.testing.assert_array_equal(head["head.weight"], model.head.linear.weight.detach().numpy())
    np.testing.assert_array_equal(head["concept_std"], model.head.concept_std.numpy())


def test_parity_detects_a_graph_that_does_not_match_the_model(random_bundle, tmp_path):
    model, meta = load_bundle(random_bundle)
    spec = meta.backbone
    cbm, head = tmp_path / "cbm.onnx", tmp_path / "head.onnx"
    from export.onnx_graphs import export_head

    assert export_cbm(model, spec.mean, spec.std, spec.input_size, cbm) == "torchscript"
    assert export_head(model.head, len(meta.concepts), meta.grid, head) == "torchscript"
    with torch.no_grad():  # the torch model drifts after export: parity must catch it
        model.head.linear.bias.add_(0.05)
    with pytest.raises(ExportError, match=r"parity failed.*salf_cbm/logits: max abs diff 0\.05 exceeds its bound"):
        check_parity(model, spec.mean, spec.std, spec.input_size, cbm, head)


def test_parity_catches_a_small_relative_error_in_the_concept_maps(random_bundle, tmp_path):
    """A random tiny model's maps are ~1e-4: an absolute 1e-4 bound let a CBL scaled by 0.8 (and the
    scores/logits that follow it) pass. The maps bound is relative to the maps' own scale."""
    model, meta = load_bundle(random_bundle)
    spec = meta.backbone
    cbm, head = tmp_path / "cbm.onnx", tmp_path / "head.onnx"
    from export.onnx_graphs import export_head

    export_cbm(model, spec.mean, spec.std, spec.input_size, cbm)
    export_head(model.head, len(meta.concepts), meta.grid, head)
    with torch.no_grad():
        model.cbl.conv.weight.mul_(0.8)
    with pytest.raises(ExportError, match=r"salf_cbm/concept_maps: max abs diff .* exceeds its bound"):
        check_parity(model, spec.mean, spec.std, spec.input_size, cbm, head, batch_sizes=(2,))


def test_failed_export_leaves_the_repository_untouched(random_bundle, tmp_path):
    repo = tmp_path / "repo"
    export_repository(random_bundle, repo, flavour="python")
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    (repo / "README.md").write_text("kept")
    other = make_random_bundle(tmp_path / "other", num_concepts=4, seed=9)
    impossible = Tolerance(atol=-1.0, rtol=0.0)  # every comparison fails, as a real mismatch would
    with pytest.raises(ExportError, match="ONNX parity failed"):
        export_repository(other, repo, flavour="python", tolerance=impossible)
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file() and p.name != "README.md"}
    assert after == before
    assert (repo / "README.md").read_text() == "kept"
    assert not any(p.name.startswith(".export-staging") for p in repo.iterdir())


def test_reexport_replaces_models_and_switches_flavour(random_bundle, tmp_path):
    repo = tmp_path / "repo"
    export_repository(random_bundle, repo, flavour="python", parity=False)
    assert (repo / "salf_cbm" / "1" / "model.py").is_file()
    report = export_repository(random_bundle, repo, flavour="onnxruntime", parity=False)
    assert report.parity is None and report.flavour == "onnxruntime"
    assert not (repo / "salf_cbm" / "1" / "model.py").exists()
    assert sorted(p.name for p in repo.iterdir()) == ["classes.json", "concepts.json", "head.safetensors",
                                                      "salf_cbm", "salf_head", "salf_model.json"]


def test_bad_inputs_are_clear_errors(tmp_path, random_bundle, synth_data):
    with pytest.raises(BundleError, match="not a SALF-CBM bundle"):
        export_repository(tmp_path / "missing", tmp_path / "repo")
    with pytest.raises(ValueError, match="unknown flavour 'tf'"):
        export_repository(random_bundle, tmp_path / "repo", flavour="tf")
    with pytest.raises(ValueError, match="no images"):
        export_repository(random_bundle, tmp_path / "repo", parity_images=tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read parity image .*bad.png"):
        load_images([bad], (64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("exporter,expected", [("auto", "torchscript"), ("dynamo", "dynamo")])
def test_vit_backbone_exports_with_either_exporter_and_keeps_parity(tmp_path, exporter, expected):
    """timm ViTs trace (the token-grid side is a plain int), and the dynamo exporter handles them too."""
    from training.backbones import BackboneSpec, build_backbone
    from training.bundle import BundleMeta, save_bundle
    from training.model import SalfCBM

    torch.manual_seed(0)
    spec = BackboneSpec(arch="timm:test_vit", input_size=(64, 64))
    backbone = build_backbone(spec)
    model = SalfCBM(backbone, backbone.feature_shape()[0], 4, 3, (7, 7), "avg").eval()
    meta = BundleMeta(backbone=spec, feature_dim=backbone.feature_shape()[0], concepts=list("abcd"),
                      classes=["x", "y", "z"])
    bundle = save_bundle(tmp_path / "vit", model, meta)
    report = export_repository(bundle, tmp_path / "repo", flavour="python", exporter=exporter)
    assert report.models["salf_cbm"]["exporter"] == expected
    assert report.models["salf_head"]["exporter"] == expected
    assert report.models["salf_cbm"]["outputs"]["concept_maps"]["dims"] == [-1, 4, 7, 7]
    assert "LayerNormalization" in report.models["salf_cbm"]["graph"]["ops"]
    assert max(report.parity["max_abs_diff"].values()) <= 1e-4 and max(report.parity["ratio"].values()) < 0.5
    session = ort.InferenceSession(str(tmp_path / "repo" / "salf_cbm" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert session.run(["logits"], {"image": np.zeros((5, 64, 64, 3), np.uint8)})[0].shape == (5, 3)
