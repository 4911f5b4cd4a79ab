"""fisherext.linop: the LinearOperator protocol (products, dense, scipy view, input checks), DenseOperator
and as_operator (tensors, FisherMatrix, operators)."""
import sys

import numpy as np
import pytest
import torch

import fisherext as fx
from support import assert_close
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


def test_mv_goes_through_matmat_once():
    A = CountingOperator(matrix())
    A @ torch.ones(40, dtype=torch.float64)
    A @ torch.ones(40, 5, dtype=torch.float64)
    assert A.calls == [(40, 1), (40, 5)]


def test_input_is_converted_to_the_operator_dtype():
    M = matrix()
    A = CountingOperator(M)
    v = torch.randn(40, dtype=torch.float32)
    out = A @ v
    assert out.dtype == torch.float64
    assert_close(out, M @ v.double())


@pytest.mark.parametrize("block_size", [None, 1, 7, 40, 100])
def test_dense_in_column_blocks(block_size):
    M = matrix()
    A = CountingOperator(M)
    D = A.dense(block_size=block_size)
    assert_close(D, M)
    widths = [k for _, k in A.calls]
    assert sum(widths) == 40
    if block_size is not None:
        assert max(widths) == min(block_size, 40)


def test_dense_refuses_large_operators_naming_the_bytes():
    A = CountingOperator(matrix())
    with pytest.raises(ValueError, match=r"40 x 40 matrix needs 12,800 bytes .*max_elements=1,000"):
        A.dense(max_elements=1000)
    assert A.calls == [], "a refused dense() must not start any product"


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


def test_to_scipy_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)   # makes the import fail
    with pytest.raises(ImportError, match="to_scipy: needs scipy"):
        CountingOperator(matrix()).to_scipy()


def test_as_operator():
    M = matrix()
    A = CountingOperator(M)
    assert as_operator(A) is A
    D = as_operator(M)
    assert isinstance(D, DenseOperator) and D.M is M
    with pytest.raises(TypeError, match=names_argument("A")):
        as_operator(M.tolist())


@pytest.mark.parametrize("structure", ["diag", "full", "kfac"])
def test_as_operator_adapts_a_fisher_matrix(structure):
    model = make_model("mlp")
    F = compute(model, make_data("mlp"), structure=structure)
    A = as_operator(F)
    assert A is F  # a FisherMatrix is a LinearOperator
    assert A.shape == F.shape and A.dtype == F.dtype and A.device == F.device
    X = torch.randn(F.P, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert_close(A @ X, F.dense() @ X)
    assert_close(A @ X[:, 1], F.mv(X[:, 1]))
    assert_close(A.dense(), F.dense())


def test_dense_operator_checks_its_matrix():
    with pytest.raises(TypeError, match=names_argument("M")):
        DenseOperator(np.eye(3))
    with pytest.raises(TypeError, match=names_argument("M")):
        DenseOperator(torch.eye(3, dtype=torch.long))
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(3))
    asymmetric = torch.eye(3, dtype=torch.float64)
    asymmetric[0, 1] = 1e-3
    with pytest.raises(ValueError, match="symmetric"):
        DenseOperator(asymmetric)
    with pytest.raises(ValueError, match="argument 'M' has non-finite"):
        DenseOperator(torch.full((3, 3), float("nan")))
    rounding = matrix()
    rounding[0, 1] += 1e-14   # symmetric up to rounding, as an autograd Hessian is: accepted
    DenseOperator(rounding)


@pytest.mark.parametrize("op", ["@", "mv", "matmat"])
def test_bad_input(op):
    A = CountingOperator(matrix())
    call = {"@": A.__matmul__, "mv": A.mv, "matmat": A.matmat}[op]
    name = "X" if op == "matmat" else "v"

    def arg(rows, **kw):
        return torch.ones((rows, 2) if op == "matmat" else (rows,), **kw)

    with pytest.raises(ValueError, match=rf"{names_argument(name)}.*\[40.*P = 40.*\(39"):
        call(arg(39, dtype=torch.float64))
    with pytest.raises(TypeError, match=names_argument(name)):
        call(arg(40).tolist())
    with pytest.raises(TypeError, match=rf"{names_argument(name)}.*floating"):
        call(arg(40, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"argument '{name}' is on meta"):
        call(arg(40, device="meta"))
    assert A.calls == [], "rejected input must not reach _matmat"


def test_wrong_rank():
    A = CountingOperator(matrix())
    with pytest.raises(ValueError, match=names_argument("v")):
        A @ torch.ones(40, 2, 2)
    with pytest.raises(ValueError, match=names_argument("v")):
        A.mv(torch.ones(40, 1))
    with pytest.raises(ValueError, match=names_argument("X")):
        A.matmat(torch.ones(40))


def test_subclass_contract():
    class Missing(LinearOperator):
        pass

    class WrongShape(LinearOperator):
        def _matmat(self, X):
            return X[:-1]

    with pytest.raises(NotImplementedError, match="Missing must implement _matmat"):
        Missing(3, torch.float64, "cpu") @ torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"WrongShape._matmat returned shape \(2, 1\)"):
        WrongShape(3, torch.float64, "cpu") @ torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=names_argument("P")):
        Missing(0, torch.float64, "cpu")
    with pytest.raises(TypeError, match=names_argument("dtype")):
        Missing(3, torch.int64, "cpu")
