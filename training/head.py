"""The sparse final layer (paper 3.4): multinomial logistic regression with an elastic net.

Objective, for standardised pooled concept scores ``X [N, M]`` and labels ``y [N]``::

    F(W, b) = 1/N * sum_n CE(W x_n + b, y_n) + lam * (alpha * |W|_1 + (1 - alpha) / 2 * |W|_2^2)

with the bias ``b`` unpenalised. This is scikit-learn's elastic-net ``LogisticRegression`` objective
divided by ``C * N`` (so ``C = 1 / (N * lam)``), which the tests use as the reference.

Solver choice: full-batch FISTA (accelerated proximal gradient) with adaptive restart, written in
torch so it runs on CPU or GPU. The paper uses GLM-SAGA, a stochastic variance-reduced method; measured
against it (`make bench-scale`, docs/scale.md) FISTA reaches the exact optimum (needed to match
scikit-learn) faster than GLM-SAGA gets near it, and warm starts along the regularisation path are cheap.
The data need not fit in memory: the solver sees a :class:`~training.activations.Design`, row blocks of
an fp16 activation file (or in-memory tensors as one block), and each iteration sums the blocks'
gradients and, under torchrun, the ranks' with one all_reduce of the ``[L, M]`` gradient. The step is
``1 / Lip`` with ``Lip`` the Lipschitz constant of the smooth part: the multinomial log-loss Hessian is
bounded by ``0.5 * [X 1]^T [X 1] / N``, so ``Lip = 0.5 * sigma_max([X 1])^2 / N + lam * (1 - alpha)``,
with ``sigma_max`` from a few power iterations (block by block); no line search is needed.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field

from pathlib import Path

import torch
import torch.nn.functional as F

from .activations import Design, TensorDesign
from .distributed import all_reduce_sum
from .runtime import progress as progress_bar, resolve_device

log = logging.getLogger(__name__)


@dataclass
class SolverResult:
    weight: torch.Tensor  # [L, M] float32
    bias: torch.Tensor  # [L] float32
    objective: float
    iterations: int
    converged: bool


@dataclass
class PathPoint:
    lam: float
    nonzero: int  # non-zero weights in total
    max_nonzero_per_class: int
    train_accuracy: float
    val_accuracy: float | None
    iterations: int


@dataclass
class HeadFit:
    """The chosen head, plus the path that led to it (recorded in the bundle)."""
    weight: torch.Tensor  # [L, M] float32
    bias: torch.Tensor  # [L] float32
    lam: float
    alpha: float
    dense: bool
    train_accuracy: float
    val_accuracy: float | None
    path: list[PathPoint] = field(default_factory=list)

    @property
    def nonzero(self) -> int:
        return int((self.weight != 0).sum())

    def summary(self) -> dict:
        return {
            "lam": self.lam, "alpha": self.alpha, "dense": self.dense, "nonzero": self.nonzero,
            "nonzero_per_class": [int(v) for v in (self.weight != 0).sum(dim=1)],
            "train_accuracy": self.train_accuracy, "val_accuracy": self.val_accuracy,
            "path": [asdict(p) for p in self.path],
        }


def standardisation(x: torch.Tensor, min_std: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std ``[M]`` of ``x [N, M]`` (std floored so constant columns stay finite)."""
    return x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(min_std)


# Below this many elements per operand a CPU loop of small ops runs on one thread: each op takes
# microseconds, and OpenMP worker hand-offs (spin-waits on a loaded machine) cost more than they
# save (measured: the head solver 16x and the CBL loop 3x slower with 2 threads on a busy 2-core box).
SINGLE_THREAD_NUMEL = 4_000_000


@contextlib.contextmanager
def small_op_threads(numel: int, device: torch.device):
    """Run the block on one CPU thread when ``numel`` (the largest operand) is small; restore after."""
    if device.type != "cpu" or numel > SINGLE_THREAD_NUMEL:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected X [N, M] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("cannot fit the head on zero samples")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    if not torch.isfinite(x).all():
        raise ValueError("concept scores contain NaN or inf")


def as_design(x, y=None, device: str | torch.device | None = "auto") -> Design:
    """A :class:`~training.activations.Design` as it is, or in-memory ``x [N, M]``/``y [N]`` checked and
    wrapped as one block."""
    if isinstance(x, Design):
        return x
    return TensorDesign(x, y, resolve_device(device))


def objective(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              lam: float, alpha: float) -> float:
    """``F(W, b)`` of the module docstring for ``x [N, M]``, ``y [N]`` int64, ``weight [L, M]``, ``bias [L]``."""
    ce = F.cross_entropy(x @ weight.T + bias, y)
    pen = lam * (alpha * weight.abs().sum() + (1 - alpha) / 2 * (weight ** 2).sum())
    return float(ce + pen)


def design_objective(d: Design, weight: torch.Tensor, bias: torch.Tensor, lam: float, alpha: float) -> float:
    """:func:`objective` summed block by block (and over the ranks)."""
    w, b = weight.to(d.device), bias.to(d.device)
    ce = torch.zeros((), dtype=torch.float64, device=d.device)
    for xb, yb in d.blocks():
        ce += F.cross_entropy(xb @ w.T + b, yb, reduction="sum").double()
    ce = all_reduce_sum(ce) / d.n
    pen = lam * (alpha * w.abs().sum() + (1 - alpha) / 2 * (w ** 2).sum())
    return float(ce + pen)


def _sigma_max_sq(d: Design, iters: int = 30) -> float:
    """Largest eigenvalue of ``[X 1]^T [X 1]`` by power iteration, block by block (no ones column is
    concatenated: ``[X 1] v = X v_x + v_1``)."""
    v = torch.ones(d.m + 1, dtype=torch.float32, device=d.device) / math.sqrt(d.m + 1)
    val = 0.0
    for _ in range(iters):
        u = torch.zeros_like(v)
        for xb, _ in d.blocks():
            z = xb @ v[:-1] + v[-1]
            u[:-1] += xb.T @ z
            u[-1] += z.sum()
        u = all_reduce_sum(u)
        val = float(u.norm())
        if val == 0.0:
            return 0.0
        v = u / val
    return val * 1.01  # power iteration approaches from below: a little slack keeps the step safe


def fit_elastic_net(x, y: torch.Tensor | None, num_classes: int, lam: float, alpha: float,
                    init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iters: int = 2000,
                    tol: float = 1e-6, device: str | torch.device | None = "auto") -> SolverResult:
    """Minimise ``F`` for one ``lam`` by FISTA. ``x [N, M]`` float and ``y [N]`` int, or a Design (then ``y``
    is None: the design's blocks carry the labels); returns CPU tensors.

    Stops when the relative change of the parameters falls below ``tol``.
    """
    if not isinstance(x, Design):
        _check(x, y, num_classes)
    if lam < 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need lam >= 0 and 0 <= alpha <= 1, got lam={lam}, alpha={alpha}")
    d = as_design(x, y, device)
    with small_op_threads(d.n * d.m, d.device):
        return _fista(d, num_classes, lam, alpha, init, max_iters, tol)


def _fista(d: Design, num_classes: int, lam: float, alpha: float,
           init: tuple[torch.Tensor, torch.Tensor] | None, max_iters: int, tol: float) -> SolverResult:
    n, m, dev = d.n, d.m, d.device
    if init is None:
        w = torch.zeros(num_classes, m, device=dev)
        prior = (d.class_counts(num_classes) / n).float().clamp_min(1e-12)
        b = prior.log() - prior.log().mean()  # the optimal intercept-only model
    else:
        w, b = init[0].to(dev, torch.float32).clone(), init[1].to(dev, torch.float32).clone()
    lip = 0.5 * _sigma_max_sq(d) / n + lam * (1 - alpha)
    step = 1.0 / max(lip, 1e-12)
    thresh = step * lam * alpha

    def smooth_grad(wv: torch.Tensor, bv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gw, gb = torch.zeros_like(wv), torch.zeros_like(bv)
        for xb, yb in d.blocks():
            resid = torch.softmax(xb @ wv.T + bv, dim=1)
            resid[torch.arange(len(yb), device=dev), yb] -= 1.0
            resid /= n  # [b, L]
            gw += resid.T @ xb
            gb += resid.sum(dim=0)
        return all_reduce_sum(gw) + lam * (1 - alpha) * wv, all_reduce_sum(gb)

    zw, zb, t = w.clone(), b.clone(), 1.0
    converged, it = False, 0
    for it in range(1, max_iters + 1):
        gw, gb = smooth_grad(zw, zb)
        vw = zw - step * gw
        w_new = torch.sign(vw) * (vw.abs() - thresh).clamp_min(0.0)  # prox of the L1 term
        b_new = zb - step * gb
        dw, db = w_new - w, b_new - b
        # Adaptive restart (O'Donoghue & Candes): drop momentum when it points uphill.
        if float(((zw - w_new) * dw).sum() + ((zb - b_new) * db).sum()) > 0:
            t = 1.0
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        mom = (t - 1) / t_new
        zw, zb = w_new + mom * dw, b_new + mom * db
        change = math.sqrt(float((dw ** 2).sum() + (db ** 2).sum()))
        scale = max(1.0, math.sqrt(float((w_new ** 2).sum() + (b_new ** 2).sum())))
        w, b, t = w_new, b_new, t_new
        if change / scale < tol:
            converged = True
            break
    if not converged:
        log.warning("elastic-net solver stopped at max_iters=%d (lam=%.3g) before reaching tol=%.1g",
                    max_iters, lam, tol)
    return SolverResult(w.cpu(), b.cpu(), design_objective(d, w, b, lam, alpha), it, converged)


def lambda_max(x, y: torch.Tensor | None, num_classes: int, alpha: float,
               device: str | torch.device | None = "cpu") -> float:
    """Smallest ``lam`` at which ``W = 0`` is optimal (the start of the path). Needs ``alpha > 0``.

    At ``W = 0`` with the optimal intercept, softmax(b) is the class prior; the subgradient condition
    gives ``lam_max = max |(prior - Y)^T X / N| / alpha`` (``(prior - Y)^T X = prior colsum(X)^T - per-class
    row sums``, accumulated block by block).
    """
    if alpha <= 0:
        raise ValueError("a regularisation path needs alpha > 0 (an L1 part)")
    d = as_design(x, y, device)
    prior = (d.class_counts(num_classes) / d.n).float()
    colsum = torch.zeros(d.m, device=d.device)
    per_class = torch.zeros(num_classes, d.m, device=d.device)
    for xb, yb in d.blocks():
        colsum += xb.sum(dim=0)
        per_class.index_add_(0, yb, xb)
    colsum, per_class = all_reduce_sum(colsum), all_reduce_sum(per_class)
    return float((prior[:, None] * colsum[None, :] - per_class).abs().max()) / d.n / alpha


def accuracy(x, y: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Top-1 accuracy of ``x @ W.T + b`` on labels ``y`` (or of a Design's blocks)."""
    if not isinstance(x, Design):
        return float(((x.float() @ weight.T + bias).argmax(dim=1) == y).float().mean())
    w, b = weight.to(x.device), bias.to(x.device)
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    for xb, yb in x.blocks():
        correct += ((xb @ w.T + b).argmax(dim=1) == yb).sum()
    return float(all_reduce_sum(correct)) / x.n


def fit_path(x, y: torch.Tensor | None, num_classes: int, alpha: float, target_nonzero_per_class: int,
             path_length: int = 20, min_ratio: float = 1e-3, x_val=None,
             y_val: torch.Tensor | None = None, max_iters: int = 2000, tol: float = 1e-6,
             device: str | torch.device | None = "auto", progress: bool = False,
             checkpoint: str | Path | None = None, checkpoint_key: dict | None = None) -> HeadFit:
    """Regularisation path from ``lam_max`` down geometrically to ``lam_max * min_ratio`` with warm starts.

    Stops after the first point with more than ``target_nonzero_per_class * L`` non-zero weights; among
    the points within that budget picks the best validation accuracy (train accuracy without a
    validation set), ties broken towards fewer non-zero weights. ``x``/``x_val``: tensors (with ``y``/
    ``y_val``) or Designs. ``checkpoint``: a folder where (rank 0) saves every point as it is reached; a
    rerun with the same path settings and ``checkpoint_key`` (what identifies the data) resumes after the
    last saved point, to the same result.
    """
    if not isinstance(x, Design):
        _check(x, y, num_classes)
    if target_nonzero_per_class < 1:
        raise ValueError("target_nonzero_per_class must be >= 1")
    d = as_design(x, y, device)
    dv = None if x_val is None else as_design(x_val, y_val, d.device)
    budget = target_nonzero_per_class * num_classes
    lmax = lambda_max(d, None, num_classes, alpha)
    lams = [lmax * min_ratio ** (k / max(path_length - 1, 1)) for k in range(path_length)]
    book = PathBook(checkpoint, {"lams": lams, "alpha": alpha, "budget": budget, "max_iters": max_iters, "tol": tol,
                                 "n": d.n, "m": d.m, "classes": num_classes,
                                 "data": checkpoint_key})
    points = book.load()
    init = (points[-1][1].weight, points[-1][1].bias) if points else None
    for lam in progress_bar(lams[len(points):], "head path", progress, unit="lam"):
        if points and points[-1][0].nonzero > budget:
            break
        res = fit_elastic_net(d, None, num_classes, lam, alpha, init, max_iters, tol)
        init = (res.weight, res.bias)
        nz = res.weight != 0
        point = PathPoint(
            lam=lam, nonzero=int(nz.sum()), max_nonzero_per_class=int(nz.sum(dim=1).max()),
            train_accuracy=accuracy(d, None, res.weight, res.bias),
            val_accuracy=None if dv is None else accuracy(dv, None, res.weight, res.bias),
            iterations=res.iterations)
        log.debug("path lam=%.4g nonzero=%d train_acc=%.3f val_acc=%s", lam, point.nonzero,
                  point.train_accuracy, point.val_accuracy)
        points.append((point, res))
        book.save(len(points) - 1, point, res)
    eligible = [pr for pr in points if pr[0].nonzero <= budget]

    def key(pr):
        p = pr[0]
        return (p.val_accuracy if p.val_accuracy is not None else p.train_accuracy, -p.nonzero)

    best_point, best = max(eligible, key=key)
    return HeadFit(best.weight, best.bias, best_point.lam, alpha, False, best_point.train_accuracy,
                   best_point.val_accuracy, [p for p, _ in points])


class PathBook:
    """The regularisation path's checkpoint: ``path.json`` (settings and the points so far) and one
    ``point-XXX.safetensors`` (weight, bias) per point, written by rank 0 after each lambda."""

    def __init__(self, folder: str | Path | None, key: dict) -> None:
        self.folder = None if folder is None else Path(folder)
        self.key = key

    def load(self) -> list[tuple[PathPoint, SolverResult]]:
        if self.folder is None or not (self.folder / "path.json").is_file():
            return []
        import json

        from safetensors.torch import load_file

        doc = json.loads((self.folder / "path.json").read_text())
        if doc.get("key") != self.key:
            log.info("head path checkpoint %s is of other settings; fitting the path from the start", self.folder)
            return []
        points = []
        for k, p in enumerate(doc["points"]):
            t = load_file(str(self.folder / f"point-{k:03d}.safetensors"))
            points.append((PathPoint(**p["point"]),
                           SolverResult(t["weight"], t["bias"], p["objective"], p["point"]["iterations"],
                                        p["converged"])))
        log.info("head path: resuming after %d of %d points from %s", len(points), len(self.key["lams"]),
                 self.folder)
        return points

    def save(self, k: int, point: PathPoint, res: SolverResult) -> None:
        from .distributed import rank_world
        from .runtime import atomic_write_json, save_tensors

        if self.folder is None or rank_world()[0] != 0:
            return
        import json

        self.folder.mkdir(parents=True, exist_ok=True)
        save_tensors(self.folder / f"point-{k:03d}.safetensors", {"weight": res.weight, "bias": res.bias})
        doc = {"key": self.key, "points": []}
        if k and (self.folder / "path.json").is_file():
            doc = json.loads((self.folder / "path.json").read_text())
        doc["points"] = doc["points"][:k] + [{"point": asdict(point), "objective": res.objective,
                                             "converged": res.converged}]
        atomic_write_json(self.folder / "path.json", doc)


def fit_dense(x, y: torch.Tensor | None, num_classes: int, lam: float = 1e-4,
              x_val=None, y_val: torch.Tensor | None = None, max_iters: int = 2000,
              tol: float = 1e-6, device: str | torch.device | None = "auto") -> HeadFit:
    """Dense head: the same solver with ``alpha = 0`` (a small ridge keeps the optimum finite)."""
    res = fit_elastic_net(x, y, num_classes, lam, 0.0, None, max_iters, tol, device)
    val = None if x_val is None else accuracy(x_val, y_val, res.weight, res.bias)
    return HeadFit(res.weight, res.bias, lam, 0.0, True, accuracy(x, y, res.weight, res.bias), val)


__all__ = ["HeadFit", "PathBook", "PathPoint", "SolverResult", "accuracy", "as_design", "design_objective",
           "fit_dense", "fit_elastic_net", "fit_path", "lambda_max", "objective", "standardisation"]
