"""training/quality/metrics.py against hand-computed cases and scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, jaccard_score

from training.quality import metrics


def test_average_precision_by_hand():
    # scores high to low: 1 (pos), 0.8 (neg), 0.6 (pos), 0.2 (neg): AP = 0.5 * 1 + 0.5 * 2/3
    assert metrics.average_precision([1, 0, 1, 0], [1.0, 0.8, 0.6, 0.2]) == pytest.approx(0.5 + 1 / 3)
    # ties enter together: both 0.5 at once -> precision 1/2 at recall 1
    assert metrics.average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(metrics.average_precision([0, 0], [0.1, 0.2]))


@pytest.mark.parametrize("seed", range(6))
def test_average_precision_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random((13, 17)) < 0.2
    labels[0, 0] = True
    scores = np.round(rng.random((13, 17)), 1 + seed % 3)  # coarse rounding: many ties
    assert metrics.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels.ravel(), scores.ravel()), abs=1e-12)


def test_segmentation_scores_match_scikit_learn_accumulated_over_images():
    rng = np.random.default_rng(7)
    heats, masks = [], []
    for k in range(5):
        mask = np.zeros((20, 24), bool)
        mask[3 + k:12 + k, 4:15 - k] = True
        heats.append(mask * 1.0 + rng.normal(0, 0.6, mask.shape))
        masks.append(mask)
    acc = metrics.SegmentationScores()
    for h, m in zip(heats, masks):
        acc.add(h, m)
    r = acc.result()
    preds = np.concatenate([metrics.threshold_at_mean(h).ravel() for h in heats])
    gts = np.concatenate([m.ravel() for m in masks])
    assert r["pixel_accuracy"] == pytest.approx(float((preds == gts).mean()))
    per_class = jaccard_score(gts, preds, average=None, labels=[False, True])
    assert r["iou_background"] == pytest.approx(per_class[0]) and r["iou_foreground"] == pytest.approx(per_class[1])
    assert r["miou"] == pytest.approx(float(per_class.mean()))
    want_ap = np.mean([average_precision_score(m.ravel(), metrics.normalise(h).ravel()) for h, m in zip(heats, masks)])
    assert r["map"] == pytest.approx(want_ap) and r["images"] == 5


def test_the_mean_rule_and_a_constant_map():
    heat = np.array([[0.0, 1.0], [0.2, 0.9]])  # normalised mean 0.525
    np.testing.assert_array_equal(metrics.threshold_at_mean(heat), [[False, True], [False, True]])
    assert not metrics.threshold_at_mean(np.full((3, 3), 4.0)).any()  # points nowhere: all background
    acc = metrics.SegmentationScores()
    mask = np.zeros((4, 5), bool)
    mask[0, :2] = True
    acc.add(np.zeros((4, 5)), mask)
    r = acc.result()
    assert r["pixel_accuracy"] == pytest.approx(18 / 20)  # the all-background map's accuracy is 1 - fg share
    assert r["iou_foreground"] == 0 and r["map"] == pytest.approx(2 / 20)  # AP of tied scores: the fg share


def test_pointing_game_trivial_maps_and_weight_share():
    mask = np.zeros((5, 5), bool)
    mask[1, 3] = True
    heat = np.zeros((5, 5))
    heat[1, 3] = 2.0
    assert metrics.pointing_hit(heat, mask) and not metrics.pointing_hit(-heat, mask)
    maps = metrics.trivial_maps((6, 8), np.random.default_rng(0))
    assert set(maps) == {"all background", "centred Gaussian", "uniform random"}
    assert all(m.shape == (6, 8) for m in maps.values())
    g = maps["centred Gaussian"]
    assert np.unravel_index(np.argmax(g), g.shape) in {(2, 3), (2, 4), (3, 3), (3, 4)}
    w = np.array([[0.5, -0.5, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    share = metrics.weight_share(w, {0: [0, 3], 1: [1]})
    assert share[0] == pytest.approx(0.75) and np.isnan(share[1])


def test_sizes_must_agree():
    with pytest.raises(ValueError, match="differ in size"):
        metrics.SegmentationScores().add(np.zeros((3, 4)), np.zeros((4, 3), bool))
