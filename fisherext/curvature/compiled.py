r"""The per-batch curvature products compiled by ``torch.compile`` (``compile=`` of ``fisherext.hvp`` and of
the curvature operators).

torch.compile cannot trace ``torch.autograd.grad`` (a graph break), so the compiled products are the
products of :mod:`fisherext.curvature.products` written with ``torch.func`` on ``functional_call``,
each traced into one graph per batch (math and normalization unchanged, results equal to rounding):

- Hessian: reverse over reverse, :math:`H_b V = \partial_\theta(\nabla_\theta L_b^\top V)` by ``vjp``
  of ``grad``, the K vectors of a block as one ``vmap`` over the pullback.
- Gauss-Newton: :math:`G_b V = J^\top \nabla^2_z L_b\, J V`: one ``vjp`` of the model (its forward
  recorded once), :math:`J V = \partial_u (J^\top u)\, V` by a ``vjp`` of that pullback (the double-VJP
  form) under ``vmap``, the output-space Hessian of the loss in the graph (reverse over reverse in z,
  whatever the loss), the pullback under ``vmap``.
- Fisher: the true Fisher with labels is the Gauss-Newton product of the likelihood's mean loss
  :math:`\sum_n \ell_n / d`, times :math:`d / n` (d: the positions that count). The other kinds, and
  the true Fisher without labels, use :math:`\hat\Lambda_n = \sum_m w_m c_{mn} c_{mn}^\top` from the
  cotangents of the kind (``fisherext._core.likelihood.Cotangents``: square-root columns of Λ, residuals
  at the data label or at sampled labels), computed eagerly at the batch's outputs: one more forward
  pass per batch (the likelihood code and its generator stay outside the graph).

Graphs are cached by torch (on the traced function, guarded by the model's structure, the shapes and
dtypes): repeated products of an operator, and hvp calls on the same model, reuse them; a new batch
shape (a ragged last batch) or a new number of vectors per block compiles one more graph.
"""
from __future__ import annotations

import inspect

import torch
from torch.func import functional_call, grad, vjp, vmap

from .._core.conventions import checked_output
from .._core.functional import FunctionalModel
from .._core.likelihood import Cotangents, Likelihood
from . import products

#: torch.compile's keyword arguments that ``compile=True`` means; a dict passed as ``compile=`` updates them.
#: fullgraph: a graph break fails loudly instead of running half the product eagerly; dynamic=False: every
#: batch shape its own static graph (a ragged last batch compiles a second one). Dynamic shapes fail on
#: convolutions' Hessian (torch 2.14.1: the double backward of a convolution under vmap asks for concrete
#: sizes), and torch's automatic dynamic (dynamic=None) turns them on as soon as a second shape is seen.
DEFAULTS = {"fullgraph": True, "dynamic": False}
_NOT_OPTIONS = ("model",)  # torch.compile's positional argument, the function itself
#: The vectors of one vmap in a graph: the graph holds this many copies of the batch's activations (and
#: their tangents); more vectors are split into blocks of this many (a remainder compiles its own graph).
VECTORS_PER_PASS = 16
#: Dynamo's settings while a compiled product runs. recompile_limit: the graphs per kind of product (the
#: Hessian, the output-space products) that one process may compile, one per model structure, loss, dtype
#: and batch shape in use (torch's default, 8, is soon reached by a few models with a ragged last batch).
_DYNAMO_CONFIG = {"recompile_limit": 64}


def compile_options(compile) -> dict | None:
    """``compile=`` as torch.compile's keyword arguments: None for False (eager), DEFAULTS for True, DEFAULTS
    updated by a dict. TypeError/ValueError naming ``compile`` otherwise."""
    if isinstance(compile, bool):
        return dict(DEFAULTS) if compile else None
    if not isinstance(compile, dict):
        raise TypeError(f"compile: expected a bool or a dict of torch.compile keyword arguments, got "
                        f"{type(compile).__name__}")
    known = [k for k in inspect.signature(torch.compile).parameters if k not in _NOT_OPTIONS]
    unknown = [k for k in compile if k not in known]
    if unknown:
        raise ValueError(f"compile: torch.compile has no keyword argument {', '.join(map(repr, unknown))} (it "
                         f"takes {', '.join(known)})")
    return {**DEFAULTS, **compile}


def batch_products(compile):
    """The per-batch products for ``compile=``: the module ``fisherext.curvature.products`` (eager, for
    False) or a :class:`CompiledProducts`; both give ``hessian_batch``, ``ggn_batch``, ``fisher_batch``."""
    options = compile_options(compile)
    return products if options is None else CompiledProducts(options)


# ---- the traced bodies (module-level functions: torch caches their graphs on their code) -------------


def _outputs_at(model, names, x):
    """θ ↦ the model's outputs for x, θ the selected parameters as positional tensors."""
    return lambda *theta: checked_output(functional_call(model, dict(zip(names, theta)), (x,)), finite=False)


def _tangents(V, theta):
    """V [K, P] → one [K, *shape] per parameter."""
    return tuple(t.reshape(V.shape[0], *p.shape) for t, p in zip(V.split([p.numel() for p in theta], 1), theta))


def _flat(rows) -> torch.Tensor:
    return torch.cat([r.reshape(r.shape[0], -1) for r in rows], 1)


def _hessian_graph(model, names, loss, x, y, theta, V):
    """(H_b V [K, P], the outputs) for the batch-mean loss ``loss(f(x), y)``."""
    outputs = _outputs_at(model, names, x)

    def batch_loss(*t):
        out = outputs(*t)
        return loss(out, y), out

    gradient = grad(batch_loss, argnums=tuple(range(len(theta))), has_aux=True)
    _, pullback, out = vjp(gradient, *theta, has_aux=True)
    return _flat(vmap(pullback)(_tangents(V, theta))), out


def _loss_hessian(out, JV, loss, y):
    """∇²_z loss(z, y) at z = out applied to JV [K, *out.shape]: reverse over reverse in z."""
    _, pullback = vjp(grad(lambda z: loss(z, y)), out)
    return vmap(pullback)(JV)[0]


def _output_space_graph(model, names, x, theta, V, factor, args):
    """(Jᵀ factor(out, J V, *args) [K, P], the outputs): the model's forward recorded once by vjp, J V as
    the derivative of the pullback u ↦ Jᵀu in u (the double-VJP form, which reuses that forward; a vmapped
    jvp runs it again: measured 1.26x (digits MLP) and 1.59x (the 32×32 CNN) slower at one vector, 1.54x
    on the CNN at 16 vectors, 1.15x faster only on the MLP at 16)."""
    out, pullback = vjp(_outputs_at(model, names, x), *theta)
    _, transpose = vjp(pullback, torch.zeros_like(out))
    JV = vmap(lambda *t: transpose(t)[0])(*_tangents(V, theta))
    return _flat(vmap(pullback)(factor(out, JV, *args))), out


class CompiledProducts:
    """The per-batch products (``hessian_batch``, ``ggn_batch``, ``fisher_batch``, with the signatures of
    :mod:`fisherext.curvature.products`) compiled by torch.compile with ``options`` (``compile_options``).

    Raises ValueError naming ``compile`` when torch.compile refuses the options or is unavailable here (at
    construction), or cannot trace or compile a product for the model and loss (at the first product).
    """

    def __init__(self, options: dict):
        try:
            self._hessian = torch.compile(_hessian_graph, **options)
            self._output_space = torch.compile(_output_space_graph, **options)
        except (RuntimeError, TypeError, ValueError) as err:  # no dynamo for this Python, mode with options, ...
            raise ValueError(f"compile: torch.compile is unavailable or refused {options}: {err}") from err

    @staticmethod
    def _blocks(fm: FunctionalModel, V: torch.Tensor, offset: int, product) -> tuple[torch.Tensor, torch.Tensor]:
        """``product(theta, B)`` -> (rows, outputs) for each block B of VECTORS_PER_PASS rows of V, the
        outputs checked (``conventions.checked_output``, sample ``offset`` + row): (the rows [K, P], the
        outputs)."""
        theta = tuple(p.detach() for p in fm.params)
        rows = []
        for B in V.to(fm.dtype).split(VECTORS_PER_PASS):   # the model's dtype (an operator's may be float32)
            try:
                with torch._dynamo.config.patch(**_DYNAMO_CONFIG):
                    part, out = product(theta, B)
            except torch._dynamo.exc.FailOnRecompileLimitHit as err:
                raise ValueError(f"compile: torch.compile reached its limit of {_DYNAMO_CONFIG['recompile_limit']} "
                                 "graphs per kind of product (one per model structure, loss, dtype and batch "
                                 "shape); pass compile=False to run it eagerly") from err
            except torch._dynamo.exc.TorchDynamoException as err:
                message = (str(err).strip().splitlines() or [""])[0]
                raise ValueError(f"compile: torch.compile could not compile the curvature product of this model "
                                 f"and loss ({type(err).__name__}: {message}; torch's report is chained to this "
                                 "error); pass compile=False to run it eagerly") from err
            if not rows:  # the outputs are the same for every block
                checked_output(out, offset)
            rows.append(part)
        return torch.cat(rows), out

    def hessian_batch(self, fm: FunctionalModel, loss, x, y, V: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """H_b V, [K, P]."""
        names = tuple(fm.names)
        return self._blocks(fm, V, offset, lambda theta, B: self._hessian(fm.model, names, loss, x, y, theta, B))[0]

    def ggn_batch(self, fm: FunctionalModel, loss, x, y, V: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """G_b V, [K, P]."""
        return self._loss_ggn(fm, loss, x, y, V, offset)[0]

    def _loss_ggn(self, fm, loss, x, y, V, offset):
        names = tuple(fm.names)
        return self._blocks(fm, V, offset, lambda theta, B: self._output_space(
            fm.model, names, x, theta, B, _loss_hessian, (loss, y)))

    def fisher_batch(self, fm: FunctionalModel, lik: Likelihood, kind: str, x, y, V: torch.Tensor, *,
                     mc_samples=1, generator=None, offset=0) -> torch.Tensor:
        r"""F_b V, [K, P]. The true Fisher with labels: the GGN of the likelihood's mean loss
        :math:`\sum_n \ell_n / d` (its Λ in the graph) times d / n, d its ``mean_denominator`` (the positions
        that count); without labels, and for the other kinds, the cotangents of the kind at the outputs
        of an eager forward pass (for the true Fisher the K = T·C square-root columns of Λ per sample)."""
        if kind == "true" and y is not None:
            rows, out = self._loss_ggn(fm, lik, x, y, V, offset)
            bound = lik.at(out, y)  # also checks the labels, as the eager product does
            return rows * (bound.mean_denominator() / out.shape[0])
        with torch.no_grad():
            out = fm.outputs(x, dict(zip(fm.names, fm.params)), offset)
        c = Cotangents(lik, out, y, kind, mc_samples=mc_samples, generator=generator)
        names, factor_args = tuple(fm.names), (c.all(), c.weights)
        return self._blocks(fm, V, offset, lambda theta, B: self._output_space(
            fm.model, names, x, theta, B, products.cotangent_product, factor_args))[0]


__all__ = ["DEFAULTS", "VECTORS_PER_PASS", "CompiledProducts", "batch_products", "compile_options"]
