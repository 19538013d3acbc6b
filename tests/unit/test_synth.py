"""Synthetic dataset (training/data/synth.py, `salfctl data synth`): determinism, layout, concept design."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from training.data import synth
from training.data.folder import ImageFolderSplit

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


def test_image_independent_of_generation_order():
    first = synth.render(3, (48, 48), synth.image_rng(5, "val", 3, 2))
    synth.render(0, (48, 48), synth.image_rng(5, "train", 0, 0))  # interleave another draw
    again = synth.render(3, (48, 48), synth.image_rng(5, "val", 3, 2))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def test_metadata_and_layout(synth_data):
    meta = json.loads((synth_data / "dataset.json").read_text())
    assert set(meta) == {"name", "seed", "image_size", "classes", "concepts", "splits", "has_masks", "shift"}
    assert meta["classes"] == (synth_data / "classes.txt").read_text().splitlines() == list(synth.CLASS_NAMES)
    assert meta["concepts"] == (synth_data / "concepts.txt").read_text().splitlines() == list(synth.CONCEPTS)
    assert meta["splits"] == {"train": 96, "val": 32, "test": 48, "shifted": 24, "shifted-pairs": 16}
    assert meta["has_masks"] is True and meta["image_size"] == [112, 112] and meta["seed"] == 0
    assert meta["shift"]["key_radius"] == list(synth.SHIFT.key_radius)
    for split in synth.ALL_SPLITS:
        assert len(list((synth_data / split).rglob("*.png"))) == meta["splits"][split]
        assert len(list((synth_data / "masks" / split).rglob("*.npz"))) == meta["splits"][split]


def _all_masks(root, split):
    ds = ImageFolderSplit(root, split)
    return ds, [ds.load_masks(i) for i in range(len(ds))]


def test_masks_layers_and_class_concepts(synth_data):
    idx = synth.CONCEPT_INDEX
    layers = [idx[c] for c in (*synth.KEY_SHAPES, *synth.DISTRACTOR_SHAPES, "string", "grass", *synth.BACKGROUNDS)]
    objects = [idx[c] for c in (*synth.KEY_SHAPES, *synth.DISTRACTOR_SHAPES)]
    colours = [idx[c] for c in synth.COLOURS]
    seen = np.zeros(len(synth.CONCEPTS), bool)
    for split in (*synth.SPLITS, synth.SHIFTED):
        ds, masks = _all_masks(synth_data, split)
        for label, m in zip(ds.labels, masks):
            assert m.shape[0] == len(synth.CONCEPTS) and m.dtype == np.bool_
            if split != synth.SHIFTED:
                assert m.shape[1:] == (112, 112)
            # every pixel belongs to exactly one layer (at most one on a shifted background, which
            # carries no concept); object pixels carry exactly one colour
            layered = m[layers].sum(0)
            assert (layered == 1).all() if split != synth.SHIFTED else (layered <= 1).all()
            if split == synth.SHIFTED:
                assert not m[[idx[b] for b in synth.BACKGROUNDS]].any()
            obj = m[objects].any(0)
            np.testing.assert_array_equal(m[colours].sum(0), obj.astype(int))
            present = {c for c, k in idx.items() if m[k].any()}
            # the class is exactly the rule whose defining concepts are present (what the head must learn)
            matching = [r for r, rule in enumerate(synth.CLASSES) if _defining(rule) <= present]
            assert matching == [label], (ds.paths, present)
            seen |= m.any(axis=(1, 2))
    assert seen.all(), [c for c, s in zip(synth.CONCEPTS, seen) if not s]


def _defining(rule):
    extra = {"balloon": "string", "ball": "grass"}.get(rule.placement, rule.texture)
    return {rule.shape, extra}


def test_colour_masks_match_pixels(synth_data):
    ds, masks = _all_masks(synth_data, "val")
    for colour, rgb in synth.COLOURS.items():
        k = synth.CONCEPT_INDEX[colour]
        pix = np.concatenate([ds.image(i)[m[k]] for i, m in enumerate(masks)]).astype(float)
        assert len(pix) > 0
        # solid and textured pixels are the colour or its light tint: the mean sits near the base
        # colour and far from every other palette colour
        dists = {c: np.linalg.norm(pix.mean(0) - (0.8 * np.array(v) + 0.2 * 255)) for c, v in synth.COLOURS.items()}
        assert min(dists, key=dists.get) == colour


def test_positional_classes(synth_data):
    ds, masks = _all_masks(synth_data, "train")
    circle = synth.CONCEPT_INDEX["circle"]
    for label, m in zip(ds.labels, masks):
        name = synth.CLASS_NAMES[label]
        if name in ("balloon", "ball"):
            rows = np.nonzero(m[circle].any(1))[0]
            centre = rows.mean() / 112
            assert centre < 0.4 if name == "balloon" else centre > 0.6


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


def test_shifted_splits(synth_data):
    """Other sizes, aspect ratios, scales and backgrounds; pairs carry each object's silhouette and class."""
    ds = ImageFolderSplit(synth_data, synth.SHIFTED)
    sizes = set()
    shape = [synth.CONCEPT_INDEX[c] for c in synth.KEY_SHAPES]
    for i in range(len(ds)):
        h, w = ds.image(i).shape[:2]
        sizes.add((h, w))
        lo, hi = synth.SHIFT.short_side
        assert lo <= min(h, w) <= hi and synth.SHIFT.aspect[0] - 0.01 <= w / h <= synth.SHIFT.aspect[1] + 0.01
        assert ds.load_objects(i) is None
        assert ds.load_masks(i)[shape].any()
    assert len(sizes) > len(ds) // 2  # not one size
    pairs = ImageFolderSplit(synth_data, synth.PAIRS)
    for i in range(len(pairs)):
        classes, objects = pairs.load_objects(i)
        masks = pairs.load_masks(i)
        assert len(classes) == 2 and classes[0] == pairs.labels[i] and classes[0] != classes[1]
        assert objects.shape == (2, *masks.shape[1:]) and objects.all(axis=0).sum() == 0  # never overlap
        assert objects.reshape(2, -1).any(axis=1).all()
        for c, obj in zip(classes, objects):  # each silhouette shows its class's shape
            rule = synth.CLASSES[c]
            assert masks[synth.CONCEPT_INDEX[rule.shape]][obj].mean() > 0.99
        present = {name for name, k in synth.CONCEPT_INDEX.items() if masks[k].any()}
        matching = {r for r, rule in enumerate(synth.CLASSES) if _defining(rule) <= present}
        assert set(classes) <= matching


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
