"""fisherext.FisherMatrix built directly from its parts: the dense matrix against an explicit assembly,
its plan against the memory budget, and load_state_dict's checks (missing keys, unknown kinds, fields,
shapes, positions), all before anything is replaced; and products, quadratic forms, traces and solves
with columns [P, K], for those parts and for fisher()'s structures, against the dense matrix."""
import copy

import pytest
import torch

from support import assert_close
from support.models import compute, make_data, make_model
from fisherext import fisher as fx_fisher
from fisherext.capture.matrix import DensePart, DiagPart, FisherMatrix, KronPart

DT = torch.float64


def spd(n, seed):
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return A @ A.T + torch.eye(n, dtype=DT)


def matrix(device="cpu"):
    """P = 13: a diagonal over positions 0-2, a dense block over 3-5, a Kronecker part G ⊗ A over a
    2 x 3 weight laid out at positions 7-12 (row-major), position 6 in no part; built on the CPU, then
    moved to `device` (with the dense matrix it must equal)."""
    d = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    M, G, A = spd(3, 0), spd(2, 1), spd(3, 2)
    parts = [DiagPart(torch.arange(3), d), DensePart(torch.arange(3, 6), M),
             KronPart(torch.arange(7, 13).view(2, 3), A, G)]
    expected = torch.zeros(13, 13, dtype=DT)
    expected[:3, :3] = torch.diag(d)
    expected[3:6, 3:6] = M
    expected[7:, 7:] = torch.kron(G, A)
    return FisherMatrix(13, parts, num_samples=5, structure="kfac").to(device), expected.to(device)


def test_dense_assembles_the_parts(device):
    F, expected = matrix(device)
    assert_close(F.dense(), expected)
    v = torch.randn(13, generator=torch.Generator().manual_seed(3), dtype=DT).to(device)
    assert_close(F.mv(v), expected @ v)


def test_dense_copies_unless_told_not_to(device):
    M = spd(4, 7).to(device)
    F = FisherMatrix(4, [DensePart(torch.arange(4, device=device), M.clone())], num_samples=3, structure="full")
    copied = F.dense()
    copied.zero_()
    assert_close(F.dense(), M)                      # the copy was written to, the Fisher is unchanged
    own = F.dense(copy=False)
    assert_close(own, M)
    own.mul_(2)
    assert_close(F.dense(), 2 * M)                  # its own matrix: documented to change the Fisher
    blocks, expected = matrix(device)
    assembled = blocks.dense(copy=False)            # parts are always assembled into a new matrix
    assembled.zero_()
    assert_close(blocks.dense(), expected)


def test_full_fisher_takes_its_mean_in_the_updates_or_at_the_end(device):
    model = make_model("mlp").to(device)
    x, y = make_data("mlp", 7)
    x, y = x.to(device), y.to(device)
    whole = fx_fisher(model, (x, y), kind="empirical", structure="full", batch_size=3).dense()
    streamed = fx_fisher(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3),
                         kind="empirical", structure="full").dense()
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        torch.nn.functional.cross_entropy(model(x[n:n + 1]), y[n:n + 1]), list(model.parameters()))]) for n in range(7)])
    assert_close(whole, grads.T @ grads / 7)
    assert_close(streamed, grads.T @ grads / 7)


def test_dense_is_planned_against_the_memory_budget(device):
    F, expected = matrix(device)
    need = 13 * 13 * 8
    with pytest.raises(ValueError, match=rf"argument 'memory_budget' the dense 13 x 13 matrix needs {need:,} bytes but the "
                                         rf"memory budget is {need - 1:,} bytes; diag\(\), mv\(\)"):
        F.dense(memory_budget=need - 1)
    assert_close(F.dense(memory_budget=need), expected)
    with pytest.raises(TypeError, match="argument 'memory_budget' expected a number of bytes"):
        F.dense(memory_budget="1GB")
    with pytest.raises(ValueError, match="argument 'memory_budget' must be a positive whole number"):
        F.dense(memory_budget=-5)


def test_state_dict_round_trip(device):
    F, expected = matrix(device)
    one = DiagPart(torch.arange(1, device=device), torch.ones(1, dtype=DT, device=device))
    other = FisherMatrix(1, [one], 1, "diag")
    other.load_state_dict(copy.deepcopy(F.state_dict()))
    assert (other.P, other.num_samples, other.structure) == (13, 5, "kfac")
    assert torch.equal(other.dense(), expected)


def _state(top=None, part=None):
    """matrix()'s state with top-level keys and part fields ({(i, field): value}) changed; None removes."""
    state = matrix()[0].state_dict()
    state["parts"] = [dict(p) for p in state["parts"]]
    for changes, where in ((top or {}, lambda k: (state, k)), (part or {}, lambda k: (state["parts"][k[0]], k[1]))):
        for key, value in changes.items():
            target, name = where(key)
            if value is None:
                del target[name]
            else:
                target[name] = value
    return state


BAD_STATES = {
    "empty": ({}, ValueError, r"argument 'state' missing keys 'P', 'num_samples', 'structure', 'parts' \(a FisherMatrix"),
    "no-P": (_state(dict(P=None)), ValueError, r"argument 'state' missing keys 'P' \("),
    "P-zero": (_state(dict(P=0)), ValueError, r"argument 'state\['P'\]' must be a positive integer"),
    "num_samples-float": (_state(dict(num_samples=2.5)), ValueError, r"argument 'state\['num_samples'\]' must be a positive"),
    "no-parts": (_state(dict(parts=[])), ValueError, r"argument 'state' 'parts' must be a non-empty list"),
    "kind": (_state(part={(1, "kind"): "block"}), ValueError,
             r"argument 'state' part 1 has kind 'block'; expected one of 'diag', 'dense', 'kron'"),
    "field-missing": (_state(part={(2, "G"): None}), ValueError, r"argument 'state' part 2 \(kron\) lacks 'G'"),
    "field-type": (_state(part={(0, "d"): [1.0, 2.0, 3.0]}), TypeError,
                   r"argument 'state' part 0 \(diag\) field 'd' must be a tensor, got list"),
    "idx-range": (_state(part={(0, "idx"): torch.tensor([0, 1, 13])}), ValueError,
                  r"argument 'state' part 0 \(diag\) has 'idx' outside the integer positions \[0, 13\)"),
    "idx-float": (_state(part={(0, "idx"): torch.tensor([0.0, 1.0, 2.0])}), ValueError,
                  r"argument 'state' part 0 \(diag\) has 'idx' outside"),
    "dense-shape": (_state(part={(1, "M"): torch.eye(2, dtype=DT)}), ValueError,
                    r"argument 'state' part 1 \(dense\) has inconsistent shapes: idx \(3,\), M \(2, 2\)"),
    "kron-shape": (_state(part={(2, "A"): torch.eye(2, dtype=DT)}), ValueError,
                   r"argument 'state' part 2 \(kron\) has inconsistent shapes"),
}


# CPU only: BAD_STATES is a module-level table of CPU states, built at import
@pytest.mark.parametrize("case", list(BAD_STATES))
def test_load_state_dict_refuses_bad_states_and_leaves_the_matrix_alone(case):
    """load_state_dict({}) used to raise KeyError 'P'; a bad part, an error half-way through."""
    state, exc, msg = BAD_STATES[case]
    F, expected = matrix()
    with pytest.raises(exc, match=msg):
        F.load_state_dict(state)
    assert (F.P, F.num_samples, F.structure) == (13, 5, "kfac")
    assert torch.equal(F.dense(), expected)


def test_load_state_dict_refuses_what_is_no_dict(device):
    F, _ = matrix(device)
    with pytest.raises(TypeError, match=r"argument 'state' expected the dict of FisherMatrix\.state_dict\(\), got list"):
        F.load_state_dict([("P", 13)])


# ---- products, quadratic forms, traces and solves with columns [P, K] --------------------------------

def columns(P, K, device, seed=4):
    return torch.randn(P, K, generator=torch.Generator().manual_seed(seed), dtype=DT).to(device)


def fisher_of(structure, device):
    model = make_model("mlp", device=device)
    return compute(model, make_data("mlp", device=device), structure=structure)


@pytest.mark.parametrize("structure", ["parts", "diag", "full", "block", "kfac"])
def test_products_with_columns_match_the_dense_matrix(structure, device):
    """F @ X ([P, K]) and F @ v ([P]) against F.dense() @ X, for every structure ("parts": the three kinds
    of parts of matrix(), with a position in no part)."""
    F, D = matrix(device) if structure == "parts" else (fisher_of(structure, device), None)
    D = F.dense() if D is None else D
    X = columns(F.P, 5, device)
    assert (F @ X).shape == (F.P, 5)
    assert_close(F @ X, D @ X)
    assert_close(F.matmat(X), D @ X)
    assert_close(F @ X[:, 3], D @ X[:, 3])
    assert_close(F.mv(X[:, 3]), D @ X[:, 3])
    assert (F @ X[:, :0]).shape == (F.P, 0)


def test_each_part_takes_all_columns_in_one_product(monkeypatch, device):
    F, D = matrix(device)
    seen = []
    for cls in (DiagPart, DensePart, KronPart):
        def counted(self, X, product=cls.matmat):
            seen.append((type(self).kind, tuple(X.shape)))
            return product(self, X)
        monkeypatch.setattr(cls, "matmat", counted)
    X = columns(13, 6, device)
    assert_close(F @ X, D @ X)
    assert seen == [("diag", (3, 6)), ("dense", (3, 6)), ("kron", (6, 6))]


def test_quad_and_trace_are_tensors(device):
    F, D = matrix(device)
    X = columns(13, 4, device)
    q = F.quad(X[:, 0])
    assert isinstance(q, torch.Tensor) and q.shape == () and q.dtype == DT
    assert_close(q, X[:, 0] @ D @ X[:, 0])
    Q = F.quad(X)
    assert Q.shape == (4,)
    assert_close(Q, torch.einsum("pk,pq,qk->k", X, D, X))
    t = F.trace()
    assert isinstance(t, torch.Tensor) and t.shape == () and t.dtype == DT
    assert_close(t, D.trace())


@pytest.mark.parametrize("structure", ["parts", "diag", "full", "block", "kfac"])
def test_solve_with_columns(structure, device):
    F, D = matrix(device) if structure == "parts" else (fisher_of(structure, device), None)
    D = F.dense() if D is None else D
    B = columns(F.P, 3, device)
    damping = 0.1
    expected = torch.linalg.solve(D + damping * torch.eye(F.P, dtype=DT, device=device), B)
    if structure == "parts":   # position 6 lies in no part: solve leaves it 0
        expected[6] = 0
    X = F.solve(B, damping=damping)
    assert X.shape == (F.P, 3)
    assert_close(X, expected)
    assert_close(F.solve(B[:, 1], damping=damping), expected[:, 1])


def test_solve_and_quad_check_their_arguments(device):
    F, _ = matrix(device)
    with pytest.raises(ValueError, match=r"fisherext.FisherMatrix.solve: argument 'b' expected shape \[13\] or "
                                         r"\[13, K\] \(P = 13\), got \(12, 2\)"):
        F.solve(torch.ones(12, 2, dtype=DT, device=device), damping=0.1)
    with pytest.raises(ValueError, match=r"fisherext.FisherMatrix.solve: argument 'damping' must be finite and >= 0"):
        F.solve(torch.ones(13, dtype=DT, device=device), damping=-1.0)
    with pytest.raises(ValueError, match=r"fisherext.FisherMatrix.quad: argument 'v' expected shape"):
        F.quad(torch.ones(13, 2, 2, dtype=DT, device=device))
    with pytest.raises(TypeError, match=r"fisherext.FisherMatrix.quad: argument 'v' expected a floating-point"):
        F.quad(torch.ones(13, dtype=torch.long, device=device))
