"""fisherext.fisher_matrix.FisherMatrix built directly from its parts (no fisher() call): the dense
matrix against an explicit assembly, its plan against the memory budget, and load_state_dict's checks
(missing keys, unknown kinds, fields, shapes, positions), all before anything is replaced."""
import copy

import pytest
import torch

from support import assert_close
from fisherext.capture.matrix import DensePart, DiagPart, FisherMatrix, KronPart

DT = torch.float64


def spd(n, seed):
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return A @ A.T + torch.eye(n, dtype=DT)


def matrix():
    """P = 13: a diagonal over positions 0-2, a dense block over 3-5, a Kronecker part G ⊗ A over a
    2 x 3 weight laid out at positions 7-12 (row-major), position 6 in no part."""
    d = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    M, G, A = spd(3, 0), spd(2, 1), spd(3, 2)
    parts = [DiagPart(torch.arange(3), d), DensePart(torch.arange(3, 6), M),
             KronPart(torch.arange(7, 13).view(2, 3), A, G)]
    expected = torch.zeros(13, 13, dtype=DT)
    expected[:3, :3] = torch.diag(d)
    expected[3:6, 3:6] = M
    expected[7:, 7:] = torch.kron(G, A)
    return FisherMatrix(13, parts, num_samples=5, structure="kfac"), expected


def test_dense_assembles_the_parts():
    F, expected = matrix()
    assert_close(F.dense(), expected)
    v = torch.randn(13, generator=torch.Generator().manual_seed(3), dtype=DT)
    assert_close(F.mv(v), expected @ v)


def test_dense_is_planned_against_the_memory_budget():
    F, expected = matrix()
    need = 13 * 13 * 8
    with pytest.raises(ValueError, match=rf"argument 'memory_budget' the dense 13 x 13 matrix needs {need:,} bytes but the "
                                         rf"memory budget is {need - 1:,} bytes; diag\(\), mv\(\)"):
        F.dense(memory_budget=need - 1)
    assert_close(F.dense(memory_budget=need), expected)
    with pytest.raises(TypeError, match="argument 'memory_budget' expected a number of bytes"):
        F.dense(memory_budget="1GB")
    with pytest.raises(ValueError, match="argument 'memory_budget' must be a positive whole number"):
        F.dense(memory_budget=-5)


def test_state_dict_round_trip():
    F, expected = matrix()
    other = FisherMatrix(1, [DiagPart(torch.arange(1), torch.ones(1, dtype=DT))], 1, "diag")
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


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_load_state_dict_refuses_bad_states_and_leaves_the_matrix_alone(case):
    """load_state_dict({}) used to raise KeyError 'P'; a bad part, an error half-way through."""
    state, exc, msg = BAD_STATES[case]
    F, expected = matrix()
    with pytest.raises(exc, match=msg):
        F.load_state_dict(state)
    assert (F.P, F.num_samples, F.structure) == (13, 5, "kfac")
    assert torch.equal(F.dense(), expected)


def test_load_state_dict_refuses_what_is_no_dict():
    F, _ = matrix()
    with pytest.raises(TypeError, match=r"argument 'state' expected the dict of FisherMatrix\.state_dict\(\), got list"):
        F.load_state_dict([("P", 13)])
