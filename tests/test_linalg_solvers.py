"""fisherext.solvers: CG, LiSSA and Neumann against torch.linalg.solve on SPD matrices with known spectra,
on every kind of operator as_operator accepts (a FisherMatrix, a curvature operator, a tensor) with
right-hand sides as columns [P, K], the absolute damping of all three, their failure modes (indefinite
operator, scale below the top eigenvalue, damping not below the scale) and argument checks."""
import pytest
import torch

import fisherext
from fisherext import solvers
from fisherext.linalg.linop import LinearOperator
from support import assert_close
from support.curvature import explicit_ggn
from support.models import compute, make_data, make_model


def spd(P, eigenvalues, device, seed=0):
    """Q diag(eigenvalues) Q^T with a random orthogonal Q, built on the CPU, then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return ((Q * eigenvalues.double()) @ Q.T).to(device), Q.to(device)


def rhs(P, K, device, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((P,) if K is None else (P, K), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def damped_system(K, damping, device, P=40):
    """(M with eigenvalues 1..10, b [P] or [P, K], (M + damping I)^-1 b by a direct solve)."""
    M, _ = spd(P, torch.linspace(1, 10, P), device)
    b = rhs(P, K, device)
    return M, b, torch.linalg.solve(M + damping * torch.eye(P, dtype=M.dtype, device=device), b)


def assert_solves(x, expected, rel):
    """max |x - expected| <= rel * max |expected|."""
    assert_close(x, expected, rtol=rel)


class CountingOperator(LinearOperator):
    """A matrix behind the operator protocol (only _matmat), counting its products."""

    def __init__(self, M):
        super().__init__(M.shape[0], M.dtype, M.device)
        self.M, self.calls = M, 0

    def _matmat(self, X):
        self.calls += 1
        return self.M @ X


# ---------------------------------------------------------------------------------------------------
# cg


@pytest.mark.parametrize("K", [None, 1, 7], ids=["P", "K1", "K7"])
def test_cg_matches_solve(K, device):
    P, damping = 60, 0.1
    M, _ = spd(P, torch.logspace(-3, 1, P), device)
    b = rhs(P, K, device)
    A = CountingOperator(M)
    x, info = solvers.cg(A, b, damping=damping, tol=1e-12, return_info=True)
    expected = torch.linalg.solve(M + damping * torch.eye(P, dtype=M.dtype, device=device), b)
    assert x.shape == b.shape and x.dtype == b.dtype
    assert_solves(x, expected, 1e-8)
    assert bool(info["converged"].all()) and info["iterations"] == A.calls <= P + 10
    assert info["residual_norm"].shape == (() if K is None else (K,))


def test_cg_columns_converge_and_freeze_independently(device):
    """A zero column converges at once (x = 0 exactly) and stays frozen while the others iterate."""
    M, _ = spd(30, torch.linspace(1, 20, 30), device)
    b = rhs(30, 3, device)
    b[:, 1] = 0
    x = solvers.cg(M, b, tol=1e-12)
    assert torch.all(x[:, 1] == 0)
    assert_solves(x, torch.linalg.solve(M, b), 1e-8)


def test_cg_float32(device):
    M, _ = spd(40, torch.linspace(1, 10, 40), device)
    b = rhs(40, 2, device)
    x = solvers.cg(M.float(), b.float(), tol=1e-6)
    assert x.dtype == torch.float32
    assert_solves(x.double(), torch.linalg.solve(M, b), 1e-4)


def test_cg_preconditioner_cuts_iterations(device):
    """Ill-conditioned, diagonally dominant SPD: scales D from 1 to 1e4 around a well-conditioned core.
    Jacobi (diag(A)) preconditioning removes the scales, so CG needs far fewer iterations."""
    P = 200
    g = torch.Generator().manual_seed(3)
    B = torch.randn(P, P, generator=g, dtype=torch.float64) / P
    core = torch.eye(P, dtype=torch.float64) + 0.5 * (B + B.T)  # eigenvalues in about [0.9, 1.1]
    d = torch.logspace(0, 4, P, dtype=torch.float64)[torch.randperm(P, generator=g)].sqrt()
    M = (d[:, None] * core * d[None, :]).to(device)
    b = rhs(P, None, device)
    expected = torch.linalg.solve(M, b)
    x_plain, plain = solvers.cg(M, b, tol=1e-10, return_info=True)
    x_pre, pre = solvers.cg(M, b, tol=1e-10, preconditioner=M.diagonal(), return_info=True)
    assert_solves(x_plain, expected, 1e-7)
    assert_solves(x_pre, expected, 1e-7)
    assert pre["iterations"] * 3 < plain["iterations"], (pre["iterations"], plain["iterations"])


def test_cg_warm_start_at_the_solution_needs_no_iteration(device):
    M, _ = spd(20, torch.linspace(1, 5, 20), device)
    b = rhs(20, None, device)
    x, info = solvers.cg(M, b, x0=torch.linalg.solve(M, b), tol=1e-8, return_info=True)
    assert info["iterations"] == 0
    assert_solves(x, torch.linalg.solve(M, b), 1e-12)


def test_cg_indefinite_raises(device):
    eig = torch.linspace(-1, 5, 30)
    M, _ = spd(30, eig, device)
    with pytest.raises(ValueError, match="not positive definite along a search direction.*damping"):
        solvers.cg(M, rhs(30, None, device))
    # Enough damping makes it positive definite, and then CG solves it.
    x = solvers.cg(M, rhs(30, None, device), damping=2.0, tol=1e-12)
    eye = torch.eye(30, dtype=M.dtype, device=device)
    assert_solves(x, torch.linalg.solve(M + 2.0 * eye, rhs(30, None, device)), 1e-8)


def test_cg_warns_when_maxiter_is_reached(device):
    M, _ = spd(50, torch.logspace(0, 4, 50), device)
    with pytest.warns(UserWarning, match="did not reach tol"):
        _, info = solvers.cg(M, rhs(50, None, device), maxiter=3, return_info=True)
    assert info["iterations"] == 3 and not bool(info["converged"])


# ---------------------------------------------------------------------------------------------------
# lissa, neumann


@pytest.mark.parametrize("K", [None, 3], ids=["P", "K3"])
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_lissa_matches_solve_with_absolute_damping(damping, K, device):
    """scale > lambda_max + damping: LiSSA converges to (A + damping I)^-1 b (damping absolute)."""
    M, b, expected = damped_system(K, damping, device)
    est = solvers.lissa(M, b, scale=12.0, damping=damping, depth=600)  # rate 1 - (1 + damping)/12
    assert_solves(est, expected, 1e-8)
    assert est.shape == b.shape and est.dtype == b.dtype


def test_lissa_damping_is_absolute_not_relative(device):
    """damping=0.5 with scale=12 solves with λ = 0.5, not with the relative λ = 0.5 * 12 = 6 of earlier
    versions; a relative factor d passes as damping=d * scale."""
    M, _ = spd(20, torch.linspace(1, 10, 20), device)
    b = rhs(20, None, device)
    eye = torch.eye(20, dtype=M.dtype, device=device)
    est = solvers.lissa(M, b, scale=12.0, damping=0.5, depth=600)
    assert_solves(est, torch.linalg.solve(M + 0.5 * eye, b), 1e-8)
    assert (est - torch.linalg.solve(M + 6.0 * eye, b)).abs().max() > 0.1 * est.abs().max()
    relative = solvers.lissa(M, b, scale=12.0, damping=0.5 * 12.0, depth=600)
    assert_solves(relative, torch.linalg.solve(M + 6.0 * eye, b), 1e-8)


@pytest.mark.parametrize("damping", [1.0, 3.0, 5.0])
def test_lissa_refuses_damping_not_below_the_scale(damping, device):
    """The recurrence needs the relative factor damping / scale in [0, 1): damping >= scale is refused
    with the reason (a relative factor >= 1), before any product."""
    A = CountingOperator(M10.to(device))
    with pytest.raises(ValueError, match=rf"fisherext.solvers.lissa: argument 'damping' the absolute λ = {damping:g} "
                                         r"must be below scale = 1 \(the recurrence uses the relative factor "
                                         r"damping / scale = [0-9.]+, which must be in \[0, 1\)\)"):
        solvers.lissa(A, B10.to(device), scale=1.0, damping=damping)
    assert A.calls == 0


def test_lissa_sampled_operator_is_called_every_step(device):
    """Stochastic LiSSA: a fresh operator per step and repeat; minibatch operators averaging to A."""
    M, _ = spd(20, torch.linspace(1, 4, 20), device)
    g = torch.Generator().manual_seed(5)
    calls = []

    def sample():
        calls.append(1)
        noise = 0.05 * torch.randn(20, 20, generator=g, dtype=torch.float64).to(device)
        return M + (noise + noise.T) / 2  # E[sample()] = M

    b = rhs(20, None, device)
    est = solvers.lissa(M, b, scale=5.0, depth=200, repeats=3, sample=sample)
    assert len(calls) == 3 * 200
    rel = torch.linalg.vector_norm(est - torch.linalg.solve(M, b)) / torch.linalg.vector_norm(torch.linalg.solve(M, b))
    assert rel < 5e-2  # noise of the sampled operators; the deterministic recurrence is tested above


def test_lissa_scale_below_lambda_max_raises(device):
    """scale < lambda_max / 2: the top eigenvalue of (I - A/s) is below -1 and the recurrence diverges."""
    M, _ = spd(30, torch.linspace(1, 10, 30), device)
    with pytest.raises(ValueError, match="diverges.*'scale' must exceed the largest eigenvalue"):
        solvers.lissa(M, rhs(30, None, device), scale=4.0, depth=1000)


@pytest.mark.parametrize("K", [None, 3], ids=["P", "K3"])
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_neumann_matches_solve(K, damping, device):
    M, b, expected = damped_system(K, damping, device)
    est = solvers.neumann(M, b, scale=12.0, damping=damping, terms=450)  # truncation (11/12)^450 ~ 1e-17
    assert_solves(est, expected, 1e-8)


def test_neumann_truncation_is_the_partial_sum(device):
    """terms=T is exactly (1/s) sum_{k<T} (I - A/s)^k b (here T = 3)."""
    M, _ = spd(10, torch.linspace(1, 3, 10), device)
    b, s = rhs(10, None, device), 4.0
    N = torch.eye(10, dtype=M.dtype, device=device) - M / s
    expected = (b + N @ b + N @ (N @ b)) / s
    assert_solves(solvers.neumann(M, b, scale=s, terms=3), expected, 1e-12)


def test_neumann_scale_below_lambda_max_raises(device):
    M, _ = spd(30, torch.linspace(1, 10, 30), device)
    with pytest.raises(ValueError, match="diverges"):
        solvers.neumann(M, rhs(30, None, device), scale=3.0, terms=200)


# ---------------------------------------------------------------------------------------------------
# every operator as_operator accepts, with K right-hand sides as columns


@pytest.fixture
def mlp(device):
    model = make_model("mlp", device=device)
    return model, make_data("mlp", device=device)


@pytest.mark.parametrize("structure", ["diag", "full", "kfac"])
def test_cg_on_a_fisher_matrix_with_columns(structure, mlp, device):
    """solvers.cg(F, B) for a FisherMatrix F and B [P, K] (the README's promise) against
    torch.linalg.solve on F.dense() + λI."""
    model, data = mlp
    F = compute(model, data, structure=structure)
    B = rhs(F.P, 4, device)
    damping = 1e-2
    x = solvers.cg(F, B, damping=damping, tol=1e-12, maxiter=5000)
    expected = torch.linalg.solve(F.dense() + damping * torch.eye(F.P, dtype=F.dtype, device=device), B)
    assert x.shape == (F.P, 4)
    assert_solves(x, expected, 1e-7)
    assert_solves(solvers.cg(F, B[:, 2], damping=damping, tol=1e-12, maxiter=5000), expected[:, 2], 1e-7)


def test_cg_on_a_curvature_operator_with_columns(mlp, device):
    model, data = mlp
    A = fisherext.GGNOperator(model, "cross_entropy", data)
    B = rhs(A.shape[0], 3, device)
    damping = 1e-2
    x = solvers.cg(A, B, damping=damping, tol=1e-10)
    G = explicit_ggn(model, "cross_entropy", *data)
    assert_solves(x, torch.linalg.solve(G + damping * torch.eye(G.shape[0], dtype=G.dtype, device=device), B), 1e-7)


@pytest.mark.parametrize("solver", ["cg", "lissa", "neumann"])
def test_solvers_take_a_dense_tensor_and_columns(solver, device):
    M, _ = spd(30, torch.linspace(1, 10, 30), device)
    B = rhs(30, 5, device)
    kwargs = {"cg": dict(tol=1e-12), "lissa": dict(scale=12.0, depth=600), "neumann": dict(scale=12.0, terms=600)}
    x = getattr(solvers, solver)(M, B, damping=0.5, **kwargs[solver])
    assert x.shape == (30, 5)
    assert_solves(x, torch.linalg.solve(M + 0.5 * torch.eye(30, dtype=M.dtype, device=device), B), 1e-8)


def test_right_hand_sides_take_the_operator_dtype(device):
    M, _ = spd(20, torch.linspace(1, 10, 20), device)
    b = rhs(20, 2, device, dtype=torch.float32)
    x = solvers.cg(M, b, tol=1e-12)
    assert x.dtype == torch.float64
    assert_solves(x, torch.linalg.solve(M, b.double()), 1e-8)


def test_progress_bars_run(capsys, device):
    M, _ = spd(10, torch.linspace(1, 3, 10), device)
    b = rhs(10, 2, device)
    solvers.cg(M, b, progress=True)
    solvers.lissa(M, b, scale=4.0, depth=20, progress=True)
    solvers.neumann(M, b, scale=4.0, terms=20, progress=True)
    err = capsys.readouterr().err
    for name in ("solvers.cg", "solvers.lissa", "solvers.neumann"):
        assert name in err


# ---------------------------------------------------------------------------------------------------
# argument checks

M10 = torch.eye(10, dtype=torch.float64) * 2
B10 = torch.ones(10, dtype=torch.float64)


class Float32Operator(CountingOperator):
    """An operator that answers in float32 whatever it is given."""

    def __matmul__(self, X):
        return super().__matmul__(X).float()


# CPU only: the calls are a module-level table built at import on M10 and B10 (CPU tensors)
@pytest.mark.parametrize("call,exc,msg", [
    (lambda: solvers.cg(M10, B10, damping=-1e-3), ValueError, "'damping' must be finite and >= 0"),
    (lambda: solvers.cg(M10, B10, damping=float("nan")), ValueError, "'damping'"),
    (lambda: solvers.cg(M10, B10, tol=0.0), ValueError, "'tol' must be finite and > 0"),
    (lambda: solvers.cg(M10, B10, maxiter=0), ValueError, "'maxiter' must be a positive integer"),
    (lambda: solvers.cg(M10, torch.ones(9, dtype=torch.float64)), ValueError,
     "'b' expected shape \\[10\\] or \\[10, K\\] \\(P = 10\\), got \\(9,\\)"),
    (lambda: solvers.cg(M10, torch.ones(10, 2, 2, dtype=torch.float64)), ValueError, "'b' expected shape"),
    (lambda: solvers.cg(M10, torch.ones(10, 0, dtype=torch.float64)), ValueError, "'b' has no columns"),
    (lambda: solvers.cg(M10, torch.full((10,), float("inf"), dtype=torch.float64)), ValueError, "'b' has non-finite"),
    (lambda: solvers.cg(M10, torch.ones(10, dtype=torch.int64)), TypeError, "'b' expected a floating-point tensor"),
    (lambda: solvers.cg(M10, torch.ones(10, device="meta")), ValueError, "'b' is on meta"),
    (lambda: solvers.cg(torch.ones(10, 9), B10), ValueError, "'A' expected a non-empty square matrix"),
    (lambda: solvers.cg(lambda x: x, B10), TypeError, "'A' expected a LinearOperator"),
    (lambda: solvers.lissa(M10.tolist(), B10, scale=3.0), TypeError, "'A' expected a LinearOperator"),
    (lambda: solvers.neumann(M10 + torch.triu(M10, 1) + 1e-3 * torch.triu(torch.ones(10, 10), 1), B10, scale=3.0),
     ValueError, "'A' must be symmetric"),
    (lambda: solvers.cg(Float32Operator(M10), B10), ValueError, "A @ X must return a tensor of X's shape and dtype"),
    (lambda: solvers.cg(M10, B10, preconditioner=torch.ones(9)), ValueError, "'preconditioner' must be a tensor of shape"),
    (lambda: solvers.cg(M10, B10, preconditioner=-torch.ones(10)), ValueError, "'preconditioner' plus damping"),
    (lambda: solvers.cg(M10, B10, x0=torch.zeros(3)), ValueError, "'x0' must have the shape"),
    (lambda: solvers.lissa(M10, B10, scale=3.0, damping=-0.1), ValueError, "'damping' must be finite and >= 0"),
    (lambda: solvers.lissa(M10, B10, scale=3.0, damping=3.0), ValueError, "'damping' the absolute λ = 3 must be below"),
    (lambda: solvers.lissa(M10, B10, scale=0.0), ValueError, "'scale' must be finite and > 0"),
    (lambda: solvers.lissa(M10, B10, scale=3.0, depth=0), ValueError, "'depth' must be a positive integer"),
    (lambda: solvers.lissa(M10, B10, scale=3.0, sample=M10), TypeError, "'sample' must be callable"),
    (lambda: solvers.lissa(M10, torch.ones(11, dtype=torch.float64), scale=3.0), ValueError, "'b' expected shape"),
    (lambda: solvers.neumann(M10, B10, scale=-1.0), ValueError, "'scale' must be finite and > 0"),
    (lambda: solvers.neumann(M10, B10, scale=3.0, terms=1.5), ValueError, "'terms' must be a positive integer"),
    (lambda: solvers.neumann(M10, B10, scale=3.0, damping=-1.0), ValueError, "'damping' must be finite and >= 0"),
])
def test_bad_arguments_raise(call, exc, msg):
    with pytest.raises(exc, match=msg) as info:
        call()
    assert "fisherext.solvers." in str(info.value)
