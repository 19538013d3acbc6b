"""Concept drift math (salf/contract/drift.py) and the gateway's window (serving/drift.py)."""
import time

import numpy as np
import pytest

from salf.contract import drift
from serving.drift import DriftTracker
from serving.metrics import GatewayMetrics


def test_histogram_shares_and_the_normal_reference():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20000, 3))
    h = drift.histogram(z)
    assert h.shape == (3, drift.BINS) and np.allclose(h.sum(axis=1), 1.0)
    np.testing.assert_allclose(h, drift.normal_reference(3), atol=0.01)  # standard normal samples
    assert drift.histogram(np.array([[-10.0], [10.0]]))[0, [0, -1]].tolist() == [0.5, 0.5]  # open end bins


def test_psi_is_small_in_distribution_and_large_when_shifted():
    rng = np.random.default_rng(1)
    train = drift.histogram(rng.normal(size=(5000, 4)))
    same = drift.psi(train, drift.live_shares(train, rng.normal(size=(64, 4))))
    moved = drift.psi(train, drift.live_shares(train, rng.normal(size=(64, 4)) + np.array([0, 0, 0, 2.0])))
    assert same.max() < 0.25 and moved[3] > 1.0 and moved[:3].max() < 0.25
    # without the prior, 64 in-distribution requests already read as drift (empty bins by chance)
    assert drift.psi(train, drift.histogram(rng.normal(size=(64, 4)))).max() > same.max()


def test_tracker_exports_only_the_top_concepts_and_is_cheap_per_request():
    m = 4741  # the paper's ImageNet concept count
    names = tuple(f"c{i}" for i in range(m))
    tracker = DriftTracker(names, None, window=256, top=5)
    metrics = GatewayMetrics()
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(300, m)).astype(np.float32)
    scores[:, 7] += 3.0  # one concept moved
    t = time.perf_counter()
    for s in scores:
        tracker.observe(s, metrics)
    per_request = (time.perf_counter() - t) / len(scores)
    t = time.perf_counter()
    tracker.publish(metrics)
    publish = time.perf_counter() - t
    samples = [s for fam in metrics.registry.collect() if fam.name == "salf_gateway_drift_psi" for s in fam.samples]
    assert len(samples) == 5 and max(samples, key=lambda s: s.value).labels["concept"] == "c7"
    assert tracker.reference_kind == "standard normal"
    print(f"drift cost at M={m}: {per_request * 1e6:.0f} us per request, publish {publish * 1e3:.0f} ms every interval")
    assert per_request < 2e-3


def test_a_hist_of_the_wrong_shape_is_refused(tmp_path):
    from salf.contract.repository import HeadArrays, RepositoryError, read_head, write_head

    head = HeadArrays(np.zeros((2, 3), np.float32), np.zeros(2, np.float32), np.zeros(3, np.float32),
                      np.ones(3, np.float32), np.zeros((3, 5), np.float32))
    write_head(tmp_path / "h.safetensors", head)
    with pytest.raises(RepositoryError, match="drift.concept_hist"):
        read_head(tmp_path / "h.safetensors", 3, 2)


def test_tracked_concepts_are_the_heaviest_and_the_same_for_the_same_model():
    w = np.array([[0.0, 2.0, -3.0, 0.5], [1.0, -2.0, 0.0, 0.5]])  # totals |w|: 1, 4, 3, 1
    assert drift.tracked_concepts(w, 2) == [1, 2]
    assert drift.tracked_concepts(w, 3) == [1, 2, 0]  # ties by index
    assert drift.tracked_concepts(w, 99) == [1, 2, 0, 3] and drift.tracked_concepts(w, 0) == []


def test_bin_counts_of_replicas_add_up_to_the_pooled_psi():
    """Three replicas' counts summed give what one window of all their requests gives: what the recording
    rules of deploy/prometheus/rules.yml compute from Prometheus (tests/integration/test_cluster_store.py)."""
    rng = np.random.default_rng(1)
    train = drift.normal_reference(3)
    parts = [rng.normal(0.3 * k, 1.0, size=(40 + 10 * k, 3)) for k in range(3)]
    summed = sum(drift.bin_counts(p) for p in parts)
    pooled = np.concatenate(parts)
    np.testing.assert_allclose(drift.psi_from_counts(train, summed),
                               drift.psi(train, drift.live_shares(train, pooled)), rtol=1e-12)
    per_replica = [drift.psi(train, drift.live_shares(train, p)) for p in parts]
    assert not np.allclose(np.mean(per_replica, axis=0), drift.psi_from_counts(train, summed))  # PSIs do not add
    np.testing.assert_array_equal(drift.bin_index(np.array([-9.0, -3.0, 0.0, 2.9, 9.0])), [0, 1, 7, 12, 13])


def test_tracker_counts_each_request_in_its_bin_for_the_tracked_concepts():
    metrics = GatewayMetrics()
    names = ("a", "b", "c")
    tracker = DriftTracker(names, None, window=8, tracked=[2, 0], metrics=metrics)
    tracker.observe(np.array([-5.0, 0.2, 1.2], np.float32), metrics)
    tracker.observe(np.array([0.1, 0.0, 1.4], np.float32), metrics)
    get = lambda c, b: metrics.registry.get_sample_value("salf_gateway_drift_bin_requests_total",
                                                         {"concept": c, "bin": str(b)})
    assert get("c", 9) == 2.0 and get("a", 0) == 1.0 and get("a", 7) == 1.0
    assert get("b", 7) is None  # untracked: no series
    share = metrics.registry.get_sample_value("salf_gateway_drift_train_share", {"concept": "a", "bin": "7"})
    assert share == pytest.approx(drift.normal_reference(1)[0, 7])
