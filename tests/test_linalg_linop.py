"""fisherext.linop: the LinearOperator protocol (products, dense, scipy view, input checks), DenseOperator
and as_operator (tensors, FisherMatrix, operators), and the algebra (sums, multiples, the damping shift,
InverseOperator) against explicit matrices, with its refusals."""
import sys

import numpy as np
import pytest
import torch

import fisherext as fx
from support import assert_close
from fisherext.linalg import InverseOperator
from fisherext.linalg.linop import DenseOperator, LinearOperator, as_operator
from support.models import compute, make_data, make_model, names_argument
from support.spectra import mixed_spectrum, with_spectrum


class CountingOperator(LinearOperator):
    """Implements only _matmat (what a subclass must provide) and records the shapes it was called with."""

    def __init__(self, M):
        super().__init__(M.shape[0], M.dtype, M.device)
        self.M, self.calls = M, []

    def _matmat(self, X):
        self.calls.append(tuple(X.shape))
        return self.M @ X


def matrix(P=40, dtype=torch.float64, device="cpu"):
    return with_spectrum(mixed_spectrum(P)).to(device=device, dtype=dtype)


# CPU only: an export check, no tensors
def test_top_level_export():
    assert fx.LinearOperator is LinearOperator
    assert fx.linop.as_operator is as_operator


def test_properties(device, dtype):
    M = matrix(dtype=dtype, device=device)
    A = CountingOperator(M)
    assert A.shape == (40, 40)
    assert A.dtype == dtype
    assert A.device == M.device
    assert "CountingOperator(P=40" in repr(A)


@pytest.mark.parametrize("cls", [CountingOperator, DenseOperator])
def test_products_match_the_matrix(cls, device, dtype):
    M = matrix(dtype=dtype, device=device)
    A = cls(M)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(40, generator=g, dtype=dtype).to(device)
    X = torch.randn(40, 3, generator=g, dtype=dtype).to(device)
    assert (A @ v).shape == (40,)
    assert (A @ X).shape == (40, 3)
    assert_close(A @ v, M @ v)
    assert_close(A.mv(v), M @ v)
    assert_close(A @ X, M @ X)
    assert_close(A.matmat(X), M @ X)
    assert (A @ X[:, :0]).shape == (40, 0)


def test_mv_goes_through_matmat_once(device):
    A = CountingOperator(matrix(device=device))
    A @ torch.ones(40, dtype=torch.float64, device=device)
    A @ torch.ones(40, 5, dtype=torch.float64, device=device)
    assert A.calls == [(40, 1), (40, 5)]


def test_input_is_converted_to_the_operator_dtype(device):
    M = matrix(device=device)
    A = CountingOperator(M)
    v = torch.randn(40, dtype=torch.float32).to(device)
    out = A @ v
    assert out.dtype == torch.float64
    assert_close(out, M @ v.double())


@pytest.mark.parametrize("block_size", [None, 1, 7, 40, 100])
def test_dense_in_column_blocks(block_size, device):
    M = matrix(device=device)
    A = CountingOperator(M)
    D = A.dense(block_size=block_size)
    assert_close(D, M)
    widths = [k for _, k in A.calls]
    assert sum(widths) == 40
    if block_size is not None:
        assert max(widths) == min(block_size, 40)


def test_dense_refuses_large_operators_naming_the_bytes(device):
    A = CountingOperator(matrix(device=device))
    with pytest.raises(ValueError, match=r"40 x 40 matrix needs 12,800 bytes .*max_elements=1,000"):
        A.dense(max_elements=1000)
    assert A.calls == [], "a refused dense() must not start any product"


# CPU only: a round trip through scipy, whose products go via numpy
def test_to_scipy_round_trip(dtype):
    from scipy.sparse.linalg import eigsh

    M = matrix(dtype=dtype)
    S = CountingOperator(M).to_scipy()
    M64 = M.double().numpy()
    assert S.shape == (40, 40) and S.dtype == np.float64
    rng = np.random.default_rng(0)
    x, X = rng.standard_normal(40), rng.standard_normal((40, 4))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(S.matvec(x), M64 @ x, rtol=rtol, atol=rtol * 10)
    np.testing.assert_allclose(S.matvec(x[:, None]), (M64 @ x)[:, None], rtol=rtol, atol=rtol * 10)
    np.testing.assert_allclose(S.rmatvec(x), M64 @ x, rtol=rtol, atol=rtol * 10)
    np.testing.assert_allclose(S.matmat(X), M64 @ X, rtol=rtol, atol=rtol * 10)
    np.testing.assert_allclose(S @ X, M64 @ X, rtol=rtol, atol=rtol * 10)
    top = eigsh(S, k=1, which="LA", return_eigenvectors=False)
    bottom = eigsh(S, k=1, which="SA", return_eigenvectors=False)
    np.testing.assert_allclose(top, [8.0], rtol=rtol)
    np.testing.assert_allclose(bottom, [-6.0], rtol=rtol)


# CPU only: the monkeypatch removes scipy, which fails before any tensor is touched
def test_to_scipy_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)   # makes the import fail
    with pytest.raises(ImportError, match="to_scipy: needs scipy"):
        CountingOperator(matrix()).to_scipy()


def test_as_operator(device):
    M = matrix(device=device)
    A = CountingOperator(M)
    assert as_operator(A) is A
    D = as_operator(M)
    assert isinstance(D, DenseOperator) and D.M is M
    with pytest.raises(TypeError, match=names_argument("A")):
        as_operator(M.tolist())


@pytest.mark.parametrize("structure", ["diag", "full", "kfac"])
def test_as_operator_adapts_a_fisher_matrix(structure, device):
    model = make_model("mlp", device=device)
    F = compute(model, make_data("mlp", device=device), structure=structure)
    A = as_operator(F)
    assert A is F  # a FisherMatrix is a LinearOperator
    assert A.shape == F.shape and A.dtype == F.dtype and A.device == F.device
    X = torch.randn(F.P, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    assert_close(A @ X, F.dense() @ X)
    assert_close(A @ X[:, 1], F.mv(X[:, 1]))
    assert_close(A.dense(), F.dense())


def test_dense_operator_checks_its_matrix(device):
    with pytest.raises(TypeError, match=names_argument("M")):
        DenseOperator(np.eye(3))
    with pytest.raises(TypeError, match=names_argument("M")):
        DenseOperator(torch.eye(3, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(3, 4, device=device))
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(3, device=device))
    asymmetric = torch.eye(3, dtype=torch.float64, device=device)
    asymmetric[0, 1] = 1e-3
    with pytest.raises(ValueError, match="symmetric"):
        DenseOperator(asymmetric)
    with pytest.raises(ValueError, match="argument 'M' has non-finite"):
        DenseOperator(torch.full((3, 3), float("nan"), device=device))
    rounding = matrix(device=device)
    rounding[0, 1] += 1e-14   # symmetric up to rounding, as an autograd Hessian is: accepted
    DenseOperator(rounding)


@pytest.mark.parametrize("op", ["@", "mv", "matmat"])
def test_bad_input(op, device):
    A = CountingOperator(matrix(device=device))
    call = {"@": A.__matmul__, "mv": A.mv, "matmat": A.matmat}[op]
    name = "X" if op == "matmat" else "v"

    def arg(rows, **kw):
        return torch.ones((rows, 2) if op == "matmat" else (rows,), **{"device": device, **kw})

    with pytest.raises(ValueError, match=rf"{names_argument(name)}.*\[40.*P = 40.*\(39"):
        call(arg(39, dtype=torch.float64))
    with pytest.raises(TypeError, match=names_argument(name)):
        call(arg(40).tolist())
    with pytest.raises(TypeError, match=rf"{names_argument(name)}.*floating"):
        call(arg(40, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"argument '{name}' is on meta"):
        call(arg(40, device="meta"))
    assert A.calls == [], "rejected input must not reach _matmat"


def test_wrong_rank(device):
    A = CountingOperator(matrix(device=device))
    with pytest.raises(ValueError, match=names_argument("v")):
        A @ torch.ones(40, 2, 2, device=device)
    with pytest.raises(ValueError, match=names_argument("v")):
        A.mv(torch.ones(40, 1, device=device))
    with pytest.raises(ValueError, match=names_argument("X")):
        A.matmat(torch.ones(40, device=device))


def test_subclass_contract(device):
    class Missing(LinearOperator):
        pass

    class WrongShape(LinearOperator):
        def _matmat(self, X):
            return X[:-1]

    with pytest.raises(NotImplementedError, match="Missing must implement _matmat"):
        Missing(3, torch.float64, device) @ torch.ones(3, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"WrongShape._matmat returned shape \(2, 1\)"):
        WrongShape(3, torch.float64, device) @ torch.ones(3, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=names_argument("P")):
        Missing(0, torch.float64, device)
    with pytest.raises(TypeError, match=names_argument("dtype")):
        Missing(3, torch.int64, device)


# ---- the algebra: sums, multiples, the damping shift, the CG inverse ---------------------------------

def psd(P=30, seed=0, dtype=torch.float64, device="cpu"):
    B = torch.randn(P, P, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return (B @ B.T / P).to(device)


def columns(P=30, K=4, seed=1, dtype=torch.float64, device="cpu"):
    return torch.randn(P, K, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def test_algebra_matches_the_matrices(device):
    M1, M2 = psd(seed=0, device=device), psd(seed=1, device=device)
    A, B = CountingOperator(M1), CountingOperator(M2)
    X = columns(device=device)
    eye = torch.eye(30, dtype=torch.float64, device=device)
    cases = {
        "A + B": (A + B, M1 + M2), "A - B": (A - B, M1 - M2), "2.5 * A": (2.5 * A, 2.5 * M1),
        "A * 2.5": (A * 2.5, 2.5 * M1), "A / 4": (A / 4, M1 / 4), "-A": (-A, -M1),
        "A.damped(0.3)": (A.damped(0.3), M1 + 0.3 * eye),
        "nested": (0.5 * (A + B).damped(0.1) - 3 * B, 0.5 * (M1 + M2 + 0.1 * eye) - 3 * M2),
        "sum of sums": ((A + B) + (B + A), 2 * (M1 + M2)),
    }
    for name, (op, M) in cases.items():
        assert isinstance(op, LinearOperator) and op.shape == (30, 30) and op.dtype == torch.float64, name
        assert_close(op @ X, M @ X)
        assert_close(op @ X[:, 0], M @ X[:, 0])
        assert_close(op.dense(), M)


def test_products_of_composites_are_one_batched_product_per_operand(device):
    A, B = CountingOperator(psd(seed=0, device=device)), CountingOperator(psd(seed=1, device=device))
    op = 2 * (A + B).damped(0.1) - A
    op @ columns(K=5, device=device)
    assert A.calls == [(30, 5), (30, 5)] and B.calls == [(30, 5)]
    assert len((A + B + A).terms) == 3   # sums are flattened
    assert (3 * (2 * A)).coefficient == 6 and (3 * (2 * A)).operator is A   # multiples fold


def test_algebra_with_a_fisher_matrix(device):
    model = make_model("mlp", device=device)
    F = compute(model, make_data("mlp", device=device), structure="kfac")
    D = F.dense()
    X = columns(F.P, 3, device=device)
    other = DenseOperator(psd(F.P, device=device))
    assert_close((F + other) @ X, (D + other.M) @ X)
    assert_close((0.5 * F).damped(1e-2) @ X, (0.5 * D + 1e-2 * torch.eye(F.P, dtype=D.dtype, device=device)) @ X)


def test_sum_refuses_mismatched_operands(device):
    A = CountingOperator(psd(30, device=device))
    with pytest.raises(ValueError, match=r"fisherext.LinearOperator.__add__: argument 'other' has shape \(20, 20\) "
                                         r"but the operator has \(30, 30\)"):
        A + CountingOperator(psd(20, device=device))
    with pytest.raises(TypeError, match=r"argument 'other' has dtype torch.float32 but the operator has torch.float64"):
        A + CountingOperator(psd(30, device=device).float())
    with pytest.raises(ValueError, match=rf"argument 'other' is on meta but the operator is on {A.device}"):
        A + CountingOperator(psd(30).to("meta"))
    with pytest.raises(ValueError, match=r"fisherext.LinearOperator.__sub__: argument 'other' has shape"):
        A - CountingOperator(psd(20, device=device))
    with pytest.raises(TypeError, match=r"argument 'other' expected a LinearOperator to add, got Tensor \(wrap a "
                                        r"matrix in DenseOperator; add a multiple of the identity with A.damped"):
        A + psd(30, device=device)
    with pytest.raises(TypeError, match=r"argument 'other' expected a LinearOperator to add, got float"):
        A + 1.0
    assert A.calls == []


def test_multiples_and_damping_refuse_bad_numbers(device):
    A = CountingOperator(psd(30, device=device))
    with pytest.raises(TypeError, match=r"fisherext.LinearOperator.__mul__: argument 'c' expected a finite real "
                                        r"number, got Tensor \(use A @ X for a product with a tensor\)"):
        A * torch.ones(30, device=device)
    with pytest.raises(TypeError, match=r"argument 'c' expected a finite real number, got bool"):
        True * A
    with pytest.raises(TypeError, match=r"argument 'c' expected a finite real number, got float"):
        A * float("inf")
    with pytest.raises(ValueError, match=r"fisherext.LinearOperator.__truediv__: argument 'c' cannot divide"):
        A / 0
    with pytest.raises(ValueError, match=r"fisherext.LinearOperator.damped: argument 'damping' must be finite and "
                                         r">= 0 \(the absolute λ of A \+ λI\), got -0.1"):
        A.damped(-0.1)
    with pytest.raises(ValueError, match=r"argument 'damping' must be finite and >= 0"):
        A.damped(float("nan"))
    assert A.calls == []


@pytest.mark.parametrize("preconditioned", [False, True])
def test_inverse_operator_solves_the_damped_system(preconditioned, device):
    """(A + λI) · InverseOperator(A, λ) @ B = B to CG's tolerance, and equals torch.linalg.solve."""
    M = psd(30, device=device)
    damping, tol = 0.05, 1e-10
    A = CountingOperator(M)
    inv = InverseOperator(A, damping, tol=tol, preconditioner=M.diagonal() if preconditioned else None)
    B = columns(K=5, device=device)
    X = inv @ B
    assert X.shape == (30, 5) and {shape for shape in A.calls} == {(30, 5)}
    damped = M + damping * torch.eye(30, dtype=M.dtype, device=device)
    bound = tol * torch.linalg.vector_norm(B, dim=0)   # CG's stopping test, per column
    assert bool((torch.linalg.vector_norm(damped @ X - B, dim=0) <= bound).all())
    # hence |X - (A + λI)^-1 B| <= bound / λ_min(A + λI) per column
    error = torch.linalg.vector_norm(X - torch.linalg.solve(damped, B), dim=0)
    assert bool((error <= bound / torch.linalg.eigvalsh(damped)[0]).all())
    x = inv @ B[:, 1]
    assert x.shape == (30,)
    assert torch.linalg.vector_norm(damped @ x - B[:, 1]) <= bound[1]


def test_inverse_operator_of_a_fisher_matrix_and_in_the_algebra(device):
    model = make_model("mlp", device=device)
    F = compute(model, make_data("mlp", device=device), structure="full")
    B = columns(F.P, 3, device=device)
    inv = InverseOperator(F, 1e-2, tol=1e-12, maxiter=5000)
    damped = F.dense() + 1e-2 * torch.eye(F.P, dtype=F.dtype, device=device)
    bound = 1e-12 * torch.linalg.vector_norm(B, dim=0) / torch.linalg.eigvalsh(damped)[0]
    assert bool((torch.linalg.vector_norm(inv @ B - F.solve(B, damping=1e-2), dim=0) <= bound).all())
    assert bool((torch.linalg.vector_norm((2 * inv) @ B - 2 * F.solve(B, damping=1e-2), dim=0) <= 2 * bound).all())
    assert fx.linalg.InverseOperator is InverseOperator is fx.solvers.InverseOperator


def test_inverse_operator_checks_its_arguments(device):
    M = psd(10, device=device)
    with pytest.raises(ValueError, match=r"fisherext.InverseOperator: argument 'damping' must be finite and >= 0"):
        InverseOperator(M, -1.0)
    with pytest.raises(ValueError, match=r"argument 'tol' must be finite and > 0"):
        InverseOperator(M, tol=0.0)
    with pytest.raises(ValueError, match=r"argument 'maxiter' must be a positive integer"):
        InverseOperator(M, maxiter=0)
    with pytest.raises(ValueError, match=r"argument 'preconditioner' must be a tensor of shape \[10\]"):
        InverseOperator(M, preconditioner=torch.ones(9, device=device))
    with pytest.raises(TypeError, match=r"argument 'A' expected a LinearOperator"):
        InverseOperator(M.tolist())
    indefinite = InverseOperator(-M)
    with pytest.raises(ValueError, match="not positive definite"):
        indefinite @ columns(10, 2, device=device)
