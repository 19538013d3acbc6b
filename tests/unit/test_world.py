"""The synthetic world (training/data/world.py) as training/data/paint.py draws it: images independent of
generation order, concept masks and layers, class concepts, colours, positions, the shifted splits."""
import numpy as np

from training.data import paint, synth, world
from training.data.folder import ImageFolderSplit


def test_image_independent_of_generation_order():
    first = paint.render(3, (48, 48), synth.image_rng(5, "val", 3, 2))
    paint.render(0, (48, 48), synth.image_rng(5, "train", 0, 0))  # interleave another draw
    again = paint.render(3, (48, 48), synth.image_rng(5, "val", 3, 2))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def _all_masks(root, split):
    ds = ImageFolderSplit(root, split)
    return ds, [ds.load_masks(i) for i in range(len(ds))]


def test_masks_layers_and_class_concepts(synth_data):
    idx = world.CONCEPT_INDEX
    layers = [idx[c] for c in (*world.KEY_SHAPES, *world.DISTRACTOR_SHAPES, "string", "grass", *world.BACKGROUNDS)]
    objects = [idx[c] for c in (*world.KEY_SHAPES, *world.DISTRACTOR_SHAPES)]
    colours = [idx[c] for c in world.COLOURS]
    seen = np.zeros(len(world.CONCEPTS), bool)
    for split in (*synth.SPLITS, synth.SHIFTED):
        ds, masks = _all_masks(synth_data, split)
        for label, m in zip(ds.labels, masks):
            assert m.shape[0] == len(world.CONCEPTS) and m.dtype == np.bool_
            if split != synth.SHIFTED:
                assert m.shape[1:] == (112, 112)
            # every pixel belongs to exactly one layer (at most one on a shifted background, which
            # carries no concept); object pixels carry exactly one colour
            layered = m[layers].sum(0)
            assert (layered == 1).all() if split != synth.SHIFTED else (layered <= 1).all()
            if split == synth.SHIFTED:
                assert not m[[idx[b] for b in world.BACKGROUNDS]].any()
            obj = m[objects].any(0)
            np.testing.assert_array_equal(m[colours].sum(0), obj.astype(int))
            present = {c for c, k in idx.items() if m[k].any()}
            # the class is exactly the rule whose defining concepts are present (what the head must learn)
            matching = [r for r, rule in enumerate(world.CLASSES) if _defining(rule) <= present]
            assert matching == [label], (ds.paths, present)
            seen |= m.any(axis=(1, 2))
    assert seen.all(), [c for c, s in zip(world.CONCEPTS, seen) if not s]


def _defining(rule):
    extra = {"balloon": "string", "ball": "grass"}.get(rule.placement, rule.texture)
    return {rule.shape, extra}


def test_colour_masks_match_pixels(synth_data):
    ds, masks = _all_masks(synth_data, "val")
    for colour, rgb in world.COLOURS.items():
        k = world.CONCEPT_INDEX[colour]
        pix = np.concatenate([ds.image(i)[m[k]] for i, m in enumerate(masks)]).astype(float)
        assert len(pix) > 0
        # solid and textured pixels are the colour or its light tint: the mean sits near the base
        # colour and far from every other palette colour
        dists = {c: np.linalg.norm(pix.mean(0) - (0.8 * np.array(v) + 0.2 * 255)) for c, v in world.COLOURS.items()}
        assert min(dists, key=dists.get) == colour


def test_positional_classes(synth_data):
    ds, masks = _all_masks(synth_data, "train")
    circle = world.CONCEPT_INDEX["circle"]
    for label, m in zip(ds.labels, masks):
        name = world.CLASS_NAMES[label]
        if name in ("balloon", "ball"):
            rows = np.nonzero(m[circle].any(1))[0]
            centre = rows.mean() / 112
            assert centre < 0.4 if name == "balloon" else centre > 0.6


def test_shifted_splits(synth_data):
    """Other sizes, aspect ratios, scales and backgrounds; pairs carry each object's silhouette and class."""
    ds = ImageFolderSplit(synth_data, synth.SHIFTED)
    sizes = set()
    shape = [world.CONCEPT_INDEX[c] for c in world.KEY_SHAPES]
    for i in range(len(ds)):
        h, w = ds.image(i).shape[:2]
        sizes.add((h, w))
        lo, hi = world.SHIFT.short_side
        assert lo <= min(h, w) <= hi and world.SHIFT.aspect[0] - 0.01 <= w / h <= world.SHIFT.aspect[1] + 0.01
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
            rule = world.CLASSES[c]
            assert masks[world.CONCEPT_INDEX[rule.shape]][obj].mean() > 0.99
        present = {name for name, k in world.CONCEPT_INDEX.items() if masks[k].any()}
        matching = {r for r, rule in enumerate(world.CLASSES) if _defining(rule) <= present}
        assert set(classes) <= matching
