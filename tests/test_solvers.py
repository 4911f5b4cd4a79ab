"""fisherext.solvers: CG, LiSSA and Neumann against torch.linalg.solve on SPD matrices with known spectra,
their failure modes (indefinite operator, scale below the top eigenvalue) and argument checks."""
import pytest
import torch

from fisherext import solvers


def spd(P, eigenvalues, device, seed=0, dtype=torch.float64):
    """Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return (Q * eigenvalues.double()) @ Q.T, Q


def rhs(P, K, device, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((P,) if K is None else (P, K), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def assert_solves(x, expected, rel):
    """max |x - expected| <= rel * max |expected|."""
    err = (x - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), f"error {err:.3g}"


class CountingOperator:
    """A matrix behind the operator protocol (A @ X, A.shape), counting its matvecs."""

    def __init__(self, M):
        self.M, self.shape, self.calls = M, M.shape, 0

    def __matmul__(self, X):
        self.calls += 1
        return self.M @ X


# ---------------------------------------------------------------------------------------------------
# cg


@pytest.mark.parametrize("K", [None, 1, 7], ids=["P", "K1", "K7"])
def test_cg_matches_solve(K, device):
    P, damping = 60, 0.1
    M, _ = spd(P, torch.logspace(-3, 1, P), device)
    M = M.to(device)
    b = rhs(P, K, device)
    A = CountingOperator(M)
    x, info = solvers.cg(A, b, damping=damping, tol=1e-12, return_info=True)
    expected = torch.linalg.solve(M + damping * torch.eye(P, dtype=M.dtype, device=device), b)
    assert x.shape == b.shape and x.dtype == b.dtype
    assert_solves(x, expected, 1e-8)
    assert bool(info["converged"].all()) and info["iterations"] == A.calls <= P + 10
    assert info["residual_norm"].shape == (() if K is None else (K,))


def test_cg_columns_converge_and_freeze_independently():
    """A zero column converges at once (x = 0 exactly) and stays frozen while the others iterate."""
    M, _ = spd(30, torch.linspace(1, 20, 30), "cpu")
    b = rhs(30, 3, "cpu")
    b[:, 1] = 0
    x = solvers.cg(M, b, tol=1e-12)
    assert torch.all(x[:, 1] == 0)
    assert_solves(x, torch.linalg.solve(M, b), 1e-8)


def test_cg_float32():
    M, _ = spd(40, torch.linspace(1, 10, 40), "cpu")
    b = rhs(40, 2, "cpu")
    x = solvers.cg(M.float(), b.float(), tol=1e-6)
    assert x.dtype == torch.float32
    assert_solves(x.double(), torch.linalg.solve(M, b), 1e-4)


def test_cg_preconditioner_cuts_iterations():
    """Ill-conditioned, diagonally dominant SPD: scales D from 1 to 1e4 around a well-conditioned core.
    Jacobi (diag(A)) preconditioning removes the scales, so CG needs far fewer iterations."""
    P = 200
    g = torch.Generator().manual_seed(3)
    B = torch.randn(P, P, generator=g, dtype=torch.float64) / P
    core = torch.eye(P, dtype=torch.float64) + 0.5 * (B + B.T)  # eigenvalues in about [0.9, 1.1]
    d = torch.logspace(0, 4, P, dtype=torch.float64)[torch.randperm(P, generator=g)].sqrt()
    M = d[:, None] * core * d[None, :]
    b = rhs(P, None, "cpu")
    expected = torch.linalg.solve(M, b)
    x_plain, plain = solvers.cg(M, b, tol=1e-10, return_info=True)
    x_pre, pre = solvers.cg(M, b, tol=1e-10, preconditioner=M.diagonal(), return_info=True)
    assert_solves(x_plain, expected, 1e-7)
    assert_solves(x_pre, expected, 1e-7)
    assert pre["iterations"] * 3 < plain["iterations"], (pre["iterations"], plain["iterations"])


def test_cg_warm_start_at_the_solution_needs_no_iteration():
    M, _ = spd(20, torch.linspace(1, 5, 20), "cpu")
    b = rhs(20, None, "cpu")
    x, info = solvers.cg(M, b, x0=torch.linalg.solve(M, b), tol=1e-8, return_info=True)
    assert info["iterations"] == 0
    assert_solves(x, torch.linalg.solve(M, b), 1e-12)


def test_cg_indefinite_raises():
    eig = torch.linspace(-1, 5, 30)
    M, _ = spd(30, eig, "cpu")
    with pytest.raises(ValueError, match="not positive definite along a search direction.*damping"):
        solvers.cg(M, rhs(30, None, "cpu"))
    # Enough damping makes it positive definite, and then CG solves it.
    x = solvers.cg(M, rhs(30, None, "cpu"), damping=2.0, tol=1e-12)
    assert_solves(x, torch.linalg.solve(M + 2.0 * torch.eye(30, dtype=M.dtype), rhs(30, None, "cpu")), 1e-8)


def test_cg_warns_when_maxiter_is_reached():
    M, _ = spd(50, torch.logspace(0, 4, 50), "cpu")
    with pytest.warns(UserWarning, match="did not reach tol"):
        _, info = solvers.cg(M, rhs(50, None, "cpu"), maxiter=3, return_info=True)
    assert info["iterations"] == 3 and not bool(info["converged"])


# ---------------------------------------------------------------------------------------------------
# lissa, neumann


@pytest.mark.parametrize("K", [None, 3], ids=["P", "K3"])
@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_lissa_matches_cg(damping, K, device):
    """scale > lambda_max: LiSSA converges to (A + damping*scale*I)^-1 b, which CG computes directly."""
    P, scale = 40, 12.0
    M, _ = spd(P, torch.linspace(1, 10, P), device)
    M = M.to(device)
    b = rhs(P, K, device)
    est = solvers.lissa(M, b, scale=scale, damping=damping, depth=400)
    x = solvers.cg(M, b, damping=damping * scale, tol=1e-12)
    rel = torch.linalg.vector_norm(est - x) / torch.linalg.vector_norm(x)
    assert rel < 1e-2
    assert est.shape == b.shape and est.dtype == b.dtype


def test_lissa_sampled_operator_is_called_every_step():
    """Stochastic LiSSA: a fresh operator per step and repeat; minibatch operators averaging to A."""
    M, _ = spd(20, torch.linspace(1, 4, 20), "cpu")
    g = torch.Generator().manual_seed(5)
    calls = []

    def sample():
        calls.append(1)
        noise = 0.05 * torch.randn(20, 20, generator=g, dtype=torch.float64)
        return M + (noise + noise.T) / 2  # E[sample()] = M

    b = rhs(20, None, "cpu")
    est = solvers.lissa(M, b, scale=5.0, depth=200, repeats=3, sample=sample)
    assert len(calls) == 3 * 200
    rel = torch.linalg.vector_norm(est - torch.linalg.solve(M, b)) / torch.linalg.vector_norm(torch.linalg.solve(M, b))
    assert rel < 5e-2  # noise of the sampled operators; the deterministic recurrence is tested above


def test_lissa_scale_below_lambda_max_raises():
    """scale < lambda_max / 2: the top eigenvalue of (I - A/s) is below -1 and the recurrence diverges."""
    M, _ = spd(30, torch.linspace(1, 10, 30), "cpu")
    with pytest.raises(ValueError, match="diverges.*'scale' must exceed the largest eigenvalue"):
        solvers.lissa(M, rhs(30, None, "cpu"), scale=4.0, depth=1000)


@pytest.mark.parametrize("K", [None, 3], ids=["P", "K3"])
def test_neumann_matches_solve(K, device):
    P, scale = 40, 12.0
    M, _ = spd(P, torch.linspace(1, 10, P), device)
    M = M.to(device)
    b = rhs(P, K, device)
    est = solvers.neumann(M, b, scale=scale, terms=450)  # truncation (11/12)^450 ~ 1e-17
    assert_solves(est, torch.linalg.solve(M, b), 1e-8)


def test_neumann_truncation_is_the_partial_sum():
    """terms=T is exactly (1/s) sum_{k<T} (I - A/s)^k b (here T = 3)."""
    M, _ = spd(10, torch.linspace(1, 3, 10), "cpu")
    b, s = rhs(10, None, "cpu"), 4.0
    N = torch.eye(10, dtype=M.dtype) - M / s
    expected = (b + N @ b + N @ (N @ b)) / s
    assert_solves(solvers.neumann(M, b, scale=s, terms=3), expected, 1e-12)


def test_neumann_scale_below_lambda_max_raises():
    M, _ = spd(30, torch.linspace(1, 10, 30), "cpu")
    with pytest.raises(ValueError, match="diverges"):
        solvers.neumann(M, rhs(30, None, "cpu"), scale=3.0, terms=200)


# ---------------------------------------------------------------------------------------------------
# argument checks

M10 = torch.eye(10, dtype=torch.float64) * 2
B10 = torch.ones(10, dtype=torch.float64)


class Float32Operator(CountingOperator):
    """An operator that answers in float32 whatever it is given."""

    def __matmul__(self, X):
        return super().__matmul__(X).float()


@pytest.mark.parametrize("call,exc,msg", [
    (lambda: solvers.cg(M10, B10, damping=-1e-3), ValueError, "'damping' must be finite and >= 0"),
    (lambda: solvers.cg(M10, B10, damping=float("nan")), ValueError, "'damping'"),
    (lambda: solvers.cg(M10, B10, tol=0.0), ValueError, "'tol' must be finite and > 0"),
    (lambda: solvers.cg(M10, B10, maxiter=0), ValueError, "'maxiter' must be a positive integer"),
    (lambda: solvers.cg(M10, torch.ones(9, dtype=torch.float64)), ValueError, "'b' must have shape \\[10\\]"),
    (lambda: solvers.cg(M10, torch.ones(10, 2, 2, dtype=torch.float64)), ValueError, "'b' must have shape"),
    (lambda: solvers.cg(M10, torch.full((10,), float("inf"), dtype=torch.float64)), ValueError, "'b' has non-finite"),
    (lambda: solvers.cg(M10, torch.ones(10, dtype=torch.int64)), TypeError, "'b' must be a floating-point tensor"),
    (lambda: solvers.cg(torch.ones(10, 9), B10), TypeError, "'A' must be a square operator"),
    (lambda: solvers.cg(lambda x: x, B10), TypeError, "'A' must be a square operator"),
    (lambda: solvers.cg(Float32Operator(M10), B10), ValueError, "A @ X must return a tensor of X's shape and dtype"),
    (lambda: solvers.cg(M10, B10, preconditioner=torch.ones(9)), ValueError, "'preconditioner' must be a tensor of shape"),
    (lambda: solvers.cg(M10, B10, preconditioner=-torch.ones(10)), ValueError, "'preconditioner' plus damping"),
    (lambda: solvers.cg(M10, B10, x0=torch.zeros(3)), ValueError, "'x0' must have the shape"),
    (lambda: solvers.lissa(M10, B10, scale=3.0, damping=-0.1), ValueError, "'damping' must be finite and in \\[0, 1\\)"),
    (lambda: solvers.lissa(M10, B10, scale=0.0), ValueError, "'scale' must be finite and > 0"),
    (lambda: solvers.lissa(M10, B10, scale=3.0, depth=0), ValueError, "'depth' must be a positive integer"),
    (lambda: solvers.lissa(M10, B10, scale=3.0, sample=M10), TypeError, "'sample' must be callable"),
    (lambda: solvers.lissa(M10, torch.ones(11, dtype=torch.float64), scale=3.0), ValueError, "'b' must have shape"),
    (lambda: solvers.neumann(M10, B10, scale=-1.0), ValueError, "'scale' must be finite and > 0"),
    (lambda: solvers.neumann(M10, B10, scale=3.0, terms=1.5), ValueError, "'terms' must be a positive integer"),
])
def test_bad_arguments_raise(call, exc, msg):
    with pytest.raises(exc, match=msg) as info:
        call()
    assert "fisherext.solvers." in str(info.value)
