"""`salfctl train ...` end to end on the small synthetic set: the real CLI, the real pipeline, the real bundle."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.trained import write_fast_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPORT_KEYS = {"test_accuracy", "dense_baseline_test_accuracy", "iou_mean", "iou_baseline_mean", "iou_per_concept",
               "concepts_kept", "concepts_total", "nonzero_weights", "nonzero_per_class", "explanation",
               "dropped_concepts", "timings_s", "wall_seconds", "bundle"}


def salfctl(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", "from clients.salfctl import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=280)


def test_train_all_cli_writes_run_layout_bundle_and_report(tmp_path, synth_data):
    from training.bundle import load_bundle
    from training.data.folder import ImageFolderSplit
    from training.model import normalize_uint8

    config = write_fast_config(tmp_path / "fast.json")
    run = tmp_path / "run"
    proc = salfctl("train", "all", "--config", str(config), "--data", str(synth_data), "--out", str(run), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the one-line summary and the explanation are printed
    assert "test accuracy" in proc.stdout and "concepts kept" in proc.stdout and "non-zero weights" in proc.stdout
    assert "top concepts by contribution" in proc.stdout and "strongest at grid cell" in proc.stdout

    for path in ("backbone/backbone.safetensors", "backbone/backbone.json", "features/train/manifest.json",
                 "cbl/cbl.safetensors", "cbl/cbl.json", "bundle/bundle.json", "bundle/weights.safetensors"):
        assert (run / path).is_file(), path
    report = json.loads((run / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["test_accuracy"] > 0.2  # chance is 1/8; ~0.44 with this seed
    assert 0 <= report["iou_mean"] <= 1 and 0 <= report["iou_baseline_mean"] <= 1
    assert report["concepts_kept"] == 19 and sum(report["nonzero_per_class"]) == report["nonzero_weights"]

    model, meta = load_bundle(run / "bundle")
    assert meta.similarity["source"] == "masks" and meta.training["validation_split"]["seed"] == 0
    assert meta.metrics["test_accuracy"] == report["test_accuracy"]
    assert len(meta.concepts) == 19 and len(meta.classes) == 8
    # the loaded bundle reproduces the reported test accuracy
    test = ImageFolderSplit(synth_data, "test", meta.backbone.input_size)
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        _, _, logits = model(normalize_uint8(images, meta.backbone.mean, meta.backbone.std))
    acc = float((logits.argmax(1) == torch.tensor(test.labels)).float().mean())
    assert acc == pytest.approx(report["test_accuracy"], abs=1e-6)


def test_train_stages_run_separately_and_head_needs_cbl(tmp_path, synth_data):
    from tests.fixtures.trained import fast_config

    doc = fast_config()
    doc["backbone_train"]["epochs"] = 1
    doc["cbl"]["epochs"] = 2
    config = tmp_path / "fast.json"
    config.write_text(json.dumps(doc))
    run = tmp_path / "run"
    proc = salfctl("train", "cbl", "--config", str(config), "--data", str(synth_data), "--out", str(run), "-q")
    assert proc.returncode == 2 and "train backbone" in proc.stderr  # the preset trains its own backbone first
    assert salfctl("train", "backbone", "--config", str(config), "--data", str(synth_data), "--out", str(run),
                   "-q").returncode == 0
    proc = salfctl("train", "head", "--config", str(config), "--data", str(synth_data), "--out", str(run), "-q")
    assert proc.returncode == 2 and "no trained CBL" in proc.stderr
    proc = salfctl("train", "cbl", "--config", str(config), "--data", str(synth_data), "--out", str(run), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "concepts kept" in proc.stdout


def test_bad_inputs_are_clear_cli_errors(tmp_path):
    proc = salfctl("train", "all", "--config", "no-such-preset", "--data", str(tmp_path), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "no config file 'no-such-preset'" in proc.stderr
    proc = salfctl("train", "all", "--config", "tiny-cpu", "--data", str(tmp_path / "nothing"), "--out",
                   str(tmp_path / "r"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_trained_run_fixture_bundle_is_usable(trained_run: Path):
    from training.bundle import load_bundle

    model, meta = load_bundle(trained_run / "bundle")
    report = json.loads((trained_run / "report.json").read_text())
    assert report["test_accuracy"] > 0.2  # chance is 1/8
    maps, scores, logits = model(torch.zeros(1, 3, *meta.backbone.input_size))
    assert maps.shape == (1, len(meta.concepts), 7, 7) and logits.shape == (1, len(meta.classes))


def test_dataset_without_masks_or_test_split_fails_before_training(tmp_path, synth_data):
    import shutil

    from training.config import config_from_dict
    from training.pipeline import PipelineError, make_context
    from tests.fixtures.trained import fast_config

    data = tmp_path / "data"
    shutil.copytree(synth_data, data, ignore=shutil.ignore_patterns("masks", "test"))
    cfg = config_from_dict(fast_config())
    with pytest.raises(PipelineError, match="no test split folder"):
        make_context(cfg, data, tmp_path / "run")
    (data / "test").mkdir()
    doc = json.loads((data / "dataset.json").read_text())
    doc["has_masks"] = False
    (data / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(PipelineError, match="needs per-image concept masks"):
        make_context(cfg, data, tmp_path / "run")


def test_feature_cache_is_rebuilt_when_the_images_change(tmp_path, synth_data):
    """Same dataset path, same image count, one image replaced: the cached features must not be reused."""
    import shutil

    from tests.fixtures.trained import fast_config
    from training.backbones import build_backbone
    from training.config import config_from_dict
    from training.data.folder import ImageFolderSplit
    from training.pipeline import make_context, stage_features

    data = tmp_path / "data"
    shutil.copytree(synth_data, data, ignore=shutil.ignore_patterns("val"))
    doc = fast_config()
    doc["backbone_train"]["enabled"] = False
    ctx = make_context(config_from_dict(doc), data, tmp_path / "run", progress=False)
    torch.manual_seed(0)
    backbone = build_backbone(ctx.cfg.backbone).eval()
    cache = stage_features(ctx, "train", backbone)
    item = int(cache.items[0])  # the first row: rows are in a seeded random order of the train part
    before = next(cache.batches([item], 1)).features
    paths = ImageFolderSplit(data, "train").paths
    image = item // ctx.cfg.cbl.views  # the image this (view) item comes from
    shutil.copyfile(paths[image - 1 if image else 1], paths[image])  # a different image under its name
    after = next(stage_features(ctx, "train", backbone).batches([item], 1)).features
    assert not torch.equal(before, after)
    # and an unchanged dataset still reuses its cache (no rebuild: same shard file)
    manifest = (tmp_path / "run" / "features" / "train" / "manifest.json").stat().st_mtime_ns
    stage_features(ctx, "train", backbone)
    assert (tmp_path / "run" / "features" / "train" / "manifest.json").stat().st_mtime_ns == manifest


def test_head_refuses_a_cbl_trained_on_other_features(tmp_path, synth_data):
    """`train cbl`, then the images change, then `train head`: the CBL's split indices would pair with
    other images; the head stage must refuse instead of fitting on a mismatched split."""
    import shutil

    from tests.fixtures.trained import fast_config
    from training.config import config_from_dict
    from training.data.folder import ImageFolderSplit
    from training.pipeline import PipelineError, make_context, stage_cbl, stage_head

    data = tmp_path / "data"
    shutil.copytree(synth_data, data, ignore=shutil.ignore_patterns("val"))
    doc = fast_config()
    doc["backbone_train"]["enabled"] = False
    doc["cbl"]["epochs"] = 2
    ctx = make_context(config_from_dict(doc), data, tmp_path / "run", progress=False)
    stage_cbl(ctx)
    paths = ImageFolderSplit(data, "train").paths
    shutil.copyfile(paths[1], paths[0])
    with pytest.raises(PipelineError, match="rerun `salfctl train cbl`"):
        stage_head(ctx)
