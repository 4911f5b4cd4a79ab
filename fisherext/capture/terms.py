r"""Per-sample gradient forms: how a captured use of a parameter contributes to its per-sample gradient.

For one batch and K backpropagated output cotangents (weights :math:`w_k`), the engine needs, per
selected parameter, reductions of its per-sample gradients :math:`g_{nk}` over samples n and cotangents
k, without materializing :math:`g` where a closed form exists:

- ``diag(w)``: :math:`\sum_k w_k \sum_n g_{nk} \odot g_{nk}` (flat, the parameter's numel);
- ``sq_norms(w)``: :math:`\sum_k w_k \|g_{nk}\|^2` per sample [N];
- ``gram()``: :math:`\langle g_{nk}, g_{nl}\rangle` per sample [N, K, K];
- ``per_sample_grads(s, e)``: :math:`g_{nk}` for samples [s, e), flat [K, e - s, numel].

A parameter used several times (a layer applied twice, tied weights, an embedding tied to an output
projection, the slices of a packed attention projection) has :math:`g = \sum_{\text{uses}} g^{(u)}`.
Uses of the same layout are merged into one form (a Linear applied twice is one linear form over twice
the positions); uses on disjoint slices of the parameter add their reductions slice by slice; anything
else is summed per sample, in chunks of samples (exact, with memory bounded by the chunk).

Forms (per-sample gradients in the layout of the tensor the use saw, a *view* of the parameter whose
positions in the parameter are ``index``, or the parameter itself when ``index`` is None):

- :class:`LinearTerm`: :math:`g_{nk} = \sum_t L_{nkt} R_{nkt}^\top` per group of rows (nn.Linear:
  L = output gradient, R = input; a convolution: R = unfolded input patches; a transposed convolution:
  L = input, R = unfolded output gradient). Either side may or may not depend on k.
- :class:`EmbeddingTerm`: row :math:`v` of :math:`g_{nk}` is the sum of the output gradients at the
  positions of sample n holding index v (padding positions excluded).
- :class:`DenseTerm`: :math:`g_{nk}` itself (biases and normalization parameters, whose gradients are
  small).

Precision: the factors keep the dtype the model computed them in (half, bfloat16, or a mix of float32
inputs and bfloat16 output gradients under autocast), and every reduction is formed and returned in the
accumulation dtype (``fisherext._core.precision.accumulation_dtype``: float32 for any half-precision
factor, else the factors' own): the factors are converted before they are squared or multiplied, so squares of small float16
gradients neither underflow nor round, and the sums over samples, positions and cotangents never round to
half precision. A product of two half-precision numbers is exact in float32, so this loses nothing to a
kernel that multiplies in half precision with float32 accumulation. ``Term.dtype`` is that accumulation
dtype. The reductions run with autocast off (``autocast_off``): under ``torch.autocast`` the model's
forward and backward are autocast's, the Fisher's sums are not.
"""
from __future__ import annotations

import torch

from .. import ops
from .._core.precision import accumulation_dtype, autocast_off

# Cotangents per class_gram call when only the diagonal of a per-sample Gram is needed: bounds the
# [N, k, k] scratch.
_GRAM_COLUMNS = 32


def _rows(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x`` as rows for ``ops.sym_outer_accum_`` into an accumulator of ``out_dtype``: the op takes half
    precision rows into a float32 accumulator as they are (float32 products, no copy); anything else is
    converted."""
    return x if x.dtype == out_dtype or accumulation_dtype(x.dtype) == out_dtype == torch.float32 else x.to(out_dtype)


def _chunks(n: int, step: int):
    """[s, e) ranges of at most ``step`` covering range(n)."""
    for s in range(0, n, step):
        yield s, min(n, s + step)


def _sq_grad_over_cotangents(a: torch.Tensor, d: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k Σ_n (d_nkᵀ a_n)² [O, I] for a [N, T, I] and d [K, N, T, O], in one kernel call: the K
    cotangents side by side as K·O outputs of one linear map, whose per-sample gradients are the K stacked.
    Computed and returned in the accumulation dtype (the kernel returns ``a``'s dtype)."""
    acc = accumulation_dtype(a.dtype, d.dtype)
    a, d, wk = a.to(acc), d.to(acc), wk.to(acc)
    K, N, T, O = d.shape
    if K == 1:
        return wk[0] * ops.linear_sq_grad(a, d[0])
    stacked = ops.linear_sq_grad(a, d.permute(1, 2, 0, 3).reshape(N, T, K * O))
    return torch.einsum("k,koi->oi", wk, stacked.view(K, O, a.shape[-1]))


def feature_gram(M: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_b M_b M_b^\top` [D, D] for M [B, D, L] (features × positions per row block), exactly
    symmetric: one small product per block when D ≤ L (its [B, D, D] scratch no larger than M), else one
    GEMM over a [D, B·L] copy of M; in the accumulation dtype (a half-precision M is converted first)."""
    M = M.to(accumulation_dtype(M.dtype))
    B, D, L = M.shape
    if D <= L:
        S = torch.bmm(M, M.mT).sum(0)
    else:
        X = M.transpose(0, 1).reshape(D, B * L)
        S = X @ X.T
    return (S + S.T) / 2


def input_factor(gram: torch.Tensor, colsum: torch.Tensor | None, rows: int) -> torch.Tensor:
    r"""K-FAC's input sum :math:`\sum \tilde a \tilde a^\top` over ``rows`` rows, with
    :math:`\tilde a = (a, 1)`, from :math:`\sum a a^\top` and :math:`\sum a` (None: no bias, the Gram
    itself), without forming the rows with a 1 appended."""
    if colsum is None:
        return gram
    D = gram.shape[0]
    A = gram.new_empty(D + 1, D + 1)
    A[:D, :D] = gram
    A[:D, D] = colsum
    A[D, :D] = colsum
    A[D, D] = rows
    return A


class Term:
    """Per-sample gradients of one parameter view; ``numel`` entries, ``batch`` samples, K cotangents.
    ``dtype``: the accumulation dtype every reduction (and ``per_sample_grads``) returns."""

    numel: int
    batch: int
    K: int
    dtype: torch.dtype
    device: torch.device

    def per_sample_grads(self, s: int, e: int) -> torch.Tensor:
        raise NotImplementedError

    @autocast_off
    def diag(self, wk: torch.Tensor) -> torch.Tensor:
        wk = wk.to(self.dtype)
        return self._chunked(lambda g: wk @ (g * g).sum(1))

    @autocast_off
    def sq_norms(self, wk: torch.Tensor) -> torch.Tensor:
        wk = wk.to(self.dtype)
        return torch.cat([wk @ (self.per_sample_grads(s, e) ** 2).sum(-1)
                          for s, e in _chunks(self.batch, self.rows_per_chunk())])

    @autocast_off
    def gram(self) -> torch.Tensor:
        return torch.cat([torch.einsum("knp,lnp->nkl", g, g)
                          for g in (self.per_sample_grads(s, e) for s, e in _chunks(self.batch, self.rows_per_chunk()))])

    # materialized gradients are formed a chunk of samples at a time
    chunk_bytes = 1 << 26

    def rows_per_chunk(self) -> int:
        return max(1, self.chunk_bytes // max(1, self.K * self.numel * torch.finfo(self.dtype).bits // 8))

    def _chunked(self, reduce):
        total = None
        for s, e in _chunks(self.batch, self.rows_per_chunk()):
            part = reduce(self.per_sample_grads(s, e))
            total = part if total is None else total + part
        return total


class DenseTerm(Term):
    """Materialized per-sample gradients g [K, N, numel], held in the accumulation dtype."""

    def __init__(self, g: torch.Tensor):
        self.dtype = accumulation_dtype(g.dtype)
        self.g = g.to(self.dtype)
        self.K, self.batch, self.numel = g.shape
        self.device = g.device

    def per_sample_grads(self, s, e):
        return self.g[:, s:e]

    @autocast_off
    def diag(self, wk):
        return wk.to(self.dtype) @ (self.g * self.g).sum(1)

    @autocast_off
    def sq_norms(self, wk):
        return wk.to(self.dtype) @ (self.g * self.g).sum(-1)

    @autocast_off
    def gram(self):
        return torch.einsum("knp,lnp->nkl", self.g, self.g)

    @staticmethod
    def merge(terms: list[DenseTerm]) -> DenseTerm:
        return DenseTerm(sum(t.g for t in terms))


class BiasTerm(DenseTerm):
    r"""The bias of a linear map: :math:`g_{nk} = \sum_t \delta_{nkt}`, from the output gradients d
    [K, N, T, O] it shares with the weight's LinearTerm (``partner``), whose diagonal already reduced
    :math:`\sum_k w_k \delta^2` at one position: the bias diagonal is then its column sum, no further pass."""

    def __init__(self, d: torch.Tensor, partner: LinearTerm | None = None):
        # the sum over positions in the accumulation dtype, not rounded to d's half precision
        super().__init__(d[:, :, 0] if d.shape[2] == 1 else d.sum(2, dtype=accumulation_dtype(d.dtype)))
        self.partner = partner

    def diag(self, wk):
        cached = None if self.partner is None else self.partner.reduced
        if cached is not None and cached[0] is wk:
            return cached[1].sum(0)
        return super().diag(wk)


class LinearTerm(Term):
    r""":math:`g_{nk} = \sum_t L_{nkt} R_{nkt}^\top` per group, groups stacked along rows.

    ``pairs``: one (L [KL, N, T, r], R [KR, N, T, c]) per group, KL and KR each 1 (the side does not
    depend on the cotangent) or K. Shape of g: [Σ r, c].
    """

    def __init__(self, pairs):
        self.pairs = pairs
        L0, R0 = pairs[0]
        self.K = max(max(L.shape[0], R.shape[0]) for L, R in pairs)
        self.batch = L0.shape[1]
        self.rows = sum(L.shape[-1] for L, _ in pairs)
        self.cols = R0.shape[-1]
        self.numel = self.rows * self.cols
        self.dtype = accumulation_dtype(*(t.dtype for pair in pairs for t in pair))
        self.device = L0.device
        self.reduced = None  # (wk, Σ_k w_k L_k² [N, r]) of the last diag at one position, for a BiasTerm

    @property
    def positions(self) -> int:
        return self.pairs[0][0].shape[2]

    @property
    def standard(self) -> bool:
        """R (the input side) independent of the cotangent, as for Linear and convolutions."""
        return all(R.shape[0] == 1 for _, R in self.pairs)

    @autocast_off
    def per_sample_grads(self, s, e):
        parts = []
        for L, R in self.pairs:
            L, R = L[:, s:e].to(self.dtype), R[:, s:e].to(self.dtype)
            if L.shape[0] != R.shape[0]:
                L, R = L.expand(self.K, *L.shape[1:]), R.expand(self.K, *R.shape[1:])
            parts.append(torch.einsum("knto,knti->knoi", L, R))
        g = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return g.flatten(2)

    @autocast_off
    def diag(self, wk):
        rows = []
        acc = self.dtype
        w = wk.to(acc)
        for L, R in self.pairs:
            KL, KR = L.shape[0], R.shape[0]
            if L.shape[2] == 1 and (KL == 1 or KR == 1):
                # one position: g_nk = L_nk R_nkᵀ, so Σ_k w_k g_nk² = Σ_n (Σ_k w_k L_nk²)ᵀ-weighted R_n²: one GEMM
                # whatever K, with the k-dependent side reduced first
                l2, r2 = L[:, :, 0].to(acc) ** 2, R[:, :, 0].to(acc) ** 2
                if KR == 1:
                    reduced = torch.einsum("k,kno->no", w, l2)
                    if len(self.pairs) == 1:
                        self.reduced = (wk, reduced)  # keyed by the caller's wk object (BiasTerm.diag)
                    rows.append(reduced.T @ r2[0])
                else:
                    rows.append(l2[0].T @ torch.einsum("k,kni->ni", w, r2))
            elif KR == 1:
                rows.append(_sq_grad_over_cotangents(R[0], L, wk))
            elif KL == 1:
                rows.append(_sq_grad_over_cotangents(L[0], R, wk).T)
            else:
                rows.append(sum(w[k] * ops.linear_sq_grad(R[k].to(acc), L[k].to(acc)) for k in range(self.K)))
        return (rows[0] if len(rows) == 1 else torch.cat(rows)).reshape(-1)

    def _oriented(self, L, R):
        """(a [N, T, I], delta [N, K, T, O]) with a the cotangent-independent side, or None; both in the
        accumulation dtype (the class-Gram kernel returns a's dtype)."""
        L, R = L.to(self.dtype), R.to(self.dtype)
        if R.shape[0] == 1:
            return R[0], L.expand(self.K, *L.shape[1:]).transpose(0, 1)
        if L.shape[0] == 1:
            return L[0], R.transpose(0, 1)
        return None

    @autocast_off
    def gram(self):
        total = 0
        for L, R in self.pairs:
            pair = self._oriented(L, R)
            if pair is None:
                return super().gram()
            total = total + ops.class_gram(*pair)
        return total

    @autocast_off
    def sq_norms(self, wk):
        total = 0
        acc = self.dtype
        w = wk.to(acc)
        for L, R in self.pairs:
            if L.shape[2] == 1:  # ‖L Rᵀ‖² = ‖L‖² ‖R‖² at one position
                total = total + w @ ((L[:, :, 0].to(acc) ** 2).sum(-1) * (R[:, :, 0].to(acc) ** 2).sum(-1))
                continue
            pair = self._oriented(L, R)
            if pair is None:
                return super().sq_norms(wk)
            a, d = pair
            for k0, k1 in _chunks(self.K, _GRAM_COLUMNS):
                g = ops.class_gram(a, d[:, k0:k1].contiguous())
                total = total + g.diagonal(dim1=1, dim2=2) @ w[k0:k1]
        return total

    @property
    def group_rows(self) -> list[int]:
        """The rows of each group's block of g (blocks stacked along rows)."""
        return [L.shape[-1] for L, _ in self.pairs]

    @autocast_off
    def kfac_factors(self, wk, with_bias: bool, inputs: bool = True):
        """Per group: (A_sum [c(+1), c(+1)] or None without ``inputs``, G_sum [r, r], rows N·T): A from
        the input side (its Gram, plus the column sums and the row count for a bias), G = Σ_k w_k Σ δδᵀ
        from the output side, one Gram per cotangent scaled by its weight (a tensor: no host sync).
        Both in the accumulation dtype (half-precision rows go into float32 sums as they are).
        Only for ``standard`` terms."""
        out = []
        acc = self.dtype
        w = wk.to(acc)
        for L, R in self.pairs:
            A = None
            a = R[0]
            if inputs:
                A = a.new_empty(a.shape[-1], a.shape[-1], dtype=acc)
                ops.sym_outer_accum_(A, _rows(a, acc), beta=0.0)
                A = input_factor(A, a.sum((0, 1), dtype=acc) if with_bias else None, a.shape[0] * a.shape[1])
            G = 0
            for k in range(L.shape[0]):
                Gk = L.new_empty(L.shape[-1], L.shape[-1], dtype=acc)
                ops.sym_outer_accum_(Gk, _rows(L[k], acc), beta=0.0)
                G = G + w[k] * Gk
            out.append((A, G, a.shape[0] * a.shape[1]))
        return out

    @staticmethod
    def merge(terms: list[LinearTerm]) -> LinearTerm:
        """The same layout used several times: one form over the positions of all (a side that depends
        on the cotangent in one use is broadcast over K in the others)."""
        K = max(t.K for t in terms)
        pairs = []
        for group in zip(*(t.pairs for t in terms)):
            sides = []
            for side in (0, 1):
                parts = [pair[side] for pair in group]
                if len({p.shape[0] for p in parts}) > 1:
                    parts = [p.expand(K, *p.shape[1:]) for p in parts]
                sides.append(torch.cat(parts, dim=2))
            pairs.append(tuple(sides))
        return LinearTerm(pairs)

    def same_shape(self, other: LinearTerm) -> bool:
        return len(self.pairs) == len(other.pairs) and all(
            L1.shape[-1] == L2.shape[-1] and R1.shape[-1] == R2.shape[-1]
            for (L1, R1), (L2, R2) in zip(self.pairs, other.pairs))


class EmbeddingTerm(Term):
    """nn.Embedding / F.embedding: idx [N, T], d [K, N, T, D] (output gradients), valid [N, T] (False at
    padding positions, which get no gradient), V rows."""

    def __init__(self, idx, d, valid, V):
        self.idx, self.d, self.valid, self.V = idx, d, valid, V
        self.K, self.batch, _, D = d.shape
        self.numel = V * D
        self.dtype, self.device = accumulation_dtype(d.dtype), d.device

    @autocast_off
    def per_sample_grads(self, s, e):
        idx, d, valid = self.idx[s:e], self.d[:, s:e], self.valid[s:e]
        n, D = e - s, d.shape[-1]
        rows = (torch.arange(n, device=idx.device)[:, None] * self.V + idx).masked_select(valid)
        out = d.new_zeros(self.K, n * self.V, D, dtype=self.dtype)
        out.index_add_(1, rows, d[:, valid].to(self.dtype))
        return out.view(self.K, n, self.V * D)

    @autocast_off
    def diag(self, wk):
        N, D = self.batch, self.d.shape[-1]
        keys = (torch.arange(N, device=self.idx.device)[:, None] * self.V + self.idx)[self.valid]
        uniq, inverse = torch.unique(keys, return_inverse=True)
        # per (sample, row) sums of every cotangent at once: [K, distinct (sample, row) pairs, D]
        summed = self.d.new_zeros(self.K, uniq.numel(), D, dtype=self.dtype).index_add_(
            1, inverse, self.d[:, self.valid].to(self.dtype))
        out = self.d.new_zeros(self.V, D, dtype=self.dtype)
        return out.index_add_(0, uniq % self.V, torch.einsum("k,kud->ud", wk.to(self.dtype),
                                                             summed.square_())).reshape(-1)

    def _same(self):
        v = self.valid
        return ((self.idx[:, :, None] == self.idx[:, None, :]) & v[:, :, None] & v[:, None, :]).to(self.dtype)

    @autocast_off
    def gram(self):
        d = self.d.to(self.dtype)
        return torch.einsum("nts,kntd,lnsd->nkl", self._same(), d, d)

    @autocast_off
    def sq_norms(self, wk):
        d = self.d.to(self.dtype)
        return torch.einsum("k,nts,kntd,knsd->n", wk.to(self.dtype), self._same(), d, d)

    def as_linear(self) -> LinearTerm:
        """The same gradients as a linear form: L = one-hot rows (cotangent-independent, exact in any dtype,
        so kept in d's), R = d."""
        onehot = torch.nn.functional.one_hot(self.idx, self.V).to(self.d.dtype) * self.valid[..., None]
        return LinearTerm([(onehot[None], self.d)])

    @staticmethod
    def merge(terms: list[EmbeddingTerm]) -> EmbeddingTerm:
        return EmbeddingTerm(torch.cat([t.idx for t in terms], 1), torch.cat([t.d for t in terms], 2),
                             torch.cat([t.valid for t in terms], 1), terms[0].V)


class Placed(Term):
    """A term over a view of the parameter, scattered to the parameter's flat positions ``index``."""

    def __init__(self, term: Term, index: torch.Tensor, numel: int):
        self.term, self.index, self.numel = term, index.reshape(-1), numel
        self.K, self.batch, self.dtype, self.device = term.K, term.batch, term.dtype, term.device

    def per_sample_grads(self, s, e):
        g = self.term.per_sample_grads(s, e)
        out = g.new_zeros(*g.shape[:2], self.numel)
        return out.index_add_(2, self.index, g)

    def diag(self, wk):  # valid because a placed term is only summed with terms on disjoint positions
        d = self.term.diag(wk)
        return d.new_zeros(self.numel).index_add_(0, self.index, d)

    def sq_norms(self, wk):
        return self.term.sq_norms(wk)

    def gram(self):
        return self.term.gram()


class Sum(Term):
    """Several terms of one parameter. With ``disjoint`` (no position of the parameter in two terms) the
    reductions add term by term; otherwise the gradients are summed per sample first, in chunks."""

    def __init__(self, terms: list[Term], disjoint: bool):
        self.terms, self.disjoint = terms, disjoint
        t = terms[0]
        self.K, self.batch, self.numel, self.dtype, self.device = t.K, t.batch, t.numel, t.dtype, t.device

    def per_sample_grads(self, s, e):
        return sum(t.per_sample_grads(s, e) for t in self.terms)

    def diag(self, wk):
        return sum(t.diag(wk) for t in self.terms) if self.disjoint else super().diag(wk)

    def sq_norms(self, wk):
        return sum(t.sq_norms(wk) for t in self.terms) if self.disjoint else super().sq_norms(wk)

    def gram(self):
        return sum(t.gram() for t in self.terms) if self.disjoint else super().gram()


def combine(entries, numel: int) -> Term:
    """One term for a parameter from its uses: ``entries`` are (term, index, key) with ``index`` the
    flat positions of the view the use saw (None: the whole parameter in its own layout) and ``key`` a
    hashable name of that view. Same-view uses of compatible forms merge; views on disjoint positions
    add; anything else sums per sample."""
    by_key: dict = {}
    for term, index, key in entries:
        by_key.setdefault(key, (index, []))[1].append(term)
    parts = [(_merge(terms), index) for index, terms in by_key.values()]
    if len(parts) == 1 and parts[0][1] is None:
        return parts[0][0]
    indices = [torch.arange(numel, device=parts[0][0].device) if index is None else index.reshape(-1)
               for _, index in parts]
    flat = torch.cat(indices)
    disjoint = torch.unique(flat).numel() == flat.numel()
    placed = [Placed(term, index, numel) for (term, _), index in zip(parts, indices)]
    return placed[0] if len(placed) == 1 and disjoint else Sum(placed, disjoint)


def _merge(terms: list[Term]) -> Term:
    """The terms of uses of one view: one form when they share one (an embedding joins linear forms as
    one), else their per-sample sum."""
    if len(terms) == 1:
        return terms[0]
    if any(isinstance(t, LinearTerm) for t in terms):
        terms = [t.as_linear() if isinstance(t, EmbeddingTerm) else t for t in terms]
    kinds = {type(t) for t in terms}
    if len(kinds) == 1 and (kinds != {LinearTerm} or all(t.same_shape(terms[0]) for t in terms)):
        return terms[0].merge(terms)
    return Sum(terms, disjoint=False)
