"""`salfctl train concepts|similarities`: bad input -> exit code 2 and a message naming the problem."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from clients.salfctl import app

pytestmark = pytest.mark.timeout(120)


def _run(*args):
    return CliRunner().invoke(app, ["train", *args])


def test_similarities_missing_dataset(tmp_path):
    res = _run("similarities", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "sim"),
               "--config", "tiny-clip-cpu")
    assert res.exit_code == 2 and "nope" in res.output and "does not exist" in res.output


def test_similarities_missing_weights_names_the_path(clip_small_data, tmp_path):
    weights = tmp_path / "weights" / "ViT-B-16.safetensors"
    res = _run("similarities", "--data", str(clip_small_data), "--out", str(tmp_path / "sim"),
               "--clip", "ViT-B-16", "--clip-pretrained", str(weights))
    assert res.exit_code == 2 and str(weights) in res.output and "nothing is downloaded" in res.output
    assert not (tmp_path / "sim" / "manifest.json").exists()


def test_similarities_bad_grid_and_unknown_model(clip_small_data, tmp_path):
    res = _run("similarities", "--data", str(clip_small_data), "--out", str(tmp_path / "s"), "--grid", "7by7")
    assert res.exit_code == 2 and "7x7" in res.output
    res = _run("similarities", "--data", str(clip_small_data), "--out", str(tmp_path / "s"), "--clip", "ViT-Q-99")
    assert res.exit_code == 2 and "unknown open_clip model 'ViT-Q-99'" in res.output


def test_concepts_needs_a_source_of_classes_and_concepts(tmp_path):
    res = _run("concepts", "--out", str(tmp_path / "c"))
    assert res.exit_code == 2 and "--data" in res.output
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\n")
    res = _run("concepts", "--out", str(tmp_path / "c"), "--classes", str(classes), "--generate")
    assert res.exit_code == 2 and "OPENAI_BASE_URL" in res.output


def test_concepts_user_list_offline(tmp_path):
    """A user list filtered without images (no --data): text rules apply, the report says why."""
    import json

    classes, concepts = tmp_path / "classes.txt", tmp_path / "concepts.txt"
    classes.write_text("dog\ncat\n")
    concepts.write_text("# my list\nred fur\nthe dog\nwhiskers\nred fur\n" + "z" * 31 + "\n")
    out = tmp_path / "c"
    res = _run("concepts", "--out", str(out), "--classes", str(classes), "--concepts", str(concepts),
               "--config", "tiny-clip-cpu", "--no-image-filter")
    assert res.exit_code == 0, res.output
    assert (out / "concepts.txt").read_text() == "red fur\nwhiskers\n"
    report = json.loads((out / "report.json").read_text())
    assert report["dropped_by_reason"] == {"class_name": 1, "duplicate": 1, "too_long": 1}
    assert report["settings"]["top5_cutoff"] is None and report["clip"]["model"] == "salf-tiny-clip-112"
