"""The CBL loss against a direct NumPy transcription of paper eq. 1."""
import numpy as np
import pytest
import torch

from training.losses import cbl_loss, cubic_cosine_similarity


def numpy_cubic_cos(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Loop over every (m, h, w): centre over the batch, cube, cosine."""
    out = np.zeros(q.shape[1:])
    for idx in np.ndindex(*q.shape[1:]):
        a = q[(slice(None),) + idx]
        b = p[(slice(None),) + idx]
        a = (a - a.mean()) ** 3
        b = (b - b.mean()) ** 3
        out[idx] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return out


def test_matches_numpy_formula():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(16, 5, 3, 4))
    p = rng.normal(size=(16, 5, 3, 4)) * 0.1 + 0.2
    want = numpy_cubic_cos(q, p)
    got = cubic_cosine_similarity(torch.tensor(q, dtype=torch.float32), torch.tensor(p, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    loss = cbl_loss(torch.tensor(q, dtype=torch.float32), torch.tensor(p, dtype=torch.float32))
    assert loss.item() == pytest.approx(-want.mean(), rel=1e-4)


def test_perfect_match_and_invariances():
    q = torch.randn(8, 2, 2, 2)
    # Any positive affine map of q has similarity 1 (centring removes shifts, cosine removes scale).
    assert torch.allclose(cubic_cosine_similarity(q, 3 * q + 5), torch.ones(2, 2, 2), atol=1e-5)
    assert torch.allclose(cubic_cosine_similarity(q, -q), -torch.ones(2, 2, 2), atol=1e-5)


def test_constant_target_gives_zero_not_nan():
    q = torch.randn(4, 1, 1, 1, requires_grad=True)
    p = torch.zeros(4, 1, 1, 1)  # a concept absent from every image of the batch
    loss = cbl_loss(q, p)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(q.grad).all()


def test_large_activations_do_not_overflow():
    q = torch.randn(8, 3, 1, 1) * 1e13
    p = q / 1e13
    assert torch.allclose(cubic_cosine_similarity(q, p), torch.ones(3, 1, 1), atol=1e-5)


def test_gradient_increases_similarity():
    torch.manual_seed(0)
    p = torch.rand(32, 3, 2, 2)
    w = torch.randn(32, 3, 2, 2, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    first = cbl_loss(w, p).item()
    for _ in range(50):
        opt.zero_grad()
        loss = cbl_loss(w, p)
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        cubic_cosine_similarity(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        cubic_cosine_similarity(torch.zeros(1, 3), torch.zeros(1, 3))
