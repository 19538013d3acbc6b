"""`salfctl eval` end to end on the quickly trained run of the session (tests/fixtures/trained.py) and
the small synthetic set: every protocol runs, with real grad-cam and captum baselines, and the figures
keep the relations that must hold whatever the model's quality."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from tests.fixtures.gateway import ROOT, SALFCTL

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def evaluation(trained_run, synth_data):
    from training.quality.protocols.run import run_eval

    return run_eval(trained_run / "bundle", synth_data, limit=16,
                    baselines=("GradCAM", "Integrated Gradients", "LRP"), seed=0)


def test_classification_rows_and_the_bundles_own_accuracy(evaluation, trained_run):
    rows = evaluation["classification"]["rows"]
    assert list(rows) == ["standard dense", "standard sparse", "SALF-CBM dense", "SALF-CBM sparse (the bundle's head)"]
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["nonzero_per_class"] > 0
    report = json.loads((trained_run / "report.json").read_text())
    own = rows["SALF-CBM sparse (the bundle's head)"]
    assert own["accuracy"] == pytest.approx(report["test_accuracy"], abs=1e-6)  # training's own evaluation
    budget = evaluation["classification"]["sparse_budget_per_class"]
    assert rows["standard sparse"]["nonzero_per_class"] <= budget
    assert 0.0 <= rows["standard sparse"]["accuracy_nec5"] <= 1.0


def test_localisation_has_every_method_and_the_trivial_floor(evaluation):
    loc = evaluation["localisation"]
    rows = loc["rows"]
    assert {"SALF-CBM", "GradCAM", "Integrated Gradients", "trivial: all background", "trivial: centred Gaussian",
            "trivial: uniform random"} <= set(rows)
    assert "LRP" in rows or "LRP" in loc["unavailable"]  # a number, or the reason it cannot run here
    for r in rows.values():
        for k in ("pixel_accuracy", "miou", "map", "pointing"):
            assert 0.0 <= r[k] <= 1.0, (k, r)
        assert r["images"] == 16
    # the all-background map is right exactly on the background, and its AP is the foreground share
    assert rows["trivial: all background"]["pixel_accuracy"] == pytest.approx(1 - loc["foreground_share"])
    assert rows["trivial: all background"]["pointing"] == 0.0
    assert len(loc["_examples"]) == 4
    for name in ("SALF-CBM", "GradCAM", "trivial: uniform random"):  # faithfulness, each on its own model
        assert 0.0 <= rows[name]["deletion_auc"] <= 1.0 and 0.0 <= rows[name]["insertion_auc"] <= 1.0


def test_concept_neurons_against_the_best_backbone_channel(evaluation):
    cn = evaluation["concept_neurons"]
    assert cn["k"] == 48 and len(cn["per_concept"]) == 19  # k 50 capped at the 48 test images; every concept kept
    for r in cn["per_concept"].values():
        assert 0.0 <= r["precision_at_k"] <= 1.0 and 0.0 <= r["channel_precision_at_k"] <= 1.0
    assert cn["_gallery"] and all(len(v) == 5 for v in cn["_gallery"].values())


def test_concepts_rules_and_cost(evaluation):
    cl = evaluation["concepts_localisation"]
    assert set(cl["per_concept"]) == {"SALF-CBM", "position-blind"}
    present = [v for v in cl["per_concept"]["SALF-CBM"]["iou_half"].values() if v is not None and not np.isnan(v)]
    assert present and all(0.0 <= v <= 1.0 for v in present)
    rules = evaluation["rules"]
    assert len(rules["share"]) == 8 and 0.0 <= rules["mean_share"] <= 1.0
    assert rules["defining"]["balloon"] == ["circle", "string"]
    cost = evaluation["cost"]["seconds_per_image"]
    assert set(cost) == {"SALF-CBM", "GradCAM", "Integrated Gradients"} and all(v > 0 for v in cost.values())


def test_generalisation_on_the_shifted_splits(evaluation):
    g = evaluation["generalisation"]
    assert g["images"] == 16 and g["in_distribution"]["images"] == 16  # --limit applies to both splits
    for part in (g, g["in_distribution"]):
        assert 0.0 <= part["salf_accuracy"] <= 1.0 and 0.0 <= part["salf_pointing"] <= 1.0
        assert sum(b["images"] for b in part["by_object_size"].values()) == part["images"]
    # the shifted split has objects that fill a large share of the frame; the test split never does
    assert ">= 15%" in g["by_object_size"] and ">= 15%" not in g["in_distribution"]["by_object_size"]
    assert g["foreground_share"] > g["in_distribution"]["foreground_share"]
    rows = g["localisation"]["rows"]
    assert {"SALF-CBM", "GradCAM", "trivial: all background"} <= set(rows)
    assert rows["SALF-CBM"]["images"] == 16 and rows["trivial: all background"]["pointing"] == 0.0
    pairs = g["pairs"]
    assert pairs["images"] == 16 and pairs["objects"] == 32
    assert all(0.0 <= v <= 1.0 for v in (*pairs["top2_both_classes"].values(), pairs["region_class"],
                                          pairs["region_defining_in_top"]))


def test_salfctl_eval_writes_json_and_figure(trained_run, synth_data, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run([*SALFCTL, "eval", str(trained_run), "--data", str(synth_data), "--limit", "8",
                           "--baselines", "GradCAM", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Class heatmaps against the object's silhouette" in proc.stdout and "trivial: all background" in proc.stdout
    assert "Generalisation: test split vs shifted split" in proc.stdout and "Two-object images" in proc.stdout
    doc = json.loads((out / "eval.json").read_text())
    assert doc["supervision"] == "masks" and "_examples" not in doc["localisation"]
    assert "_examples" not in doc["generalisation"]["localisation"]
    assert (out / "localisation.png").stat().st_size > 1000 and (out / "concept-neurons.png").stat().st_size > 1000
    assert "_gallery" not in doc["concept_neurons"]
    assert (out / "rules.png").stat().st_size > 1000
    assert all(abs(w) > 0 for terms in doc["rules"]["terms"].values() for _, w in terms)
    bad = subprocess.run([*SALFCTL, "eval", str(trained_run), "--data", str(synth_data), "--baselines", "Nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown baseline" in bad.stderr


def test_class_concept_mode_end_to_end(synth_data, tmp_path):
    """`salfctl train all --class-concepts 'An image of a {class}'` (paper 4.2): one concept per class, none
    dropped, the template recorded in the bundle; `salfctl eval` then scores each class concept's own
    map as a heatmap row of its own, and skips the rules (no defining concepts among class prompts)."""
    from tests.fixtures.trained import write_fast_config
    from training.data.world import CLASS_NAMES

    config = write_fast_config(tmp_path / "fast.json")
    run = tmp_path / "run"
    train = subprocess.run([*SALFCTL, "train", "all", "--config", str(config), "--data", str(synth_data), "--out",
                            str(run), "--quiet", "--class-concepts", "An image of a {class}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=400)
    assert train.returncode == 0, train.stdout + train.stderr
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    assert meta["concepts"] == [f"An image of a {c.replace('_', ' ')}" for c in CLASS_NAMES]
    assert meta["similarity"]["class_concepts"] == "An image of a {class}"
    out = tmp_path / "eval"
    proc = subprocess.run([*SALFCTL, "eval", str(run), "--data", str(synth_data), "--limit", "8", "--baselines",
                           "none", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((out / "eval.json").read_text())
    assert doc["class_concepts"] == "An image of a {class}"
    row = doc["localisation"]["rows"]["SALF-CBM class concept (paper 4.2)"]
    assert row["images"] == 8 and 0.0 <= row["map"] <= 1.0
    assert "SALF-CBM class concept (paper 4.2)" in doc["generalisation"]["localisation"]["rows"]
    assert "skipped" in doc["rules"]
    bad = subprocess.run([*SALFCTL, "train", "all", "--config", str(config), "--data", str(synth_data), "--out",
                          str(tmp_path / "bad"), "--class-concepts", "no placeholder"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "placeholder" in bad.stderr


def test_imagenet_segmentation_file(trained_run, synth_data, tmp_path):
    """`salfctl eval --imagenet-seg gtsegs_ijcv.mat` (a file the test writes in the real layout, with
    synthetic images and their objects' silhouettes, other sizes included): Table 2 on it alone (the
    baselines explain the SALF-CBM itself), and beside the dataset's protocols with --data."""
    from tests.unit.test_quality_readers import write_gtsegs
    from training.data.folder import ImageFolderSplit
    from training.quality.protocols.localisation import foreground

    images, masks = [], []
    for split in ("test", "shifted"):
        ds = ImageFolderSplit(synth_data, split)
        for i in range(0, len(ds), len(ds) // 3):
            images.append(ds.image(i))
            masks.append(foreground(ds, i))
    path = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(path, images, masks)
    out = tmp_path / "seg"
    proc = subprocess.run([*SALFCTL, "eval", str(trained_run), "--imagenet-seg", str(path), "--baselines", "GradCAM",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ImageNet-segmentation (paper Table 2)" in proc.stdout
    seg = json.loads((out / "eval.json").read_text())["imagenet_segmentation"]
    assert seg["images"] == len(images) and seg["baselines_explain"] == "the SALF-CBM itself"
    assert set(seg["rows"]) >= {"SALF-CBM", "GradCAM", "trivial: all background"}
    assert seg["rows"]["SALF-CBM"]["images"] == len(images)
    none = subprocess.run([*SALFCTL, "eval", str(trained_run)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "--imagenet-seg" in none.stderr
