r"""Elastic weight consolidation (Kirkpatrick et al., 2017) and online EWC (Schwarz et al., 2018).

After training on task t, the parameters :math:`\theta^*_t` and the Fisher information :math:`F_t` of the
task's data at :math:`\theta^*_t` are consolidated; training on later tasks adds the quadratic penalty

.. math:: \Omega(\theta) = \frac\lambda2 \sum_t (\theta - \theta^*_t)^\top F_t\, (\theta - \theta^*_t)
          \;\overset{\text{diag}}{=}\; \frac\lambda2 \sum_t \sum_i F_{t,i}\,(\theta_i - \theta^*_{t,i})^2

to the new task's loss, each task keeping its own Fisher and anchor. Online EWC keeps one running Fisher
anchored at the latest parameters:

.. math:: F^* \leftarrow \gamma F^* + F_k, \qquad \theta^* \leftarrow \theta^*_k, \qquad
          \Omega(\theta) = \frac\lambda2 (\theta - \theta^*)^\top F^* (\theta - \theta^*),

so memory does not grow with the number of tasks (for the diagonal; see ``structure="kfac"`` below).
With :math:`\gamma = 1` the running Fisher is the sum of all tasks' Fishers. (Schwarz et al. write the
penalty of task k + 1 with :math:`\gamma F^*_k`; that is this penalty with λ rescaled by γ.)

The ½ belongs to the penalty: :math:`\frac12 \Delta^\top F \Delta` is the second-order term of
:math:`-\log p(\theta \mid D_t)` around :math:`\theta^*_t` (the Laplace approximation) and of
:math:`\mathrm{KL}(p_{\theta^*} \| p_{\theta^* + \Delta})`. A penalty written without it (as in many
implementations) equals this one with twice the λ.

**The Fisher** is chosen explicitly (``kind``) and comes from :func:`fisherext.fisher`, normalized as
:math:`F = \frac1N \sum_n F_n` over the task's N samples with the per-sample negative log-likelihood
:math:`\ell_n = -\log p(y_n \mid x_n, \theta)`:

- ``"true"`` (default): :math:`F_n = \mathbb E_{y \sim p(y|x_n,\theta)}[\nabla\ell\,\nabla\ell^\top]`,
  exact over the classes (for softmax outputs, :math:`\sum_c p_c\, g_{n,c} g_{n,c}^\top`);
- ``"empirical"``: :math:`F_n = g_n g_n^\top` at the data label;
- ``"mc"``: ``mc_samples`` labels per input drawn from the model with ``generator``;
- ``"batch_mean_grad_sq"``, **not a Fisher**, for comparison only:
  :math:`\frac1B \sum_b \big(\nabla \frac1{|b|} \sum_{n \in b} \ell_n\big)^{\odot 2}`, the square of
  each mini-batch's mean-loss gradient averaged over the B batches, which many EWC implementations
  compute. The cross terms :math:`g_n \odot g_m` of a batch do not vanish, the squares of per-sample
  gradients are divided by :math:`|b|^2` instead of :math:`|b|`, and near a minimum the per-sample
  gradients cancel, so it is smaller than the empirical Fisher by a factor of about the batch size and
  changes with ``batch_size``. With a batch size of 1 it equals the empirical Fisher.

**Structures**: ``"diag"`` (the diagonal of F, the method as published) or ``"kfac"``: per Linear or
convolution weight (with its bias as a last column, as :func:`fisherext.fisher` factors them)
:math:`F \approx G \otimes A`, penalized without forming the Kronecker product,

.. math:: \mathrm{vec}(\Delta)^\top (G \otimes A)\,\mathrm{vec}(\Delta) = \mathrm{tr}(\Delta^\top G \Delta A)
          = \textstyle\sum (\Delta \odot G \Delta A), \qquad \Delta = [\Delta_W \mid \Delta_b]
          \ (O \times I{+}1,\ \text{row-major vec}),

and the other parameters diagonal. A sum of Kronecker products is no Kronecker product, so online EWC
with ``"kfac"`` keeps the running sum exactly as one :math:`(\gamma^{k-j} G_j) \otimes A_j` term per
consolidated task (memory then grows with the tasks, as for plain EWC; the diagonal parts are summed
into one vector).

The penalty is differentiable in the parameters (its gradient is :math:`\lambda F (\theta - \theta^*)`
summed over tasks) and works with any optimizer: add it to the loss.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ._core.checks import all_finite, check_choice, check_inputs, check_positive_int
from ._core.conventions import curvature_forward
from ._core.data import iter_batches, progress_bar
from ._core.entry import entry_points
from ._core.functional import FunctionalModel, grads
from ._core.likelihood import as_likelihood
from ._core.params import original_module, resolve_params
from ._core.types import Data, Loss, Params
from .capture import FisherMatrix, fisher
from .capture.matrix import DiagPart

KINDS = ("true", "empirical", "mc", "batch_mean_grad_sq")
STRUCTURES = ("diag", "kfac")
_STATE_KEYS = ("config", "num_tasks", "tasks")
_CONFIG_KEYS = ("lam", "kind", "structure", "online", "gamma", "mc_samples", "params", "shapes")


def _check_lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam: must be a finite number >= 0, got {lam!r}")
    return float(lam)


def _check_online_gamma(online, gamma) -> tuple[bool, float]:
    if not isinstance(online, bool):
        raise TypeError(f"online: must be True or False, got {online!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) \
            or not 0 <= gamma <= 1:
        raise ValueError(f"gamma: must be a number in [0, 1], got {gamma!r}")
    if not online and gamma != 1:
        raise ValueError(f"gamma: the decay of the running Fisher applies to online=True only, got {gamma!r} "
                         "with online=False (each task then keeps its own Fisher)")
    return online, float(gamma)


def _check_kind_structure(kind, structure) -> None:
    check_choice("kind", kind, KINDS)
    check_choice("structure", structure, STRUCTURES)
    if kind == "batch_mean_grad_sq" and structure != "diag":
        raise ValueError(f"structure: kind='batch_mean_grad_sq' is a diagonal quantity; got {structure!r}")


@entry_points
class EWC:
    r"""Elastic weight consolidation: the penalty :math:`\frac\lambda2 \sum_t (\theta-\theta^*_t)^\top
    F_t (\theta-\theta^*_t)` over consolidated tasks, or online EWC's single running
    :math:`F^* \leftarrow \gamma F^* + F_k` at the latest anchor (the math: :mod:`fisherext.ewc`).

    Typical use: train task 1, ``ewc = EWC(model, task1_data, lam=...)``; train task 2 on
    ``loss + ewc.penalty()``; ``ewc.consolidate(task2_data)``; train task 3; and so on. ``data=None``
    constructs it before the first task: the penalty is then 0 until :meth:`consolidate` is called, so one
    training loop serves every task.

    Args:
        model: the network; its selected parameters at each :meth:`consolidate` are that task's anchor, and
            the Fisher is computed there. The Fisher needs a deterministic forward pass: call
            ``model.eval()`` before consolidating a model with dropout or BatchNorm (and ``model.train()``
            after), or the computation is refused naming the module.
        data: the first task's data (a DataLoader, a Dataset, or an (x, y) tuple), consolidated at once
            at the model's current parameters; None (default) consolidates nothing yet.
        lam: λ ≥ 0, the strength of the penalty (required; 0 switches it off).
        kind: the Fisher: "true" (default; exact over the classes), "empirical" (data labels), "mc"
            (``mc_samples`` labels drawn from the model with ``generator``), or "batch_mean_grad_sq"
            (**not the Fisher**: the squared gradient of each mini-batch's mean loss averaged over
            batches, the quantity of many EWC copies, kept for comparison; it depends on the batch size,
            which must therefore be given: ``batch_size`` or a DataLoader).
        structure: "diag" (default) or "kfac" (Kronecker factors per Linear/convolution weight with its
            bias, the other parameters diagonal). "batch_mean_grad_sq" is diagonal only.
        online: False (default): every task keeps its own Fisher and anchor. True: online EWC, one running
            Fisher :math:`F^* \leftarrow \gamma F^* + F_k` anchored at the latest consolidated parameters.
        gamma: γ in [0, 1], the decay of the running Fisher (online only; 1: the sum of every task's
            Fisher, 0: the latest task's alone). Any other value than 1 with ``online=False`` is refused.
        loss: the likelihood whose Fisher is taken: "cross_entropy" (default), "mse", "bce", or the torch
            loss of one (see :func:`fisherext.fisher`).
        params: None (all parameters that require grad), or names, modules or tensors: the penalty then
            covers that subset only.
        mc_samples: labels drawn per input for ``kind="mc"``, a positive int.
        batch_size: samples per batch for tensor or Dataset data (a DataLoader keeps its own). None:
            planned against ``memory_budget`` by :func:`fisherext.fisher`; required for
            "batch_mean_grad_sq" (unless the data is a DataLoader).
        memory_budget: bytes the Fisher computation may use (see :func:`fisherext.fisher`).
        progress: a tqdm progress bar over the batches of each consolidation.
        generator: the ``torch.Generator`` of ``kind="mc"`` (None: torch's global one).

    Attributes:
        num_tasks: the number of consolidations so far.
        tasks: the consolidated state, one dict per task (online: one running dict) with the anchor
            ``"anchor"`` [P], the diagonal ``"diag"`` [P] (zero where a Kronecker part sits) and the
            Kronecker parts ``"kron"`` (``"idx"`` [O, I] flat positions, ``"A"``, ``"G"``); flat vectors
            follow the selected parameters in ``model.named_parameters()`` order.

    Raises:
        ValueError: ``lam`` negative or not finite, ``gamma`` outside [0, 1] (or not 1 without
            ``online``), an unknown ``kind``, ``structure`` or loss name, "batch_mean_grad_sq" with
            "kfac", a bad ``mc_samples`` or ``batch_size``, an empty ``params`` subset; and the errors of
            :meth:`consolidate` when ``data`` is given.
        TypeError: ``online`` not a bool, ``generator`` not a torch.Generator, ``loss`` neither a name
            nor callable.
    """

    def __init__(self, model: nn.Module, data: Data | None = None, *, lam: float, kind: str = "true",
                 structure: str = "diag", online: bool = False, gamma: float = 1.0,
                 loss: Loss = "cross_entropy", params: Params = None, mc_samples: int = 1,
                 batch_size: int | None = None, memory_budget: int | None = None, progress: bool = False,
                 generator: torch.Generator | None = None):
        self.lam = _check_lam(lam)
        _check_kind_structure(kind, structure)
        self.online, self.gamma = _check_online_gamma(online, gamma)
        as_likelihood(loss)  # refuses a loss that is no likelihood now, not after a task's training
        check_positive_int("mc_samples", mc_samples)
        check_positive_int("batch_size", batch_size, optional=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        selected = resolve_params(model, params)
        self.model = model
        self.names = [n for n, _ in selected]
        self.shapes = [tuple(p.shape) for _, p in selected]
        self.P = sum(p.numel() for _, p in selected)
        self.kind, self.structure, self.loss, self.mc_samples = kind, structure, loss, mc_samples
        self.batch_size, self.memory_budget, self.progress, self.generator = batch_size, memory_budget, progress, generator
        # One entry per consolidated task (online: one running entry): {"anchor": [P], "diag": [P],
        # "kron": [{"idx": [O, I], "A": [I, I], "G": [O, O]}]}, the diagonal zero where a Kronecker part sits.
        self.tasks: list[dict] = []
        self.num_tasks = 0
        if data is not None:
            self.consolidate(data)

    # ---- consolidation -----------------------------------------------------------------------------

    def _batch_mean_grad_sq(self, data, batch_size, progress) -> FisherMatrix:
        """(1/B) Σ_b (∇ mean_{n∈b} ℓ_n)² over the B batches, as a diagonal FisherMatrix (not a Fisher)."""
        if batch_size is None and not isinstance(data, torch.utils.data.DataLoader):
            raise ValueError("batch_size: kind='batch_mean_grad_sq' is defined by its mini-batches; pass "
                             "batch_size (or a DataLoader)")
        lik = as_likelihood(self.loss)
        fm = FunctionalModel(self.model, self.names)
        acc = torch.zeros(fm.P, dtype=fm.dtype, device=fm.device)
        batches, seen = 0, 0
        with curvature_forward(self.model), torch.enable_grad():
            for x, y in progress_bar(iter_batches(data, batch_size), progress, "batch_mean_grad_sq", unit="batch"):
                check_inputs(self.model, x)
                if x.shape[0] == 0:
                    continue
                if y is None:
                    raise ValueError("data: kind='batch_mean_grad_sq' needs labels y")
                leaves = fm.leaves()
                out = fm.outputs(x, dict(zip(fm.names, leaves)), seen)
                # the likelihood's torch loss is a mean over its own denominator (positions, entries):
                # rescaled to the mean per-sample NLL of the batch, so batch_size=1 gives g_n g_n exactly
                mean_nll = lik(out, y) * (lik.at(out, y).mean_denominator() / x.shape[0])
                g = torch.cat([t.reshape(-1) for t in grads([mean_nll], leaves, [None])])
                acc += g.square()
                batches += 1
                seen += x.shape[0]
        if batches == 0:
            raise ValueError("data: no samples")
        idx = torch.arange(fm.P, device=fm.device)
        return FisherMatrix(fm.P, [DiagPart(idx, acc / batches)], seen, "diag")

    def _split(self, F: FisherMatrix) -> tuple[torch.Tensor, list[dict]]:
        """The diagonal parts of F scattered into one [P] vector (zero elsewhere) and its Kronecker parts."""
        if self.structure == "diag":
            return F.diag().detach().clone(), []
        d = torch.zeros(self.P, dtype=F.dtype, device=F.device)
        kron = []
        for part in F.parts:
            t = part.tensors()
            if part.kind == "diag":
                d[t["idx"].reshape(-1)] = t["d"].detach()
            elif part.kind == "kron":
                kron.append({"idx": t["idx"], "A": t["A"].detach(), "G": t["G"].detach()})
            else:  # fisher(structure="kfac") has no dense parts; a silent drop would weaken the penalty
                raise RuntimeError(f"EWC: unexpected {part.kind!r} part in a K-FAC Fisher")
        return d, kron

    def consolidate(self, data: Data, *, batch_size: int | None = None, progress: bool | None = None) -> FisherMatrix:
        r"""Adds a task: computes the Fisher :math:`F_k` of ``data`` at the model's current parameters
        :math:`\theta^*_k` and keeps both (online: :math:`F^* \leftarrow \gamma F^* + F_k`, anchor
        :math:`\theta^*_k`).

        Call it right after training on a task, with that task's data (the model in eval mode if it has
        dropout or BatchNorm).

        Args:
            data: the task's data: a DataLoader, a Dataset, or an (x, y) tuple (labels are needed for
                "empirical" and "batch_mean_grad_sq" only).
            batch_size: samples per batch for this task (None: the constructor's ``batch_size``).
            progress: a progress bar for this task (None: the constructor's ``progress``).

        Returns:
            the task's FisherMatrix :math:`F_k` (for "batch_mean_grad_sq", that quantity as a diagonal
            FisherMatrix).

        Raises:
            ValueError: no samples, labels that do not fit the outputs, a model in train mode with dropout
                or BatchNorm, parameters that no longer match the selected ones or are not finite, a Fisher over
                ``memory_budget``, a bad ``batch_size`` (or none for "batch_mean_grad_sq" on tensors).
            TypeError: data of an unknown type, integer inputs.
        """
        batch_size = self.batch_size if batch_size is None else check_positive_int("batch_size", batch_size)
        progress = self.progress if progress is None else progress
        theta = self._flat(self.model, "model").detach().clone()  # the anchor, checked against the selection
        if not all_finite([theta]):
            raise ValueError("model: the selected parameters have non-finite values (did training diverge? with "
                             "plain SGD the penalty's step is stable only while lr * lam * max F < 2)")
        if self.kind == "batch_mean_grad_sq":
            F = self._batch_mean_grad_sq(data, batch_size, progress)
        else:
            F = fisher(self.model, data, kind=self.kind, structure=self.structure, loss=self.loss,
                       params=self.names, mc_samples=self.mc_samples, batch_size=batch_size,
                       memory_budget=self.memory_budget, progress=progress, generator=self.generator)
        d, kron = self._split(F)
        if self.online and self.tasks:
            running = self.tasks[0]
            # γ(G ⊗ A) = (γG) ⊗ A: the decay goes into the G factor of each earlier Kronecker term
            running["diag"] = self.gamma * running["diag"] + d
            kept = running["kron"] if self.gamma > 0 else []  # γ = 0 forgets them: no zero terms kept
            running["kron"] = [dict(k, G=self.gamma * k["G"]) for k in kept] + kron
            running["anchor"] = theta
        else:
            self.tasks.append({"anchor": theta, "diag": d, "kron": kron})
        self.num_tasks += 1
        return F

    # ---- the penalty -------------------------------------------------------------------------------

    def _flat(self, model, name: str, against_state: bool = True) -> torch.Tensor:
        """The selected parameters of ``model`` (by name) as one flat vector, differentiable; ValueError
        naming ``name`` when a parameter is missing, has another shape, or (``against_state``) another
        dtype/device than the consolidated state."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name}: expected an nn.Module, got {type(model).__name__}")
        named = dict(original_module(model).named_parameters())
        tensors = []
        for n, shape in zip(self.names, self.shapes):
            p = named.get(n)
            if p is None:
                raise ValueError(f"{name}: has no parameter {n!r}, which this EWC was built for "
                                 f"(parameters {', '.join(map(repr, self.names))})")
            if tuple(p.shape) != shape:
                raise ValueError(f"{name}: parameter {n!r} has shape {tuple(p.shape)}, but this EWC was built "
                                 f"for shape {shape}")
            tensors.append(p)
        if against_state and self.tasks:
            ref, p = self.tasks[0]["anchor"], tensors[0]
            if p.dtype != ref.dtype or p.device != ref.device:
                raise ValueError(f"{name}: parameters are {p.dtype} on {p.device}, but the consolidated state "
                                 f"is {ref.dtype} on {ref.device}; ewc.load_state_dict(ewc.state_dict()) "
                                 "moves it to the model's dtype and device")
        return torch.cat([p.reshape(-1) for p in tensors])

    def penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        r"""The EWC penalty :math:`\frac\lambda2 \sum_t (\theta-\theta^*_t)^\top F_t (\theta-\theta^*_t)`
        (online: the one running term), differentiable in the parameters: add it to the loss.

        Diagonal parts give :math:`\sum_i F_i \delta_i^2`, Kronecker parts
        :math:`\sum(\Delta \odot G\Delta A)` over the weight-shaped :math:`\Delta` (bias as last column);
        the gradient is :math:`\lambda \sum_t F_t(\theta - \theta^*_t)`.

        Args:
            model: the model whose parameters θ are penalized (None: the one given at construction); its
                selected parameters are looked up by name and must have the consolidated shapes, dtype
                and device.

        Returns:
            a 0-d tensor in the parameters' dtype and device; a constant 0 before the first
            :meth:`consolidate`.

        Raises:
            ValueError: ``model`` lacks a selected parameter, or one has another shape, dtype or device.
            TypeError: ``model`` is not an nn.Module.
        """
        theta = self._flat(self.model if model is None else model, "model")
        if not self.tasks:
            return theta.new_zeros(())
        total = theta.new_zeros(())
        for task in self.tasks:
            delta = theta - task["anchor"]
            total = total + (task["diag"] * delta.square()).sum()
            for k in task["kron"]:
                D = delta[k["idx"]]  # [O, I(+1)]: the weight's rows, its bias as the last column
                total = total + (D * (k["G"] @ D @ k["A"])).sum()
        return 0.5 * self.lam * total

    # ---- state -------------------------------------------------------------------------------------

    def _config(self) -> dict:
        return {"lam": self.lam, "kind": self.kind, "structure": self.structure, "online": self.online,
                "gamma": self.gamma, "mc_samples": self.mc_samples, "params": list(self.names),
                "shapes": [list(s) for s in self.shapes]}

    def state_dict(self) -> dict:
        """The consolidated state: tensors (each task's anchor, diagonal and Kronecker factors) and the
        penalty's configuration (``lam``, ``kind``, ``structure``, ``online``, ``gamma``, ``mc_samples``,
        the selected parameter names and shapes), for ``torch.save`` and :meth:`load_state_dict`.

        Returns:
            ``{"config": dict, "num_tasks": int, "tasks": [{"anchor": [P], "diag": [P], "kron":
            [{"idx", "A", "G"}]}]}`` (the tensors themselves, not copies).
        """
        return {"config": self._config(), "num_tasks": self.num_tasks,
                "tasks": [{"anchor": t["anchor"], "diag": t["diag"], "kron": [dict(k) for k in t["kron"]]}
                          for t in self.tasks]}

    def _task_from_state(self, i: int, entry, ref: torch.Tensor) -> dict:
        P = self.P
        if not isinstance(entry, Mapping) or not {"anchor", "diag", "kron"} <= entry.keys():
            raise ValueError(f"state: task {i} must be a dict with 'anchor', 'diag' and 'kron'")
        for key in ("anchor", "diag"):
            t = entry[key]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (P,):
                raise ValueError(f"state: task {i} {key!r} must be a floating-point tensor of shape ({P},), got "
                                 f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        if not isinstance(entry["kron"], (list, tuple)):
            raise ValueError(f"state: task {i} 'kron' must be a list, got {type(entry['kron']).__name__}")
        kron = []
        for j, k in enumerate(entry["kron"]):
            if not isinstance(k, Mapping) or not all(isinstance(k.get(f), torch.Tensor) for f in ("idx", "A", "G")):
                raise ValueError(f"state: task {i} Kronecker part {j} must be a dict of tensors 'idx', 'A', 'G'")
            idx, A, G = k["idx"], k["A"], k["G"]
            if idx.is_floating_point() or idx.dim() != 2 or (idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < P):
                raise ValueError(f"state: task {i} Kronecker part {j} has 'idx' that is no [O, I] tensor of "
                                 f"positions in [0, {P})")
            if tuple(G.shape) != (idx.shape[0],) * 2 or tuple(A.shape) != (idx.shape[1],) * 2:
                raise ValueError(f"state: task {i} Kronecker part {j} has inconsistent shapes: idx "
                                 f"{tuple(idx.shape)}, A {tuple(A.shape)}, G {tuple(G.shape)}")
            kron.append({"idx": idx.detach().to(ref.device, torch.long).clone(),
                         "A": A.detach().to(ref).clone(), "G": G.detach().to(ref).clone()})
        return {"anchor": entry["anchor"].detach().to(ref).clone(), "diag": entry["diag"].detach().to(ref).clone(),
                "kron": kron}

    def load_state_dict(self, state: dict) -> None:
        """Replaces the consolidated tasks and the penalty's configuration (``lam``, ``kind``,
        ``structure``, ``online``, ``gamma``, ``mc_samples``) by those of ``state`` (from
        :meth:`state_dict`); the loss, batch size, memory budget, progress and generator stay this
        object's. The tensors are copied to the dtype and device of the model's parameters. Everything is
        checked before anything is replaced.

        Args:
            state: a dict from :meth:`state_dict`, saved for the same parameter names and shapes.

        Raises:
            ValueError: missing keys, a configuration value that the constructor would refuse, other
                parameter names or shapes, tensors of the wrong shape, several tasks with ``online``.
            TypeError: ``state`` is not a dict.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected the dict of EWC.state_dict(), got {type(state).__name__}")
        missing = [repr(k) for k in _STATE_KEYS if k not in state]
        config = state.get("config")
        if not missing and isinstance(config, Mapping):
            missing = [f"config[{k!r}]" for k in _CONFIG_KEYS if k not in config]
        if missing or not isinstance(config, Mapping):
            raise ValueError(f"state: missing {', '.join(missing) or 'config'} (an EWC state has "
                             f"{', '.join(map(repr, _STATE_KEYS))})")
        try:  # the constructor's checks, reported as a bad state
            lam = _check_lam(config["lam"])
            _check_kind_structure(config["kind"], config["structure"])
            online, gamma = _check_online_gamma(config["online"], config["gamma"])
            mc_samples = check_positive_int("mc_samples", config["mc_samples"])
            shapes = [tuple(s) for s in config["shapes"]]
        except (ValueError, TypeError) as err:
            raise ValueError(f"state: config {err}") from None
        if list(config["params"]) != self.names or shapes != self.shapes:
            raise ValueError(f"state: was saved for parameters {list(config['params'])} with shapes {shapes}, "
                             f"but this EWC selects {self.names} with shapes {self.shapes}")
        tasks = state["tasks"]
        if not isinstance(tasks, (list, tuple)):
            raise ValueError(f"state: 'tasks' must be a list, got {type(tasks).__name__}")
        if online and len(tasks) > 1:
            raise ValueError(f"state: online EWC keeps one running task, got {len(tasks)}")
        num_tasks = state["num_tasks"]
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < len(tasks):
            raise ValueError(f"state: 'num_tasks' must be an int >= the {len(tasks)} stored tasks, got {num_tasks!r}")
        ref = self._flat(self.model, "model", against_state=False).detach()
        loaded = [self._task_from_state(i, entry, ref) for i, entry in enumerate(tasks)]
        self.lam, self.kind, self.structure = lam, config["kind"], config["structure"]
        self.online, self.gamma, self.mc_samples = online, gamma, mc_samples
        self.tasks, self.num_tasks = loaded, num_tasks

    def __repr__(self):
        mode = f"online=True, gamma={self.gamma:g}" if self.online else "online=False"
        return (f"EWC(lam={self.lam:g}, kind={self.kind!r}, structure={self.structure!r}, {mode}, "
                f"num_tasks={self.num_tasks}, P={self.P})")


__all__ = ["EWC"]
