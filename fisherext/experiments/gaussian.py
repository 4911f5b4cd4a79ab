r"""Experiment ``gaussian`` (seed 000): the KL divergence of a Gaussian under a parameter step against the
Fisher quadratic form, with the exact Fisher and the per-sample empirical one, beside seed 000's two
defects.

For :math:`p_\theta = \mathcal N(\mu, LL^\top)` in dimension d (d = 1: the univariate normal,
θ = (μ, σ)), θ = (μ, tril L) in the layout of :mod:`fisherext.gaussian`, and a step
:math:`\Delta = r u` (u a unit vector on the mean coordinates, the Cholesky coordinates, or both),

.. math:: \mathrm{KL}(p_\theta\,\|\,p_{\theta+\Delta}) = \tfrac12\,\Delta^\top F\Delta + O(r^3),
          \qquad F = \mathbb E_{x\sim p_\theta}[g g^\top],\quad g = \nabla_\theta\log p_\theta(x),

so the ratio :math:`\mathrm{KL}/(\tfrac12\Delta^\top F\Delta) = 1 + O(r)` (exactly 1 for a step of the
mean alone, where the KL is :math:`\tfrac12\Delta_\mu^\top\Sigma^{-1}\Delta_\mu`). The study rows are
those of :func:`fisherext.experiments.gaussian_kl.kl_vs_fisher_study`: the exact F, and the per-sample
empirical :math:`\hat F = \frac1n\sum_i g_i g_i^\top` (a mean over samples of outer products), whose
small-radius ratio is :math:`u^\top F u / u^\top\hat F u`, one within its Monte-Carlo standard error.

Seed 000 compared the KL with :math:`\Delta^\top F\Delta` (no ½: its prediction is twice the KL) and, for
the multivariate normal, built its "empirical Fisher" from the gradient of the *summed* log-likelihood,
:math:`\tilde F = \frac1n(\sum_i g_i)(\sum_i g_i)^\top` (:func:`seed_sum_then_outer_quad`). Along a fixed
u, :math:`u^\top\tilde F u = (\sum_i g_i^\top u)^2/n` is :math:`u^\top F u` times one
:math:`\chi^2_1` draw (the sum is :math:`\mathcal N(0, n\,u^\top F u)`), whatever n, and it is zero
along every direction orthogonal to :math:`\sum_i g_i` (rank one). Both are measured here on the seed's
own sample size (n = 10⁴) over random directions, beside the per-sample estimate on the same samples.
"""
from __future__ import annotations

import math

import torch

from .._core.entry import entry_point
from ..gaussian import (mvn_empirical_fisher_quad, mvn_fisher_quad, mvn_kl, mvn_log_prob, mvn_num_params, mvn_pack,
                        mvn_unpack, random_mvn)
from .gaussian_kl import DEFAULT_RADII, WHICH, kl_vs_fisher_study
from .registry import Config, Experiment, Figure, Outcome, Result, Table

__all__ = ["DIMENSIONS", "EXPERIMENT", "run", "seed_kl_prediction", "seed_sum_then_outer_quad"]

#: The dimensions of the study (d = 1 is the univariate normal, θ = (μ, σ)).
DIMENSIONS = (1, 10, 100)
#: Samples of the seed's multivariate part (its ``n_sample``).
SEED_SAMPLES = 10_000
# Sizes: samples of the per-sample empirical Fisher in the study, random directions of the seed
# comparison (each costs one pass over the seed's 10⁴ samples per d).
_SIZES = {True: {"n_empirical": 20_000, "directions": 8}, False: {"n_empirical": 1_000_000, "directions": 48}}
# The O(r) slope is fitted over the radii up to this one (beyond it the cubic term is no longer small).
_SLOPE_RADIUS = 1e-2


@entry_point(name="experiments.gaussian.seed_sum_then_outer_quad")
def seed_sum_then_outer_quad(x: torch.Tensor, mu: torch.Tensor, L: torch.Tensor, deltas: torch.Tensor,
                             diag: str = "raw") -> torch.Tensor:
    r"""Seed 000's multivariate "empirical Fisher" as a quadratic form, reproducing its defect.

    The seed ran ``W.log_prob(W_sample).sum().backward()`` and took the outer product of the resulting
    gradient divided by n: :math:`\tilde F = \frac1n s s^\top` with :math:`s = \sum_i g_i`, the gradient
    of the summed log-likelihood (sum first, outer product after), instead of the mean of per-sample
    outer products :math:`\frac1n\sum_i g_i g_i^\top`. Here s comes from autograd of
    :func:`fisherext.gaussian.mvn_log_prob` summed over ``x`` (the seed's recipe), and each step's
    :math:`\Delta^\top\tilde F\Delta = (s^\top\Delta)^2/n` is evaluated without the P×P matrix.

    Args:
        x: the samples [n, d].
        mu: the mean [d].
        L: the Cholesky factor [d, d].
        deltas: one step [P] or K steps as the rows of [K, P], in the θ layout of
            :mod:`fisherext.gaussian`.
        diag: ``"raw"`` or ``"log"``, the layout of the diagonal coordinates of L.

    Returns:
        Tensor [K] (0-d for one step): :math:`\Delta^\top\tilde F\Delta` (no ½).

    Raises:
        TypeError: ``deltas`` is not a floating-point tensor; (x, μ, L) as
            :func:`fisherext.gaussian.mvn_log_prob`.
        ValueError: ``deltas`` is not [P] or [K, P]; bad (x, μ, L, diag) as
            :func:`fisherext.gaussian.mvn_log_prob` and :func:`fisherext.gaussian.mvn_pack`.
    """
    theta = mvn_pack(mu.detach(), L.detach(), diag).requires_grad_(True)   # checks (μ, L) and diag
    d = L.shape[-1]
    if not isinstance(deltas, torch.Tensor) or not deltas.is_floating_point():
        raise TypeError(f"deltas: expected a floating-point tensor [P] or [K, P], got {type(deltas).__name__}")
    if deltas.dim() not in (1, 2) or deltas.shape[-1] != theta.numel():
        raise ValueError(f"deltas: expected [P] or [K, P] with P = {theta.numel()}, got {tuple(deltas.shape)}")
    mu_t, L_t = mvn_unpack(theta, d, diag)
    summed = torch.autograd.grad(mvn_log_prob(x, mu_t, L_t).sum(), theta)[0]
    return (deltas.to(summed) @ summed) ** 2 / x.shape[0]


@entry_point(name="experiments.gaussian.seed_kl_prediction")
def seed_kl_prediction(quad: float) -> float:
    r"""Seed 000's prediction of the KL from a Fisher quadratic form :math:`q = \Delta^\top F\Delta`:
    q itself, its missing ½ (the right prediction is q / 2), so it is twice the KL to second order.

    Args:
        quad: :math:`\Delta^\top F\Delta`.

    Returns:
        ``quad``, the seed's prediction of :math:`\mathrm{KL}(p_\theta\|p_{\theta+\Delta})`.
    """
    return float(quad)


def _directions(K, P, d, which, generator, like):
    """K random unit directions [K, P] supported on the mean, the L or all coordinates (as the study's)."""
    V = torch.randn(K, P, generator=generator, dtype=like.dtype)
    if which == "mean":
        V[:, d:] = 0
    elif which == "L":
        V[:, :d] = 0
    return (V / V.norm(dim=1, keepdim=True)).to(like.device)


def _slope(radii, ratios):
    """The least-squares slope of log|ratio − 1| against log r over the radii up to _SLOPE_RADIUS."""
    pts = [(math.log(r), math.log(abs(q - 1))) for r, q in zip(radii, ratios)
           if r <= _SLOPE_RADIUS and math.isfinite(q) and q != 1]
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def _quantiles(values, qs=(0.1, 0.5, 0.9)):
    t = torch.tensor(values, dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in qs]


def _study_case(config, d, w_idx, which, radii, n_empirical):
    """The exact and empirical study rows of one case, sharing (μ, L) and the direction u."""
    offset = 1000 * d + 10 * w_idx
    mu, L = random_mvn(d, generator=config.generator(offset), dtype=torch.float64, device=config.device)
    rows = {kind: kl_vs_fisher_study(d, which, kind, n=n_empirical, radii=radii, mu=mu, L=L,
                                     generator=config.generator(offset + 1), device=config.device)
            for kind in ("true", "empirical")}
    return mu, L, rows


def _seed_case(config, d, w_idx, which, mu, L, directions, radius):
    """Seed 000's estimates beside the exact and per-sample ones on the seed's sample size, over random
    directions: (per-direction dict of lists, the rank-one check along a direction orthogonal to Σg)."""
    gen = config.generator(1000 * d + 10 * w_idx + 2)
    P = mvn_num_params(d)
    z = torch.randn(SEED_SAMPLES, d, generator=gen, dtype=L.dtype).to(L.device)
    x = mu + z @ L.T
    V = _directions(directions, P, d, which, gen, L)
    exact = mvn_fisher_quad(mu, L, V)
    per_sample = torch.stack([mvn_empirical_fisher_quad(x, mu, L, v) for v in V])
    seed = seed_sum_then_outer_quad(x, mu, L, V)
    theta = mvn_pack(mu, L)
    kl = torch.stack([mvn_kl(mu, L, *mvn_unpack(theta + radius * v, d)) for v in V])
    out = {
        "exact_ratio": (kl / (0.5 * radius**2 * exact)).tolist(),
        "per_sample_over_exact": (per_sample / exact).tolist(),
        "seed_over_exact": (seed / exact).tolist(),
        # the seed's whole prediction (sum-then-outer quadratic, no ½) over the KL
        "seed_prediction_over_kl": [seed_kl_prediction(q) / k for q, k in zip((radius**2 * seed).tolist(), kl.tolist())],
    }
    orthogonal = None
    if which == "both":  # a direction orthogonal to the summed score: the seed's rank-one matrix is 0 there
        theta_g = theta.clone().requires_grad_(True)
        summed = torch.autograd.grad(mvn_log_prob(x, *mvn_unpack(theta_g, d)).sum(), theta_g)[0]
        u = torch.randn(P, generator=gen, dtype=L.dtype).to(L.device)
        u = u - (u @ summed) / (summed @ summed) * summed
        u = u / u.norm()
        orthogonal = float(seed_sum_then_outer_quad(x, mu, L, u) / mvn_fisher_quad(mu, L, u))
    return out, orthogonal


@entry_point(name="experiments.gaussian.run")
def run(config: Config) -> Result:
    """Runs the experiment (module docstring).

    Args:
        config: quick or full sizes, the device, the seed every random draw derives from, progress bars.

    Returns:
        the Result: measured figures (``data``), expected outcomes, tables and figures for the report.
    """
    sizes = _SIZES[bool(config.quick)]
    radii = list(DEFAULT_RADII)
    r0 = radii[0]
    cases, rows_all, orthogonal = [], [], []
    for d in DIMENSIONS:
        for w_idx, which in enumerate(WHICH):
            mu, L, rows = _study_case(config, d, w_idx, which, radii, sizes["n_empirical"])
            rows_all += rows["true"] + rows["empirical"]
            true_r = [r["ratio"] for r in rows["true"]]
            emp_r = [r["ratio"] for r in rows["empirical"]]
            emp0 = rows["empirical"][0]
            seed, orth = _seed_case(config, d, w_idx, which, mu, L, sizes["directions"], r0)
            if orth is not None:
                orthogonal.append({"d": d, "seed_over_exact": orth})
            case = {
                "d": d, "which": which, "P": mvn_num_params(d),
                "ratio_true": true_r, "ratio_empirical": emp_r,
                "ratio_true_smallest": true_r[0], "ratio_empirical_smallest": emp_r[0],
                "empirical_rel_se": emp0["quad_half_se"] / emp0["quad_half"],
                # the seed's comparison with ΔᵀFΔ (no ½) on the exact Fisher, at the smallest radius
                "seed_missing_half_prediction_over_kl": seed_kl_prediction(2 * rows["true"][0]["quad_half"]) / rows["true"][0]["kl"],
                "slope": _slope(radii, true_r) if which != "mean" else None,
                "seed": seed,
            }
            for key in ("per_sample_over_exact", "seed_over_exact", "seed_prediction_over_kl"):
                case[key + "_quantiles"] = _quantiles(seed[key])
            cases.append(case)

    outcomes = _outcomes(cases, orthogonal, radii)
    data = {"dimensions": list(DIMENSIONS), "which": list(WHICH), "radii": radii,
            "n_empirical": sizes["n_empirical"], "seed_samples": SEED_SAMPLES, "directions": sizes["directions"],
            "cases": cases, "rows": rows_all, "orthogonal": orthogonal}
    return Result(id="gaussian", title=EXPERIMENT.title, summary=_summary(cases, sizes), data=data,
                  outcomes=outcomes, tables=_tables(cases, radii), figures=_figures(cases, radii))


def _outcomes(cases, orthogonal, radii):
    worst_true = max(abs(c["ratio_true_smallest"] - 1) for c in cases)
    mean_dev = max(abs(q - 1) for c in cases if c["which"] == "mean" for q in c["ratio_true"])
    slopes = [c["slope"] for c in cases if c["slope"] is not None]
    worst_slope = max(slopes, key=lambda s: abs(s - 1))
    z_emp = max(abs(c["ratio_empirical_smallest"] - 1) / c["empirical_rel_se"] for c in cases)
    half = max(abs(c["seed_missing_half_prediction_over_kl"] - 2) for c in cases)
    seed_all = [q for c in cases for q in c["seed"]["seed_over_exact"]]
    per_all = [q for c in cases for q in c["seed"]["per_sample_over_exact"]]
    seed_off2 = sum(1 for q in seed_all if q > 2 or q < 0.5) / len(seed_all)
    per_worst = max(abs(q - 1) for q in per_all)
    orth = max(o["seed_over_exact"] for o in orthogonal)
    return [
        Outcome(f"exact Fisher: KL / (½ΔᵀFΔ) is within 1e-3 of 1 at the smallest radius r = {radii[0]:g} in all "
                f"{len(cases)} cases (d = 1, 10, 100 × mean, L, both); value: the largest |ratio − 1|",
                worst_true <= 1e-3, worst_true),
        Outcome("a step of the mean alone: KL = ½ΔᵀFΔ exactly (|ratio − 1| ≤ 1e-9 at every radius); value: the "
                "largest |ratio − 1|", mean_dev <= 1e-9, mean_dev),
        Outcome(f"the deviation is O(r): the log-log slope of |ratio − 1| against r (r ≤ {_SLOPE_RADIUS:g}) is in "
                "[0.9, 1.1] for every step involving L; value: the slope furthest from 1",
                all(0.9 <= s <= 1.1 for s in slopes), worst_slope),
        Outcome("per-sample empirical Fisher: KL / (½ΔᵀF̂Δ) at the smallest radius is within 3 standard errors of 1 "
                "in every case; value: the largest |ratio − 1| / SE", z_emp <= 3, z_emp),
        Outcome("seed 000's missing ½: its prediction ΔᵀFΔ is twice the KL (|ΔᵀFΔ / KL − 2| ≤ 2e-3 at the smallest "
                "radius, every case); value: the largest |ΔᵀFΔ / KL − 2|", half <= 2e-3, half),
        Outcome(f"seed 000's sum-then-outer Fisher (n = {SEED_SAMPLES:,}) is off from the exact uᵀFu by more than a "
                "factor 2 either way in at least 40% of the random directions (a χ²₁ draw: 68% expected); value: "
                "that fraction", seed_off2 >= 0.4, seed_off2),
        Outcome(f"the per-sample empirical Fisher on the same {SEED_SAMPLES:,} samples is within 15% of uᵀFu in every "
                "random direction; value: the largest |uᵀF̂u / uᵀFu − 1|", per_worst <= 0.15, per_worst),
        Outcome("seed 000's sum-then-outer Fisher has rank one: along a direction orthogonal to the summed score it "
                "is 0 (≤ 1e-20 of uᵀFu) while the Fisher is not; value: the largest ratio", orth <= 1e-20, orth),
    ]


def _summary(cases, sizes):
    med = _quantiles([q for c in cases for q in c["seed"]["seed_over_exact"]])
    return (
        "KL(p_θ ‖ p_θ+Δ) against ½ΔᵀFΔ for normals of dimension 1, 10 and 100, stepping the mean, the Cholesky "
        "factor or both: with the exact Fisher the ratio tends to 1 as the step shrinks (deviation O(r), none for "
        f"the mean), and with the per-sample empirical Fisher (n = {sizes['n_empirical']:,}) to 1 within its "
        "Monte-Carlo error. Seed 000 compared the KL with ΔᵀFΔ, without the ½, so its prediction is twice the KL, and "
        "its multivariate \"empirical Fisher\" was the outer product of the summed score: a rank-one matrix whose "
        f"quadratic form is uᵀFu times a χ²₁ draw (over random directions, n = {SEED_SAMPLES:,}: 10/50/90% quantiles "
        f"of uᵀF̃u / uᵀFu {med[0]:.3g} / {med[1]:.3g} / {med[2]:.3g}) and zero orthogonal to the summed score. "
        "The seed's univariate part looped over samples (right), its only defect there is the ½.")


def _fmt(x, digits=6):
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _tables(cases, radii):
    summary = Table(
        "KL / (½ΔᵀFΔ) at the smallest radius, and seed 000's estimates (medians over random directions, [10%, 90%])",
        ["d", "case", "P", "exact", "per-sample empirical (± SE)", "seed ΔᵀFΔ / KL (no ½)",
         "per-sample uᵀF̂u / uᵀFu", "seed sum-then-outer uᵀF̃u / uᵀFu", "seed prediction / KL"],
        [[c["d"], c["which"], c["P"], _fmt(c["ratio_true_smallest"], 8),
          f"{_fmt(c['ratio_empirical_smallest'], 5)} ± {c['empirical_rel_se']:.2g}",
          _fmt(c["seed_missing_half_prediction_over_kl"], 6),
          "{1:.4f} [{0:.4f}, {2:.4f}]".format(*c["per_sample_over_exact_quantiles"]),
          "{1:.3g} [{0:.3g}, {2:.3g}]".format(*c["seed_over_exact_quantiles"]),
          "{1:.3g} [{0:.3g}, {2:.3g}]".format(*c["seed_prediction_over_kl_quantiles"])] for c in cases])
    ratio = Table("KL / (½ΔᵀFΔ), exact Fisher, over the radius (nan: the step leaves σ > 0)",
                  ["radius"] + [f"d={c['d']} {c['which']}" for c in cases],
                  [[f"{r:g}"] + [_fmt(c["ratio_true"][i], 7) for c in cases] for i, r in enumerate(radii)])
    return [summary, ratio]


def _figures(cases, radii):
    def plot_ratio(fig):
        axes = fig.subplots(1, len(DIMENSIONS), sharey=True)
        colors = {"mean": "C0", "L": "C1", "both": "C2"}
        for ax, d in zip(axes, DIMENSIONS):
            for c in (c for c in cases if c["d"] == d):
                ax.semilogx(radii, c["ratio_true"], "-o", ms=3, color=colors[c["which"]], label=f"{c['which']}, exact F")
                ax.semilogx(radii, c["ratio_empirical"], "--", color=colors[c["which"]], label=f"{c['which']}, per-sample empirical F")
            ax.axhline(1, color="k", lw=0.5)
            ax.set_title(f"d = {d}" + (" (univariate)" if d == 1 else ""))
            ax.set_xlabel("radius r of the step Δ = r u")
            ax.set_ylim(0.95, 1.1)
        axes[0].set_ylabel("KL / (½ ΔᵀFΔ)")
        axes[-1].legend(fontsize=7)
        fig.set_size_inches(12, 4)
        fig.tight_layout()

    def plot_seed(fig):
        ax = fig.subplots()
        labels = []
        for i, c in enumerate(cases):
            k = len(c["seed"]["seed_over_exact"])
            ax.scatter([i - 0.12] * k, c["seed"]["seed_over_exact"], s=8, color="C3", alpha=0.6,
                       label="seed: sum-then-outer" if i == 0 else None)
            ax.scatter([i + 0.12] * k, c["seed"]["per_sample_over_exact"], s=8, color="C0", alpha=0.6,
                       label="per-sample mean of outer products" if i == 0 else None)
            labels.append(f"d={c['d']}\n{c['which']}")
        ax.set_yscale("log")
        ax.axhline(1, color="k", lw=0.5)
        ax.set_xticks(range(len(cases)), labels, fontsize=8)
        ax.set_ylabel("estimated / exact uᵀFu (random unit u)")
        ax.legend(fontsize=8)
        fig.set_size_inches(9, 4)
        fig.tight_layout()

    return [Figure("gaussian_ratio", "KL / (½ΔᵀFΔ) over the radius of the step, exact Fisher (solid) and per-sample "
                   "empirical Fisher (dashed): both tend to 1 as the step shrinks.", plot_ratio),
            Figure("gaussian_seed_fisher", f"Empirical Fisher quadratic forms over random directions on seed 000's "
                   f"n = {SEED_SAMPLES:,} samples, relative to the exact one: the seed's sum-then-outer matrix "
                   "scatters over decades (a χ²₁ draw per direction), the per-sample mean stays at 1.", plot_seed)]


EXPERIMENT = Experiment(id="gaussian", seeds="000",
                        title="Gaussian: KL divergence against ½ΔᵀFΔ (exact and per-sample empirical Fisher)",
                        run=run)
