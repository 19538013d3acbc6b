"""Model pieces and the training stages that need no dataset: CBL layer, pooling, head, feature cache,
validation carving, CBL training against a known target, cutoff, evaluation helpers, explanations."""
import json

import pytest
import torch

from training.backbones import BackboneSpec, build_backbone
from training.cbl import apply_cutoff, carve_validation, train_cbl, validation_similarity
from training.config import CBLCfg
from training.evaluate import IoUAccumulator, threshold_maps
from training.explain import explain_maps
from training.features import FeatureCache, FeatureCacheError, build_feature_cache
from training.losses import cubic_cosine_similarity
from training.model import ConceptBottleneck, SalfCBM, SalfHead, pool_maps

pytestmark = pytest.mark.timeout(120)


def test_cbl_is_a_bias_free_1x1_conv_with_d_times_m_parameters():
    cbl = ConceptBottleneck(32, 5, (7, 7))
    assert cbl.conv.bias is None and sum(p.numel() for p in cbl.parameters()) == 32 * 5
    feats = torch.randn(2, 32, 4, 4)
    maps = cbl(feats)
    assert maps.shape == (2, 5, 7, 7)
    # linear in the features: resize then project == project then resize
    direct = torch.nn.functional.interpolate(torch.einsum("md,bdhw->bmhw", cbl.conv.weight[:, :, 0, 0], feats),
                                             size=(7, 7), mode="bilinear", align_corners=False)
    assert torch.allclose(maps, direct, atol=1e-5)


def test_pooling_avg_and_softmax():
    maps = torch.tensor([[[[0.0, 0.0], [0.0, 4.0]]]])
    assert pool_maps(maps, "avg").item() == pytest.approx(1.0)
    w = torch.softmax(torch.tensor([0.0, 0.0, 0.0, 4.0]), 0)
    assert pool_maps(maps, "softmax").item() == pytest.approx(float(4 * w[3]))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_maps(maps, "max")


def test_head_standardises_then_applies_linear_layer():
    head = SalfHead(3, 2)
    with torch.no_grad():
        head.concept_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        head.concept_std.copy_(torch.tensor([2.0, 2.0, 2.0]))
    maps = torch.randn(4, 3, 7, 7)
    scores, logits = head(maps)
    assert torch.allclose(scores, (maps.mean(dim=(2, 3)) - head.concept_mean) / 2.0)
    assert torch.allclose(logits, head.linear(scores))


def test_salf_cbm_forward_shapes():
    bb = build_backbone(BackboneSpec(arch="salf_tinycnn", input_size=(64, 64), width=8))
    model = SalfCBM(bb, bb.feature_shape()[0], 6, 3, (7, 7), "softmax").eval()
    maps, scores, logits = model(torch.randn(2, 3, 64, 64))
    assert maps.shape == (2, 6, 7, 7) and scores.shape == (2, 6) and logits.shape == (2, 3)


class ToyImages(torch.utils.data.Dataset):
    """uint8 images [H, W, 3] with labels i % 3."""

    def __init__(self, n, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 3


def _cache(tmp_path, n=23, shard=5, key=None):
    bb = build_backbone(BackboneSpec(arch="salf_tinycnn", input_size=(32, 32), width=4)).eval()
    return build_feature_cache(bb, ToyImages(n), (3, 3), tmp_path / "cache", key or {"k": 1}, batch_size=4,
                               shard_size=shard, progress=False), bb


def test_feature_cache_shards_manifest_and_streaming(tmp_path):
    cache, bb = _cache(tmp_path)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 3] and manifest["dtype"] == "float16"
    assert not list((tmp_path / "cache").glob("*.tmp"))
    assert len(cache) == 23 and cache.shape == (32, 3, 3)
    # the cached features are the backbone's, resized to the grid, in fp16
    from training.features import extract_features

    want = extract_features(bb, ToyImages(23).images[:4], (3, 3))
    first = next(cache.batches(batch_size=4))
    assert torch.allclose(first.features, want.half().float()) and first.labels.tolist() == [0, 1, 2, 0]
    # a subset, shuffled: every selected index once, full batches except the last
    subset = [0, 3, 4, 7, 8, 9, 15, 16, 20, 22]
    batches = list(cache.batches(subset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == subset
    assert [len(b.indices) for b in batches] == [3, 3, 3, 1]
    assert all(torch.equal(b.labels, b.indices % 3) for b in batches)
    dropped = list(cache.batches(subset, batch_size=3, drop_last=True))
    assert [len(b.indices) for b in dropped] == [3, 3, 3]


def test_feature_cache_reused_only_when_key_matches(tmp_path):
    _cache(tmp_path)
    stamp = (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns
    _cache(tmp_path)
    assert (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    _cache(tmp_path, shard=10, key={"k": 2})
    assert len(list((tmp_path / "cache").glob("shard-*"))) == 3


def test_incomplete_cache_is_a_clear_error(tmp_path):
    _cache(tmp_path)
    (tmp_path / "cache" / "manifest.json").unlink()
    with pytest.raises(FeatureCacheError, match="no complete feature cache"):
        FeatureCache(tmp_path / "cache")


def test_carve_validation_is_seeded_stratified_and_disjoint():
    labels = torch.arange(100) % 4
    a = carve_validation(100, 0.2, seed=3, labels=labels)
    b = carve_validation(100, 0.2, seed=3, labels=labels)
    c = carve_validation(100, 0.2, seed=4, labels=labels)
    assert a.val_indices == b.val_indices and a.val_indices != c.val_indices
    assert len(a.val_indices) == 20 and not set(a.val_indices) & set(a.train_indices)
    assert sorted(a.val_indices + a.train_indices) == list(range(100))
    assert torch.bincount(labels[a.val_indices]).tolist() == [5, 5, 5, 5]
    assert a.record() == {"fraction": 0.2, "seed": 3, "train_count": 80, "val_count": 20}
    with pytest.raises(ValueError, match="val_fraction"):
        carve_validation(100, 1.5, 0)


class LinearSource:
    """P = a fixed linear map of the cached features (so a perfect CBL exists), except concept 2
    which is pure noise (no CBL can match it: the cutoff must drop it)."""

    def __init__(self, cache, m=3):
        self.concepts = ["good a", "good b", "noise"]
        self.grid = tuple(cache.shape[1:])
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(m, cache.feature_dim, generator=g)
        feats = torch.cat([b.features for b in cache.batches(batch_size=1000)])
        self.p = torch.einsum("md,ndhw->nmhw", self.w, feats)
        self.p[:, 2] = torch.rand(self.p[:, 2].shape, generator=g)

    def similarities(self, indices):
        return self.p[list(indices)]


def test_train_cbl_learns_target_and_cutoff_drops_noise(tmp_path):
    cache, _ = _cache(tmp_path, n=60, shard=16)
    source = LinearSource(cache)
    split = carve_validation(len(cache), 0.25, 0)
    cfg = CBLCfg(epochs=30, lr=0.05, batch_size=15, patience=30, interpretability_cutoff=0.5)
    result = train_cbl(cache, source, split, cfg, seed=0, device="cpu", progress=False)
    assert result.concepts == ["good a", "good b"] and result.kept == [0, 1]
    assert result.dropped[0]["concept"] == "noise" and result.dropped[0]["val_similarity"] < 0.5
    assert min(result.val_similarity[:2]) > 0.8
    assert result.weight.shape == (2, 32, 1, 1)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert result.record()["validation_split"]["val_count"] == 15


def test_train_cbl_refuses_a_source_of_another_image_count(tmp_path):
    cache, _ = _cache(tmp_path, n=20, shard=8)
    class LongerSource(LinearSource):  # e.g. a CLIP cache made from another copy of the dataset
        def __len__(self):
            return 24

    source = LongerSource(cache)
    split = carve_validation(len(cache), 0.25, 0)
    with pytest.raises(ValueError, match="covers 24 images but the features 20"):
        train_cbl(cache, source, split, CBLCfg(epochs=1, batch_size=5), seed=0, device="cpu", progress=False)


def test_validation_similarity_equals_whole_set_formula(tmp_path):
    cache, _ = _cache(tmp_path, n=30, shard=7)
    source = LinearSource(cache)
    cbl = ConceptBottleneck(cache.feature_dim, 3, (3, 3))
    idx = list(range(0, 30, 2))
    streamed = validation_similarity(cbl, cache, source, idx, batch_size=4, device=torch.device("cpu"))
    feats = torch.cat([b.features for b in cache.batches(idx, batch_size=100)])
    with torch.no_grad():
        direct = cubic_cosine_similarity(cbl(feats).double(), source.similarities(idx).double())
    assert torch.allclose(streamed.double(), direct, atol=1e-5)


def test_apply_cutoff_records_scores_and_nan():
    kept, dropped = apply_cutoff(["a", "b", "c"], torch.tensor([0.6, 0.2, float("nan")]), 0.45)
    assert kept == [0]
    assert dropped == [{"concept": "b", "val_similarity": pytest.approx(0.2)}, {"concept": "c", "val_similarity": None}]


def test_threshold_maps_and_iou():
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 0, 0] = 1.0  # the concept is top-left
    pred = threshold_maps(maps, (8, 8), "half")[0]
    assert threshold_maps(maps, (8, 8), "mean")[0].sum() >= pred.sum()
    assert pred.shape == (1, 8, 8) and pred[0, 0, 0] and not pred[0, 7, 7]
    acc = IoUAccumulator(2)
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[0, :4, :4] = True  # concept 1 absent: not counted
    acc.add(torch.cat([pred, pred]), gt)
    iou = acc.per_concept()
    inter = (pred[0] & gt[0]).sum().item()
    union = (pred[0] | gt[0]).sum().item()
    assert iou[0] == pytest.approx(inter / union) and iou[0] > 0.5 and iou[1] != iou[1]


def test_explanation_uses_contributions_and_grid_positions():
    maps = torch.zeros(3, 7, 7)
    maps[1, 2, 5] = 9.0
    scores = torch.tensor([1.0, 2.0, -3.0])
    weight = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    logits = scores @ weight.T
    ex = explain_maps(maps, scores, logits, weight, ["a", "b", "c"], ["x", "y"], (112, 112), k=2)
    assert ex.predicted == "x" and ex.predicted_index == 0
    assert [c.concept for c in ex.top] == ["b", "a"]
    assert ex.top[0].contribution == pytest.approx(2.0) and ex.top[0].cell == (2, 5)
    assert ex.top[0].pixel == (36, 90)  # grid centres i * floor(112 / 6) = 18 * i
    assert "strongest at grid cell (h=2, w=5)" in ex.describe()


def test_prefetched_batches_are_the_same_batches(tmp_path):
    cache, _ = _cache(tmp_path, n=23, shard=5)
    plain = list(cache.batches(batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)))
    ahead = list(cache.batches(batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1), prefetch=2))
    assert len(plain) == len(ahead) == 6
    assert all(torch.equal(a.indices, b.indices) and torch.equal(a.features, b.features) for a, b in zip(plain, ahead))
    # a consumer that stops early does not leave the reader thread behind
    import threading

    for _ in cache.batches(batch_size=2, prefetch=1):
        break
    assert not [t for t in threading.enumerate() if t.name == "feature-prefetch" and t.is_alive()]


def test_part_of_a_global_batch_is_every_worldth_row(tmp_path):
    cache, _ = _cache(tmp_path, n=23, shard=5)
    whole = list(cache.batches(batch_size=6))
    parts = [list(cache.batches(batch_size=6, part=(r, 2))) for r in (0, 1)]
    for k, b in enumerate(whole):
        assert torch.equal(parts[0][k].indices, b.indices[0::2]) and torch.equal(parts[1][k].indices, b.indices[1::2])
        assert torch.equal(parts[1][k].features, b.features[1::2])
