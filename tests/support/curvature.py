"""Oracles for tests/test_curvature_products.py and tests/test_curvature_operators.py: explicit Hessians by double backprop and
Gauss-Newton matrices from per-sample output Jacobians (plain autograd loops, no torch.func, no
fisherext), float64."""
import torch
import torch.nn.functional as F

from support.models import make_data, make_model, named_trainable


def half_mse(out, y):
    """Mean over samples of ½‖f(x) − y‖² (the Gaussian negative log-likelihood of fisherext.fisher)."""
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


LOSS = {"cross_entropy": F.cross_entropy, "mse": half_mse}
MODELS = {"mlp": "cross_entropy", "mlp_reg": "mse", "cnn": "cross_entropy", "norm": "cross_entropy",
          "seq": "cross_entropy", "tied": "cross_entropy"}


def setup(name, n=None, device="cpu", dtype=torch.float64):
    model = make_model(name, dtype=dtype, device=device)
    x, y = make_data(name, n, dtype=dtype, device=device)
    return model, (x, y), LOSS[MODELS[name]]


def explicit_hessian(model, loss_fn, x, y, params=None):
    """∇² of the mean loss by double backprop, one row per parameter entry."""
    params = [p for _, p in named_trainable(model)] if params is None else params
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)])
    rows = []
    for i in range(g.numel()):
        row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if r is None else r).reshape(-1) for r, p in zip(row, params)]))
    return torch.stack(rows)


def output_jacobians(model, x):
    """J [N, C, P]: gradients of every output of every sample, one backward each."""
    params = [p for _, p in named_trainable(model)]
    J = []
    for n in range(x.shape[0]):
        out = model(x[n:n + 1])[0]
        J.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[c], params, retain_graph=True)])
                              for c in range(out.numel())]))
    return torch.stack(J)


def explicit_ggn(model, loss, x, y):
    """(1/N) Σ J_nᵀ Λ_n J_n with Λ = diag(p) − ppᵀ (cross-entropy) or I (½‖·‖²)."""
    J = output_jacobians(model, x)
    if loss == "mse":
        return torch.einsum("ncp,ncq->pq", J, J) / x.shape[0]
    p = torch.softmax(model(x).detach(), -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", J, Lam, J) / x.shape[0]


def directions(P, K=3, seed=0, dtype=torch.float64, device="cpu"):
    """K seeded directions [K, P], drawn on the CPU (the same values on every device), then on `device`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, P, generator=g, dtype=torch.float64).to(device, dtype)
