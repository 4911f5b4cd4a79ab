"""Shared helpers of the perturbation tests: seeded draws, a smooth MLP, parameters with gradients."""
import torch
from torch import nn

from support.models import MLP


def randn(shape, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def tanh_mlp(dtype=torch.float64, device="cpu", seed=0):
    """Smooth (tanh) MLP 5-7-4: the FD truncation error has a clean leading term for the order tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100 + seed)
        return MLP(5, 7, 4, act=nn.Tanh()).to(dtype=dtype, device=device).eval()


def with_grads(model, seed=7):
    """Give every parameter a .grad, so that 'grad untouched' is checked on a real tensor, not on None."""
    for i, p in enumerate(model.parameters()):
        p.grad = randn(p.shape, seed + i, p.dtype, p.device)
    return model
