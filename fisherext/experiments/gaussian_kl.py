r"""Seed 000's study: for a Gaussian, :math:`\mathrm{KL}(p_\theta\|p_{\theta+r u})` against
:math:`\tfrac12 r^2 u^\top F u` over a range of radii r, with the exact Fisher or an empirical one from
samples (the closed forms are :mod:`fisherext.gaussian`, whose θ layout this study uses).

The results are report rows: lists of dicts of Python numbers, one per radius, for tables
(:func:`format_ratio_table`) and the suite's JSON output, not tensors for further computation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._core.checks import check_choice
from .._core.entry import entry_point
from ..gaussian import DIAGS, mvn_fisher_quad, mvn_kl, mvn_pack, mvn_sampled_fisher_quad, mvn_unpack, random_mvn

#: The supports of the study's direction u: the mean coordinates, the L coordinates, or all of θ.
WHICH = ("mean", "L", "both")
#: The Fisher of the study: exact, or the per-sample empirical one from samples.
KINDS = ("true", "empirical")
#: The radii r of the steps Δ = r u.
DEFAULT_RADII = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)

__all__ = ["DEFAULT_RADII", "KINDS", "WHICH", "format_ratio_table", "kl_vs_fisher_grid", "kl_vs_fisher_study"]


def _direction(P, d, which, generator, dtype, device):
    """A random unit vector in θ space supported on the mean (first d), the L, or all coordinates."""
    v = torch.randn(P, generator=generator, dtype=dtype)
    if which == "mean":
        v[d:] = 0
    elif which == "L":
        v[:d] = 0
    return (v / v.norm()).to(device)


@entry_point
def kl_vs_fisher_study(d: int, which: str = "both", kind: str = "true", *, n: int = 200_000,
                       radii: Sequence[float] = DEFAULT_RADII, generator: torch.Generator | None = None,
                       mu: torch.Tensor | None = None, L: torch.Tensor | None = None, diag: str = "raw",
                       dtype=torch.float64, device=None, chunk_size: int | None = None) -> list[dict]:
    r"""Seed 000's study: :math:`\mathrm{KL}(p_\theta\|p_{\theta+r u})` against :math:`\tfrac12 r^2 u^\top F u`.

    The Gaussian is :math:`\mathcal N(\mu, LL^\top)` in dimension ``d`` (d = 1 is the univariate
    normal, θ = (μ, σ) for ``diag="raw"`` or (μ, log σ) for ``diag="log"``); (μ, L) are drawn with
    :func:`fisherext.gaussian.random_mvn` unless given. u is one random unit direction in θ space,
    supported on the mean coordinates (``which="mean"``), on the L coordinates (``"L"``) or on all
    (``"both"``), and each radius r gives Δ = r u. The perturbed parameters are θ + Δ in the θ layout of
    :mod:`fisherext.gaussian` (so with ``diag="log"`` the diagonal of L is multiplied by exp(Δ)).

    ``kind="true"`` uses the exact Fisher (:func:`fisherext.gaussian.mvn_fisher_quad`);
    ``kind="empirical"`` draws ``n`` samples :math:`x_i\sim p_\theta` once and uses
    :math:`u^\top\hat F u = \frac1n\sum_i(g_i^\top u)^2` (the per-sample mean of outer products,
    evaluated as a quadratic form by :func:`fisherext.gaussian.mvn_sampled_fisher_quad`: no P×P
    matrix). The same direction and samples serve every radius, so for the empirical Fisher the
    small-radius ratio converges to :math:`u^\top F u / u^\top\hat F u`, whose relative Monte-Carlo error
    is reported as ``quad_half_se / quad_half`` (:math:`\approx\sqrt{2/n}` when :math:`g^\top u` is close
    to Gaussian).

    Args:
        d: the dimension, ≥ 1.
        which: ``"mean"``, ``"L"`` or ``"both"``: the coordinates u is supported on.
        kind: ``"true"`` (exact Fisher) or ``"empirical"`` (from ``n`` samples).
        n: the number of samples of ``kind="empirical"``, ≥ 2.
        radii: the radii r > 0, in the order of the rows.
        generator: the source of randomness, drawn in this order: (μ, L) when not given, then u, then the
            samples (None: the global generator; a CPU generator).
        mu: the mean [d], given together with ``L`` (any one-element tensor for d = 1).
        L: the Cholesky factor [d, d] (any one-element tensor for d = 1).
        diag: ``"raw"`` or ``"log"``, the layout of the diagonal coordinates of L in θ.
        dtype: the dtype of a drawn (μ, L).
        device: where the computation runs.
        chunk_size: samples per chunk of ``kind="empirical"`` (default: about 4M numbers a chunk).

    Returns:
        One dict per radius (a report row of Python numbers): ``d, which, kind, n`` (None for "true"),
        ``radius``, ``kl``, ``quad_half`` (= ½ΔᵀFΔ), ``ratio`` (= kl / quad_half → 1 as r → 0, deviation
        O(r)), and ``quad_half_se`` (the standard error of quad_half; 0 for "true"). A radius at which the
        perturbed L has a non-positive diagonal (raw diagonal only) is not a Cholesky factor: its ``kl``
        and ``ratio`` are NaN.

    Raises:
        ValueError: an unknown ``which``, ``kind`` or ``diag``, ``d`` not a positive int, ``n`` < 2 for
            "empirical", ``radii`` empty or not all finite and positive, only one of ``mu`` and ``L``,
            or a (μ, L) that is not a valid normal of dimension d.
        TypeError: ``mu`` or ``L`` is not a floating-point tensor.
    """
    check_choice("which", which, WHICH)
    check_choice("kind", kind, KINDS)
    check_choice("diag", diag, DIAGS)
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d: expected a positive int, got {d!r}")
    if kind == "empirical" and (not isinstance(n, int) or n < 2):
        raise ValueError(f"n: expected an int >= 2 for kind='empirical', got {n!r}")
    radii = [float(r) for r in radii]
    if not radii or any(not math.isfinite(r) or r <= 0 for r in radii):
        raise ValueError(f"radii: expected a non-empty sequence of positive numbers, got {radii}")
    if (mu is None) != (L is None):
        raise ValueError("mu, L: give both or neither")
    if mu is None:
        mu, L = random_mvn(d, generator=generator, dtype=dtype)
    elif isinstance(mu, torch.Tensor) and isinstance(L, torch.Tensor):
        if L.dim() == 0 or (L.dim() == 1 and L.numel() == 1):
            L = L.reshape(1, 1)
        mu = mu.reshape(-1)
    theta = mvn_pack(mu, L, diag).to(device)  # checks (μ, L)
    if L.shape[0] != d:
        raise ValueError(f"L: expected shape ({d}, {d}), got {tuple(L.shape)}")
    mu, L = mu.to(device), L.to(device)
    u = _direction(theta.numel(), d, which, generator, L.dtype, L.device)

    if kind == "true":
        quad_u, se_u = mvn_fisher_quad(mu, L, u, diag), torch.zeros((), dtype=L.dtype)
    else:
        quad_u, se_u = mvn_sampled_fisher_quad(mu, L, u, n, diag, generator=generator, chunk_size=chunk_size)

    rows = []
    for r in radii:
        mu1, L1 = mvn_unpack(theta + r * u, d, diag)
        if bool((torch.diagonal(L1) > 0).all()):
            kl = mvn_kl(mu, L, mu1, L1).item()
        else:
            kl = float("nan")
        quad_half = 0.5 * r * r * quad_u.item()
        rows.append({"d": d, "which": which, "kind": kind, "n": n if kind == "empirical" else None,
                     "radius": r, "kl": kl, "quad_half": quad_half, "ratio": kl / quad_half,
                     "quad_half_se": 0.5 * r * r * float(se_u)})
    return rows


@entry_point(renamed={"seed": "generator"})
def kl_vs_fisher_grid(ds: Sequence[int] = (1, 10, 100), whichs: Sequence[str] = WHICH,
                      kinds: Sequence[str] = KINDS, *, n: int = 200_000, radii: Sequence[float] = DEFAULT_RADII,
                      generator: torch.Generator | None = None, **kwargs) -> list[dict]:
    """All rows of :func:`kl_vs_fisher_study` over ``ds`` × ``whichs`` × ``kinds``.

    One base seed is drawn from ``generator``; case (d, which) runs on a fresh generator seeded with the
    base + 1000·d + the index of ``which`` in ``whichs``, the same for both kinds, so both kinds of a case
    share (μ, L) and the direction u (and each case's numbers do not depend on which other cases run).

    Args:
        ds: the dimensions.
        whichs: the supports of the direction (see :func:`kl_vs_fisher_study`).
        kinds: the Fisher kinds.
        n: samples of the empirical kind.
        radii: the radii of every case.
        generator: the source of the base seed (one draw; None: the global generator). The same seeded
            generator gives the same rows.
        **kwargs: passed to :func:`kl_vs_fisher_study` (``diag``, ``dtype``, ``device``, ``chunk_size``).

    Returns:
        The report rows of all cases (dicts of Python numbers), case after case in the loop order d,
        which, kind.

    Raises:
        ValueError: as :func:`kl_vs_fisher_study`.
        TypeError: the old keyword ``seed`` (now ``generator``).
    """
    base = int(torch.randint(0, 2**62, (), generator=generator))
    rows = []
    for d in ds:
        for w_idx, which in enumerate(whichs):
            for kind in kinds:
                g = torch.Generator().manual_seed(base + 1000 * d + w_idx)
                rows += kl_vs_fisher_study(d, which, kind, n=n, radii=radii, generator=g, **kwargs)
    return rows


@entry_point
def format_ratio_table(rows: Sequence[dict]) -> str:
    """A markdown table of the ratios KL / (½ΔᵀFΔ) of study rows.

    Args:
        rows: rows of :func:`kl_vs_fisher_study` or :func:`kl_vs_fisher_grid`.

    Returns:
        The table: one line per radius, one column per (d, which, kind) case, ratios to 5 decimals (an
        empty cell where a case lacks that radius).
    """
    cases = list(dict.fromkeys((r["d"], r["which"], r["kind"]) for r in rows))
    radii = list(dict.fromkeys(r["radius"] for r in rows))
    val = {(r["d"], r["which"], r["kind"], r["radius"]): r["ratio"] for r in rows}
    head = "| radius | " + " | ".join(f"d={d} {w} {k}" for d, w, k in cases) + " |"
    sep = "|---" * (len(cases) + 1) + "|"
    body = []
    for rad in radii:
        cells = [f"{val[c + (rad,)]:.5f}" if c + (rad,) in val else "" for c in cases]
        body.append(f"| {rad:g} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])
