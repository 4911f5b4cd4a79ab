"""Shared helpers of the Gaussian tests: float64, seeded CPU generators, random Gaussians, closeness."""
import torch

import fisherext.gaussian as G
from support import assert_close

f64 = torch.float64
TOL = 1e-10


def close(actual, expected, tol=TOL):
    """Equal to relative precision ``tol`` of the largest entry of ``expected``."""
    assert_close(actual, expected, rtol=tol)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def mvn(d, seed=0, device="cpu"):
    return G.random_mvn(d, generator=gen(seed), device=device)
