"""The elastic-net head solver against scikit-learn's saga on the same problem."""
import warnings

import numpy as np
import pytest
import torch

from training.head import (accuracy, fit_dense, fit_elastic_net, fit_path, lambda_max, objective,
                           standardisation)


def clear_problem(n=300, m=8, classes=3, seed=0):
    """Class l is driven by feature l only; the other features are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = rng.normal(size=(n, m))
    x[np.arange(n), y] += 2.5
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def sklearn_fit(x, y, lam, alpha):
    from sklearn.linear_model import LogisticRegression

    n = x.shape[0]
    # penalty="elasticnet" is implied by 0 < l1_ratio < 1 (the `penalty` argument is deprecated
    # since scikit-learn 1.8); objective = C * sum CE + alpha |W|_1 + (1 - alpha)/2 |W|^2.
    clf = LogisticRegression(solver="saga", l1_ratio=alpha, C=1.0 / (n * lam), tol=1e-10, max_iter=20000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(x.double().numpy(), y.numpy())
    return torch.tensor(clf.coef_, dtype=torch.float32), torch.tensor(clf.intercept_, dtype=torch.float32)


@pytest.mark.parametrize("lam,alpha", [(0.05, 0.9), (0.01, 0.5), (0.1, 0.99)])
def test_matches_sklearn_objective_and_sparsity(lam, alpha):
    x, y = clear_problem()
    ours = fit_elastic_net(x, y, 3, lam, alpha, max_iters=20000, tol=1e-9, device="cpu")
    assert ours.converged
    w_sk, b_sk = sklearn_fit(x, y, lam, alpha)
    f_sk = objective(x, y, w_sk, b_sk, lam, alpha)
    assert ours.objective == pytest.approx(f_sk, rel=0.01)
    assert ours.objective <= f_sk * (1 + 1e-4)  # never worse than the reference beyond noise
    # Same sparsity pattern (sklearn's saga leaves tiny non-zeros: compare above a small tolerance).
    assert torch.equal(ours.weight.abs() > 1e-4, w_sk.abs() > 1e-4)
    if alpha >= 0.9:
        # the clear case: only the diagonal (feature l for class l) survives strong L1
        assert (ours.weight[:, 3:] == 0).all()
        assert (ours.weight[torch.arange(3), torch.arange(3)] > 0).all()


def test_lambda_max_gives_all_zero_and_below_it_not():
    x, y = clear_problem()
    lmax = lambda_max(x, y, 3, 0.9)
    assert (fit_elastic_net(x, y, 3, lmax * 1.01, 0.9, device="cpu").weight == 0).all()
    assert (fit_elastic_net(x, y, 3, lmax * 0.9, 0.9, device="cpu").weight != 0).any()


def test_path_respects_budget_and_picks_by_validation():
    x, y = clear_problem(n=400, m=10)
    xv, yv = clear_problem(n=200, m=10, seed=1)
    fit = fit_path(x, y, 3, alpha=0.99, target_nonzero_per_class=1, path_length=15, x_val=xv, y_val=yv,
                   device="cpu")
    assert fit.nonzero <= 3
    assert fit.val_accuracy > 0.8
    assert fit.path[0].nonzero == 0 and len(fit.path) >= 2
    lams = [p.lam for p in fit.path]
    assert lams == sorted(lams, reverse=True)
    # the path stops right after exceeding the budget
    assert all(p.nonzero <= 3 for p in fit.path[:-1])
    summary = fit.summary()
    assert summary["nonzero"] == fit.nonzero and len(summary["path"]) == len(fit.path)


def test_dense_head_uses_every_feature_and_fits():
    x, y = clear_problem()
    fit = fit_dense(x, y, 3, lam=1e-4, device="cpu")
    assert fit.nonzero == fit.weight.numel()
    assert fit.train_accuracy > 0.9 and accuracy(x, y, fit.weight, fit.bias) == fit.train_accuracy


def test_standardisation_handles_constant_columns():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    mean, std = standardisation(x)
    assert torch.allclose(mean, torch.tensor([2.0, 5.0])) and std[0] == 1.0 and std[1] > 0
    assert torch.isfinite((x - mean) / std).all()


def test_bad_inputs_are_clear_errors():
    x, y = clear_problem(n=20)
    with pytest.raises(ValueError, match="labels must lie"):
        fit_elastic_net(x, y + 5, 3, 0.1, 0.5)
    with pytest.raises(ValueError, match="expected X"):
        fit_elastic_net(x[:, 0], y, 3, 0.1, 0.5)
    with pytest.raises(ValueError, match="alpha > 0"):
        lambda_max(x, y, 3, 0.0)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_elastic_net(bad, y, 3, 0.1, 0.5)
