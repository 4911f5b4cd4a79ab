"""fisherext.spectral against torch.linalg.eigh: power iteration and Lanczos on matrices with known spectra
(both signs, repeated eigenvalues, low rank) and on the exact Hessian of a small MLP's mean loss;
Hutchinson traces and stochastic Lanczos quadrature against exact traces and their theoretical errors
(statistical checks with seeded generators); bad input."""
import math
import warnings

import pytest
import torch

import fisherext as fx
from fisherext.linalg.linop import LinearOperator
from fisherext.linalg.spectral import hutchinson_trace, lanczos, power_iteration, slq_density
from support.models import compute, make_data, make_model, names_argument, slow
from support.spectra import mixed_spectrum, mlp_hessian, with_spectrum

RTOL = 1e-10   # float64 eigenvalues, relative to the largest |λ|


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_eigenvalues(actual, expected, rtol=RTOL, scale=None):
    scale = scale if scale is not None else expected.abs().max().item()
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=0, atol=rtol * scale)


def assert_eigenvectors(U, M, eigenvalues, min_gap=1e-2, tol=1e-8):
    """Each column of U is, up to sign, the eigenvector of M for its eigenvalue, wherever that eigenvalue
    is separated from the rest of the spectrum by more than min_gap (elsewhere only the subspace is
    defined). Columns are orthonormal in every case."""
    U, M = U.cpu().double(), M.cpu().double()
    torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), rtol=0, atol=1e-10)
    lam, V = torch.linalg.eigh(M)
    checked = 0
    for j, ev in enumerate(eigenvalues.cpu().double()):
        i = (lam - ev).abs().argmin()
        gap = torch.cat([lam[:i], lam[i + 1:]]).sub(lam[i]).abs().min()
        if gap > min_gap:
            assert abs(float(U[:, j] @ V[:, i])) > 1 - tol, f"eigenvector {j} (λ = {ev.item():.6g}) is off"
            checked += 1
    assert checked, "no eigenvalue was separated enough to check its eigenvector"


def by_magnitude(lam, k):
    return lam[lam.abs().argsort(descending=True)[:k]]


@pytest.fixture(scope="module")
def hessian():
    """Exact Hessian of an MLP's mean MSE loss: an indefinite spectrum, negative eigenvalues included."""
    H = mlp_hessian("mlp_reg")
    lam = torch.linalg.eigvalsh(H)
    assert lam[0] < -0.5 and lam[-1] > 1.0, "the test needs an indefinite Hessian"
    return H, lam


# --------------------------------------------------------------------------------------------------
# power_iteration
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
def test_power_iteration_known_spectrum(k, device):
    lam = mixed_spectrum()
    M = with_spectrum(lam).to(device)
    ev, U = power_iteration(M, k, maxiter=1000, tol=1e-12, generator=gen())
    expected = by_magnitude(lam, k)   # 8, -6, 5: the second one is negative
    assert_eigenvalues(ev, expected)
    assert_eigenvectors(U, M, ev)


def test_power_iteration_resolves_plus_minus_pairs(device):
    """±5 have equal magnitude: a single power vector oscillates between them, the block must return both."""
    lam = torch.cat([torch.tensor([5.0, -5.0], dtype=torch.float64), torch.linspace(-3, 3, 28, dtype=torch.float64)])
    M = with_spectrum(lam, seed=3).to(device)
    ev, U = power_iteration(M, 2, maxiter=1000, tol=1e-12, generator=gen())
    assert_eigenvalues(ev.sort().values, torch.tensor([-5.0, 5.0], dtype=torch.float64))
    assert_eigenvectors(U, M, ev)


def test_power_iteration_hessian(hessian, device):
    H, lam = hessian
    H = H.to(device)
    ev, U = power_iteration(H, 2, maxiter=2000, tol=1e-12, generator=gen())
    assert_eigenvalues(ev, by_magnitude(lam, 2))
    assert_eigenvectors(U, H, ev)
    # the most negative eigenvalue, dominant (and negative) after shifting the spectrum by λ_max
    shift = lam[-1].item()
    ev, U = power_iteration(H - shift * torch.eye(H.shape[0], dtype=H.dtype, device=device), 1, maxiter=2000, tol=1e-12,
                            generator=gen())
    assert ev.item() < 0
    assert_eigenvalues(ev + shift, lam[:1], scale=lam.abs().max().item())
    assert_eigenvectors(U, H, ev + shift)


def test_power_iteration_warns_without_convergence(device):
    M = with_spectrum(mixed_spectrum()).to(device)
    with pytest.warns(RuntimeWarning, match="no convergence in maxiter=3"):
        ev, U = power_iteration(M, 2, maxiter=3, tol=1e-12, generator=gen())
    assert ev.shape == (2,) and U.shape == (40, 2)


def test_power_iteration_is_seeded(device):
    M = with_spectrum(mixed_spectrum()).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a = power_iteration(M, 2, maxiter=5, tol=0.0, generator=gen(1))
        b = power_iteration(M, 2, maxiter=5, tol=0.0, generator=gen(1))
        c = power_iteration(M, 2, maxiter=5, tol=0.0, generator=gen(2))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


# --------------------------------------------------------------------------------------------------
# lanczos
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_lanczos_known_spectrum(which, device):
    lam = mixed_spectrum(60)
    M = with_spectrum(lam, seed=1).to(device)
    ev, U = lanczos(M, 3, which=which, generator=gen())   # default m = 40 < P = 60
    expected = {"largest": lam.flip(0)[:3], "smallest": lam[:3], "magnitude": by_magnitude(lam, 3)}[which]
    assert_eigenvalues(ev, expected)
    assert_eigenvectors(U, M, ev)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_hessian(hessian, which, device):
    H, lam = hessian
    H = H.to(device)
    ev, U = lanczos(H, 4, which=which, generator=gen())
    expected = lam.flip(0)[:4] if which == "largest" else lam[:4]
    assert_eigenvalues(ev, expected)
    if which == "smallest":
        assert (ev < 0).all()
    assert_eigenvectors(U, H, ev)


def test_lanczos_full_krylov_space_is_exact(hessian, device):
    H, lam = hessian
    H = H.to(device)
    P = H.shape[0]
    ev, U = lanczos(H, P, which="smallest", m=10 * P, generator=gen())
    assert_eigenvalues(ev, lam)
    torch.testing.assert_close(U @ torch.diag(ev) @ U.T, H, rtol=0, atol=1e-10 * lam.abs().max().item())


def test_lanczos_breakdown_and_repeated_eigenvalues(device):
    """Three distinct eigenvalues: every Krylov space closes after 3 steps; the basis must restart to find
    the multiplicities, and return orthonormal eigenvectors of each eigenspace."""
    lam = torch.cat([torch.full((4,), 5.0), torch.full((20,), 1.0), torch.full((6,), -2.0)]).double()
    M = with_spectrum(lam, seed=2).to(device)
    for which, expected in [("largest", [5.0] * 4 + [1.0]), ("smallest", [-2.0] * 6)]:
        ev, U = lanczos(M, len(expected), which=which, generator=gen())
        assert_eigenvalues(ev, torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(M @ U, U * ev, rtol=0, atol=1e-10 * 5)
        torch.testing.assert_close(U.T @ U, torch.eye(len(expected), dtype=torch.float64, device=device), rtol=0,
                                   atol=1e-10)


def test_lanczos_low_rank(device):
    g = gen(4)
    B = torch.randn(30, 2, generator=g, dtype=torch.float64)
    M = B @ B.T
    lam = torch.linalg.eigvalsh(M)
    M = M.to(device)
    ev, U = lanczos(M, 4, generator=gen())
    assert_eigenvalues(ev, lam.flip(0)[:4])
    torch.testing.assert_close(M @ U, U * ev, rtol=0, atol=1e-10 * lam.max().item())


def test_lanczos_fisher_matrix(device):
    F = compute(make_model("mlp", device=device), make_data("mlp", device=device), structure="full")
    lam = torch.linalg.eigvalsh(F.dense())
    ev, _ = lanczos(F, 3, generator=gen())
    assert_eigenvalues(ev, lam.flip(0)[:3])


def test_lanczos_operator_dtype_and_device(device, dtype):
    lam = mixed_spectrum()
    M = with_spectrum(lam).to(device=device, dtype=dtype)
    ev, U = lanczos(M, 2, which="smallest", generator=gen())
    assert ev.dtype == dtype and U.dtype == dtype and ev.device == M.device and U.device == M.device
    assert_eigenvalues(ev, lam[:2], rtol=RTOL if dtype == torch.float64 else 1e-5)


# --------------------------------------------------------------------------------------------------
# hutchinson_trace
# --------------------------------------------------------------------------------------------------

def theoretical_std_error(M, n, distribution):
    """Standard error of the mean of n values zᵀMz: Var = 2 Σ_{i≠j} M_ij² (Rademacher), 2 ‖M‖_F² (Gaussian)."""
    off = M - torch.diag(M.diagonal())
    var = 2 * (off ** 2).sum() if distribution == "rademacher" else 2 * (M ** 2).sum()
    return math.sqrt(var.item() / n)


@slow
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("which", ["known", "hessian"])
def test_hutchinson_trace(which, distribution, hessian, device):
    M = (with_spectrum(mixed_spectrum()) if which == "known" else hessian[0]).to(device)
    exact = M.trace().item()
    n = 2000
    est, se = hutchinson_trace(M, n, distribution=distribution, generator=gen(), return_std=True)
    expected_se = theoretical_std_error(M, n, distribution)
    assert abs(est - exact) < 4 * expected_se, f"estimate {est} vs exact {exact} (se {expected_se})"
    assert 0.8 < se / expected_se < 1.25, f"reported se {se} vs theoretical {expected_se}"
    assert hutchinson_trace(M, n, distribution=distribution, generator=gen()) == est


def test_hutchinson_trace_is_exact_for_diagonal_rademacher(device):
    """zᵀ D z = Σ D_ii z_i² = tr(D) for every ±1 probe: no variance at all (Gaussian probes have some)."""
    D = torch.diag(torch.linspace(-2, 7, 25, dtype=torch.float64)).to(device)
    est, se = hutchinson_trace(D, 10, generator=gen(), return_std=True)
    assert est.cpu() == pytest.approx(D.trace().item(), rel=1e-14) and se.cpu() == pytest.approx(0.0, abs=1e-12)
    _, se = hutchinson_trace(D, 10, distribution="gaussian", generator=gen(), return_std=True)
    assert se > 0.1


def test_hutchinson_trace_returns_tensors(device, dtype):
    """The estimate and its standard error are 0-d tensors in the operator's dtype (no host sync)."""
    M = with_spectrum(mixed_spectrum()).to(device=device, dtype=dtype)
    est, se = hutchinson_trace(M, 8, generator=gen(), return_std=True)
    for value in (est, se, hutchinson_trace(M, 8, generator=gen())):
        assert isinstance(value, torch.Tensor) and value.shape == () and value.dtype == dtype
    Z = torch.randint(0, 2, (40, 8), generator=gen()).to(device=device, dtype=dtype).mul_(2).sub_(1)   # the same probes
    values = (Z * (M @ Z)).sum(0)
    torch.testing.assert_close(est, values.mean())
    torch.testing.assert_close(se, values.std() / math.sqrt(8))


def test_hutchinson_trace_blocks_of_probes(device):
    class Counting(LinearOperator):
        def __init__(self, M):
            super().__init__(M.shape[0], M.dtype, M.device)
            self.M, self.widths = M, []

        def _matmat(self, X):
            self.widths.append(X.shape[1])
            return self.M @ X

    A = Counting(with_spectrum(mixed_spectrum()).to(device))
    hutchinson_trace(A, 23, block_size=10, generator=gen())
    assert A.widths == [10, 10, 3]
    A.widths.clear()
    hutchinson_trace(A, 23, generator=gen())
    assert A.widths == [23]
    assert math.isnan(hutchinson_trace(A, 1, generator=gen(), return_std=True)[1])


# --------------------------------------------------------------------------------------------------
# slq_density
# --------------------------------------------------------------------------------------------------

def test_slq_density_integrates_to_one(hessian, device):
    H, lam = hessian
    H = H.to(device)
    grid, density = slq_density(H, m=30, n=5, generator=gen())
    assert grid.shape == density.shape and (density >= 0).all()
    assert abs(torch.trapezoid(density, grid).item() - 1) < 1e-2
    wide = torch.linspace(-5, 5, 4001, dtype=torch.float64)
    result = slq_density(H, m=30, n=5, grid=wide, sigma=0.05, generator=gen())
    assert torch.equal(result.grid, wide)
    assert abs(torch.trapezoid(result.density, wide).item() - 1) < 1e-2
    torch.testing.assert_close(result.weights.sum(1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)


@slow
def test_slq_mean_node_is_an_unbiased_trace_estimate(device):
    """Σ_i τ_i θ_i = qᵀAq with q = z/√P: per probe, an unbiased estimate of tr(A)/P (Rademacher z)."""
    M = with_spectrum(mixed_spectrum()).to(device)
    P, n = M.shape[0], 400
    result = slq_density(M, m=10, n=n, generator=gen())
    per_probe = (result.nodes * result.weights).sum(1)
    expected_se = theoretical_std_error(M, n, "rademacher") / P
    assert abs(per_probe.mean().item() - M.trace().item() / P) < 4 * expected_se
    assert 0.8 < (per_probe.std().item() / math.sqrt(n)) / expected_se < 1.25


def test_slq_nodes_are_the_eigenvalues_when_m_covers_the_space(device):
    lam = mixed_spectrum(30)
    M = with_spectrum(lam, seed=5).to(device)
    result = slq_density(M, m=100, n=3, generator=gen())
    assert result.nodes.shape == (3, 30)
    for nodes, weights in zip(result.nodes, result.weights):
        assert_eigenvalues(nodes.sort().values, lam, rtol=1e-9)
        assert (weights > 0).all()


def test_slq_probe_whose_krylov_space_closes_early(device):
    """A = c·I: every Krylov space is one-dimensional, one node c with weight 1, the rest padding."""
    M = 2.5 * torch.eye(12, dtype=torch.float64, device=device)
    result = slq_density(M, m=8, n=2, generator=gen())
    assert result.nodes.shape == (2, 8)
    torch.testing.assert_close(result.nodes[:, 0], torch.full((2,), 2.5, dtype=torch.float64))
    torch.testing.assert_close(result.weights[:, 0], torch.ones(2, dtype=torch.float64))
    assert (result.weights[:, 1:] == 0).all()
    peak = result.grid[result.density.argmax()].item()
    assert abs(peak - 2.5) < 0.01
    assert abs(torch.trapezoid(result.density, result.grid).item() - 1) < 1e-2


def test_progress_bars_run(capsys, device):
    M = with_spectrum(mixed_spectrum(10)).to(device)
    power_iteration(M, 1, maxiter=500, tol=1e-8, generator=gen(), progress=True)
    lanczos(M, 1, generator=gen(), progress=True)
    hutchinson_trace(M, 4, generator=gen(), progress=True)
    slq_density(M, m=5, n=2, generator=gen(), progress=True)
    err = capsys.readouterr().err
    for name in ("power_iteration", "lanczos", "hutchinson_trace", "slq_density"):
        assert name in err


# CPU only: an export check, no tensors
def test_exported():
    assert fx.spectral.lanczos is lanczos


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc, name", [
    (lambda M: power_iteration(M, 0), ValueError, "k"),
    (lambda M: power_iteration(M, 11), ValueError, "k"),
    (lambda M: power_iteration(M, 1.0), ValueError, "k"),
    (lambda M: power_iteration(M, 1, maxiter=0), ValueError, "maxiter"),
    (lambda M: power_iteration(M, 1, tol=-1.0), ValueError, "tol"),
    (lambda M: lanczos(M, 0), ValueError, "k"),
    (lambda M: lanczos(M, 11), ValueError, "k"),
    (lambda M: lanczos(M, 3, m=2), ValueError, "m"),
    (lambda M: lanczos(M, 1, which="biggest"), ValueError, "which"),
    (lambda M: hutchinson_trace(M, 0), ValueError, "n"),
    (lambda M: hutchinson_trace(M, 5, distribution="normal"), ValueError, "distribution"),
    (lambda M: hutchinson_trace(M, 5, block_size=0), ValueError, "block_size"),
    (lambda M: slq_density(M, n=0), ValueError, "n"),
    (lambda M: slq_density(M, m=0), ValueError, "m"),
    (lambda M: slq_density(M, sigma=0.0), ValueError, "sigma"),
    (lambda M: slq_density(M, grid=[0.0, 1.0]), TypeError, "grid"),
    (lambda M: slq_density(M, grid=torch.zeros(2, 2)), ValueError, "grid"),
    (lambda M: lanczos(M.tolist(), 1), TypeError, "A"),
    (lambda M: power_iteration(M[:, :5], 1), ValueError, "A"),
])
def test_bad_input(call, exc, name, device):
    M = with_spectrum(mixed_spectrum(10)).to(device)
    with pytest.raises(exc, match=names_argument(name)):
        call(M)


def test_k_above_p_names_p(device):
    with pytest.raises(ValueError, match=r"k must be at most P = 10"):
        lanczos(with_spectrum(mixed_spectrum(10)).to(device), 11)
