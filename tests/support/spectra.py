"""Test matrices with known spectra for tests/test_linalg_linop.py and tests/test_linalg_spectral.py.

Nothing here calls fisherext: these are the oracles (torch.linalg.eigh and torch.func.hessian).
"""
from __future__ import annotations

import torch
from torch.func import functional_call, hessian

from support.models import make_data, make_model, named_trainable


def with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T for a random orthogonal Q (Haar, seeded), exactly symmetric, float64."""
    P = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    Q = Q * R.diagonal().sign()
    M = (Q * eigenvalues.to(torch.float64)) @ Q.T
    return 0.5 * (M + M.T)


def mixed_spectrum(P: int = 40) -> torch.Tensor:
    """Eigenvalues with both signs, the extremes well separated at both ends: -6, -4, -3 ... 3.5, 5, 8."""
    inner = torch.linspace(-2.0, 3.0, P - 5, dtype=torch.float64)
    return torch.cat([torch.tensor([-6.0, -4.0], dtype=torch.float64), inner,
                      torch.tensor([4.2, 5.0, 8.0], dtype=torch.float64)]).sort().values


def mlp_hessian(name: str = "mlp_reg", n: int | None = None) -> torch.Tensor:
    """The exact Hessian [P, P] (float64) of the mean loss of make_model(name) on make_data(name, n) over
    the flat parameters, by torch.func.hessian (mse: mean over samples of 1/2 ||f(x) - y||^2)."""
    model = make_model(name)
    x, y = make_data(name, n)
    named = named_trainable(model)
    shapes = [p.shape for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(theta):
        chunks = torch.split(theta, [s.numel() for s in shapes])
        params = {name: c.view(s) for (name, _), c, s in zip(named, chunks, shapes)}
        out = functional_call(model, params, (x,))
        if y.dtype == torch.long:
            return torch.nn.functional.cross_entropy(out, y)
        return 0.5 * ((out - y) ** 2).sum(-1).mean()

    H = hessian(loss)(flat)
    return 0.5 * (H + H.T)
