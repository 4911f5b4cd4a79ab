r"""How fisherext runs a model's forward pass for curvature: the rules every product and measure follows.

Per-sample curvature (a Hessian, GGN or Fisher of :math:`\frac1N\sum_n \ell(f(x_n;\theta), y_n)`, a
finite difference of it, an influence) presumes that :math:`f(x_n;\theta)` is one fixed function of
the sample and the parameters. Six rules make that so, the same for reverse mode, forward mode,
double backprop and finite differences:

1. **Deterministic, per sample** (``check_deterministic``). A forward pass may depend neither on the
   other samples of its batch nor on randomness: BatchNorm normalizing with batch statistics (train
   mode, or ``track_running_stats=False``), and stochastic modules in train mode (the dropout family
   with p > 0, ``nn.RReLU``, ``nn.MultiheadAttention(dropout > 0)``, recurrent layers with dropout
   between layers) are refused with the module's qualified name: call ``model.eval()``.
   ``nn.FractionalMaxPool2d/3d`` draws random pooling regions in any mode and is refused unless its
   ``_random_samples`` are fixed.
2. **padding_idx is a constant** (``padding_as_constant``), PyTorch's own convention: an embedding
   lookup with ``padding_idx`` returns, at the padding positions, the padding row as a constant: no
   gradient, no tangent, no second derivative flows through that lookup (other uses of a tied weight
   are unaffected). Left alone, forward-mode AD *does* differentiate the padding row while reverse mode
   zeroes its gradient, so a GGN product by a dual forward and one by reverse mode would disagree (by
   3-6 % on a model with ``nn.Embedding(padding_idx=0)``), and the double-backprop Hessian would not be
   symmetric. For finite differences the constant is the unperturbed row: the mode snapshots the
   padding rows of the model's ``nn.Embedding`` modules when it is entered, before any perturbation.
3. **Attention has second derivatives** (``second_order_attention``): torch's fused attention kernels
   (flash / memory-efficient, the CPU default) have neither a double backward nor forward-mode AD, nor
   do the native fast paths that ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take in
   eval mode when no gradient is recorded (a forward-mode JVP under ``no_grad``), so passes run
   ``F.scaled_dot_product_attention`` with the math kernel and the fast paths off.
4. **Outputs are finite tensors** (``checked_output``): a model returning a tuple, a dict or anything
   else is a TypeError that says what it returned; a non-finite output is a ValueError naming the sample.
5. **Recurrent layers run step by step** (``stepwise_recurrent``): nn.RNN/LSTM/GRU as per-step
   ``F.linear`` calls (``fisherext._core.recurrent``), equal to torch's fused kernels to rounding, which write
   their state in place and so cannot run under a per-sample ``vmap``.
6. **A compiled model runs its original module, eagerly** (``original_forward``): for ``compiled =
   torch.compile(model)`` every forward is ``model``'s own, hooks and all; TorchDynamo never traces it
   (``fisherext._core.params.original_module`` says why). The parameters are shared, so the curvature of
   ``compiled`` is that of ``model``.

``curvature_forward(model)`` enters rules 2, 3, 5 and 6 around a computation; callers check rule 1 before
any work and rule 4 on every batch's outputs.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from .recurrent import STEPWISE
from .checks import all_finite
from .params import is_compiled, original_module

_FIX = "call model.eval()"


def _nondeterminism(module: nn.Module) -> tuple[str, str] | None:
    """(why the module's forward depends on the batch or on randomness now, the remedy), or None."""
    if isinstance(module, (nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)) and module._random_samples is None:
        return "draws random pooling regions at every forward pass, in any mode", "fix them with _random_samples"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.track_running_stats:
            return ("has no running statistics (track_running_stats=False), so it normalizes with the "
                    "statistics of the batch, which couples its samples",
                    "build it with track_running_stats=True and " + _FIX)
        if module.training:
            return "normalizes with the statistics of the batch in train mode, which couples its samples", _FIX
        return None
    if not module.training:
        return None
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
        return f"drops activations at random in train mode (p={module.p})", _FIX
    if isinstance(module, nn.RReLU) and module.lower < module.upper:
        return "draws random negative slopes in train mode", _FIX
    if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
        return f"drops attention weights at random in train mode (dropout={module.dropout})", _FIX
    if isinstance(module, nn.RNNBase) and module.dropout > 0 and module.num_layers > 1:
        return f"drops activations between layers at random in train mode (dropout={module.dropout})", _FIX
    return None


def check_deterministic(model: nn.Module) -> None:
    """Refuses a model whose forward pass depends on the other samples of the batch or on randomness
    (rule 1 of the module docstring): ValueError naming the first such module and the remedy (named as in
    the original module of a compiled model)."""
    for name, module in original_module(model).named_modules():
        found = _nondeterminism(module)
        if found is not None:
            why, fix = found
            where = f"module {name!r}" if name else "the model itself"
            raise ValueError(f"model: {where} ({type(module).__name__}) {why}, so its per-sample curvature is "
                             f"undefined; {fix}")


def _lookup(input, weight, padding_idx=None, *args, **kwargs):
    """F.embedding's first three arguments, however they were passed."""
    return input, weight, padding_idx


class _PaddingAsConstant(TorchFunctionMode):
    """Rule 2: F.embedding with padding_idx returns the padding row as a constant at padding positions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.embeddings = padded_embeddings(model)
        self.rows: list[tuple[nn.Embedding, torch.Tensor]] = []

    def __enter__(self):
        # Snapshot before any perturbation: a finite difference then sees the unperturbed padding row.
        self.rows = [(m, m.weight.detach()[m.padding_idx].clone()) for m in self.embeddings]
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.embedding:
            input, weight, padding_idx = _lookup(*args, **kwargs)
            if padding_idx is not None:
                index = padding_idx if padding_idx >= 0 else weight.shape[0] + padding_idx
                out = torch.where((input == index).unsqueeze(-1), self._row(weight, index), out)
        return out

    def _row(self, weight, index):
        # Under functional_call (and vmap over it) the module's weight attribute *is* the tensor passed
        # in, so identity finds the module whether its parameters were swapped or moved in place.
        for module, row in self.rows:
            if module.weight is weight and module.padding_idx == index:
                return row
        return weight[index].detach()


def padded_embeddings(model: nn.Module) -> list[nn.Embedding]:
    """The model's nn.Embedding modules that have a padding_idx."""
    return [m for m in model.modules() if isinstance(m, nn.Embedding) and m.padding_idx is not None]


def padding_as_constant(model: nn.Module) -> TorchFunctionMode:
    """Rule 2 as a context manager (a ``TorchFunctionMode``): inside it every ``F.embedding`` call with a
    ``padding_idx`` returns, at the padding positions, a constant: the padding row of the model's
    ``nn.Embedding`` as it was when the context was entered (the current row, detached, for a weight
    that is no nn.Embedding's). Works under ``functional_call``, ``vmap``, ``jvp``, forward-mode dual
    levels and double backprop."""
    return _PaddingAsConstant(model)


@contextmanager
def second_order_attention():
    """Rule 3: ``F.scaled_dot_product_attention`` by the math kernel, which has a double backward and
    forward-mode AD (the fused kernels have neither), and the native MultiheadAttention /
    TransformerEncoderLayer fast paths off (no forward-mode AD either); both restored on exit."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


class _StepwiseRecurrent(TorchFunctionMode):
    """Rule 5: the fused recurrent calls run step by step (``fisherext._core.recurrent``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        stepwise = STEPWISE.get(func)
        return (stepwise or func)(*args, **(kwargs or {}))


def stepwise_recurrent() -> TorchFunctionMode:
    """Rule 5 as a context manager: nn.RNN/LSTM/GRU run as per-step ``F.linear`` calls, which ``vmap``
    batches (torch's fused kernels write their state in place, which a per-sample vmap cannot)."""
    return _StepwiseRecurrent()


# What the compiled wrapper takes from its original module inside ``original_forward``: its call, and the
# names of its tensors, which ``torch.func.functional_call`` reads to reparametrize tied tensors together.
_STAND_IN = ("forward", "named_parameters", "named_buffers")


@contextmanager
def original_forward(model: nn.Module):
    """Rule 6 as a context manager: inside it, a model compiled by ``torch.compile(model)`` stands in for the
    original module. Calling it runs the original's ``__call__`` (its hooks, then its forward) eagerly, and
    its ``named_parameters``/``named_buffers`` are the original's, so that ``functional_call`` on it with
    the original's names (those of ``resolve_params``) moves tied tensors together (without them, a weight
    shared by two submodules would be replaced under one name only). On exit the wrapper is as it was,
    also after an exception. Nothing happens for a module that is no such wrapper.

    The wrapper's compiled forward is set aside for the duration rather than dynamo switched off
    (``torch.compiler.set_stance("force_eager")``): that would switch off every compiled function inside
    too, among them the graphs of the ``compile=`` option of the curvature products. Like a parameter
    perturbation, it changes the wrapper object for the duration: another thread calling the compiled
    model meanwhile runs it eagerly (same values). Modules compiled in place (``module.compile()``) run
    their eager ``__call__`` inside too."""
    with _uncompiled_calls(original_module(model)), (_wrapper_stand_in(model) if is_compiled(model) else nullcontext()):
        yield


@contextmanager
def _uncompiled_calls(model: nn.Module):
    """Modules compiled in place (``module.compile()``, which compiles the module's own ``__call__``) run
    their eager call inside: the compiled call is set aside on every such submodule and put back on exit."""
    compiled = [m for m in model.modules() if vars(m).get("_compiled_call_impl") is not None]
    saved = [vars(m).pop("_compiled_call_impl") for m in compiled]
    try:
        yield
    finally:
        for m, call in zip(compiled, saved):
            m._compiled_call_impl = call


@contextmanager
def _wrapper_stand_in(model: nn.Module):
    """The torch.compile wrapper ``model`` takes its original module's call and names (``original_forward``)."""
    state, original = vars(model), model._orig_mod
    missing = object()
    saved = {attr: state.get(attr, missing) for attr in _STAND_IN}
    # the compiled forward is dynamo running this very call of the original module
    state.update({attr: getattr(original, "__call__" if attr == "forward" else attr) for attr in _STAND_IN})
    try:
        yield
    finally:
        for attr, value in saved.items():
            if value is missing:
                state.pop(attr, None)
            else:
                state[attr] = value


@contextmanager
def curvature_forward(model: nn.Module):
    """Rules 2, 3, 5 and 6 around a computation's forward passes; enter it before any parameter perturbation.

    The padding mode is entered only when the model holds an ``nn.Embedding`` with ``padding_idx``: a
    ``TorchFunctionMode`` routes every torch call through Python, which costs time on other models for
    nothing. A bare ``F.embedding(..., padding_idx=)`` in a model without such a module is therefore
    not covered; use an nn.Embedding, or enter ``padding_as_constant`` yourself.
    """
    with ExitStack() as stack:
        stack.enter_context(original_forward(model))
        model = original_module(model)
        stack.enter_context(second_order_attention())
        if padded_embeddings(model):
            stack.enter_context(padding_as_constant(model))
        if any(isinstance(m, nn.RNNBase) for m in model.modules()):
            stack.enter_context(stepwise_recurrent())
        yield


def _describe(value) -> str:
    if isinstance(value, dict):
        return f"a {type(value).__name__} with keys {', '.join(map(repr, value))}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def checked_output(out, offset: int = 0, *, finite: bool = True) -> torch.Tensor:
    """Rule 4: ``out`` when it is a tensor with finite entries. TypeError naming ``model`` when it is not
    a tensor; ValueError naming ``model`` and the first sample (``offset`` + row) with a non-finite
    output. One min/max pass and one host sync when all is well. ``finite=False`` checks the type only
    (inside vmap, where a data-dependent check cannot run; check the results afterwards)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: returned {_describe(out)}, not a tensor; fisherext differentiates one output "
                        "tensor [N, ...]: wrap the model in a module whose forward returns it (e.g. "
                        "model(x)[0] or model(x)['logits'])")
    if finite and not all_finite([out]):
        if out.dim() == 0:
            raise ValueError("model: the output is not finite")
        bad = (~torch.isfinite(out.detach().reshape(out.shape[0], -1))).any(1).nonzero()
        raise ValueError(f"model: the output for sample {offset + int(bad[0])} is not finite")
    return out


__all__ = ["check_deterministic", "checked_output", "curvature_forward", "original_forward", "padded_embeddings",
           "padding_as_constant", "second_order_attention"]
