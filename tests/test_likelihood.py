"""Likelihoods (fisherext.likelihood): the class axis of outputs with positions, and the cotangents of each
Fisher kind, whose weighted outer products must give the output-space Fisher of the summed per-position
log-likelihood (block-diagonal over positions, ignored positions zero), whatever the chunking."""
import pytest
import torch

from fisherext._core.likelihood import Cotangents, class_axis

D64 = torch.float64


def test_class_axis():
    assert class_axis(torch.zeros(4, 3), None, None) == 1
    assert class_axis(torch.zeros(4, 5, 3), torch.zeros(4, 5, dtype=torch.long), None) == 2     # [N, T, C]
    assert class_axis(torch.zeros(4, 3, 6, 7), torch.zeros(4, 6, 7, dtype=torch.long), None) == 1  # [N, C, H, W]
    assert class_axis(torch.zeros(4, 5, 3), None, -1) == 2
    with pytest.raises(ValueError, match="class_dim"):
        class_axis(torch.zeros(4, 5, 3), None, None)              # no labels: ambiguous
    with pytest.raises(ValueError, match="class_dim"):
        class_axis(torch.zeros(4, 3, 3), torch.zeros(4, 3, dtype=torch.long), None)   # both fit
    with pytest.raises(ValueError, match="labels"):
        class_axis(torch.zeros(4, 5, 3), torch.zeros(4, 2, dtype=torch.long), None)
    with pytest.raises(ValueError, match="class_dim"):
        class_axis(torch.zeros(4, 5, 3), None, 0)                 # the batch axis is no class axis


def output_fisher(cot: Cotangents) -> torch.Tensor:
    """Σ_k w_k c_k c_kᵀ per sample, [N, E, E] over the flattened per-sample outputs (chunks of 2)."""
    total = 0
    for k0 in range(0, cot.K, 2):
        c = cot.chunk(k0, min(cot.K, k0 + 2)).flatten(2)
        total = total + torch.einsum("k,kne,knf->nef", cot.weights[k0:k0 + c.shape[0]], c, c)
    return total


def expected_true(out, axis, valid):
    """Block-diagonal over positions: diag(p) − ppᵀ for every counted position (outputs flattened in
    their own layout)."""
    N = out.shape[0]
    moved = out.movedim(axis, -1)
    p = torch.softmax(moved, -1)
    C = p.shape[-1]
    positions = p.reshape(N, -1, C).shape[1]
    index = torch.arange(out[0].numel()).view(out.shape[1:]).movedim(axis - 1, -1).reshape(positions, C)
    F = torch.zeros(N, out[0].numel(), out[0].numel(), dtype=out.dtype)
    for n in range(N):
        for t in range(positions):
            if valid is None or valid.reshape(N, -1)[n, t]:
                q = p.reshape(N, -1, C)[n, t]
                i = index[t]
                F[n, i[:, None], i[None, :]] = torch.diag(q) - torch.outer(q, q)
    return F


@pytest.mark.parametrize("shape,axis", [((3, 4), 1), ((3, 5, 4), 2), ((3, 4, 2, 3), 1)])
def test_true_cross_entropy_is_the_block_diagonal_softmax_hessian(shape, axis):
    out = torch.randn(*shape, dtype=D64)
    y = torch.randint(0, shape[axis], shape[:axis] + shape[axis + 1:])
    y.view(-1)[1] = -100
    cot = Cotangents(out, y, "true", "cross_entropy")
    assert cot.K == out[0].numel()
    torch.testing.assert_close(output_fisher(cot), expected_true(out, axis, y != -100))


@pytest.mark.parametrize("shape", [(3, 4), (3, 5, 4)])
def test_empirical_and_mc_cross_entropy(shape):
    out = torch.randn(*shape, dtype=D64)
    y = torch.randint(0, shape[-1], shape[:-1])
    y.view(-1)[0] = -100
    cot = Cotangents(out, y, "empirical", "cross_entropy")
    r = torch.softmax(out, -1) - torch.nn.functional.one_hot(y.clamp_min(0), shape[-1]).to(D64)
    r = r * (y != -100)[..., None]
    torch.testing.assert_close(cot.chunk(0, 1)[0], r)
    mc = Cotangents(out, y, "mc", "cross_entropy", mc_samples=3, generator=torch.Generator().manual_seed(0))
    c = mc.chunk(0, 3)
    assert mc.K == 3 and torch.allclose(mc.weights, torch.full((3,), 1 / 3, dtype=D64))
    # every sampled residual is p − e_c for some class c, zero at ignored positions
    residual = torch.softmax(out, -1)[None] - c
    assert torch.all((residual.round(decimals=12) == 0) | (residual.round(decimals=12) == 1) | (c == 0))
    assert torch.equal(c.reshape(3, -1, shape[-1])[:, 0], torch.zeros(3, shape[-1], dtype=D64))


def test_mse_true_is_the_identity_over_every_entry():
    out = torch.randn(3, 2, 2, dtype=D64)
    cot = Cotangents(out, None, "true", "mse")
    torch.testing.assert_close(output_fisher(cot), torch.eye(4, dtype=D64).expand(3, 4, 4))


def test_empirical_needs_labels_of_the_right_shape():
    out = torch.randn(3, 5, 4, dtype=D64)
    with pytest.raises(ValueError, match="labels"):
        Cotangents(out, None, "empirical", "cross_entropy", class_dim=-1)
    with pytest.raises(ValueError, match="labels"):
        Cotangents(out, torch.full((3, 5), 7), "empirical", "cross_entropy")
