"""export/onnx_graphs.py SparseLinear: the gathered head computes the dense head's logits."""
import numpy as np
import pytest
import torch
from torch import nn

from export.onnx_graphs import SparseLinear, export_head, gathered_head
from training.model import SalfHead


def _sparse_linear(m: int, l: int, per_class, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(m, l)
    w = torch.zeros(l, m)
    for row, k in enumerate(per_class):
        w[row, torch.randperm(m, generator=g)[:k]] = torch.randn(k, generator=g)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.randn(l, generator=g))
    return lin


def test_gathered_equals_dense_including_empty_and_uneven_classes():
    lin = _sparse_linear(400, 6, [3, 0, 30, 1, 17, 30])  # a class with no concept keeps its bias alone
    assert SparseLinear.applies(lin)
    sparse = SparseLinear(lin)
    assert tuple(sparse.index.shape) == (6, 30)
    x = torch.randn(5, 400, dtype=torch.float32)
    torch.testing.assert_close(sparse(x), lin(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(sparse(x)[:, 1], lin.bias[1].expand(5))


def test_dense_weights_keep_the_dense_product():
    lin = nn.Linear(40, 3)  # every weight non-zero
    assert not SparseLinear.applies(lin)
    head = SalfHead(40, 3)
    with gathered_head(head) as h:
        assert h.linear is head.linear and isinstance(h.linear, nn.Linear)


def test_exported_head_graph_gathers_and_matches_the_torch_head(tmp_path):
    import onnx
    import onnxruntime as ort

    head = SalfHead(300, 8).eval()
    head.linear = _sparse_linear(300, 8, [5] * 8, seed=2)
    with torch.no_grad():
        head.concept_mean.copy_(torch.randn(300) * 0.1)
        head.concept_std.copy_(torch.rand(300) + 0.5)
    path = tmp_path / "head.onnx"
    export_head(head, 300, (3, 4), path)
    assert isinstance(head.linear, nn.Linear)  # put back after export
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Gather" in ops and "Gemm" not in ops and "MatMul" not in ops, ops
    maps = np.random.default_rng(0).standard_normal((4, 300, 3, 4)).astype(np.float32)
    scores, logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["concept_scores", "logits"], {"concept_maps": maps})
    with torch.no_grad():
        t_scores, t_logits = head(torch.from_numpy(maps))
    np.testing.assert_allclose(scores, t_scores.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, t_logits.numpy(), rtol=1e-5, atol=1e-5)
