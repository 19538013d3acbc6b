"""Deletion/insertion curves (training/quality/protocols/faithfulness.py) on a scorer whose evidence is known."""
import numpy as np
import pytest
import torch

from training.quality import metrics
from training.quality.protocols.faithfulness import deletion_insertion


def test_curve_auc_and_order_by_hand():
    assert metrics.curve_auc([0.0, 0.5, 1.0], [1.0, 1.0, 0.0]) == pytest.approx(0.75)
    np.testing.assert_array_equal(metrics.deletion_order(np.array([[0.1, 0.9], [0.9, 0.0]])), [1, 2, 0, 3])


def test_a_heatmap_on_the_evidence_deletes_faster_and_inserts_faster_than_its_reverse():
    h, w = 8, 8
    evidence = np.zeros((h, w), bool)
    evidence[2:5, 3:7] = True  # class 1's score is the brightness of these pixels

    def score(x: torch.Tensor) -> torch.Tensor:
        lit = x.float()[:, torch.from_numpy(evidence)].mean(dim=(1, 2)) / 255.0  # [N]
        return torch.stack([torch.zeros_like(lit), 8.0 * lit], dim=1)

    rng = np.random.default_rng(0)
    img = rng.integers(0, 60, (1, h, w, 3), dtype=np.uint8)
    img[0][evidence] = 250
    images = torch.from_numpy(img)
    good = evidence.astype(float)[None] + 0.01 * rng.random((1, h, w))
    d_good, i_good = deletion_insertion(score, images, good, torch.tensor([1]), steps=8)
    d_bad, i_bad = deletion_insertion(score, images, -good, torch.tensor([1]), steps=8)
    assert d_good[0] < d_bad[0] and i_good[0] > i_bad[0]
    assert 0.0 <= d_good[0] <= 1.0 and 0.0 <= i_bad[0] <= 1.0
