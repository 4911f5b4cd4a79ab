"""Shared helpers of the op-family tests (tests/test_ops_*.py): the bad-input factory (each case through the
wrapper, the compiled op and the fake kernel), the opcheck factory, the scratch-budget override and seeded
inputs."""
import contextlib

import pytest
import torch


def _to_meta(a):
    """The same arguments as meta tensors, strides kept (a.to("meta") makes a non-dense tensor, such as an
    expanded one, contiguous)."""
    if isinstance(a, (list, tuple)):
        return type(a)(_to_meta(x) for x in a)
    if isinstance(a, torch.Tensor):
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
    return a


def _clone(a):
    return [x.clone() for x in a] if isinstance(a, list) else a.clone()


def _equal(a, b):
    return all(map(torch.equal, a, b)) if isinstance(a, list) else torch.equal(a, b)


def check_bad_input(name, args, exc, msg, path):
    """Calls op `name` through `path` ("wrapper": fisherext.ops, "compiled": torch.ops.fisherext,
    "fake": torch.ops.fisherext on meta tensors) and checks the error names the op and the argument,
    and that an in-place op left every tensor argument (its outputs among them) untouched."""
    from fisherext import ops

    if path == "wrapper":
        call = getattr(ops, name)
    else:
        call = getattr(torch.ops.fisherext, name)
        if path == "fake":
            args = _to_meta(args)
    tensors = [a for a in args if isinstance(a, (torch.Tensor, list))]
    snapshot = [_clone(a) for a in tensors] if name.endswith("_") and path != "fake" else None
    with pytest.raises(exc, match=msg) as info:
        call(*args)
    assert f"fisherext.{name}" in str(info.value)
    if snapshot is not None:
        assert all(map(_equal, tensors, snapshot)), "a rejected call must leave its arguments untouched"


ALL_PATHS = ("wrapper", "compiled", "fake")
# Arguments that share memory are refused by the compiled kernels (checks.h check_no_overlap) and not by the
# fakes: meta tensors have no memory to compare (every data pointer is 0), and _to_meta makes each argument
# a separate meta tensor anyway. So overlap cases run through the wrapper and the compiled op only.
OVERLAP_PATHS = ("wrapper", "compiled")


def views_of(make, buffer=lambda: torch.randn(12)):
    """An args factory for the overlap cases: make(b) on a fresh b = buffer(), the args being views of b."""
    return lambda: make(buffer())


def bad_input_test(cases, paths=ALL_PATHS):
    """The bad-input test of an op family: every case (op name, args factory, exception type, message
    pattern) through each of `paths`: the wrapper, the compiled op and the fake kernel (see check_bad_input)."""

    @pytest.mark.parametrize("path", paths)
    @pytest.mark.parametrize("name,make_args,exc,msg", cases, ids=[f"{c[0]}-{i}" for i, c in enumerate(cases)])
    def test_bad_input_names_the_argument(name, make_args, exc, msg, path):
        check_bad_input(name, make_args(), exc, msg, path)

    return test_bad_input_names_the_argument


def opcheck_test(cases):
    """The opcheck test of an op family: every named case (id -> factory(device) -> (op overload, args)) through
    torch.library.opcheck (schema, fake kernel, autograd registration, dispatch) on each device."""

    @pytest.mark.parametrize("make_case", list(cases.values()), ids=list(cases))
    def test_opcheck(make_case, device):
        op, args = make_case(device)
        torch.library.opcheck(op, args)

    return test_opcheck


@contextlib.contextmanager
def scratch_elems(elems):
    """The fisher_accum kernels' per-chunk scratch budget set to `elems` elements within the block (default
    2^22), so that small inputs cross chunk boundaries."""
    from fisherext import _C

    previous = _C._set_scratch_elems(elems)
    try:
        yield
    finally:
        _C._set_scratch_elems(previous)


def randn(shape, dtype, device, seed, scale=1.0):
    """Seeded normal entries (drawn in float64 on the CPU, then converted), the same on every device."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype=dtype, device=device)


def t(*shape, dtype=torch.float32):
    """An unseeded CPU tensor for the bad-input cases (values do not matter there)."""
    return torch.randn(*shape, dtype=dtype)


LOW = [torch.float16, torch.bfloat16]
