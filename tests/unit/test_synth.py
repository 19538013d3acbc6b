"""Synthetic dataset writer (training/data/synth.py, `salfctl data synth`): determinism, layout, metadata,
arguments, reuse of an existing dataset."""
import hashlib
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from training.data import synth, world

TINY = {"train": 2, "val": 1, "test": 1, "shifted": 1, "shifted-pairs": 1}


def _digest(root):
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.timeout(60)
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = _digest(synth.generate(tmp_path / "a", seed=7, per_class=TINY, image_size=48).root)
    b = _digest(synth.generate(tmp_path / "b", seed=7, per_class=TINY, image_size=48, workers=2).root)
    c = _digest(synth.generate(tmp_path / "c", seed=8, per_class=TINY, image_size=48).root)
    assert a == b
    assert len(a) == 8 * 6 * 2 + 3  # image + mask per image, three metadata files
    differing = [k for k in a if k.endswith((".png", ".npz")) and a[k] != c[k]]
    assert len(differing) == 8 * 6 * 2


def test_metadata_and_layout(synth_data):
    meta = json.loads((synth_data / "dataset.json").read_text())
    assert set(meta) == {"name", "seed", "image_size", "classes", "concepts", "splits", "has_masks", "shift"}
    assert meta["classes"] == (synth_data / "classes.txt").read_text().splitlines() == list(world.CLASS_NAMES)
    assert meta["concepts"] == (synth_data / "concepts.txt").read_text().splitlines() == list(world.CONCEPTS)
    assert meta["splits"] == {"train": 96, "val": 32, "test": 48, "shifted": 24, "shifted-pairs": 16}
    assert meta["has_masks"] is True and meta["image_size"] == [112, 112] and meta["seed"] == 0
    assert meta["shift"]["key_radius"] == list(world.SHIFT.key_radius)
    for split in synth.ALL_SPLITS:
        assert len(list((synth_data / split).rglob("*.png"))) == meta["splits"][split]
        assert len(list((synth_data / "masks" / split).rglob("*.npz"))) == meta["splits"][split]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        synth.generate(tmp_path / "x", seed=-1, per_class=TINY)
    with pytest.raises(ValueError, match="image size"):
        synth.generate(tmp_path / "x", seed=0, per_class=TINY, image_size=16)
    with pytest.raises(ValueError, match="train"):
        synth.generate(tmp_path / "x", seed=0, per_class={"train": 0, "val": 1, "test": 1})


def test_cli(tmp_path):
    import typer

    from training.cli import data_app

    app = typer.Typer()  # mounted as in salfctl, without importing the other parts' commands
    app.add_typer(data_app, name="data")
    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--seed", "3", "--size", "tiny", "--train-per-class", "1",
            "--val-per-class", "1", "--test-per-class", "0", "--image-size", "40"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "8 classes, 19 concepts, train/val/test = 8/8/0 images at 40x40, seed 3" in result.output
    with Image.open(next((out / "train").rglob("*.png"))) as im:
        assert im.size == (40, 40)
    png = next((out / "train").rglob("*.png"))
    stamp = png.stat().st_mtime_ns
    same = CliRunner().invoke(app, args)  # same parameters: kept, nothing rewritten (make demo reruns)
    assert same.exit_code == 0 and same.output.startswith("kept (same parameters)")
    assert png.stat().st_mtime_ns == stamp
    other = CliRunner().invoke(app, [a if a != "3" else "4" for a in args])
    assert other.exit_code == 2 and "different or incomplete dataset" in other.output
    before = png.read_bytes()
    png.unlink()  # an incomplete split is written again, the same bytes; the other splits stay
    other_png = next((out / "val").rglob("*.png"))
    other_stamp = other_png.stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.startswith("added train to"), again.output
    assert png.read_bytes() == before and other_png.stat().st_mtime_ns == other_stamp
    assert CliRunner().invoke(app, args + ["--overwrite"]).exit_code == 0
    assert png.is_file()
    bad = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "o2"), "--size", "huge"])
    assert bad.exit_code != 0 and "unknown size preset" in bad.output


def test_a_dataset_from_before_the_shifted_splits_gains_them(tmp_path):
    old = {"train": 1, "val": 1, "test": 1, "shifted": 0, "shifted-pairs": 0}
    root = synth.generate(tmp_path / "d", seed=2, per_class=old, image_size=40).root
    meta = json.loads((root / "dataset.json").read_text())
    del meta["shift"]  # the metadata an older version wrote
    meta["splits"] = {k: v for k, v in meta["splits"].items() if k in synth.SPLITS}
    (root / "dataset.json").write_text(json.dumps(meta))
    before = _digest(root / "train")
    summary = synth.generate(root, seed=2, per_class={**old, "shifted": 1, "shifted-pairs": 1}, image_size=40)
    assert summary.extra["written"] == ["shifted", "shifted-pairs"]
    assert _digest(root / "train") == before
    assert json.loads((root / "dataset.json").read_text())["splits"]["shifted"] == 8
