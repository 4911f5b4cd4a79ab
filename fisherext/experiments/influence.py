r"""Experiment ``influence`` (seed 002): influence functions against leave-one-out retraining, by every
inverse-Hessian solver, and seed 002's finite-difference Hessian-vector product beside the library's.

The model is L2-regularized softmax regression on scikit-learn's digits (64 pixels, 10 classes,
P = 650), trained by Newton's method to the optimum :math:`\hat\theta` of

.. math:: J(\theta) = \frac1N \sum_{i=1}^N \ell(z_i;\theta) + \frac\lambda2\|\theta\|^2 ,

so :math:`H + \lambda I` (H the Hessian of the mean cross-entropy) is the objective's Hessian and the
influence functions' first-order theory applies exactly. For the test loss
:math:`L_{test}(\theta) = \sum_t \ell(z^{test}_t;\theta)` of the highest-loss test digits, removing
training point i changes it by about

.. math:: \Delta_i \approx -\frac1N \sum_t I[t, i] = \frac1N\, \nabla\ell(z_i)^\top s, \qquad
          s = (H + \lambda I)^{-1} \sum_t \nabla\ell(z^{test}_t)

(:class:`fisherext.InfluenceFunctions`, normalization and sign as in :mod:`fisherext.influence`). The
prediction is computed with s from

- ``exact``: the dense :math:`H + \lambda I` and its Cholesky factor (``solver="exact"``);
- ``cg``: batched conjugate gradients over autograd Hessian products (``solver="cg"``);
- ``lissa``: the LiSSA recurrence, scale 1.1 λ_max(H) from a seeded power iteration (``solver="lissa"``);
- ``fd_cg``: :func:`fisherext.solvers.cg` whose product is the central difference
  :math:`(\nabla L(\theta + \epsilon v) - \nabla L(\theta - \epsilon v))/2\epsilon` of
  :func:`fisherext.hvp` (``method="fd"``), which writes :math:`\theta_0 \pm \epsilon v` from a saved copy
  of :math:`\theta_0` and restores it bit for bit; in float64 and, with seed 002's step
  :math:`\epsilon = r = 10^{-2}`, in float32 (``fd_cg_float32``);
- ``seed_inplace_float32``: the same CG with seed 002's product (:func:`seed_inplace_fd_hvp`), which moves
  the weights in place by :math:`+rv`, :math:`-2rv`, :math:`+rv`; in floating point
  :math:`((\theta + rv) - 2rv) + rv \ne \theta`, so the weights drift with every product.

The actual change :math:`\Delta_i` is measured by retraining without point i (its weight 1/N set to 0,
the others kept: the :math:`\varepsilon = -1/N` of the derivation), warm-started at :math:`\hat\theta`,
with Newton steps on the exact leave-one-out Hessian at :math:`\hat\theta` until
:math:`\|\nabla J_{-i}\| \le 10^{-12}` (float64, plain ``torch.func``: independent of the library). The
points retrained are the most influential ones by the exact prediction and as many drawn at random from
the rest.

The drift is measured twice: the weights after the CG solves, and after many products along random
directions of the size of s; its effect on the influence is the change of the exact prediction computed
at the drifted weights, set against the parameter change that removing one training point causes.

``Result.data`` (JSON): ``n_train``, ``n_test_points``, ``P``, ``damping``, ``lambda_max``, ``lissa_scale``,
``lissa_depth``, ``fd_eps``, ``seed_r``, ``test_accuracy``; ``methods``: {name: {``label``, ``dtype``,
``rel_error_vs_exact`` (over all N predictions), ``pearson``, ``spearman``, ``slope`` (least-squares slope of
actual on predicted), ``cg_iterations`` (None where the library chose), ``seconds``}}; ``loo``:
{``indices``, ``actual``, ``predicted`` ({name: list}), ``newton_steps_max``, ``parameter_change_median``};
``drift``: {``checkpoints``, ``inplace_norm``, ``inplace_max_abs``, ``restored_norm``, ``restored_bitwise``,
``cg_inplace_norm``, ``cg_restored_norm``, ``repeat_inplace_rel_diff``, ``repeat_restored_bitwise``,
``influence_rel_change``, ``drift_over_loo_change``, ``theta_norm``}.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .._core.entry import entry_point
from .._core.params import flatten, unflatten
from ..curvature import HessianOperator, hvp
from ..influence import InfluenceFunctions
from ..linalg import solvers, spectral
from ..linalg.linop import LinearOperator
from . import data as datasets
from .registry import Config, Experiment, Figure, Outcome, Result, Table

ID = "influence"
DAMPING = 1e-2      # λ of the L2 penalty, and the damping of every solve
SEED_R = 1e-2       # seed 002's finite-difference step r
FD_EPS = 1e-3       # the step of the float64 finite-difference CG (fisherext.hvp's default)
GRAD_TOL = 1e-12    # ‖∇J‖ at which Newton (fit and leave-one-out) stops
CG_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Generator offsets (config.generator(offset)): one per independent draw.
_GEN_LOO, _GEN_POWER, _GEN_DRIFT = 1, 2, 3

QUICK = dict(n_train=400, n_test=4, n_top=10, n_random=10, lissa_depth=600, drift_hvps=300)
FULL = dict(n_train=600, n_test=8, n_top=30, n_random=30, lissa_depth=1000, drift_hvps=3000)

METHODS = {  # name: (label, dtype)
    "exact": ("exact (Cholesky)", "float64"),
    "cg": ("CG, autograd HVP", "float64"),
    "lissa": ("LiSSA", "float64"),
    "fd_cg": ("CG, FD-HVP (restored), ε=1e-3", "float64"),
    "fd_cg_float32": ("CG, FD-HVP (restored), r=1e-2", "float32"),
    "seed_inplace_float32": ("CG, seed's in-place ±r FD-HVP, r=1e-2", "float32"),
}

__all__ = ["EXPERIMENT", "seed_inplace_fd_hvp"]


# ---- the seed's defect, reproduced ------------------------------------------------------------------


@entry_point
def seed_inplace_fd_hvp(model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *,
                        eps: float = SEED_R) -> torch.Tensor:
    r"""Reproduces seed 002's finite-difference Hessian-vector product, defect included: the weights are
    moved **in place** by :math:`+\epsilon v`, then :math:`-2\epsilon v`, then :math:`+\epsilon v`, and
    the product is :math:`(\nabla L(\theta + \epsilon v) - \nabla L(\theta - \epsilon v))/2\epsilon`.

    In exact arithmetic the weights end where they started; in floating point each addition rounds, so
    they end at :math:`\theta + \delta` with :math:`\delta \ne 0` of the order of the rounding unit of
    :math:`|\theta| + \epsilon|v|`, and the drift accumulates over products. ``fisherext.hvp(method="fd")``
    writes :math:`\theta_0 \pm \epsilon v` from a saved copy and restores :math:`\theta_0` bit for bit. Kept
    to show the difference; do not use it.

    Args:
        model: the network; all its parameters are moved (in ``named_parameters()`` order).
        loss: ``loss(outputs, targets)`` returning the batch's mean loss, e.g. ``F.cross_entropy``.
        x, y: the batch (one batch: the seed's minibatch averaging is not reproduced).
        v: the direction [P], flat over all parameters.
        eps: the step, seed 002's r (default 1e-2).

    Returns:
        Tensor [P]: the finite-difference product. The model is left with the drifted weights.

    Raises:
        ValueError: ``v`` not of shape [P], ``eps`` not a finite positive number.
    """
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    if v.shape != (P,):
        raise ValueError(f"v: expected shape [{P}] (all parameters, flat), got {list(v.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: must be a finite number > 0, got {eps!r}")
    pieces = unflatten(v.to(params[0].dtype), params)

    def move(step):
        with torch.no_grad():
            for p, d in zip(params, pieces):
                p.add_(d, alpha=step)

    def gradient():
        with torch.enable_grad():
            return flatten(torch.autograd.grad(loss(model(x), y), params))

    move(+eps)
    g_plus = gradient()
    move(-2 * eps)
    g_minus = gradient()
    move(+eps)
    return (g_plus - g_minus) / (2 * eps)


# ---- helpers ----------------------------------------------------------------------------------------


class _ProductOperator(LinearOperator):
    """A LinearOperator whose product is ``product(X)`` for X [P, K]; counts the vectors it multiplied."""

    def __init__(self, model: nn.Module, product):
        p0 = next(model.parameters())
        super().__init__(sum(p.numel() for p in model.parameters()), p0.dtype, p0.device)
        self.product, self.vectors = product, 0

    def _matmat(self, X):
        self.vectors += X.shape[1]
        return self.product(X)


def _theta(model: nn.Module) -> torch.Tensor:
    return flatten([p.detach() for p in model.parameters()]).clone()


def _load(model: nn.Module, theta: torch.Tensor) -> None:
    with torch.no_grad():
        for p, t in zip(model.parameters(), unflatten(theta, list(model.parameters()))):
            p.copy_(t)


def _objective(model: nn.Module, x, y, lam: float):
    r""":math:`J_w(\theta) = \sum_i w_i \ell_i(\theta) + \frac\lambda2\|\theta\|^2` as a function of the flat θ and
    the weights w, built from plain ``torch.func`` (the reference, independent of the library)."""
    names = [n for n, _ in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]

    def J(theta, w):
        out = functional_call(model, dict(zip(names, unflatten(theta, like))), (x,))
        return (F.cross_entropy(out, y, reduction="none") * w).sum() + 0.5 * lam * theta.square().sum()

    def loss_one(theta, xi, yi):
        return F.cross_entropy(functional_call(model, dict(zip(names, unflatten(theta, like))), (xi[None],)), yi[None])

    return J, loss_one


def _newton(grad_fn, step_fn, theta, what: str, max_steps: int = 60):
    """Iterates θ ← θ − step(θ, g) until ‖g‖ ≤ GRAD_TOL; returns (θ, steps taken)."""
    for steps in range(max_steps):
        g = grad_fn(theta)
        if g.norm() <= GRAD_TOL:
            return theta, steps
        theta = theta - step_fn(theta, g)
    raise RuntimeError(f"{what}: Newton did not reach |grad| <= {GRAD_TOL:g} in {max_steps} steps "
                       f"(|grad| = {g.norm().item():.3g})")


def _fit(model: nn.Module, x, y, lam: float):
    """Newton's method from θ = 0 to the optimum of J (uniform weights 1/N); writes it into ``model`` and
    returns (θ̂, the objective's Hessian at θ̂, J, loss_one)."""
    J, loss_one = _objective(model, x, y, lam)
    w = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=x.dtype, device=x.device)
    grad_J, hess_J = torch.func.grad(J), torch.func.hessian(J)
    theta = torch.zeros_like(_theta(model))
    theta, _ = _newton(lambda t: grad_J(t, w), lambda t, g: torch.linalg.solve(hess_J(t, w), g), theta, "fit")
    _load(model, theta)
    return theta, hess_J(theta, w), J, loss_one


def _leave_one_out(J, loss_one, theta, H, x, y, x_test, y_test, test_loss, indices):
    """Actual change of the test loss when each training point of ``indices`` is removed (weight 0), by
    Newton from θ̂ with the exact leave-one-out Hessian at θ̂ (H − ∇²ℓ_i/N); also ‖θ_{-i} − θ̂‖ and the
    largest number of steps taken."""
    N = y.shape[0]
    w = torch.full((N,), 1.0 / N, dtype=x.dtype, device=x.device)
    grad_J, hess_one = torch.func.grad(J), torch.func.hessian(loss_one)
    base = test_loss(theta)
    changes, moves, most = [], [], 0
    for i in indices:
        w_i = w.clone()
        w_i[i] = 0.0
        factor = torch.linalg.cholesky(H - hess_one(theta, x[i], y[i]) / N)
        theta_i, steps = _newton(lambda t: grad_J(t, w_i), lambda t, g: torch.cholesky_solve(g[:, None], factor)[:, 0],
                                 theta.clone(), f"leave-one-out retraining of point {i}")
        changes.append((test_loss(theta_i) - base).item())
        moves.append((theta_i - theta).norm().item())
        most = max(most, steps)
    return changes, moves, most


def _dots(model: nn.Module, x, y, s: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla\ell(z_i)^\top s` for every training point at once: one forward-mode product of the
    per-sample losses along s (no per-sample gradient is formed)."""
    names = [n for n, _ in model.named_parameters()]
    primals = {n: p.detach() for n, p in model.named_parameters()}
    tangents = dict(zip(names, unflatten(s.to(x.dtype), list(primals.values()))))

    def losses(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")

    return torch.func.jvp(losses, (primals,), (tangents,))[1]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the ranks (the values are continuous: no ties)."""
    return _pearson(a.argsort().argsort().double(), b.argsort().argsort().double())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _checkpoints(n: int) -> list[int]:
    """1, 3, 10, 30, ... up to n (n included)."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k = k * 3 if str(k).startswith("1") else k * 10 // 3
    return out + [n]


# ---- the run ----------------------------------------------------------------------------------------


def _model(split: datasets.Split, theta: torch.Tensor, config: Config) -> nn.Module:
    """Softmax regression (Flatten, Linear) in θ's dtype on the run's device, with θ written in, in eval mode."""
    net = datasets.mlp([split.features, split.classes], seed=config.seed).to(theta.dtype).to(config.device).eval()
    _load(net, theta)
    return net


def _library_solvers(model, train, test, N: int, lissa_depth: int, config: Config):
    """The predicted changes by InfluenceFunctions with solver "exact", "cg" and "lissa" (its scale 1.1 λ_max
    from a seeded power iteration, so that the run does not draw from torch's global generator)."""
    lam_max = spectral.power_iteration(HessianOperator(model, "cross_entropy", train), 1,
                                       generator=config.generator(_GEN_POWER), progress=config.progress)[0].abs().item()
    solver_kwargs = {"exact": None, "cg": dict(tol=CG_TOL[torch.float64], maxiter=1000),
                     "lissa": dict(scale=1.1 * lam_max, depth=lissa_depth)}
    predicted, seconds = {}, {}
    for name, kwargs in solver_kwargs.items():
        start = time.perf_counter()
        inf = InfluenceFunctions(model, "cross_entropy", train, damping=DAMPING, solver=name, solver_kwargs=kwargs,
                                 progress=config.progress)
        predicted[name] = -inf.influence(test).sum(0) / N
        seconds[name] = time.perf_counter() - start
    return predicted, seconds, lam_max


def _fd_cg(net, x, y, g_test, N: int, product: str, eps: float, config: Config, repeats: int = 1):
    """CG on (H + λI) s = Σ_t ∇ℓ(z_t) with the finite-difference product of fisherext.hvp ("library") or of
    seed 002 ("seed"), ``repeats`` solves in a row; the predicted changes ∇ℓ(z_i)ᵀs / N at the weights the
    solves left, the solutions, CG's iterations and the seconds per solve."""
    dtype = next(net.parameters()).dtype
    if product == "library":
        op = _ProductOperator(net, lambda X: hvp(net, "cross_entropy", (x, y), X, method="fd", eps=eps))
    else:
        op = _ProductOperator(net, lambda X: torch.stack(
            [seed_inplace_fd_hvp(net, F.cross_entropy, x, y, v, eps=eps) for v in X.T], 1))
    start = time.perf_counter()
    solutions = []
    for _ in range(repeats):
        s, info = solvers.cg(op, g_test.to(dtype), damping=DAMPING, tol=CG_TOL[dtype], maxiter=500, return_info=True,
                             progress=config.progress)
        solutions.append(s)
    predicted = _dots(net, x, y, solutions[0]).double() / N  # the seed computes it at the weights its solve left
    return predicted, solutions, int(info["iterations"]), (time.perf_counter() - start) / repeats


def _drift(split, theta32, x, y, scale: float, n_hvps: int, config: Config):
    """‖θ − θ₀‖ and max |θ − θ₀| at the checkpoints of n_hvps products of the seed's recipe along random
    directions of norm ``scale``, and whether fisherext.hvp(method="fd") left θ₀ bitwise after the same
    products; returns (that dict, the drifted weights)."""
    V = torch.randn(n_hvps, theta32.numel(), generator=config.generator(_GEN_DRIFT))
    V = (V * (scale / V.norm(dim=1, keepdim=True))).float().to(config.device)
    drifting = _model(split, theta32, config)
    checkpoints, norms, maxima = _checkpoints(n_hvps), [], []
    for k in range(1, n_hvps + 1):
        seed_inplace_fd_hvp(drifting, F.cross_entropy, x, y, V[k - 1], eps=SEED_R)
        if k in checkpoints:
            delta = _theta(drifting) - theta32
            norms.append(delta.norm().item())
            maxima.append(delta.abs().max().item())
    kept = _model(split, theta32, config)
    hvp(kept, "cross_entropy", (x, y), V.T, method="fd", eps=SEED_R, progress=config.progress)  # the same products
    out = {"checkpoints": checkpoints, "inplace_norm": norms, "inplace_max_abs": maxima,
           "restored_norm": (_theta(kept) - theta32).norm().item(), "restored_bitwise": torch.equal(_theta(kept), theta32)}
    return out, _theta(drifting)


def run(config: Config) -> Result:
    sizes = QUICK if config.quick else FULL
    split = datasets.load("digits", seed=config.seed, data_root=config.data_root)
    N = sizes["n_train"]
    x, y = split.x_train[:N].double().to(config.device), split.y_train[:N].to(config.device)
    xt_all, yt_all = split.x_test.double().to(config.device), split.y_test.to(config.device)
    model = datasets.mlp([split.features, split.classes], seed=config.seed).double().to(config.device).eval()
    theta, H, J, loss_one = _fit(model, x, y, DAMPING)
    test_accuracy = datasets.accuracy(model, xt_all, yt_all)

    # the test points: the highest-loss held-out digits, where the training points matter most
    with torch.no_grad():
        worst = F.cross_entropy(model(xt_all), yt_all, reduction="none").argsort(descending=True)[:sizes["n_test"]]
    x_test, y_test = xt_all[worst], yt_all[worst]
    names, like = [n for n, _ in model.named_parameters()], [p.detach() for p in model.parameters()]

    def test_loss(t):
        out = functional_call(model, dict(zip(names, unflatten(t, like))), (x_test,))
        return F.cross_entropy(out, y_test, reduction="sum")

    train, test = (x, y), (x_test, y_test)
    predicted, seconds, lam_max = _library_solvers(model, train, test, N, sizes["lissa_depth"], config)
    iterations = dict.fromkeys(predicted)
    g_test = InfluenceFunctions(model, "cross_entropy", train, damping=DAMPING).test_gradients(test).sum(0)

    # CG on finite-difference products: fisherext's (restored) in float64 and float32, the seed's in-place one;
    # the float32 ones at seed 002's r and solved twice in a row (the second solve starts where the first left θ)
    theta32 = theta.float()
    x32 = x.float()
    predicted["fd_cg"], _, iterations["fd_cg"], seconds["fd_cg"] = _fd_cg(model, x, y, g_test, N, "library", FD_EPS,
                                                                          config)
    kept, drifting = _model(split, theta32, config), _model(split, theta32, config)
    predicted["fd_cg_float32"], restored, iterations["fd_cg_float32"], seconds["fd_cg_float32"] = _fd_cg(
        kept, x32, y, g_test, N, "library", SEED_R, config, repeats=2)
    predicted["seed_inplace_float32"], inplace, iterations["seed_inplace_float32"], seconds["seed_inplace_float32"] = \
        _fd_cg(drifting, x32, y, g_test, N, "seed", SEED_R, config, repeats=2)

    # leave-one-out retraining of the most influential points and as many random others
    order = predicted["exact"].abs().argsort(descending=True).cpu()
    rest = order[sizes["n_top"]:]
    rest = rest[torch.randperm(rest.numel(), generator=config.generator(_GEN_LOO))[:sizes["n_random"]]]
    chosen = torch.cat([order[:sizes["n_top"]], rest]).tolist()
    actual, moves, newton_steps = _leave_one_out(J, loss_one, theta, H, x, y, x_test, y_test, test_loss, chosen)
    actual_t = torch.tensor(actual, dtype=torch.float64)
    methods = {}
    for name, (label, dtype) in METHODS.items():
        pred = predicted[name].double().cpu()[chosen]
        methods[name] = {"label": label, "dtype": dtype, "rel_error_vs_exact": _rel(predicted[name], predicted["exact"]),
                         "pearson": _pearson(pred, actual_t), "spearman": _spearman(pred, actual_t),
                         "slope": ((pred * actual_t).sum() / (pred * pred).sum()).item(),
                         "cg_iterations": iterations[name], "seconds": seconds[name]}

    # the drift over many products, and its effect: the exact prediction at the drifted weights against the
    # one at the saved weights, and the drift against the parameter change of removing one training point
    drift, drifted = _drift(split, theta32, x32, y, restored[0].norm().item(), sizes["drift_hvps"], config)

    def exact_at(theta_32):
        net = _model(split, theta_32.double(), config)
        return -InfluenceFunctions(net, "cross_entropy", train, damping=DAMPING).influence(test).sum(0) / N

    median_move = float(torch.tensor(moves).median())
    drift.update({"cg_inplace_norm": (_theta(drifting) - theta32).norm().item(),
                  "cg_restored_norm": (_theta(kept) - theta32).norm().item(),
                  "repeat_inplace_rel_diff": _rel(inplace[1], inplace[0]),
                  "repeat_restored_bitwise": torch.equal(restored[1], restored[0]),
                  "influence_rel_change": _rel(exact_at(drifted), exact_at(theta32)),
                  "drift_over_loo_change": drift["inplace_norm"][-1] / median_move,
                  "theta_norm": theta32.norm().item()})
    loo = {"indices": chosen, "actual": actual,
           "predicted": {name: predicted[name].double().cpu()[chosen].tolist() for name in METHODS},
           "newton_steps_max": newton_steps, "parameter_change_median": median_move}
    data = {"n_train": N, "n_test_points": sizes["n_test"], "P": theta.numel(), "damping": DAMPING,
            "lambda_max": lam_max, "lissa_scale": 1.1 * lam_max, "lissa_depth": sizes["lissa_depth"], "fd_eps": FD_EPS,
            "seed_r": SEED_R, "test_accuracy": test_accuracy, "methods": methods, "loo": loo, "drift": drift}
    return Result(ID, EXPERIMENT.title, _summary(data), data, _outcomes(data), _tables(data), _figures(data))


# ---- report -----------------------------------------------------------------------------------------


def _summary(d: dict) -> str:
    m, dr = d["methods"], d["drift"]
    n = dr["checkpoints"][-1]
    restored = (f"θ bitwise unchanged after {n} products" if dr["restored_bitwise"]
                else f"θ moved by {dr['restored_norm']:.1e} after {n} products")
    return (
        f"Influence of {d['n_train']} training digits on the summed loss of the {d['n_test_points']} highest-loss "
        f"test digits, for L2-regularized softmax regression (P = {d['P']}, λ = {d['damping']:g}) at its exact "
        f"optimum, against leave-one-out retraining of {len(d['loo']['indices'])} points (warm-started Newton). The "
        f"exact solution predicts the retraining with Pearson {m['exact']['pearson']:.4f}, Spearman "
        f"{m['exact']['spearman']:.4f}; CG and LiSSA differ from it by {m['cg']['rel_error_vs_exact']:.1e} and "
        f"{m['lissa']['rel_error_vs_exact']:.1e} (relative). Seed 002 computed its Hessian products by finite "
        f"differences that move the weights in place (+r, −2r, +r) and solved with scipy's fmin_cg. Here CG runs "
        f"on fisherext's finite-difference product, which writes θ₀ ± εv from a saved copy ({restored}; "
        f"{m['fd_cg']['rel_error_vs_exact']:.1e} from exact in float64), and beside it on the seed's recipe: its "
        f"float32 weights drift by {dr['inplace_norm'][-1]:.1e} (‖θ‖ = {dr['theta_norm']:.1f}) after {n} products, "
        f"growing as √products, and its solve repeated gives another answer "
        f"({dr['repeat_inplace_rel_diff']:.1e} relative). In this problem that drift is "
        f"{dr['drift_over_loo_change']:.0e} of the parameter change of removing one training point and moves the "
        f"exact prediction by {dr['influence_rel_change']:.0e}: a reproducibility defect here, far below the float32 "
        f"finite-difference error at the seed's r ({m['fd_cg_float32']['rel_error_vs_exact']:.0e}).")


def _outcomes(d: dict) -> list[Outcome]:
    m, dr = d["methods"], d["drift"]
    n = dr["checkpoints"][-1]
    worst = min(v["pearson"] for v in m.values())
    return [
        Outcome("exact influence predicts leave-one-out retraining: Pearson ≥ 0.99", m["exact"]["pearson"] >= 0.99,
                m["exact"]["pearson"]),
        Outcome("exact influence ranks the leave-one-out changes: Spearman ≥ 0.95", m["exact"]["spearman"] >= 0.95,
                m["exact"]["spearman"]),
        Outcome("first order in 1/N has the retraining's size: least-squares slope of actual on predicted in "
                "[0.8, 1.25]", 0.8 <= m["exact"]["slope"] <= 1.25, m["exact"]["slope"]),
        Outcome("CG agrees with exact to 1e-6 relative", m["cg"]["rel_error_vs_exact"] <= 1e-6,
                m["cg"]["rel_error_vs_exact"]),
        Outcome("LiSSA agrees with exact to 1e-3 relative", m["lissa"]["rel_error_vs_exact"] <= 1e-3,
                m["lissa"]["rel_error_vs_exact"]),
        Outcome("CG on the float64 finite-difference HVP agrees with exact to 1e-3 relative",
                m["fd_cg"]["rel_error_vs_exact"] <= 1e-3, m["fd_cg"]["rel_error_vs_exact"]),
        Outcome("every method (float32 finite differences included) predicts retraining with Pearson ≥ 0.99",
                worst >= 0.99, worst),
        Outcome(f"the seed's in-place ±r recipe drifts θ (‖Δθ‖ > 0 after {n} float32 products) while fisherext's "
                "restored one leaves it bitwise unchanged", dr["inplace_norm"][-1] > 0 and dr["restored_bitwise"],
                dr["inplace_norm"][-1]),
        Outcome("repeating the seed's CG solve gives another answer (relative difference > 0); the restored one "
                "repeats bit for bit", dr["repeat_inplace_rel_diff"] > 0 and dr["repeat_restored_bitwise"],
                dr["repeat_inplace_rel_diff"]),
        Outcome(f"here the drift is small: after {n} products it moves the exact prediction by < 1e-3 relative",
                dr["influence_rel_change"] < 1e-3, dr["influence_rel_change"]),
    ]


def _tables(d: dict) -> list[Table]:
    rows = [[v["label"], v["dtype"], f"{v['rel_error_vs_exact']:.2e}", f"{v['pearson']:.4f}", f"{v['spearman']:.4f}",
             f"{v['slope']:.3f}", "" if v["cg_iterations"] is None else v["cg_iterations"], f"{v['seconds']:.2f}"]
            for v in d["methods"].values()]
    dr = d["drift"]
    drift_rows = [[k, f"{a:.3e}", f"{b:.3e}"] for k, a, b in zip(dr["checkpoints"], dr["inplace_norm"],
                                                                 dr["inplace_max_abs"])]
    drift_rows.append([f"{dr['checkpoints'][-1]} (restored)", f"{dr['restored_norm']:.3e}",
                       "bitwise equal" if dr["restored_bitwise"] else "CHANGED"])
    return [
        Table("Influence on the test loss against leave-one-out retraining, by method",
              ["method", "dtype", "rel. error vs exact", "Pearson", "Spearman", "slope", "CG iterations", "seconds"],
              rows),
        Table(f"Drift of the float32 weights (‖θ‖ = {dr['theta_norm']:.2f}) under the seed's in-place ±r recipe "
              f"(r = {d['seed_r']:g}) against fisherext.hvp(method='fd')",
              ["products", "‖θ − θ₀‖", "max |θ − θ₀|"], drift_rows),
    ]


def _figures(d: dict) -> list[Figure]:
    loo, methods, dr = d["loo"], d["methods"], d["drift"]

    def scatter(fig):
        fig.set_size_inches(12, 7.5)
        axes = fig.subplots(2, 3).ravel()
        actual = loo["actual"]
        lo, hi = min(actual + [min(p) for p in loo["predicted"].values()]), \
            max(actual + [max(p) for p in loo["predicted"].values()])
        for ax, (name, v) in zip(axes, methods.items()):
            ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
            ax.scatter(loo["predicted"][name], actual, s=12)
            ax.set_title(f"{v['label']} ({v['dtype']})\nPearson {v['pearson']:.3f}, Spearman {v['spearman']:.3f}",
                         fontsize=9)
            ax.set_xlabel("predicted change of test loss")
            ax.set_ylabel("leave-one-out change")
        fig.tight_layout()

    def drift_plot(fig):
        ax = fig.subplots()
        ax.loglog(dr["checkpoints"], dr["inplace_norm"], "o-", label="seed's in-place ±r: ‖θ − θ₀‖")
        ax.loglog(dr["checkpoints"], dr["inplace_max_abs"], "s--", label="seed's in-place ±r: max |θ − θ₀|")
        k0, n0 = dr["checkpoints"][0], dr["inplace_norm"][0]
        ax.loglog(dr["checkpoints"], [n0 * math.sqrt(k / k0) for k in dr["checkpoints"]], ":", color="0.5",
                  label="∝ √products")
        ax.axhline(d["loo"]["parameter_change_median"], color="C3", lw=1,
                   label="median ‖θ₋ᵢ − θ̂‖ (removing one point)")
        ax.set_xlabel("finite-difference Hessian-vector products (float32)")
        ax.set_ylabel("drift of the weights")
        ax.set_title("fisherext.hvp(method='fd'): θ bitwise unchanged" if dr["restored_bitwise"]
                     else "fisherext.hvp(method='fd'): θ CHANGED")
        ax.legend(fontsize=8)

    return [Figure(f"{ID}_scatter", "Predicted against actual leave-one-out change of the test loss, one panel per "
                   "method (the grey line is y = x).", scatter),
            Figure(f"{ID}_drift", "Drift of the weights under seed 002's in-place ±r finite differences, against the "
                   "number of products; fisherext's restored product leaves them bitwise unchanged.", drift_plot)]


EXPERIMENT = Experiment(id=ID, seeds="002", title="Influence functions against leave-one-out retraining", run=run)
