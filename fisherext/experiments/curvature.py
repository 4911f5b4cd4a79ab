r"""Experiment ``curvature``: the spectrum of a trained digits MLP's Hessian, Gauss–Newton matrix and Fisher,
matrix-free, checked against dense eigendecompositions.

For the mean training loss :math:`L(\theta) = \frac1N\sum_n \ell(f(x_n;\theta), y_n)` (cross entropy) the
three curvature matrices are

.. math:: H = \nabla^2_\theta L, \qquad G = \frac1N\sum_n J_n^\top \nabla^2_z\ell_n\, J_n, \qquad
          F = \frac1N\sum_n J_n^\top \Lambda_n J_n, \quad \Lambda_n = \mathrm{diag}(p_n) - p_n p_n^\top,

with :math:`J_n` the Jacobian of the logits. For softmax cross entropy :math:`\nabla^2_z\ell_n = \Lambda_n`,
so the true Fisher *is* the GGN, positive semi-definite, while H adds the second derivatives of the network
weighted by the residuals and is indefinite. Each is a matrix-free ``HessianOperator`` / ``GGNOperator`` /
``FisherOperator`` over the training data; on them run the spectral methods of
:mod:`fisherext.linalg.spectral`: top eigenvalues by power (subspace) iteration and by Lanczos, the trace by
Hutchinson's estimator with its standard error, and the spectral density by stochastic Lanczos quadrature
(SLQ). The MLP is small (P = 2,410; quick 610) so that the dense matrices fit: H by plain autograd
(``torch.func``, reverse over reverse) and F from ``fisher(structure="full")``, eigendecomposed by
``torch.linalg.eigvalsh`` as the reference; G is F, which the operators' products on random columns
confirm (a nonzero difference would show on them almost surely) without assembling G from P columns.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev

from .._core.entry import entry_point
from .._core.params import flatten, unflatten
from ..capture import fisher
from ..curvature import FisherOperator, GGNOperator, HessianOperator
from ..linalg.spectral import hutchinson_trace, lanczos, power_iteration, slq_density
from . import data as datasets
from .registry import Config, Experiment, Figure, Outcome, Result, Table

__all__ = ["EXPERIMENT", "dense_hessian", "run"]

#: The curvature matrices, in the order of the report.
MATRICES = ("hessian", "ggn", "fisher")
_LABELS = {"hessian": "Hessian H", "ggn": "GGN G", "fisher": "true Fisher F"}
# Eigenpairs of Lanczos and of power iteration.
_K_LANCZOS, _K_POWER = 5, 3
# Sizes: hidden units of the MLP 64-hidden-10, training samples the curvature is of (None: all),
# Hutchinson probes, SLQ probes and Lanczos steps per probe, Lanczos steps for the top eigenpairs,
# power iterations at most.
_SIZES = {True: {"hidden": 8, "samples": 256, "epochs": 10, "probes": 30, "slq_n": 3, "slq_m": 20, "lanczos_m": 20,
                 "power_maxiter": 100},
          False: {"hidden": 32, "samples": None, "epochs": 20, "probes": 100, "slq_n": 5, "slq_m": 40,
                  "lanczos_m": 40, "power_maxiter": 300}}
_GRID_POINTS = 541
# The autograd Hessian's reverse-over-reverse pass: rows per vmap chunk (memory, not accuracy).
_HESSIAN_CHUNK = 128


@entry_point(name="experiments.curvature.dense_hessian")
def dense_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""The dense Hessian of the mean cross entropy over (x, y) by plain autograd, the reference for the
    matrix-free operators: :math:`\nabla^2_\theta \frac1N\sum_n \ell_n` as ``torch.func.jacrev`` of
    ``torch.func.grad`` over the flat parameter vector (``fisherext.flatten`` order), in chunks of rows.

    Args:
        model: a classifier returning logits [N, C]; all its parameters are differentiated.
        x: the inputs [N, ...].
        y: the labels [N].

    Returns:
        Tensor [P, P] in the parameters' dtype.
    """
    named = list(model.named_parameters())
    names, like = [n for n, _ in named], [p for _, p in named]

    def loss(theta):
        return F.cross_entropy(functional_call(model, dict(zip(names, unflatten(theta, like))), (x,)), y)

    theta = flatten([p.detach() for p in like])
    return jacrev(grad(loss), chunk_size=_HESSIAN_CHUNK)(theta)


def _smoothed(eigenvalues, grid, sigma):
    r"""The dense spectral density :math:`\frac1P\sum_j g_\sigma(t - \lambda_j)` on ``grid`` (SLQ's kernel)."""
    diff = (grid[:, None] - eigenvalues.to("cpu", torch.float64)[None, :]) / sigma
    return torch.exp(-0.5 * diff**2).mean(1) / (sigma * math.sqrt(2 * math.pi))


def _spectra(name, A, M, config, sizes, offset):
    """The matrix-free spectral estimates of operator A against its dense matrix M."""
    ev = torch.linalg.eigvalsh(M)
    top = ev.flip(0)
    lam_max = top[0].item()
    lz, _ = lanczos(A, _K_LANCZOS, m=sizes["lanczos_m"], generator=config.generator(offset), progress=config.progress)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        pw, _ = power_iteration(A, _K_POWER, maxiter=sizes["power_maxiter"], generator=config.generator(offset + 1),
                                progress=config.progress)
    tr, se = hutchinson_trace(A, sizes["probes"], generator=config.generator(offset + 2), return_std=True,
                              progress=config.progress)
    exact_trace = M.trace().item()
    # one kernel and grid for SLQ and the dense density, set from the matrix-free top eigenvalue
    lam_lz = lz[0].item()
    sigma = 0.01 * lam_lz
    grid = torch.linspace(-0.25 * lam_lz, 1.1 * lam_lz, _GRID_POINTS, dtype=torch.float64)
    sd = slq_density(A, m=sizes["slq_m"], n=sizes["slq_n"], grid=grid, sigma=sigma,
                     generator=config.generator(offset + 3), progress=config.progress)
    dense_density = _smoothed(ev, grid, sigma)
    step = (grid[1] - grid[0]).item()
    return {
        "name": name, "eigenvalues_top": top[:10].tolist(), "lambda_max": lam_max, "lambda_min": ev[0].item(),
        "trace": exact_trace, "negative_eigenvalues": int((ev < -1e-8 * lam_max).sum()),
        "lanczos": lz.tolist(), "lanczos_rel_err": ((lz - top[:_K_LANCZOS]).abs().max() / lam_max).item(),
        "power": pw.tolist(), "power_rel_err": ((pw - top[:_K_POWER]).abs().max() / lam_max).item(),
        "power_converged": not caught,
        "hutchinson": tr.item(), "hutchinson_se": se.item(), "hutchinson_z": (tr.item() - exact_trace) / se.item(),
        "slq_sigma": sigma, "grid": grid.tolist(), "slq_density": sd.density.tolist(),
        "dense_density": dense_density.tolist(),
        "slq_l1": ((sd.density - dense_density).abs().sum() * step).item(),
        "slq_mass": (sd.density.sum() * step).item(),
    }


@entry_point(name="experiments.curvature.run")
def run(config: Config) -> Result:
    """Runs the experiment (module docstring).

    Args:
        config: quick or full sizes, the device, the seed every random draw derives from, progress bars.

    Returns:
        the Result: measured figures (``data``), expected outcomes, tables and figures for the report.
    """
    sizes = _SIZES[bool(config.quick)]
    split = datasets.load("digits", seed=config.seed, data_root=config.data_root).to(config.device)
    model = datasets.mlp([split.features, sizes["hidden"], split.classes], seed=config.seed).to(config.device)
    datasets.train(model, split.x_train, split.y_train, epochs=sizes["epochs"], lr=0.1, generator=config.generator(21))
    accuracy = datasets.accuracy(model, split.x_test, split.y_test)
    model = model.double().eval()
    x, y = split.x_train[:sizes["samples"]].double(), split.y_train[:sizes["samples"]]
    data = (x, y)
    # the operators stream over the data at each product; a bar per product would flood the output
    ops = {"hessian": HessianOperator(model, "cross_entropy", data), "ggn": GGNOperator(model, "cross_entropy", data),
           "fisher": FisherOperator(model, "cross_entropy", data)}
    # the dense references: H by plain autograd, F by the capture engine; G is F (checked below on random
    # columns, which any nonzero G - F would fail almost surely), as assembling G from P operator columns
    # costs P backward passes over the data
    fisher_dense = fisher(model, data, structure="full", progress=config.progress).dense()
    dense = {"hessian": dense_hessian(model, x, y), "ggn": fisher_dense, "fisher": fisher_dense}
    P = ops["hessian"].shape[0]
    X = torch.randn(P, 4, generator=config.generator(22), dtype=torch.float64).to(config.device)
    product_err = {name: ((ops[name] @ X - dense[name] @ X).norm() / (dense[name] @ X).norm()).item()
                   for name in MATRICES}
    # GGN and Fisher share their random draws (offset 40), so their Lanczos runs start alike
    offsets = {"hessian": 30, "ggn": 40, "fisher": 40}
    spectra = {name: _spectra(name, ops[name], dense[name], config, sizes, offsets[name]) for name in MATRICES}
    ggn_fisher_top = abs(spectra["ggn"]["lanczos"][0] - spectra["fisher"]["lanczos"][0]) / spectra["fisher"]["lanczos"][0]
    data_out = {"P": P, "samples": x.shape[0], "hidden": sizes["hidden"], "test_accuracy": accuracy,
                "product_rel_err": product_err,
                "ggn_fisher_top_rel_diff": ggn_fisher_top, "spectra": spectra,
                "settings": {"lanczos_k": _K_LANCZOS, "lanczos_m": sizes["lanczos_m"], "power_k": _K_POWER,
                             "hutchinson_probes": sizes["probes"], "slq_probes": sizes["slq_n"],
                             "slq_steps": sizes["slq_m"]}}
    return Result(id="curvature", title=EXPERIMENT.title, summary=_summary(data_out), data=data_out,
                  outcomes=_outcomes(data_out), tables=_tables(data_out), figures=_figures(data_out))


def _outcomes(d):
    s = d["spectra"]
    lz = max(s[n]["lanczos_rel_err"] for n in MATRICES)
    pw = max(s[n]["power_rel_err"] for n in MATRICES)
    z = max(abs(s[n]["hutchinson_z"]) for n in MATRICES)
    ggn_min = s["ggn"]["lambda_min"] / s["ggn"]["lambda_max"]
    h_min = s["hessian"]["lambda_min"] / s["hessian"]["lambda_max"]
    l1 = max(s[n]["slq_l1"] for n in MATRICES)
    return [
        Outcome(f"Lanczos: the top {_K_LANCZOS} eigenvalues of H, G and F are within 1e-6 (relative to λmax) of the "
                f"dense ones (P = {d['P']:,}); value: the largest error", lz <= 1e-6, lz),
        Outcome(f"power iteration: the top {_K_POWER} eigenvalues of H, G and F are within 1e-6 (relative to λmax) of "
                "the dense ones; value: the largest error", pw <= 1e-6, pw),
        Outcome(f"Hutchinson ({d['settings']['hutchinson_probes']} Rademacher probes): the trace estimates of H, G and F "
                "are within 3 standard errors of the exact traces; value: the largest |estimate − trace| / SE", z <= 3, z),
        Outcome("GGN ⪰ 0: the smallest eigenvalue of the dense GGN is ≥ −1e-8·λmax; value: λmin / λmax", ggn_min >= -1e-8, ggn_min),
        Outcome("the true Fisher equals the GGN for softmax cross entropy: the Lanczos top eigenvalues of "
                "FisherOperator and GGNOperator differ by < 1e-6 relative; value: the relative difference",
                d["ggn_fisher_top_rel_diff"] < 1e-6, d["ggn_fisher_top_rel_diff"]),
        Outcome("… and GGNOperator's products equal those of the dense fisher(structure='full') on random columns: "
                "‖GX − FX‖ / ‖FX‖ ≤ 1e-10; value: that ratio", d["product_rel_err"]["ggn"] <= 1e-10,
                d["product_rel_err"]["ggn"]),
        Outcome("the Hessian is indefinite where the GGN is not: λmin(H) / λmax(H) < −1e-3; value: that ratio",
                h_min < -1e-3, h_min),
        Outcome("HessianOperator's and FisherOperator's products equal those of the dense autograd Hessian and the "
                "dense fisher(structure='full') on random columns to 1e-10 relative; value: the larger relative "
                "difference", max(d["product_rel_err"]["hessian"], d["product_rel_err"]["fisher"]) <= 1e-10,
                max(d["product_rel_err"]["hessian"], d["product_rel_err"]["fisher"])),
        Outcome("SLQ: the spectral densities of H, G and F are within 0.05 (L1 distance) of the dense eigenvalues "
                "smoothed by the same Gaussian kernel; value: the largest L1 distance", l1 <= 0.05, l1),
    ]


def _summary(d):
    s = d["spectra"]
    return (
        f"The curvature of a trained digits MLP (64-{d['hidden']}-10, P = {d['P']:,}, test accuracy "
        f"{d['test_accuracy']:.3f}) over {d['samples']:,} training samples: Hessian, Gauss–Newton and true Fisher as "
        "matrix-free operators, their top eigenvalues by power iteration and Lanczos, traces by Hutchinson and "
        "spectral densities by stochastic Lanczos quadrature, each checked against a dense eigendecomposition. "
        f"λmax(H) = {s['hessian']['lambda_max']:.4g}, λmax(G) = λmax(F) = {s['ggn']['lambda_max']:.4g}; H has "
        f"{s['hessian']['negative_eigenvalues']} negative eigenvalues (down to {s['hessian']['lambda_min']:.3g}), "
        "G = F has none: for softmax cross entropy the true Fisher is the GGN. No seed computed these spectra; "
        "seed 004's 1/λmax step size needs the top eigenvalue, which Lanczos gives in a few dozen products.")


def _tables(d):
    s = d["spectra"]
    rows = []
    for n in MATRICES:
        r = s[n]
        rows.append([_LABELS[n], f"{r['lambda_max']:.10g}", f"{r['lanczos'][0]:.10g}", f"{r['lanczos_rel_err']:.2g}",
                     f"{r['power'][0]:.10g}", f"{r['power_rel_err']:.2g}", f"{r['lambda_min']:.4g}",
                     f"{r['trace']:.6g}", f"{r['hutchinson']:.6g} ± {r['hutchinson_se']:.2g}",
                     f"{r['hutchinson_z']:+.2f}", f"{r['slq_l1']:.3g}"])
    return [Table("Spectra: matrix-free estimates against the dense eigendecomposition",
                  ["matrix", "λmax (dense)", "λmax (Lanczos)", f"Lanczos top-{_K_LANCZOS} error",
                   "λmax (power)", f"power top-{_K_POWER} error", "λmin (dense)", "trace (dense)",
                   "Hutchinson ± SE", "z", "SLQ L1"], rows),
            Table("Top eigenvalues (dense)", ["rank"] + [_LABELS[n] for n in MATRICES],
                  [[i + 1] + [f"{s[n]['eigenvalues_top'][i]:.8g}" for n in MATRICES] for i in range(10)])]


def _figures(d):
    s = d["spectra"]

    def plot(fig):
        axes = fig.subplots(1, 2)
        for ax, names in zip(axes, (("hessian",), ("ggn", "fisher"))):
            for n, color, ls in zip(names, ("C0", "C2") if len(names) == 2 else ("C3",), ("-", "--")):
                ax.semilogy(s[n]["grid"], [max(v, 1e-8) for v in s[n]["slq_density"]], ls, color=color,
                            label=f"{_LABELS[n]}: SLQ")
            # G and F share their dense matrix: one dense curve per panel
            ax.semilogy(s[names[0]]["grid"], [max(v, 1e-8) for v in s[names[0]]["dense_density"]], ":", color="k",
                        label="dense eigenvalues, same kernel")
            ax.set_ylim(1e-5, None)
            ax.set_xlabel("eigenvalue")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("spectral density (Gaussian kernel, σ = 1% of λmax)")
        axes[0].set_title(f"Hessian (λmin = {s['hessian']['lambda_min']:.3g})")
        axes[1].set_title("GGN and true Fisher (identical)")
        fig.set_size_inches(11, 4)
        fig.tight_layout()

    return [Figure("curvature_density", f"Spectral densities by stochastic Lanczos quadrature of a digits MLP "
                   f"(P = {d['P']:,}): the Hessian has negative eigenvalues, the GGN and the true Fisher coincide and "
                   "are positive semi-definite; dotted: the dense eigenvalues smoothed by the same kernel.", plot)]


EXPERIMENT = Experiment(id="curvature", seeds="—",
                        title="Curvature spectra: Hessian, GGN and Fisher of a digits MLP", run=run)
