"""fx.fisher and fx.FisherMatrix against the per-sample autograd reference of tests/support/models.py.

Kinds x structures x losses on an MLP, Monte-Carlo checks (exact: the result is one of the finitely many
possible draws; statistical: within a few standard errors of the true Fisher), parameter subsets,
chunking, FisherMatrix methods, normalization (mean over samples, per-sample outer products), and bad
input (clear errors naming the argument, model left untouched, no hook left behind).
"""
import io
import re

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fisherext as fx
from support import assert_close
from support.models import (
    KINDS, LOSSES, SPECS, STRUCTURES, assert_is_one_of, assert_matches, assert_no_hooks, assert_symmetric_psd,
    batch_mean_gradient, block_mask, compute, expected_dense, flat_indices,
    kfac_dense, make_data, make_model, mc_candidates, names_argument, num_params, per_class_grads,
    reference, reference_fisher, reference_kfac, reference_kfac_factors, slow, submatrix, untouched,
)

EXACT_KINDS = ["true", "empirical"]
MLP_FOR_LOSS = {"cross_entropy": "mlp", "mse": "mlp_reg"}


def mlp_names(model):
    return [n for n, _ in model.named_parameters()]


# --------------------------------------------------------------------------------------------------
# The oracle itself (no fisherext): the per-sample loop agrees with closed forms, so that a failure
# below is the package's, not the reference's.
# --------------------------------------------------------------------------------------------------

def test_reference_true_fisher_is_jacobian_form():
    # CPU only: checks the CPU oracle itself (no fisherext call)
    """True Fisher reference == J^T (diag(p) - p p^T) J with J from torch.func.jacrev."""
    from torch.func import functional_call, jacrev

    model = make_model("mlp")
    x, _ = make_data("mlp")
    names = mlp_names(model)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits(flat, xn):
        chunks = torch.split(flat, [params[n].numel() for n in names])
        d = {n: c.view_as(params[n]) for n, c in zip(names, chunks)}
        return functional_call(model, d, (xn[None],))[0]

    flat = torch.cat([params[n].reshape(-1) for n in names])
    expected = 0
    for n in range(x.shape[0]):
        J = jacrev(logits)(flat, x[n])
        p = torch.softmax(logits(flat, x[n]), -1)
        expected = expected + J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    assert_matches(reference_fisher("mlp", "true"), expected / x.shape[0], rtol=1e-12)


def test_reference_empirical_and_mse_forms():
    # CPU only: checks the CPU oracle itself (no fisherext call)
    model = make_model("mlp_reg")
    x, y = make_data("mlp_reg")
    _, J = per_class_grads(model, x, loss="mse")                       # [N, O, P]
    assert_matches(reference_fisher("mlp_reg", "true"), torch.einsum("nop,noq->pq", J, J) / len(x), 1e-12)
    r = (model(x) - y).detach()                                         # g_n = J_n^T (f - y)
    g = torch.einsum("no,nop->np", r, J)
    assert_matches(reference_fisher("mlp_reg", "empirical"), g.T @ g / len(x), 1e-12)


def test_reference_kfac_single_sample_equals_exact_block():
    """With one sample and T = 1, G (x) A is the exact per-layer block (the KFAC reference's anchor)."""
    # CPU only: checks the CPU oracle itself (no fisherext call)
    for name in ("mlp", "mlp_reg"):
        model = make_model(name)
        x, y = make_data(name, 1)
        for kind in EXACT_KINDS:
            K = reference_kfac(model, x, y, kind, SPECS[name].loss)
            assert_matches(K, reference_fisher(name, kind, 1) * block_mask(model), 1e-12)


# --------------------------------------------------------------------------------------------------
# Every kind x structure x loss on the MLP
# --------------------------------------------------------------------------------------------------

def check_structure_zeros(D, model, structure):
    """Entries the structure drops are exactly zero."""
    D = D.detach().cpu()
    if structure == "diag":
        assert torch.count_nonzero(D - torch.diag_embed(D.diagonal())) == 0, "diag: off-diagonal entries"
    elif structure in ("block", "kfac"):
        assert torch.count_nonzero(D[~block_mask(model)]) == 0, f"{structure}: entries between modules"


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_mlp_exact_kinds(kind, structure, loss, device):
    name = MLP_FOR_LOSS[loss]
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    F = compute(model, (x, y), kind=kind, structure=structure, loss=loss)
    P = num_params(model)
    D = F.dense()
    assert D.shape == (P, P) and D.dtype == torch.float64 and D.device.type == device.type
    expected = expected_dense(name, kind, structure)
    assert_matches(D, expected, rtol=1e-8)
    d = F.diag()
    assert d.shape == (P,) and d.dtype == torch.float64
    assert_matches(d, expected.diagonal(), rtol=1e-8)
    check_structure_zeros(D, make_model(name), structure)
    assert F.num_samples == len(x)


def mc_terms(name, model, x, structure):
    """terms[n][c]: sample n's contribution to F when label c is drawn, in the given structure."""
    probs, g = per_class_grads(model, x)                                # g [N, C, P]
    N, C, P = g.shape
    if structure == "kfac":
        A, _ = reference_kfac_factors(model, x, torch.zeros(N, dtype=torch.long), "empirical", "cross_entropy")
        per_class = [reference_kfac_factors(model, x, torch.full((N,), c), "empirical", "cross_entropy")[1]
                     for c in range(C)]
        return [[kfac_dense(model, A, {k: G[k][n] for k in G}) for G in per_class] for n in range(N)]
    mask = block_mask(model)
    out = []
    for n in range(N):
        row = []
        for c in range(C):
            M = torch.outer(g[n, c], g[n, c])
            row.append(M.diagonal().clone() if structure == "diag" else (M * mask if structure == "block" else M))
        out.append(row)
    return out


@pytest.mark.parametrize("structure", STRUCTURES)
def test_mlp_mc_cross_entropy_is_a_possible_draw(structure, device):
    """MC with one label per input is exactly (1/N) sum_n g(x_n, y_n~p) g^T for SOME draw: enumerate all
    C^N draws (N = 2) and require one to match to float64 precision."""
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", 2, device=device)
    F = compute(model, (x, y), kind="mc", structure=structure, loss="cross_entropy", mc_samples=1,
                generator=torch.Generator(device=device).manual_seed(7))
    assert F.num_samples == 2
    actual = F.diag() if structure == "diag" else F.dense()
    assert_is_one_of(actual.cpu(), mc_candidates(mc_terms("mlp", make_model("mlp"), x.cpu(), structure), 1))
    assert_symmetric_psd(F.dense())


def test_mc_averages_over_mc_samples_not_over_draws_times_inputs(device):
    """mc_samples = 3: F_n is the MEAN over the 3 draws; F the mean over the 2 inputs; num_samples = 2."""
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", 2, device=device)
    F = compute(model, (x, y), kind="mc", structure="diag", loss="cross_entropy", mc_samples=3,
                generator=torch.Generator(device=device).manual_seed(3))
    assert F.num_samples == 2
    assert_is_one_of(F.diag().cpu(), mc_candidates(mc_terms("mlp", make_model("mlp"), x.cpu(), "diag"), 3))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_mc_reproducible_with_generator(structure, loss, device):
    name = MLP_FOR_LOSS[loss]
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)
    run = lambda seed: compute(model, (x, y), kind="mc", structure=structure, loss=loss, mc_samples=2,  # noqa: E731
                               generator=torch.Generator(device=device).manual_seed(seed)).dense()
    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a, b), "same generator seed must give the same MC Fisher"
    assert not torch.equal(a, c), "a different generator seed gave the identical MC Fisher"
    assert_symmetric_psd(a)
    check_structure_zeros(a, model, structure)


def test_mc_num_samples_counts_inputs(device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    F = compute(model, (x, y), kind="mc", structure="diag", loss="cross_entropy", mc_samples=5,
                generator=torch.Generator(device=device).manual_seed(0))
    assert F.num_samples == len(x) and isinstance(F.num_samples, int)


@slow
def test_mc_cross_entropy_diag_statistics(device):
    """mc_samples = 2000 on a one-layer model: the MC diag is within 5 standard errors of the true diag.
    The per-entry variance is exact, from the class distribution: for input n the draw y ~ p_n gives
    g_y^2 with mean m_n = sum_c p_c g_c^2 and variance sum_c p_c g_c^4 - m_n^2; the estimate
    (1/N) sum_n (1/M) sum_m g^2 has variance sum_n var_n / (N^2 M) (N*M = 18000 draws: close to normal)."""
    M = 2000
    model = make_model("linear1", device=device)
    x, y = make_data("linear1", device=device)
    N = len(x)
    p, g = per_class_grads(make_model("linear1"), x.cpu())                # reference on a CPU copy
    mean_n = (p[..., None] * g ** 2).sum(1)
    var_n = (p[..., None] * g ** 4).sum(1) - mean_n ** 2
    true_diag = mean_n.mean(0)
    se = (var_n.sum(0) / (N ** 2 * M)).sqrt()
    F = compute(model, (x, y), kind="mc", structure="diag", loss="cross_entropy", mc_samples=M,
                generator=torch.Generator(device=device).manual_seed(2024))
    err = (F.diag().cpu().double() - true_diag).abs()
    assert (err <= 5 * se + 1e-12 * true_diag.max()).all(), f"worst z-score {(err / se).max():.2f}"
    assert err.max() > 1e-6 * true_diag.max(), "the MC estimate equals the true Fisher: no sampling happened"


@slow
@pytest.mark.parametrize("structure", STRUCTURES)
def test_mc_mse_statistics(structure, device):
    """Gaussian MC for mse: y = f + eps, g = -J^T eps, so g_j^2 = d_j chi^2_1 with mean d_j = (J^T J)_jj
    and variance 2 d_j^2; the estimate's standard error is sqrt(sum_n 2 d_nj^2 / M) / N.
    KFAC: with one input (N = 1) and T = 1, E[G_mc] (x) A is the exact block, and each diagonal entry
    G_oo a_i^2 has the same chi^2 law, so the same bound applies."""
    M = 1000
    n = 1 if structure == "kfac" else 5
    model = make_model("mlp_reg", device=device)
    x, y = make_data("mlp_reg", n, device=device)
    d_n = reference("mlp_reg", "true", n).diagonal(dim1=1, dim2=2)      # [n, P]
    true_diag = d_n.mean(0)
    se = (2 * (d_n ** 2).sum(0) / M).sqrt() / n
    F = compute(model, (x, y), kind="mc", structure=structure, loss="mse", mc_samples=M,
                generator=torch.Generator(device=device).manual_seed(5))
    err = (F.diag().cpu().double() - true_diag).abs()
    assert (err <= 5 * se + 1e-12 * true_diag.max()).all(), f"worst z-score {(err / se).max():.2f}"
    assert err.max() > 1e-6 * true_diag.max(), "the MC estimate equals the true Fisher: no sampling happened"


# --------------------------------------------------------------------------------------------------
# KFAC anchors
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear1", "linear1_reg"])
@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_kfac_one_linear_layer_one_sample_is_exact(name, kind, device):
    """A bare nn.Linear (the root module owns the parameters), one sample: KFAC == the exact Fisher."""
    model = make_model(name, device=device)
    x, y = make_data(name, 1, device=device)
    F = compute(model, (x, y), kind=kind, structure="kfac", loss=SPECS[name].loss)
    assert_matches(F.dense(), reference_fisher(name, kind, 1), rtol=1e-8)


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_kfac_mlp_one_sample_is_exact_block(kind, device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", 1, device=device)
    F = compute(model, (x, y), kind=kind, structure="kfac", loss="cross_entropy")
    assert_matches(F.dense(), reference_fisher("mlp", kind, 1) * block_mask(model), rtol=1e-8)


def test_kfac_differs_from_exact_block_with_many_samples(device):
    """Sanity of the KFAC tests: with N > 1 the Kronecker product is an approximation, not the block."""
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    F = compute(model, (x, y), kind="true", structure="kfac", loss="cross_entropy")
    exact_block = reference_fisher("mlp", "true") * block_mask(model)
    assert (F.dense().cpu() - exact_block).abs().max() > 1e-3 * exact_block.abs().max()


# --------------------------------------------------------------------------------------------------
# Precision and device
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("structure", ["diag", "full", "block"])
@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_dtype(kind, structure, dtype, device):
    model = make_model("mlp", dtype=dtype, device=device)
    x, y = make_data("mlp", dtype=dtype, device=device)
    F = compute(model, (x, y), kind=kind, structure=structure, loss="cross_entropy")
    D = F.dense()
    assert D.dtype == dtype and F.diag().dtype == dtype and D.device.type == device.type
    assert_close(D.cpu(), expected_dense("mlp", kind, structure), dtype=dtype)


def test_progress_bar_does_not_change_result(device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    a = compute(model, (x, y), kind="true", structure="full", loss="cross_entropy", progress=True, batch_size=5)
    b = compute(model, (x, y), kind="true", structure="full", loss="cross_entropy")
    assert_matches(a.dense(), b.dense(), rtol=1e-10)


# --------------------------------------------------------------------------------------------------
# Parameter subsets
# --------------------------------------------------------------------------------------------------

SUBSETS = {
    "names": (lambda m: ["fc2.weight", "fc2.bias"], ["fc2.weight", "fc2.bias"]),
    "modules": (lambda m: [m.fc1], ["fc1.weight", "fc1.bias"]),
    "tensors": (lambda m: [m.fc1.weight, m.fc2.bias], ["fc1.weight", "fc2.bias"]),
    "mixed_modules": (lambda m: [m.fc1, m.fc2], ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]),
}


@pytest.mark.parametrize("structure", ["diag", "full", "block"])
@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_params_subset(subset, kind, structure, device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    select, names = SUBSETS[subset]
    F = compute(model, (x, y), kind=kind, structure=structure, loss="cross_entropy", params=select(model))
    idx = flat_indices(model, names)
    sub = submatrix(reference_fisher("mlp", kind), idx)
    expected = {"diag": torch.diag_embed(sub.diagonal()), "full": sub,
                "block": sub * block_mask(model, names)}[structure]
    assert F.dense().shape == (len(idx), len(idx))
    assert_matches(F.dense(), expected, rtol=1e-8)


def test_params_subset_kfac_of_one_layer(device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    F = compute(model, (x, y), kind="true", structure="kfac", loss="cross_entropy", params=[model.fc2])
    idx = flat_indices(model, ["fc2.weight", "fc2.bias"])
    assert_matches(F.dense(), submatrix(expected_dense("mlp", "true", "kfac"), idx), rtol=1e-8)


def test_params_subset_of_cnn_modules(device):
    model = make_model("cnn", device=device)
    x, y = make_data("cnn", device=device)
    F = compute(model, (x, y), kind="empirical", structure="full", loss="cross_entropy",
                params=[model.conv, model.norm])
    idx = flat_indices(model, ["conv.weight", "conv.bias", "norm.weight", "norm.bias"])
    assert_matches(F.dense(), submatrix(reference_fisher("cnn", "empirical"), idx), rtol=1e-8)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_frozen_parameters_are_excluded_by_default(structure, device):
    model = make_model("mlp", device=device)
    model.fc1.bias.requires_grad_(False)
    x, y = make_data("mlp", device=device)
    F = compute(model, (x, y), kind="true", structure=structure, loss="cross_entropy")
    idx = flat_indices(make_model("mlp"), ["fc1.weight", "fc2.weight", "fc2.bias"])
    sub = submatrix(reference_fisher("mlp", "true"), idx)
    assert_matches(F.dense(), sub if structure == "full" else torch.diag_embed(sub.diagonal()), rtol=1e-8)
    assert model.fc1.bias.requires_grad is False


def test_unknown_parameter_name_is_refused(device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    with untouched(model), pytest.raises(ValueError, match=names_argument("params")):
        fx.fisher(model, (x, y), kind="true", structure="diag", loss="cross_entropy", params=["fc9.weight"])


# --------------------------------------------------------------------------------------------------
# Data forms and chunking
# --------------------------------------------------------------------------------------------------

class PairDataset(Dataset):
    """A plain map-style Dataset (not a TensorDataset) returning (x_i, y_i)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("name", ["mlp", "seq"])
def test_chunking_and_data_forms_agree(name, kind, structure, device):
    model = make_model(name, device=device)
    x, y = make_data(name, device=device)                   # N odd, so every chunking has a ragged tail
    kw = dict(kind=kind, structure=structure, loss=SPECS[name].loss)
    base = compute(model, (x, y), **kw)
    others = {
        "batch_size=5": compute(model, (x, y), batch_size=5, **kw),
        "batch_size=1": compute(model, (x, y), batch_size=1, **kw),
        "DataLoader(4)": compute(model, DataLoader(TensorDataset(x, y), batch_size=4), **kw),
        "TensorDataset": compute(model, TensorDataset(x, y), **kw),
        "Dataset": compute(model, PairDataset(x, y), **kw),
        "Dataset+batch_size=3": compute(model, PairDataset(x, y), batch_size=3, **kw),
    }
    for label, F in others.items():
        assert F.num_samples == len(x), label
        assert_matches(F.dense(), base.dense(), rtol=1e-10)
    assert_matches(base.dense(), expected_dense(name, kind, structure), rtol=1e-8)


# --------------------------------------------------------------------------------------------------
# FisherMatrix methods
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def mlp_problem(device):
    return make_model("mlp", device=device), make_data("mlp", device=device)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_matrix_methods_agree_with_dense(structure, mlp_problem, device):
    model, (x, y) = mlp_problem
    F = compute(model, (x, y), kind="true", structure=structure, loss="cross_entropy")
    D = F.dense()
    P = D.shape[0]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(P, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(P, generator=g, dtype=torch.float64).to(device)
    v0, b0 = v.clone(), b.clone()

    assert_symmetric_psd(D)
    assert_matches(F.diag(), D.diagonal(), rtol=1e-12)

    mv = F.mv(v)
    assert mv.shape == (P,) and mv.dtype == torch.float64
    assert_matches(mv, D @ v, rtol=1e-10)

    q = F.quad(v)
    assert isinstance(q, torch.Tensor) and q.shape == () and q.dtype == torch.float64
    assert q.item() == pytest.approx((v @ D @ v).item(), rel=1e-10)           # v^T F v: no factor 1/2

    t = F.trace()
    assert isinstance(t, torch.Tensor) and t.shape == () and t.dtype == torch.float64
    assert t.item() == pytest.approx(D.trace().item(), rel=1e-10)

    sol = F.solve(b, damping=0.1)
    assert sol.shape == (P,) and sol.dtype == torch.float64
    assert_matches((D + 0.1 * torch.eye(P, dtype=D.dtype, device=device)) @ sol, b, rtol=1e-8)

    assert torch.equal(v, v0) and torch.equal(b, b0), "mv/quad/solve modified their argument"
    assert isinstance(F.num_samples, int) and F.num_samples == len(x)


def test_solve_without_damping_on_a_positive_diagonal(mlp_problem, device):
    model, (x, y) = mlp_problem
    F = compute(model, (x, y), kind="true", structure="diag", loss="cross_entropy")
    d = F.diag()
    assert (d > 0).all(), "precondition: a positive diagonal"
    b = torch.randn(len(d), generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    assert_matches(F.solve(b), b / d, rtol=1e-10)
    assert_matches(F.solve(b, damping=0.5), b / (d + 0.5), rtol=1e-10)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_state_dict_round_trip(structure, mlp_problem, device):
    model, (x, y) = mlp_problem
    F = compute(model, (x, y), kind="empirical", structure=structure, loss="cross_entropy")
    other = compute(model, (x[:3], y[:3]), kind="empirical", structure=structure, loss="cross_entropy")
    buf = io.BytesIO()
    torch.save(F.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))                   # torch.load's default: weights_only=True
    assert torch.equal(other.dense(), F.dense())
    assert torch.equal(other.diag(), F.diag())
    assert other.num_samples == F.num_samples == len(x)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_to_dtype(structure, mlp_problem, device):
    model, (x, y) = mlp_problem
    F = compute(model, (x, y), kind="true", structure=structure, loss="cross_entropy")
    D64 = F.dense()
    F32 = F.to(torch.float32)
    assert F32.dense().dtype == torch.float32 and F32.diag().dtype == torch.float32
    assert_close(F32.dense(), D64, dtype=torch.float32)
    v = torch.randn(D64.shape[0], generator=torch.Generator().manual_seed(4)).to(device)
    assert_close(F32.mv(v), (D64 @ v.double()), dtype=torch.float32)
    assert F.to("cpu").dense().device.type == "cpu"


# --------------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_fisher_is_a_mean_over_samples(kind, structure, mlp_problem, device):
    """Concatenating the data set with itself leaves F unchanged (a sum would double it)."""
    model, (x, y) = mlp_problem
    F1 = compute(model, (x, y), kind=kind, structure=structure, loss="cross_entropy")
    F2 = compute(model, (torch.cat([x, x]), torch.cat([y, y])), kind=kind, structure=structure,
                 loss="cross_entropy", batch_size=8)
    assert F2.num_samples == 2 * len(x)
    assert_matches(F2.dense(), F1.dense(), rtol=1e-10)


def test_empirical_diag_is_not_the_squared_batch_mean_gradient(mlp_problem, device):
    """Seed 003's bug: square the gradient of the batch-mean loss. Sum_n g_n^2 / N differs from
    (sum_n g_n / N)^2 by the per-sample variance, which dominates on this untrained model."""
    model, (x, y) = mlp_problem
    F = compute(model, (x, y), kind="empirical", structure="diag", loss="cross_entropy")
    expected = reference_fisher("mlp", "empirical").diagonal()
    bug = batch_mean_gradient(make_model("mlp"), x.cpu(), y.cpu(), "cross_entropy") ** 2   # on a CPU copy
    assert (expected - bug).norm() > 0.5 * expected.norm(), "precondition: the two must differ here"
    assert_matches(F.diag(), expected, rtol=1e-8)
    assert (F.diag().cpu() - bug).norm() > 0.5 * expected.norm()


def test_full_is_not_the_outer_product_of_the_summed_gradient(mlp_problem, device):
    """Seed 000's bug: (sum_n g_n)(sum_n g_n)^T is rank one; the per-sample sum is not."""
    model, (x, y) = mlp_problem
    F = compute(model, (x, y), kind="empirical", structure="full", loss="cross_entropy")
    assert torch.linalg.matrix_rank(F.dense()).item() > 1
    assert_matches(F.dense(), reference_fisher("mlp", "empirical"), rtol=1e-8)


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, nothing left half-done
# --------------------------------------------------------------------------------------------------

def refuses(model, data, exc, argument_regex, **kwargs):
    """fx.fisher raises `exc` with a message matching `argument_regex`; the model is untouched and no hook
    remains. Returns the message."""
    kwargs = {"kind": "true", "structure": "diag", "loss": "cross_entropy", **kwargs}
    with untouched(model), pytest.raises(exc, match=argument_regex) as info:
        fx.fisher(model, data, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("argument,value", [("kind", "fisher"), ("kind", "True"), ("structure", "dense"),
                                            ("structure", "kron"), ("loss", "nll"), ("loss", "l2")])
def test_unknown_option(argument, value, mlp_problem, device):
    model, data = mlp_problem
    refuses(model, data, ValueError, names_argument(argument), **{argument: value})


EMPTY_DATA = {
    "tuple": lambda x, y: (x[:0], y[:0]),
    "TensorDataset": lambda x, y: TensorDataset(x[:0], y[:0]),
    "Dataset": lambda x, y: PairDataset(x[:0], y[:0]),
    "DataLoader": lambda x, y: DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4),
}


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("form", list(EMPTY_DATA))
def test_empty_data(form, structure, device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    refuses(model, EMPTY_DATA[form](x, y), ValueError, names_argument("data"), structure=structure)


def test_a_dataloader_without_batches_is_refused(device):
    """DataLoader(batch_size=None) yields single samples without a batch axis: said so, not blamed on
    the model's output shape."""
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    refuses(model, DataLoader(TensorDataset(x, y), batch_size=None), ValueError, r"argument 'data' .*batch_size=None")
    with pytest.raises(ValueError, match=r"argument 'data' .*batch_size=None"):
        fx.hvp(model, torch.nn.functional.cross_entropy, DataLoader(TensorDataset(x, y), batch_size=None),
               torch.ones(num_params(model), dtype=torch.float64, device=device))


@pytest.mark.parametrize("budget,exc", [("1GB", TypeError), (-5, ValueError), (float("nan"), ValueError),
                                        (0, ValueError), (2.5, ValueError), (True, TypeError)])
def test_bad_memory_budget_is_refused(budget, exc, mlp_problem, device):
    model, data = mlp_problem
    refuses(model, data, exc, names_argument("memory_budget"), memory_budget=budget)


def test_hvp_on_empty_data_says_so(device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    with pytest.raises(ValueError, match=r"argument 'data' no samples"):
        fx.hvp(model, torch.nn.functional.cross_entropy, (x[:0], y[:0]),
               torch.ones(num_params(model), dtype=torch.float64, device=device))


def test_integer_inputs_to_a_linear_model(device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    xi = (x * 3).round().long()
    refuses(model, (xi, y), (TypeError, ValueError), f"{names_argument('data')}|{names_argument('x')}")
    refuses(model, DataLoader(TensorDataset(xi, y), batch_size=4), (TypeError, ValueError),
            f"{names_argument('data')}|{names_argument('x')}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_parameter_is_named(bad, device):
    model = make_model("mlp", device=device)
    with torch.no_grad():
        model.fc2.weight[1, 2] = bad
    x, y = make_data("mlp", device=device)
    refuses(model, (x, y), ValueError, re.escape("fc2.weight"))


def test_non_finite_logits_name_the_sample(device):
    """Finite inputs, but sample 11 overflows to inf logits: the error names the global index 11 (it sits
    in the third chunk of 5)."""
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    x[11] = 1.7e308 * torch.sign(model.fc1.weight[0].detach())
    out = model(x)
    assert not torch.isfinite(out[11]).all() and torch.isfinite(torch.cat([out[:11], out[12:]])).all()
    refuses(model, (x, y), ValueError, r"(?<!\d)11(?!\d)", batch_size=5)
    refuses(model, (x, y), ValueError, r"(?<!\d)11(?!\d)", structure="full")


def test_nan_input_names_the_sample(device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    x[11, 0] = float("nan")
    refuses(model, (x, y), ValueError, r"(?<!\d)11(?!\d)", batch_size=5)


def test_full_over_memory_budget_is_refused_before_any_work(device):
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    P = num_params(model)
    needed = P * P * 8                                       # one float64 P x P matrix
    msg = refuses(model, (x, y), (ValueError, MemoryError), r".", structure="full", memory_budget=1000)
    assert model.forward_calls == 0, "the refusal must come before any forward pass"
    numbers = [int(s.replace(",", "").replace("_", "")) for s in re.findall(r"\d[\d,_]*", msg)]
    assert any(needed <= n <= 8 * needed for n in numbers), f"message should give the bytes needed ({needed}): {msg}"
    for word in ("diag", "block", "kfac", "params"):
        assert word in msg, f"message should suggest {word!r}: {msg}"
    # a budget that fits: computed normally
    F = compute(model, (x, y), kind="true", structure="full", loss="cross_entropy", memory_budget=10**9)
    assert_matches(F.dense(), reference_fisher("mlp", "true"), rtol=1e-8)


@pytest.mark.parametrize("method", ["mv", "quad"])
def test_matrix_methods_reject_bad_vectors(method, mlp_problem, device):
    model, (x, y) = mlp_problem
    F = compute(model, (x, y), kind="true", structure="full", loss="cross_entropy")
    P = F.dense().shape[0]
    fn = getattr(F, method)
    for wrong in (torch.ones(P + 1, dtype=torch.float64, device=device),
                  torch.ones(P - 1, dtype=torch.float64, device=device)):
        with pytest.raises(ValueError, match=names_argument("v")):
            fn(wrong)
    with pytest.raises((TypeError, ValueError), match=names_argument("v")):
        fn(torch.ones(P, dtype=torch.long, device=device))


def test_solve_rejects_bad_right_hand_side(mlp_problem, device):
    model, (x, y) = mlp_problem
    F = compute(model, (x, y), kind="true", structure="full", loss="cross_entropy")
    P = F.dense().shape[0]
    with pytest.raises(ValueError, match=names_argument("b")):
        F.solve(torch.ones(P + 1, dtype=torch.float64, device=device), damping=0.1)


# --------------------------------------------------------------------------------------------------
# The model is left alone
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_model_left_untouched_and_no_hooks(kind, structure, device):
    """Parameters bitwise, .grad None, buffers, modes, no hooks (checked by `compute`), also when the
    model was in train mode and when some .grad already held a value."""
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    compute(model, (x, y), kind=kind, structure=structure, loss="cross_entropy",
            generator=torch.Generator(device=device).manual_seed(0))
    assert all(p.grad is None for p in model.parameters())
    model.train()
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 0.25)
    F = compute(model, (x, y), kind=kind, structure=structure, loss="cross_entropy",
                generator=torch.Generator(device=device).manual_seed(0))
    assert model.training and model.fc1.training
    assert model.fc1.weight.grad is None and torch.equal(model.fc2.weight.grad, torch.full_like(model.fc2.weight, 0.25))
    if kind != "mc":                                        # no dropout/BatchNorm: train mode is the same function
        assert_matches(F.dense(), expected_dense("mlp", kind, structure), rtol=1e-8)
    assert_no_hooks(model)


# --------------------------------------------------------------------------------------------------
# Bernoulli outputs (loss="bce"): independent sigmoid outputs, against plain autograd
# --------------------------------------------------------------------------------------------------

def bernoulli_problem():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(6, 4, generator=g, dtype=torch.float64) > 0.5).double()
    return model, x, y


def bernoulli_references(model, x, y):
    """Per-sample true Fisher E_y[g gᵀ] summed exactly over the 2^E label vectors, and the empirical
    g_n g_nᵀ, g the gradient of −Σ_e log p(y_e | z_e) by autograd (one backward per sample and label)."""
    params = list(model.parameters())
    E = y.shape[1]
    labels = torch.tensor([[(k >> e) & 1 for e in range(E)] for k in range(2 ** E)], dtype=torch.float64)
    true, empirical = [], []
    for n in range(x.shape[0]):
        def grad_at(t):
            z = model(x[n:n + 1])[0]
            nll = -(t * torch.nn.functional.logsigmoid(z) + (1 - t) * torch.nn.functional.logsigmoid(-z)).sum()
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(nll, params)])
        q = torch.sigmoid(model(x[n:n + 1])[0]).detach()
        F_n = 0
        for t in labels:
            g = grad_at(t)
            F_n = F_n + torch.prod(torch.where(t == 1, q, 1 - q)) * torch.outer(g, g)
        true.append(F_n)
        g = grad_at(y[n])
        empirical.append(torch.outer(g, g))
    return torch.stack(true), torch.stack(empirical)


@pytest.mark.parametrize("loss", ["bce", torch.nn.functional.binary_cross_entropy_with_logits,
                                  torch.nn.BCEWithLogitsLoss()], ids=["name", "F", "module"])
def test_bernoulli_fisher_against_autograd(loss, device):
    model, x, y = bernoulli_problem()
    true_n, empirical_n = bernoulli_references(model, x, y)                # on the CPU, before the move
    model, x, y = model.to(device), x.to(device), y.to(device)
    for kind, F_n in (("true", true_n), ("empirical", empirical_n)):
        F = compute(model, (x, y), kind=kind, structure="full", loss=loss, batch_size=4)
        assert_close(F.dense(), F_n.mean(0))
        assert_close(compute(model, (x, y), kind=kind, structure="diag", loss=loss).diag(), F_n.mean(0).diagonal())
        assert_close(fx.per_sample_fisher(model, x, y, kind=kind, loss=loss), F_n.diagonal(dim1=1, dim2=2).sum(1))
        V = torch.randn(F_n.shape[1], 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        assert_close(fx.FisherOperator(model, loss, (x, y), kind=kind) @ V.to(device), F_n.mean(0) @ V)
    # the GGN of the summed Bernoulli NLL is the true Fisher: F.binary_cross_entropy_with_logits's mean
    # over N·E entries is that NLL over N·E
    V = torch.randn(true_n.shape[1], 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_close(fx.hvp(model, loss, (x, y), V.to(device), curvature="ggn") * y.shape[1], true_n.mean(0) @ V)


def test_bernoulli_mc_is_one_of_the_label_draws(device):
    """MC with one sample: each per-sample term is g gᵀ at one of the 2^E label vectors."""
    model, x, y = bernoulli_problem()
    params = list(model.parameters())
    candidates = []                                                          # on the CPU, before the move
    for k in range(2 ** y.shape[1]):
        t = torch.tensor([(k >> e) & 1 for e in range(y.shape[1])], dtype=torch.float64)
        z = model(x[:1])[0]
        nll = -(t * torch.nn.functional.logsigmoid(z) + (1 - t) * torch.nn.functional.logsigmoid(-z)).sum()
        g = torch.cat([a.reshape(-1) for a in torch.autograd.grad(nll, params)])
        candidates.append(torch.outer(g, g))
    model, x, y = model.to(device), x.to(device), y.to(device)
    F = compute(model, (x[:1], y[:1]), kind="mc", structure="full", loss="bce",
                generator=torch.Generator(device=device).manual_seed(0))
    assert min((F.dense().cpu() - c).abs().max().item() for c in candidates) < 1e-10


# --------------------------------------------------------------------------------------------------
# The loss argument: old spelling, the ignore_index of a module
# --------------------------------------------------------------------------------------------------

def test_old_spelling_of_the_loss(mlp_problem, device):
    model, data = mlp_problem
    refuses(model, data, TypeError, r"fisherext.fisher: argument 'loss_fn' is now called 'loss'", loss_fn="mse")


def test_ignore_index_of_a_cross_entropy_module(device):
    """nn.CrossEntropyLoss(ignore_index=2): samples labelled 2 contribute nothing to the empirical Fisher
    (and count in N), as with ignore_index=2 given by itself; a conflicting ignore_index is refused."""
    model = make_model("mlp", device=device)
    x, y = make_data("mlp", device=device)
    y = y.clone()
    y[::2] = 2
    by_module = compute(model, (x, y), kind="empirical", structure="full", loss=torch.nn.CrossEntropyLoss(ignore_index=2))
    by_argument = compute(model, (x, y), kind="empirical", structure="full", ignore_index=2)
    keep = y != 2
    counted = compute(model, (x[keep], y[keep]), kind="empirical", structure="full").dense() * keep.sum() / len(y)
    assert torch.equal(by_module.dense(), by_argument.dense())
    assert_close(by_module.dense(), counted)
    with untouched(model), pytest.raises(ValueError, match=r"argument 'ignore_index' 5 differs"):
        fx.fisher(model, (x, y), loss=torch.nn.CrossEntropyLoss(ignore_index=2), ignore_index=5)
