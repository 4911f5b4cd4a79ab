"""Per-sample gradient forms (fisherext.terms): every closed-form reduction of every form equals the same
reduction of its materialized per-sample gradients, formed here by explicit loops; and combining the uses
of one parameter (same view merged, disjoint views added, overlapping views summed) gives the reductions of
the summed per-sample gradient."""
import pytest
import torch

from fisherext.capture.terms import BiasTerm, DenseTerm, EmbeddingTerm, LinearTerm, combine

D64 = torch.float64
K, N = 3, 5


def _g(*shape, seed=0, device="cpu"):
    """Normal draws from a seeded CPU generator, moved to `device` (the same values on every device)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64).to(device)


def explicit_linear(pairs):
    """g [K, N, rows*cols] by loops over samples, cotangents and positions."""
    Kmax = max(max(L.shape[0], R.shape[0]) for L, R in pairs)
    out = []
    for k in range(Kmax):
        per_n = []
        for n in range(pairs[0][0].shape[1]):
            rows = []
            for L, R in pairs:
                lk, rk = L[k if L.shape[0] > 1 else 0, n], R[k if R.shape[0] > 1 else 0, n]
                rows.append(sum(torch.outer(lk[t], rk[t]) for t in range(lk.shape[0])))
            per_n.append(torch.cat(rows).reshape(-1))
        out.append(torch.stack(per_n))
    return torch.stack(out)


def check_reductions(term, g, wk):
    """term's diag / sq_norms / gram / per_sample_grads against the materialized g [K, N, P]."""
    torch.testing.assert_close(term.per_sample_grads(0, N), g)
    torch.testing.assert_close(term.per_sample_grads(1, 4), g[:, 1:4])
    torch.testing.assert_close(term.diag(wk), torch.einsum("k,knp->p", wk, g * g))
    torch.testing.assert_close(term.sq_norms(wk), torch.einsum("k,knp->n", wk, g * g))
    torch.testing.assert_close(term.gram(), torch.einsum("knp,lnp->nkl", g, g))


WK = torch.tensor([0.5, 1.0, 2.0], dtype=D64)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("KL,KR", [(K, 1), (1, K), (K, K)])
@pytest.mark.parametrize("groups", [1, 2])
def test_linear_term(T, KL, KR, groups, device):
    pairs = [(_g(KL, N, T, 3, seed=g, device=device), _g(KR, N, T, 4, seed=10 + g, device=device))
             for g in range(groups)]
    term = LinearTerm(pairs)
    check_reductions(term, explicit_linear(pairs), WK.to(device))


def test_linear_kfac_factors_are_sums_over_positions_and_cotangents(device):
    L, R = _g(K, N, 4, 3, seed=1, device=device), _g(1, N, 4, 5, seed=2, device=device)
    (A, G, rows), = LinearTerm([(L, R)]).kfac_factors(WK.to(device), with_bias=True)
    a = torch.cat([R[0], torch.ones(N, 4, 1, dtype=D64, device=device)], -1).reshape(-1, 6)
    torch.testing.assert_close(A, a.T @ a)
    torch.testing.assert_close(G, sum(WK.to(device)[k] * L[k].reshape(-1, 3).T @ L[k].reshape(-1, 3) for k in range(K)))
    assert rows == N * 4


def test_bias_term_with_and_without_its_partner(device):
    d = _g(K, N, 1, 4, seed=3, device=device)
    weight = LinearTerm([(d, _g(1, N, 1, 2, seed=4, device=device))])
    bias = BiasTerm(d, weight)
    g = d[:, :, 0]
    weight.diag(WK.to(device))                                       # fills the shared reduction
    check_reductions(bias, g, WK.to(device))
    d4 = _g(K, N, 4, 3, seed=5, device=device)
    check_reductions(BiasTerm(d4), d4.sum(2), WK.to(device))


def test_embedding_term_counts_repeated_indices_and_skips_padding(device):
    V, D, T = 6, 3, 5
    idx = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(0)).to(device)
    idx[0, :3] = 2                                                   # a repeated index in one sample
    valid = idx != 0
    d = _g(K, N, T, D, seed=6, device=device)
    g = torch.zeros(K, N, V, D, dtype=D64, device=device)
    for n in range(N):
        for t in range(T):
            if valid[n, t]:
                g[:, n, idx[n, t]] += d[:, n, t]
    term = EmbeddingTerm(idx, d, valid, V)
    check_reductions(term, g.reshape(K, N, -1), WK.to(device))
    check_reductions(term.as_linear(), g.reshape(K, N, -1), WK.to(device))


def test_combine_merges_uses_of_one_view(device):
    """A Linear applied twice, an embedding tied to an output projection: one form over all positions."""
    p1 = (_g(K, N, 2, 3, seed=7, device=device), _g(1, N, 2, 4, seed=8, device=device))
    p2 = (_g(K, N, 3, 3, seed=9, device=device), _g(1, N, 3, 4, seed=10, device=device))
    merged = combine([(LinearTerm([p1]), None, None), (LinearTerm([p2]), None, None)], 12)
    assert isinstance(merged, LinearTerm) and merged.positions == 5
    check_reductions(merged, explicit_linear([p1]) + explicit_linear([p2]), WK.to(device))
    V, D = 4, 3
    idx = torch.randint(0, V, (N, 2), generator=torch.Generator().manual_seed(1)).to(device)
    emb = EmbeddingTerm(idx, _g(K, N, 2, D, seed=11, device=device),
                        torch.ones(N, 2, dtype=torch.bool, device=device), V)
    head = LinearTerm([(_g(K, N, 3, V, seed=12, device=device), _g(1, N, 3, D, seed=13, device=device))])
    tied = combine([(emb, None, None), (head, None, None)], V * D)
    check_reductions(tied, emb.per_sample_grads(0, N) + head.per_sample_grads(0, N), WK.to(device))


def test_combine_adds_disjoint_views_and_sums_overlapping_ones(device):
    """Row slices of a packed weight add slice by slice; a weight used whole and transposed overlaps."""
    O, I = 4, 3
    P = O * I
    rows = torch.arange(P, device=device).view(O, I)
    top = LinearTerm([(_g(K, N, 2, 2, seed=14, device=device), _g(1, N, 2, I, seed=15, device=device))])
    bottom = LinearTerm([(_g(K, N, 2, 2, seed=16, device=device), _g(1, N, 2, I, seed=17, device=device))])
    g = torch.zeros(K, N, P, dtype=D64, device=device)
    g[:, :, rows[:2].reshape(-1)] += top.per_sample_grads(0, N)
    g[:, :, rows[2:].reshape(-1)] += bottom.per_sample_grads(0, N)
    split = combine([(top, rows[:2], "top"), (bottom, rows[2:], "bottom")], P)
    assert split.disjoint
    check_reductions(split, g, WK.to(device))

    square = 3
    whole = LinearTerm([(_g(K, N, 2, square, seed=18, device=device), _g(1, N, 2, square, seed=19, device=device))])
    transposed = LinearTerm([(_g(K, N, 2, square, seed=20, device=device),
                              _g(1, N, 2, square, seed=21, device=device))])
    index_t = torch.arange(square * square, device=device).view(square, square).T
    g = whole.per_sample_grads(0, N).clone()
    g[:, :, index_t.reshape(-1)] += transposed.per_sample_grads(0, N)
    both = combine([(whole, None, None), (transposed, index_t, "t")], square * square)
    assert not both.disjoint
    check_reductions(both, g, WK.to(device))


def test_combine_of_dense_terms_sums_them(device):
    a, b = _g(K, N, 4, seed=22, device=device), _g(K, N, 4, seed=23, device=device)
    check_reductions(combine([(DenseTerm(a), None, None), (DenseTerm(b), None, None)], 4), a + b, WK.to(device))
