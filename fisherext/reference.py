"""Pure-PyTorch twins of every compiled op: the test oracle, never a silent fallback.

Each twin computes the same quantity the straightforward way, materializing per-sample gradients
(N x O x I) where the compiled kernel does not. In-place ops have functional twins that return the
updated accumulator instead of writing it. Notation as in the modules of ``fisherext.ops``.
"""
from __future__ import annotations

import torch


def _positions(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[N, I] -> [N, 1, I] (dim=3) / [N, C, O] -> [N, C, 1, O] (dim=4); already positional: unchanged."""
    return t if t.dim() == dim else t.unsqueeze(dim - 2)


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def per_sample_linear_grads(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """g_n = sum_t delta_nt a_nt^T for every n: [N, O, I] (materialized)."""
    return torch.einsum("nto,nti->noi", _compute(_positions(delta, 3)), _compute(_positions(a, 3)))


def _weights(weight, n, like):
    return torch.ones(n, dtype=like.dtype, device=like.device) if weight is None else _compute(weight)


def _symmetric_from_upper(out: torch.Tensor) -> torch.Tensor:
    return torch.triu(out) + torch.triu(out, 1).transpose(0, 1)


def linear_sq_grad(a, delta, weight=None):
    """Twin of ``fisherext.ops.linear_sq_grad``: sum_n w_n g_n^2, [O, I]."""
    g = per_sample_linear_grads(a, delta)
    w = _weights(weight, g.shape[0], g)
    return torch.einsum("n,noi->oi", w, g * g).to(a.dtype)


def linear_outer_accum(out, a, delta, weight=None, alpha=1.0):
    """Twin of ``linear_outer_accum_``: returns out + alpha sum_n w_n vec(g_n) vec(g_n)^T."""
    g = per_sample_linear_grads(a, delta)
    G = g.reshape(g.shape[0], -1)
    w = _weights(weight, G.shape[0], G)
    upd = (G * w[:, None]).T @ G
    return (_symmetric_from_upper(_compute(out)) + alpha * upd).to(out.dtype)


def sym_outer_accum(out, x, weight=None, alpha=1.0, beta=1.0):
    """Twin of ``sym_outer_accum_``: returns beta out + alpha sum_n w_n sum_t x_nt x_nt^T."""
    X = _compute(_positions(x, 3))
    w = _weights(weight, X.shape[0], X)
    upd = torch.einsum("n,ntd,nte->de", w, X, X)
    base = torch.zeros_like(upd) if beta == 0 else beta * _symmetric_from_upper(_compute(out))
    return (base + alpha * upd).to(out.dtype)


def kfac_factor_update(factor, x, weight=None, decay=None):
    """Twin of ``kfac_factor_update_`` (sum, or running average of per-batch means)."""
    if decay is None:
        return sym_outer_accum(factor, x, weight)
    return sym_outer_accum(factor, x, weight, alpha=(1.0 - decay) / x.shape[0], beta=decay)


def class_gram(a, delta):
    """Twin of ``class_gram``: K_n = J_n J_n^T with J_n[c] = vec(sum_t delta_nct a_nt^T), [N, C, C]."""
    A = _compute(_positions(a, 3))
    D = _compute(_positions(delta, 4))
    J = torch.einsum("ncto,nti->ncoi", D, A).flatten(2)
    return (J @ J.transpose(1, 2)).to(a.dtype)


def unflatten_axpy(out, x, v, eps):
    """Twin of ``unflatten_axpy_``: returns the new value of every out_i, x_i + eps v_i in the compute dtype
    rounded to out_i's dtype (x_i, v_i the slices of the flat x, v), or x_i itself when v is None."""
    sizes = [o.numel() for o in out]
    if v is None:
        return [xi.view(o.shape).clone() for o, xi in zip(out, x.split(sizes))]
    return [(_compute(xi) + eps * _compute(vi)).view(o.shape).to(o.dtype)
            for o, xi, vi in zip(out, x.split(sizes), v.split(sizes))]


def _kl(log_p, log_q):
    """KL(p || q) per row from log-probabilities [N, C]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def fd_fisher_reduce(logits_plus, logits_minus, logits_0, eps):
    """Twin of ``fd_fisher_reduce``: (quad, kl_plus, kl_minus) from explicit log-softmaxes, compute dtype.

    quad = sum_c (log p+ - log p-)(p+ - p-) / (2 eps)^2; the KLs are KL(p0 || p±) with logits_0, else
    KL(p- || p+) and KL(p+ || p-).
    """
    log_plus = torch.log_softmax(_compute(logits_plus), -1)
    log_minus = torch.log_softmax(_compute(logits_minus), -1)
    quad = ((log_plus - log_minus) * (log_plus.exp() - log_minus.exp())).sum(-1) / (2 * eps) ** 2
    if logits_0 is None:
        return quad, _kl(log_minus, log_plus), _kl(log_plus, log_minus)
    log_0 = torch.log_softmax(_compute(logits_0), -1)
    return quad, _kl(log_0, log_plus), _kl(log_0, log_minus)


# ---- K3 hvp ----


def softmax_hvp(logits, u):
    """Twin of ``softmax_hvp``: (diag(p) - p p^T) u per row by explicit matrices, u's dtype."""
    p = torch.softmax(_compute(logits), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [N, C, C]
    return torch.einsum("ncd,...nd->...nc", H, _compute(u)).to(u.dtype)


def softmax_hessian_sqrt(logits):
    """Twin of ``softmax_hessian_sqrt``: S[k, n] = sqrt(p_nk) (e_k - p_n), [C, N, C]."""
    p = torch.softmax(_compute(logits), -1)
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    return (p.T.sqrt()[:, :, None] * (eye[:, None, :] - p[None])).to(logits.dtype)


def _columns(t, vec):
    """Per-column scalar t ([] or [K]) broadcast against vec ([P] or [P, K])."""
    return t if vec.dim() == 1 else t[None, :]


def _preconditioned(r, inv_diag):
    """z = inv_diag ⊙ r along the rows of r ([P] or [P, K]); z = r without a preconditioner."""
    if inv_diag is None:
        return r
    inv = inv_diag.to(r.dtype)
    return r * (inv if r.dim() == 1 else inv[:, None])


def cg_update(x, r, p, Ap, alpha, inv_diag=None):
    """Twin of ``cg_update_``: returns (x + alpha p, r - alpha Ap, rz, rr), the sums in float64 of the
    rounded new r and cast to alpha's dtype."""
    a = _columns(alpha, x)
    x_new = (_compute(x) + a * _compute(p)).to(x.dtype)
    r_new = (_compute(r) - a * _compute(Ap)).to(r.dtype)
    r64 = r_new.double()
    z64 = _preconditioned(r64, inv_diag)
    return x_new, r_new, (r64 * z64).sum(0).to(alpha.dtype), (r64 * r64).sum(0).to(alpha.dtype)


def cg_direction(p, r, beta, inv_diag=None):
    """Twin of ``cg_direction_``: returns z + beta p, z = inv_diag ⊙ r."""
    return (_preconditioned(_compute(r), inv_diag) + _columns(beta, p) * _compute(p)).to(p.dtype)


def lissa_update(h, v, Hh, damping, scale):
    """Twin of ``lissa_update_``: returns v + (1 - damping) h - Hh / scale."""
    return (_compute(v) + (1.0 - damping) * _compute(h) - _compute(Hh) / scale).to(h.dtype)


def neumann_update(term, acc, Aterm, scale):
    """Twin of ``neumann_update_``: returns (term - Aterm / scale, acc + that term)."""
    new_term = (_compute(term) - _compute(Aterm) / scale).to(term.dtype)
    return new_term, (_compute(acc) + _compute(new_term)).to(acc.dtype)
