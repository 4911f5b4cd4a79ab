r"""Finite-difference Fisher measures by parameter perturbation, with bitwise restore.

For a classifier with softmax outputs :math:`p(\theta)` and a direction :math:`v` in parameter space,

.. math:: v^\top F_n v = \sum_c \frac{d p_c}{d\varepsilon}\,\frac{d \log p_c}{d\varepsilon}\Big|_{\varepsilon=0}
          \approx \sum_c \frac{(\log p_c^+ - \log p_c^-)(p_c^+ - p_c^-)}{(2\varepsilon)^2},
          \qquad p^\pm = p(\theta \pm \varepsilon v)

(the true Fisher of input n, central differences, error :math:`O(\varepsilon^2)`), and
:math:`\mathrm{KL}(p(\theta)\,\|\,p(\theta+\varepsilon v)) = \tfrac12 \varepsilon^2 v^\top F v + O(\varepsilon^3)`.
The Fisher information sensitivity of input coordinate i (Martin & Elster) is

.. math:: \mathrm{FIS}_i = \sum_c \partial_{x_i}\Big(\frac{d p_c}{d\varepsilon}\Big)\,
          \partial_{x_i}\Big(\frac{d \log p_c}{d\varepsilon}\Big).

Vectors: one direction is a flat vector [P] over the selected parameters (in ``named_parameters()``
order); K shared directions are the columns of [P, K] (``fd_quadratic_directions``); one direction per
input n is a row of [N, P] and is only accepted with ``per_input=True``. Per-input results are [N] for
one direction and [N, K] for K.

All parameters move at once along the whole of v (``block=True`` reproduces the per-tensor variant that
sums only the diagonal blocks, for comparison). Every routine restores the parameters by copying them
back from a saved buffer, bit for bit, also when the forward pass raises.

Precision. A central difference of step :math:`\varepsilon` has the relative error
:math:`c_3\varepsilon^2 + c_r\, u/\varepsilon` (truncation plus the cancellation of two values rounded
with unit roundoff u), smallest, about :math:`u^{2/3}`, near :math:`\varepsilon = u^{1/3}`; and the
parameters themselves move by :math:`\mathrm{fl}(\theta + \varepsilon v) - \theta`, which differs from
:math:`\varepsilon v` wherever :math:`\varepsilon |v_i|` is not large against the spacing of
:math:`\theta_i` (below half of it the step rounds away). Every finite-difference routine (and
:func:`perturbed`, whose step is not a difference, for the second rule only) warns with a
:class:`~fisherext.PrecisionWarning` (``fisherext._core.precision.check_step``) when

1. the cancellation error exceeds ten times the best the computation's dtype allows,
   :math:`\varepsilon < u^{1/3} / 10` with u that of the lowest precision the forward runs in (the
   parameters', or autocast's): bfloat16 below 0.016, float16 below 0.0079, float32 below 3.9e-4,
   float64 below 4.8e-7 (so the float32 default 1e-3, within 4× of the optimum, does not warn); for
   forward differences (error :math:`c_2\varepsilon + c_r u/\varepsilon`, best :math:`\sqrt u`)
   :math:`\varepsilon < \sqrt u / 10`; or
2. the realized step is off by more than 10% of the step,
   :math:`\|\mathrm{fl}(\theta + \varepsilon v) - \theta - \varepsilon v\| > 0.1\,\|\varepsilon v\|`
   for some direction, the rounding done in the parameters' dtype exactly as the perturbation does it
   (a float16 or bfloat16 model at the default 1e-3 moves most of its weights by 0 or by a whole
   spacing: 100%).

Either way the result is dominated by rounding: the first costs at least 10× the achievable accuracy,
the second an error of the order of its 10% in the direction actually differenced. The results of the
measures are in float32 for float16/bfloat16 logits (``fisherext.ops.fd_fisher_reduce``).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from .. import ops
from .._core.checks import all_finite, check_choice, check_eps, check_inputs, check_vectors
from .._core.conventions import check_deterministic, checked_output, curvature_forward
from .._core.entry import entry_point
from .._core.params import resolve_params
from .._core.perturbation import ParameterPerturbation
from .._core.precision import check_step
from .._core.types import Params

SCHEMES = ("central", "forward")
STRATEGIES = ("auto", "vmap", "in_place", "linear")
# Inputs up to which "auto" picks the "linear" strategy on CPU (it doubles the arithmetic).
_LINEAR_MAX_INPUTS = 16

def split_vector(v, selected):
    # v may be a column of a matrix: made contiguous so that each piece is a view of the parameter's shape
    return [t.view_as(p).to(p.dtype) for t, (_, p) in zip(v.contiguous().split([p.numel() for _, p in selected]),
                                                          selected)]


def moved_params(selected, v, step):
    """{name: θ + step·v} as new tensors, for functional_call (under vmap: one model per row of v)."""
    return {n: p.detach() + step * t for (n, p), t in zip(selected, split_vector(v, selected))}


def check_directions(v, selected, n: int, per_input, shared: str | None = None) -> torch.Tensor:
    """The vector rule of the per-input measures: ``v`` is one direction [P], or with ``per_input=True``
    one direction per input, rows [n, P]; a 2-D ``v`` without it is refused, saying how to pass each
    case (K shared directions go as the columns [P, K] of the entry point ``shared`` where there is one)."""
    if not isinstance(per_input, bool):
        raise TypeError(f"per_input: expected a bool, got {type(per_input).__name__}")
    P = sum(p.numel() for _, p in selected)
    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
    if per_input:
        if shape is not None and shape != (n, P):
            raise ValueError(f"v: per_input=True takes one direction per input as the rows of [N, P] = [{n}, {P}], "
                             f"got shape {shape}")
        return check_vectors(v, selected, n)
    if shape is not None and len(shape) == 2:
        several = (f"K shared directions go as the columns [{P}, K] to fisherext.{shared}" if shared
                   else "K shared directions take one call each")
        raise ValueError(f"v: is 2-D, shape {shape}, without per_input=True: one direction is [{P}]; {several}; "
                         f"one direction per input is the rows [N, P] = [{n}, {P}] with per_input=True")
    return check_vectors(v, selected)


@entry_point
def perturbed(model: nn.Module, v: torch.Tensor, eps: float, *, params: Params = None):
    r"""A context manager in which the selected parameters are :math:`\theta + \varepsilon v`.

    On exit (also on an exception) the parameters are restored bit for bit, copied back from a saved
    buffer (never by :math:`+\varepsilon v - \varepsilon v` arithmetic). The block runs the user's own
    forward passes, so no forward-pass convention is imposed: a model in train mode with dropout is
    allowed (a SAM-style step trains at the perturbed point), and the restore does not depend on the mode.

    Args:
        model: the model whose parameters move.
        v: one direction [P], flat over the selected parameters in ``named_parameters()`` order.
        eps: the step :math:`\varepsilon` (any finite number; 0 and negative steps are allowed).
        params: the parameters to move (default: all that require grad), as names, modules or tensors.

    Returns:
        A context manager yielding ``model``.

    Raises:
        TypeError: ``v`` is not a floating-point tensor.
        ValueError: ``v`` has the wrong shape, device or non-finite entries, or ``eps`` is not finite;
            checked when ``perturbed`` is called, before anything moves.

    Warns:
        PrecisionWarning: when the parameters' dtype does not resolve the step, i.e. the realized step
            :math:`\mathrm{fl}(\theta + \varepsilon v) - \theta` is off from :math:`\varepsilon v` by more
            than 10% (the second rule of ``check_step``).
    """
    selected = resolve_params(model, params)
    eps = check_eps(eps, positive=False)
    v = check_vectors(v, selected).contiguous()
    check_step("perturbed", selected, v, eps, order=None)
    return _perturbed(model, ParameterPerturbation(selected), v, eps)


@contextmanager
def _perturbed(model, state, v, eps):
    try:
        state.set(v, eps)
        yield model
    finally:
        state.restore()


def as_logits(out) -> torch.Tensor:
    """A model's output as logits [N, C]: a tensor (else the TypeError of the output rule) with two
    dimensions. Shapes only, so it also runs under vmap; finiteness is checked on the results."""
    checked_output(out, finite=False)
    if out.dim() != 2:
        raise ValueError(f"model: expected outputs of shape [N, C], got {tuple(out.shape)}")
    return out


def check_finite_logits(*outputs):
    """The output rule on logits [N, C] or stacks of them [K, N, C] (K perturbed models): one pass and one
    host sync when all are finite; otherwise the first non-finite output names its input n."""
    if not all_finite(outputs):
        for out in outputs:
            checked_output(out if out.dim() == 2 else out.transpose(0, 1))


def _per_input_logits(model, selected, x, V, eps):
    """Logits of input n at θ + eps·V[n], for every n: one batched forward over stacked parameters."""
    def one(x_n, v_n):
        return as_logits(functional_call(model, moved_params(selected, v_n, eps), (x_n.unsqueeze(0),))).squeeze(0)

    return vmap(one)(x, V)


@entry_point
def fd_quadratic(model: nn.Module, x: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-3,
                 scheme: str = "central", block: bool = False, per_input: bool = False,
                 params: Params = None) -> torch.Tensor:
    r"""Finite-difference estimate of the true-Fisher quadratic form :math:`v^\top F_n v` of every input.

    .. math:: v^\top F_n v \approx \sum_c \frac{(\log p_c^+ - \log p_c^-)(p_c^+ - p_c^-)}{(2\varepsilon)^2},
              \qquad p^\pm = \mathrm{softmax}\, f(x_n; \theta \pm \varepsilon v),

    with :math:`F_n = \mathbb E_{y\sim p(y|x_n)}[\nabla_\theta\log p(y|x_n)\,\nabla_\theta\log p(y|x_n)^\top]`
    the Fisher of input n alone (no mean over inputs: average the result for
    :math:`v^\top F v`, :math:`F = \frac1N\sum_n F_n`). ``scheme="forward"`` compares
    :math:`p(\theta + \varepsilon v)` with :math:`p(\theta)` instead (the same formula with
    :math:`2\varepsilon` replaced by :math:`\varepsilon`).

    Args:
        model: a classifier returning logits [N, C].
        x: the inputs [N, ...].
        v: one direction [P] shared by all inputs, flat over the selected parameters in
            ``named_parameters()`` order; with ``per_input=True``, one direction per input as the rows
            of [N, P] (evaluated in one batched forward over stacked parameters). K shared directions
            go as the columns [P, K] to :func:`fd_quadratic_directions`.
        eps: the finite-difference step :math:`\varepsilon > 0`.
        scheme: ``"central"`` (error :math:`O(\varepsilon^2)`) or ``"forward"`` (:math:`O(\varepsilon)`).
        block: perturb one parameter tensor at a time and sum the results: the block-diagonal
            approximation :math:`\sum_t v_t^\top F_n[t, t]\, v_t` of seed 001, kept for comparison only.
        per_input: whether ``v`` holds one direction per input (rows [N, P]).
        params: the parameters v lives on (default: all that require grad), as names, modules or tensors.

    Returns:
        Tensor [N]: :math:`v^\top F_n v` (or :math:`v_n^\top F_n v_n`) for every input n.

    Raises:
        TypeError: ``v`` or ``x`` is not a tensor of a usable dtype, or the model does not return a tensor.
        ValueError: a 2-D ``v`` without ``per_input=True`` (the message says how to pass each case), a
            ``v`` of the wrong shape, device or with non-finite entries, a bad ``eps`` or ``scheme``, a
            non-deterministic model, or non-finite outputs. Checked before the model runs; the
            parameters are restored bit for bit in every case.

    Warns:
        PrecisionWarning: ``eps`` below what the dtypes resolve (the module's precision rules), e.g. the default
            1e-3 for float16 or bfloat16 parameters.

    The forward passes follow the curvature conventions stated in :mod:`fisherext.perturb`; the result is
    in float32 for float16/bfloat16 logits, else in their dtype.
    """
    check_choice("scheme", scheme, SCHEMES)
    eps = check_eps(eps)
    check_deterministic(model)
    check_inputs(model, x)
    selected = resolve_params(model, params)
    v = check_directions(v, selected, x.shape[0], per_input, shared="fd_quadratic_directions")
    check_step("fd_quadratic", selected, v, eps, order=2 if scheme == "central" else 1)
    if block:
        total = 0
        offset = 0
        for name, p in selected:
            part = torch.zeros_like(v)
            part[..., offset:offset + p.numel()] = v[..., offset:offset + p.numel()]
            total = total + _quadratic(model, selected, x, part, eps, scheme, per_input)
            offset += p.numel()
        return total
    return _quadratic(model, selected, x, v, eps, scheme, per_input)


def _quadratic(model, selected, x, v, eps, scheme, per_input) -> torch.Tensor:
    """fd_quadratic's work on checked arguments, along the whole of v."""
    with curvature_forward(model), torch.no_grad():  # entered before any parameter moves
        if per_input:
            plus = _per_input_logits(model, selected, x, v, eps)
            other = _per_input_logits(model, selected, x, v, -eps) if scheme == "central" else None
        else:
            v = v.contiguous()
            state = ParameterPerturbation(selected)
            try:
                state.set(v, eps)
                plus = as_logits(model(x))
                if scheme == "central":
                    state.set(v, -eps)
                    other = as_logits(model(x))
            finally:
                state.restore()
        if scheme == "forward":
            other = as_logits(model(x))
    check_finite_logits(plus, other)
    # forward differences: (Δ log p)(Δ p)/ε² is the central formula with half the step
    quad, _, _ = ops.fd_fisher_reduce(plus, other, None, eps if scheme == "central" else eps / 2)
    return quad


def _direction_rows(V, selected) -> torch.Tensor:
    """K directions as the columns of V [P, K] (floating point, finite), as rows [K, P] for the strategies:
    ``V.T`` made contiguous, which copies nothing when V is itself the transpose of a contiguous [K, P]."""
    P = sum(p.numel() for _, p in selected)
    if not isinstance(V, torch.Tensor) or not V.is_floating_point() or V.dim() != 2 or V.shape[0] != P:
        shape = tuple(getattr(V, "shape", ()))
        hint = ""
        if len(shape) == 2 and shape[1] == P:
            hint = f" (directions as rows [K, {P}] are the earlier layout: pass V.T)"
        elif shape == (P,):
            hint = " (one direction goes to fisherext.fd_quadratic, or as V[:, None])"
        raise ValueError(f"V: expected the K directions as the columns of a floating-point tensor [{P}, K], got "
                         f"{getattr(V, 'dtype', type(V).__name__)} {shape}{hint}")
    rows = V.T.contiguous()
    if not all_finite([rows]):  # on the contiguous rows: flattening the columns of a transposed view would copy
        raise ValueError("V: has non-finite entries")
    return rows


@entry_point
def fd_quadratic_directions(model: nn.Module, x: torch.Tensor, V: torch.Tensor, *, eps: float = 1e-3,
                            params: Params = None, strategy: str = "auto") -> torch.Tensor:
    r"""Central-difference true-Fisher quadratic forms :math:`v_k^\top F_n v_k` of K shared directions.

    .. math:: v_k^\top F_n v_k \approx \sum_c \frac{(\log p_{kc}^+ - \log p_{kc}^-)(p_{kc}^+ - p_{kc}^-)}
              {(2\varepsilon)^2}, \qquad p_k^\pm = \mathrm{softmax}\, f(x_n; \theta \pm \varepsilon v_k),

    for every input n and every column :math:`v_k` of ``V``, with :math:`F_n` the Fisher of input n alone
    (as in :func:`fd_quadratic`, which column k of the result equals), from one fused reduction over all
    K·N rows. How the 2K perturbed models run:

    - ``"vmap"``: the K models at :math:`\theta + \varepsilon v_k` as one forward (``functional_call``
      under ``vmap`` over stacked parameters, K copies of them in memory), likewise the K at
      :math:`\theta - \varepsilon v_k`.
    - ``"in_place"``: 2K forwards with the parameters moved in place by the multi-tensor kernel from one
      saved copy, restored bit for bit at the end (also on an exception).
    - ``"linear"``: one forward of the 2K·N replicated inputs in which every nn.Linear owning selected
      parameters adds :math:`\pm\varepsilon (V_k h + c_k)` to its output on the rows of direction k,
      since :math:`(W \pm \varepsilon V_k) h + b \pm \varepsilon c_k` is exactly that: no perturbed copy of
      the parameters is made, and W meets all rows in one GEMM. Only when every selected parameter is
      the weight or bias of an nn.Linear. The batch axis of each Linear input is established, not
      assumed: the input must derive from the replicated inputs (every torch op of the forward is
      watched) and have exactly one axis of size 2K·N other than the feature axis (a sequence-first
      [T, 2K·N, D] input works). A Linear input without one (a buffer broadcast over the batch, rows
      merged with other axes, another axis of the same size), or a selected parameter used outside its
      nn.Linear (e.g. ``F.linear(h, self.fc.weight)``), sends the call to "in_place" instead. A model
      that reinterprets rows of the batch as another axis by a bare reshape (mixing samples) is not
      detected. It does twice the arithmetic of the others, so it pays for few inputs.
    - ``"auto"`` (default): "vmap" on CUDA, where a small model's forwards are launch-bound; on CPU
      "linear" for at most 16 inputs where the model allows it, else "in_place" (measured on the
      85k-parameter digits MLP with K = 16, in one process: at N = 8 inputs linear 2.7 ms, vmap 4.3 ms,
      in place 5.4 ms, 16 separate ``fd_quadratic`` calls 10.4 ms; at N = 256 in place 30 ms, vmap 39 ms,
      linear 61 ms).

    Args:
        model: a classifier returning logits [N, C].
        x: the inputs [N, ...].
        V: the K directions as the columns of [P, K], flat over the selected parameters in
            ``named_parameters()`` order. The strategies work on rows: ``V.T`` made contiguous, a copy
            only when ``V`` is not already the transpose of a contiguous [K, P] tensor.
        eps: the finite-difference step :math:`\varepsilon > 0`.
        params: the parameters V lives on (default: all that require grad), as names, modules or tensors.
        strategy: ``"auto"``, ``"vmap"``, ``"in_place"`` or ``"linear"`` (above); all give the same
            values up to rounding.

    Returns:
        Tensor [N, K]: entry (n, k) is :math:`v_k^\top F_n v_k`.

    Raises:
        ValueError: ``V`` is not a finite floating-point [P, K] (directions as rows [K, P], the earlier
            layout, are named as such), a bad ``eps`` or ``strategy``, ``"linear"`` on a model whose
            selected parameters are not all nn.Linear weights and biases, a non-deterministic model, or
            non-finite outputs. Checked before the model runs; the parameters are restored bit for bit in
            every case.
        TypeError: ``x`` is not a tensor of a usable dtype, or the model does not return a tensor.

    Warns:
        PrecisionWarning: ``eps`` below what the dtypes resolve (the module's precision rules; for the
            "linear" strategy, which perturbs the Linear outputs, not the parameters, the rule is the same).

    The forward passes follow the curvature conventions stated in :mod:`fisherext.perturb`; the result is
    in float32 for float16/bfloat16 logits, else in their dtype.
    """
    check_choice("strategy", strategy, STRATEGIES)
    eps = check_eps(eps)
    check_deterministic(model)
    check_inputs(model, x)
    selected = resolve_params(model, params)
    rows = _direction_rows(V, selected)
    check_step("fd_quadratic_directions", selected, rows, eps)
    owners = _linear_owners(model, selected)
    if strategy == "auto":
        if selected[0][1].device.type == "cuda":
            strategy = "vmap"
        else:
            strategy = "linear" if owners is not None and x.shape[0] <= _LINEAR_MAX_INPUTS else "in_place"
    if strategy == "linear" and owners is None:
        raise ValueError("strategy: 'linear' needs every selected parameter to be the weight or bias of an "
                         "nn.Linear; use 'in_place' or 'vmap'")
    with curvature_forward(model), torch.no_grad():
        logits = _linear_logits(model, selected, owners, x, rows, eps) if strategy == "linear" else None
        if logits is None:  # not "linear", or the forward did not allow it (see the docstring)
            logits = (_stacked_logits if strategy == "vmap" else _in_place_logits)(model, selected, x, rows, eps)
    plus, minus = logits
    check_finite_logits(plus, minus)
    K, N = rows.shape[0], x.shape[0]
    quad, _, _ = ops.fd_fisher_reduce(plus.reshape(K * N, -1), minus.reshape(K * N, -1), None, eps)
    return quad.view(K, N).T.contiguous()  # N·K values: the per-input axis first


def _linear_owners(model, selected) -> dict[nn.Module, set[str]] | None:
    """For the "linear" strategy: the modules owning selected parameters, each with the names it owns
    ("weight", "bias"), when all are plain nn.Linear (their own forward); None otherwise."""
    ids = {id(p) for _, p in selected}
    owners: dict[nn.Module, set[str]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) in ids:
                if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
                    return None
                owners.setdefault(module, set()).add(attr)
    return owners


def _tensors(values):
    """The tensors among ``values``, directly or in a list/tuple (how torch ops take them: cat, stack)."""
    for a in values:
        if type(a) in (list, tuple):
            yield from (b for b in a if isinstance(b, torch.Tensor))
        elif isinstance(a, torch.Tensor):
            yield a


class _LinearWatch(TorchFunctionMode):
    """While the "linear" strategy's forward runs: which tensors derive from the replicated inputs (an op
    with such an argument makes its outputs so; held by weak reference, so activations are freed as
    usual), and whether a selected parameter is used while no owning nn.Linear's forward runs (``depth``
    counts those in progress). ``fallback`` says why the strategy cannot be used, once it cannot."""

    def __init__(self, watched: set[int], inputs: torch.Tensor):
        super().__init__()
        self.watched, self.depth, self.fallback = watched, 0, None
        self.derived: dict[int, weakref.ref] = {}
        self.mark(inputs)

    def mark(self, t: torch.Tensor):
        self.derived[id(t)] = weakref.ref(t)

    def is_derived(self, t) -> bool:
        ref = self.derived.get(id(t))
        return ref is not None and ref() is t  # an id may be reused by a tensor allocated later

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.fallback is None:
            derived = False
            for a in _tensors((*args, *kwargs.values())):
                if not self.depth and id(a) in self.watched:
                    self.fallback = "a selected parameter is used outside its nn.Linear"
                    return out
                derived = derived or self.is_derived(a)
            if derived:
                for t in _tensors(out if type(out) in (list, tuple) else (out,)):
                    self.mark(t)
        return out


def _batch_axis(watch: _LinearWatch, a, rows: int) -> int | None:
    """The axis of the Linear input ``a`` holding the ``rows`` replicated inputs, or None (then
    ``watch.fallback`` says why): ``a`` must derive from the inputs and have exactly one axis of that size
    other than the feature axis."""
    if not watch.is_derived(a):
        watch.fallback = "a Linear input does not derive from the inputs"
        return None
    axes = [d for d in range(a.dim() - 1) if a.shape[d] == rows]
    if len(axes) != 1:
        watch.fallback = f"a Linear input {tuple(a.shape)} has {len(axes)} axes of the batch size {rows}"
        return None
    return axes[0]


def _linear_logits(model, selected, owners, x, V, eps):
    """Logits [K, N, C] at θ ± εv_k, v_k the rows of V [K, P], by the "linear" strategy (see
    fd_quadratic_directions), or None when the forward did not allow it (a Linear input without an
    established batch axis, or a selected parameter used outside its nn.Linear): those rows would be wrong."""
    K, N = V.shape[0], x.shape[0]
    dtype = selected[0][1].dtype
    sizes = [p.numel() for _, p in selected]
    pieces = {id(p): t.reshape(K, *p.shape) for (_, p), t in zip(selected, V.to(dtype).split(sizes, dim=1))}
    steps = torch.tensor([eps, -eps], dtype=dtype, device=V.device)
    inputs = x.unsqueeze(0).expand(2 * K, *x.shape).reshape(2 * K * N, *x.shape[1:])
    watch = _LinearWatch(set(pieces), inputs)

    def enter(module, args):
        watch.depth += 1

    def perturb(module, args, out):
        watch.depth -= 1
        axis = None if watch.fallback else _batch_axis(watch, args[0], 2 * K * N)
        if axis is None:
            return out
        # Rows are ordered (direction, sign, input): with the batch axis first, the rows of direction k,
        # both signs (and all other positions), are one block, so V_k meets them in one batched GEMM.
        a = args[0].movedim(axis, 0)
        O = out.shape[-1]
        span = a.numel() // (2 * K * a.shape[-1])  # inputs times positions per (direction, sign)
        delta = None
        if "weight" in owners[module]:
            delta = torch.bmm(a.reshape(K, 2 * span, -1), pieces[id(module.weight)].transpose(1, 2))
        if "bias" in owners[module]:
            bias = pieces[id(module.bias)][:, None, :]
            delta = bias.expand(K, 2 * span, O) if delta is None else delta + bias
        delta = (delta.reshape(K, 2, span * O) * steps.view(1, 2, 1)).view(*a.shape[:-1], O)
        return out + delta.movedim(0, axis)

    handles = []
    try:
        for module in owners:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(perturb))
        with watch:
            out = as_logits(model(inputs))
    finally:
        for handle in handles:
            handle.remove()
    if watch.fallback:
        return None
    out = out.view(K, 2, N, -1)
    return out[:, 0], out[:, 1]


def _stacked_logits(model, selected, x, V, eps):
    """Logits [K, N, C] at θ ± εv_k, v_k the rows of V [K, P]: one vmapped forward per sign over stacked
    parameters."""
    def logits_at(v, step):
        return as_logits(functional_call(model, moved_params(selected, v, step), (x,)))

    return vmap(lambda v: logits_at(v, eps))(V), vmap(lambda v: logits_at(v, -eps))(V)


def _in_place_logits(model, selected, x, V, eps):
    """Logits [K, N, C] at θ ± εv_k, v_k the rows of V [K, P]: 2K forwards, the parameters set by the
    kernel from one saved copy."""
    state = ParameterPerturbation(selected)
    plus, minus = [], []
    try:
        for v in V:
            state.set(v, eps)
            plus.append(as_logits(model(x)))
            state.set(v, -eps)
            minus.append(as_logits(model(x)))
    finally:
        state.restore()
    return torch.stack(plus), torch.stack(minus)


