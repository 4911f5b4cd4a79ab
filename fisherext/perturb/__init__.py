r"""Fisher measures by parameter perturbation: finite-difference quadratic forms, the perturbed-parameters
context, and the Fisher information sensitivity of the inputs.

Vectors: one direction is a flat vector [P] over the selected parameters (in ``named_parameters()``
order); K shared directions are the columns of [P, K]; one direction per input n is row n of [N, P],
accepted only with ``per_input=True`` (a 2-D ``v`` without it is refused, with a message that says how to
pass each case). Per-input results are [N] for one direction and [N, K] for K directions. Every
finite-difference step is ``eps``; parameters are restored bit for bit after every perturbation.

Curvature conventions of the forward passes (all entry points here but :func:`perturbed`, whose block
runs the user's own code): the model must be deterministic per sample (no dropout in train mode, no
BatchNorm with batch statistics: call ``model.eval()``); an embedding lookup at ``padding_idx`` keeps its
unperturbed value (a constant, as in PyTorch's gradients); attention runs with kernels that have the
derivatives needed; recurrent layers run step by step; and the model must return a tensor of finite
logits [N, C] (else a TypeError says what it returned, or a ValueError names the input).

Every finite-difference routine warns with a :class:`PrecisionWarning` (``fisherext.PrecisionWarning``)
when its step is below what the dtypes resolve: :math:`\varepsilon < u^{1/3}/10` with u the unit roundoff
of the dtype the forward runs in (:math:`\sqrt u/10` for forward differences), or a realized step
:math:`\mathrm{fl}(\theta + \varepsilon v) - \theta` off from :math:`\varepsilon v` by more than 10%.
"""
from .._core.precision import PrecisionWarning
from .finite_differences import fd_quadratic, fd_quadratic_directions, perturbed
from .sensitivity import input_sensitivity, predicted_class_directions

__all__ = ["PrecisionWarning", "fd_quadratic", "fd_quadratic_directions", "input_sensitivity", "perturbed",
           "predicted_class_directions"]
