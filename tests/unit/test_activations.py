"""The head out of core (training/activations.py, training/head.py on a Design): fp16 activation files equal
the in-memory activations, the block solver equals the one-block solver, the path resumes from its
checkpoint to the same result, and the histograms built block by block equal the whole matrix's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.activations import FileDesign, TensorDesign, block_histogram, write_activations
from training.backbones import BackboneSpec, build_backbone
from training.features import build_feature_cache, concept_activations
from training.head import fit_elastic_net, fit_path, lambda_max

CPU = torch.device("cpu")


class Images(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    bb = build_backbone(BackboneSpec(arch="salf_tinycnn", input_size=(32, 32), width=4)).eval()
    out = tmp_path_factory.mktemp("cache") / "c"
    return build_feature_cache(bb, Images(50), (3, 3), out, {"k": 1}, batch_size=8, shard_size=16, progress=False,
                               order_seed=3)


def test_activation_file_holds_the_activations_and_their_statistics(cache, tmp_path):
    w = torch.randn(6, cache.feature_dim, 1, 1, generator=torch.Generator().manual_seed(1))
    c, y, mean_map, idx = concept_activations(cache, w, "avg")
    out, mm = write_activations(cache, tmp_path / "a", {"t": 1}, w, "avg", block_rows=7)
    d = FileDesign(out, CPU)
    xs, ys = zip(*((x.clone(), y.clone()) for x, y in d.blocks()))
    x, labels = torch.cat(xs), torch.cat(ys)
    # rows are in cache order; the in-memory helper sorts by dataset index
    order = torch.argsort(cache.items)
    assert torch.equal(labels[order], y)
    mean, std = c.mean(0), c.std(0, unbiased=False)
    assert torch.allclose(x[order], (c - mean) / std, atol=5e-3)  # fp16 storage of c - shift
    assert torch.allclose(torch.tensor(d.meta["mean"], dtype=torch.float64), mean.double(), atol=1e-3)
    assert torch.allclose(mm, mean_map, atol=1e-5)
    # reused by key, rewritten for another one
    stamp = (out / "values.f16").stat().st_mtime_ns
    write_activations(cache, tmp_path / "a", {"t": 1}, w, "avg", block_rows=7)
    assert (out / "values.f16").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.memmap(out / "values.f16", np.float16, "r", shape=(50, 6)).shape, (50, 6))


def test_resident_and_streamed_blocks_are_the_same(cache, tmp_path):
    out, _ = write_activations(cache, tmp_path / "f", {"t": 2}, None, "avg", block_rows=8)
    streamed = [x.clone() for x, _ in FileDesign(out, CPU, resident_bytes=0).blocks()]
    resident = FileDesign(out, CPU, resident_bytes=2**30)
    assert resident.resident
    for _ in range(2):
        assert all(torch.equal(a, b) for a, (b, _) in zip(streamed, resident.blocks()))


def _problem(n=211, m=9, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = rng.normal(size=(n, m)).astype(np.float32)
    x[np.arange(n), y % m] += 2.0
    return torch.tensor(x), torch.tensor(y)


def test_block_solver_equals_the_one_block_solver():
    x, y = _problem()
    one, blocks = TensorDesign(x, y, CPU), TensorDesign(x, y, CPU, block_rows=13)
    assert lambda_max(one, None, 4, 0.9) == pytest.approx(lambda_max(blocks, None, 4, 0.9), rel=1e-6)
    a = fit_elastic_net(one, None, 4, 0.01, 0.9, max_iters=3000, tol=1e-8)
    b = fit_elastic_net(blocks, None, 4, 0.01, 0.9, max_iters=3000, tol=1e-8)
    assert torch.equal(a.weight != 0, b.weight != 0)
    assert torch.allclose(a.weight, b.weight, atol=1e-5) and a.objective == pytest.approx(b.objective, rel=1e-6)
    # tensors in, the same as a one-block design
    c = fit_elastic_net(x, y, 4, 0.01, 0.9, max_iters=3000, tol=1e-8)
    assert torch.equal(c.weight, a.weight)


def test_path_resumes_from_its_checkpoint_to_the_same_head(tmp_path):
    x, y = _problem(seed=1)
    xv, yv = _problem(n=60, seed=2)
    full = fit_path(x, y, 4, 0.9, 2, path_length=6, x_val=xv, y_val=yv, max_iters=300, device="cpu",
                    checkpoint=tmp_path / "full", checkpoint_key={"data": 1})
    # a run that stopped after 3 points (as if killed), then the same call
    part = tmp_path / "part"
    fit_path(x, y, 4, 0.9, 2, path_length=6, x_val=xv, y_val=yv, max_iters=300, device="cpu", checkpoint=part,
             checkpoint_key={"data": 1})
    import json

    doc = json.loads((part / "path.json").read_text())
    doc["points"] = doc["points"][:3]
    (part / "path.json").write_text(json.dumps(doc))
    for k in range(3, 10):
        (part / f"point-{k:03d}.safetensors").unlink(missing_ok=True)
    resumed = fit_path(x, y, 4, 0.9, 2, path_length=6, x_val=xv, y_val=yv, max_iters=300, device="cpu",
                       checkpoint=part, checkpoint_key={"data": 1})
    assert torch.equal(resumed.weight, full.weight) and resumed.lam == full.lam
    assert [p.nonzero for p in resumed.path] == [p.nonzero for p in full.path]
    # another data key starts from the beginning (and still gets the same answer)
    again = fit_path(x, y, 4, 0.9, 2, path_length=6, x_val=xv, y_val=yv, max_iters=300, device="cpu",
                     checkpoint=part, checkpoint_key={"data": 2})
    assert torch.equal(again.weight, full.weight)


def test_block_histogram_equals_the_whole_matrix_histogram():
    from salf.contract.drift import histogram

    x, y = _problem(n=301, m=7)
    want = histogram(x.numpy())
    got = block_histogram(TensorDesign(x, y, CPU, block_rows=17))
    np.testing.assert_array_equal(got, want)
