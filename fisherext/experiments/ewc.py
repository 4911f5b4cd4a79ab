r"""Experiment ``ewc`` (seed 003): continual learning on permuted digits with elastic weight consolidation,
each Fisher beside plain SGD and beside the batch-mean squared gradient that many EWC copies use.

Task k is scikit-learn's digits with a fixed random permutation of the 64 pixels (task 1: none). An MLP
64-64-10 is trained on the tasks in turn by plain SGD (no momentum); after task t its parameters
:math:`\theta^*_t` and a Fisher :math:`F_t` of task t's training data at :math:`\theta^*_t` are
consolidated (:class:`fisherext.ewc.EWC`), and later tasks train on

.. math:: \mathcal L(\theta) = \mathrm{CE}_{\text{batch}}(\theta)
          + \frac\lambda2 \sum_{t} \sum_i F_{t,i}\,(\theta_i - \theta^*_{t,i})^2 ,

the diagonal Fisher normalized as :math:`F = \frac1N\sum_n F_n` over the task's N samples. The methods:

- ``sgd``: no penalty;
- ``ewc_true``, ``ewc_empirical``, ``ewc_mc``: the true Fisher (exact over the 10 classes), the empirical
  one (data labels), one label per input sampled from the model;
- ``online_ewc``: one running true Fisher :math:`F^* \leftarrow F^* + F_k` (γ = 1) anchored at the latest
  parameters;
- ``seed_argmax``: seed 003's own loop, one backward pass per sample at the **predicted** label
  :math:`\arg\max_c p(c|x_n)`: the empirical Fisher at the argmax labels (``kind="empirical"`` on
  :math:`(x, \hat y)`), neither the true nor the empirical Fisher;
- ``batch_mean``: ``kind="batch_mean_grad_sq"``, :math:`\frac1B\sum_b (\nabla \frac1{|b|}\sum_{n\in b}\ell_n)^{\odot 2}`
  over the training batches of 32, which is **not** a Fisher (its cross terms do not vanish and near a
  minimum the per-sample gradients cancel); :func:`seed_batch_mean_grad_sq` computes it by hand as
  those copies do, and the run checks that the two agree.

Every method uses the same λ. Seed 003 writes the penalty as :math:`\lambda_s \sum_i F_i\Delta_i^2`
(no ½), which is this one with :math:`\lambda = 2\lambda_s`. The accuracy matrix R has rows "after
training task i" and columns "test accuracy on task j"; it is the mean over ``repeats`` runs that differ
in the initialization, the batch order and the MC draws (the tasks stay the same).

``Result.data`` (JSON): ``tasks``, ``epochs``, ``repeats``, ``lam``, ``lr``, ``batch_size``, ``n_train``,
``n_test``; ``methods``: {name: {``label``, ``accuracy`` (mean R [tasks][tasks]), ``accuracy_std``,
``task1_final`` (mean of R[-1][0]), ``task1_final_runs`` (one per repeat), ``final_mean`` (mean of the last
row), ``last_task_final``, ``fisher_trace_task1`` (mean trace of the first consolidated diagonal; None for
SGD)}}; ``factor_true_over_batch_mean``, ``factor_true_over_empirical`` (ratios of those traces, mean over
repeats); ``batch_mean_by_hand_rel_diff`` (max |library − by hand| / max by hand).
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from .._core.checks import check_positive_int
from .._core.entry import entry_point
from .._core.params import flatten
from ..ewc import EWC
from . import data as datasets
from .registry import Config, Experiment, Figure, Outcome, Result, Table

ID = "ewc"
LAM = 10.0
LR = 0.1
BATCH_SIZE = 32
HIDDEN = 64
# Generator offsets (config.generator(offset)): task permutations, then per repeat r the batch order and MC draws.
_GEN_PERM, _GEN_BATCH, _GEN_MC = 0, 100, 200

QUICK = dict(tasks=3, epochs=6, n_train=None, repeats=1)
FULL = dict(tasks=3, epochs=10, n_train=None, repeats=3)

METHODS = {  # name: (label, EWC keyword arguments or None for no penalty)
    "sgd": ("SGD (no penalty)", None),
    "ewc_true": ("EWC, true Fisher", dict(kind="true")),
    "ewc_empirical": ("EWC, empirical Fisher", dict(kind="empirical")),
    "ewc_mc": ("EWC, MC Fisher (1 label per input)", dict(kind="mc")),
    "online_ewc": ("online EWC (true Fisher, γ = 1)", dict(kind="true", online=True)),
    "seed_argmax": ("EWC, argmax-label Fisher (seed 003's loop)", dict(kind="empirical")),
    "batch_mean": ("batch-mean squared gradient (not a Fisher)", dict(kind="batch_mean_grad_sq",
                                                                        batch_size=BATCH_SIZE)),
}

# short titles for the figure's panels
PANEL = {"sgd": "SGD", "ewc_true": "EWC, true Fisher", "ewc_empirical": "EWC, empirical Fisher",
         "ewc_mc": "EWC, MC Fisher", "online_ewc": "online EWC", "seed_argmax": "seed 003: argmax label",
         "batch_mean": "batch-mean grad² (copies)"}

__all__ = ["EXPERIMENT", "seed_batch_mean_grad_sq"]


# ---- the seed's defect, reproduced ------------------------------------------------------------------


@entry_point
def seed_batch_mean_grad_sq(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    r"""Reproduces the "Fisher" of many EWC implementations (the batch-mean defect of seed 003's family):
    the square of each mini-batch's **mean-loss** gradient, averaged over the batches,

    .. math:: \frac1B \sum_{b=1}^B \Big(\nabla_\theta \frac1{|b|}\sum_{n \in b} \ell_n\Big)^{\odot 2},

    with consecutive batches of ``batch_size`` (the last one may be smaller) and the cross-entropy loss, one
    backward pass per batch, as those copies write it. It is not the Fisher: for a batch of n samples it is
    :math:`\frac1{n^2}(\sum_n g_n)^{\odot 2}`, whose cross terms do not vanish, against the empirical
    Fisher's :math:`\frac1n\sum_n g_n^{\odot 2}`; near a minimum the per-sample gradients cancel and it is
    smaller by about the batch size or more. With ``batch_size=1`` it is the empirical Fisher's diagonal.
    ``fisherext.ewc.EWC(kind="batch_mean_grad_sq")`` computes the same quantity; kept to show the defect.

    Args:
        model: a classifier returning logits [N, C]; all its parameters (``named_parameters()`` order).
        x: inputs [N, ...]; y: labels [N].
        batch_size: samples per mini-batch, a positive int.

    Returns:
        Tensor [P], flat over all parameters.

    Raises:
        ValueError: a bad ``batch_size``, or no samples.
    """
    check_positive_int("batch_size", batch_size)
    if x.shape[0] == 0:
        raise ValueError("x: has no samples")
    params = list(model.parameters())
    total = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    batches = 0
    with torch.enable_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            total += flatten(torch.autograd.grad(F.cross_entropy(model(xb), yb), params)).square()
            batches += 1
    return total / batches


# ---- the run ----------------------------------------------------------------------------------------


def _tasks(split: datasets.Split, n_tasks: int, n_train, generator: torch.Generator, device):
    """[((x_train, y_train), (x_test, y_test))] per task, inputs flat [N, 64], task k's pixels permuted."""
    perms = [torch.arange(split.features)] + [torch.randperm(split.features, generator=generator)
                                              for _ in range(n_tasks - 1)]
    xa, xb = split.flat(split.x_train)[:n_train], split.flat(split.x_test)
    ya, yb = split.y_train[:n_train].to(device), split.y_test.to(device)
    return [((xa[:, p].to(device), ya), (xb[:, p].to(device), yb)) for p in perms]


def _continual(tasks, method: str, config: Config, repeat: int, epochs: int):
    """Trains one model on the tasks in turn with the method's penalty; returns (R [T, T] as lists, the trace of
    the first consolidated diagonal or None, the model's parameters after task 1, that diagonal)."""
    kwargs = METHODS[method][1]
    model = datasets.mlp([tasks[0][0][0].shape[1], HIDDEN, 10], seed=config.seed + repeat).to(config.device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batches = config.generator(_GEN_BATCH + repeat)
    ewc = None
    if kwargs is not None:
        mc = config.generator(_GEN_MC + repeat) if kwargs["kind"] == "mc" else None
        ewc = EWC(model, lam=LAM, progress=config.progress, generator=mc, **kwargs)
    T = len(tasks)
    R = [[0.0] * T for _ in range(T)]
    trace, theta1, diag1 = None, None, None
    for i, ((x, y), _) in enumerate(tasks):
        datasets.train(model, x, y, epochs=epochs, batch_size=BATCH_SIZE, generator=batches, optimizer=opt,
                       penalty=None if ewc is None else ewc.penalty)
        if i == 0:
            theta1 = [p.detach().clone() for p in model.parameters()]
        if ewc is not None and i < T - 1:
            if method == "seed_argmax":
                with torch.no_grad():
                    y = model(x).argmax(1)  # seed 003: the predicted label, one sample at a time
            F_t = ewc.consolidate((x, y))
            if i == 0:
                diag1 = F_t.diag().detach()
                trace = diag1.sum().item()
        for j, (_, (xt, yt)) in enumerate(tasks):
            R[i][j] = datasets.accuracy(model, xt, yt)
    return R, trace, theta1, diag1


def run(config: Config) -> Result:
    sizes = QUICK if config.quick else FULL
    split = datasets.load("digits", seed=config.seed, data_root=config.data_root)
    tasks = _tasks(split, sizes["tasks"], sizes["n_train"], config.generator(_GEN_PERM), config.device)
    T, repeats = sizes["tasks"], sizes["repeats"]
    runs = {name: [] for name in METHODS}
    traces = {name: [] for name in METHODS}
    by_hand_rel = None
    for r in range(repeats):
        for name in METHODS:
            R, trace, theta1, diag1 = _continual(tasks, name, config, r, sizes["epochs"])
            runs[name].append(R)
            traces[name].append(trace)
            if name == "batch_mean" and r == 0:  # the library's quantity against the copies' by-hand loop
                model = datasets.mlp([split.features, HIDDEN, 10], seed=config.seed).to(config.device)
                with torch.no_grad():
                    for p, t in zip(model.parameters(), theta1):
                        p.copy_(t)
                (x1, y1), _ = tasks[0]
                by_hand = seed_batch_mean_grad_sq(model, x1, y1, batch_size=BATCH_SIZE)
                by_hand_rel = ((diag1 - by_hand).abs().max() / by_hand.abs().max()).item()

    methods = {}
    for name, (label, _) in METHODS.items():
        Rs = torch.tensor(runs[name], dtype=torch.float64)  # [repeats, T, T]
        mean = Rs.mean(0)
        std = Rs.std(0, unbiased=False)
        methods[name] = {"label": label, "accuracy": mean.tolist(), "accuracy_std": std.tolist(),
                         "task1_final": mean[-1, 0].item(), "task1_final_runs": Rs[:, -1, 0].tolist(),
                         "final_mean": mean[-1].mean().item(), "last_task_final": mean[-1, -1].item(),
                         "fisher_trace_task1": None if traces[name][0] is None else statistics.fmean(traces[name])}
    factor = {other: statistics.fmean(a / b for a, b in zip(traces["ewc_true"], traces[other]))
              for other in ("batch_mean", "ewc_empirical")}
    data = {"tasks": T, "epochs": sizes["epochs"], "repeats": repeats, "lam": LAM, "lr": LR,
            "batch_size": BATCH_SIZE, "n_train": tasks[0][0][1].shape[0], "n_test": tasks[0][1][1].shape[0],
            "methods": methods, "factor_true_over_batch_mean": factor["batch_mean"],
            "factor_true_over_empirical": factor["ewc_empirical"], "batch_mean_by_hand_rel_diff": by_hand_rel}
    return Result(ID, EXPERIMENT.title, _summary(data), data, _outcomes(data), _tables(data), _figures(data))


# ---- report -----------------------------------------------------------------------------------------


def _summary(d: dict) -> str:
    m = d["methods"]
    t1 = {k: v["task1_final"] for k, v in m.items()}
    return (
        f"{d['tasks']} permuted-digits tasks learned in turn by an MLP 64-{HIDDEN}-10 ({d['epochs']} epochs of plain SGD "
        f"each, lr {d['lr']:g}, batches of {d['batch_size']}, the same λ = {d['lam']:g} for every penalty; mean of "
        f"{d['repeats']} run(s)). Test accuracy on task 1 after the last task: SGD {t1['sgd']:.2f}; EWC with the true "
        f"Fisher {t1['ewc_true']:.2f}, empirical {t1['ewc_empirical']:.2f}, MC {t1['ewc_mc']:.2f}, online "
        f"{t1['online_ewc']:.2f}. Seed 003 computes its Fisher one sample at a time at the predicted label "
        f"({t1['seed_argmax']:.2f}; neither the true nor the empirical Fisher) and drops the ½ of the penalty (its λ "
        f"is half of this one). The copies that square the gradient of each mini-batch's mean loss get a quantity "
        f"{d['factor_true_over_batch_mean']:.0f}× smaller than the true Fisher (trace at task 1; the empirical Fisher "
        f"is {d['factor_true_over_empirical']:.1f}× smaller), so at the same λ they keep task 1 at "
        f"{t1['batch_mean']:.2f}, next to SGD's {t1['sgd']:.2f}.")


def _outcomes(d: dict) -> list[Outcome]:
    m = d["methods"]
    t1 = {k: v["task1_final"] for k, v in m.items()}
    learned = min(v["accuracy"][0][0] for v in m.values())
    return [
        Outcome("task 1 is learned before the others (test accuracy after task 1 ≥ 0.9, every method)",
                learned >= 0.9, learned),
        Outcome("EWC (true Fisher) keeps task 1 better than SGD after the last task, by ≥ 0.2 accuracy",
                t1["ewc_true"] - t1["sgd"] >= 0.2, t1["ewc_true"] - t1["sgd"]),
        Outcome("EWC (true Fisher) has a higher mean accuracy over all tasks after the last one than SGD, by ≥ 0.05",
                m["ewc_true"]["final_mean"] - m["sgd"]["final_mean"] >= 0.05,
                m["ewc_true"]["final_mean"] - m["sgd"]["final_mean"]),
        Outcome("EWC (true Fisher) still learns the last task (accuracy ≥ 0.75)",
                m["ewc_true"]["last_task_final"] >= 0.75, m["ewc_true"]["last_task_final"]),
        Outcome("the MC Fisher protects task 1 as the true one does (|difference| ≤ 0.05)",
                abs(t1["ewc_mc"] - t1["ewc_true"]) <= 0.05, t1["ewc_mc"] - t1["ewc_true"]),
        Outcome(f"the empirical Fisher ({d['factor_true_over_empirical']:.1f}× smaller trace) protects task 1 less than "
                "the true one at the same λ", t1["ewc_empirical"] < t1["ewc_true"], t1["ewc_empirical"] - t1["ewc_true"]),
        Outcome("seed 003's argmax-label Fisher protects task 1 less than the true one at the same λ",
                t1["seed_argmax"] < t1["ewc_true"], t1["seed_argmax"] - t1["ewc_true"]),
        Outcome("online EWC keeps task 1 better than SGD, by ≥ 0.2", t1["online_ewc"] - t1["sgd"] >= 0.2,
                t1["online_ewc"] - t1["sgd"]),
        Outcome("the batch-mean squared gradient protects task 1 less than the true-Fisher EWC at the same λ, by ≥ 0.15",
                t1["ewc_true"] - t1["batch_mean"] >= 0.15, t1["ewc_true"] - t1["batch_mean"]),
        Outcome("the batch-mean squared gradient is ≥ 10× smaller than the true Fisher (trace at task 1)",
                d["factor_true_over_batch_mean"] >= 10, d["factor_true_over_batch_mean"]),
        Outcome("EWC(kind='batch_mean_grad_sq') is the copies' by-hand quantity (max relative difference ≤ 1e-5)",
                d["batch_mean_by_hand_rel_diff"] <= 1e-5, d["batch_mean_by_hand_rel_diff"]),
    ]


def _tables(d: dict) -> list[Table]:
    m = d["methods"]
    summary = [[v["label"], f"{v['accuracy'][0][0]:.3f}", f"{v['task1_final']:.3f}",
                " ".join(f"{a:.2f}" for a in v["task1_final_runs"]), f"{v['final_mean']:.3f}",
                f"{v['last_task_final']:.3f}", "" if v["fisher_trace_task1"] is None else f"{v['fisher_trace_task1']:.3g}"]
               for v in m.values()]
    header = ["after task"] + [f"task {j + 1}" for j in range(d["tasks"])]
    tables = [Table("Task accuracy by method (mean over runs)",
                    ["method", "task 1 after task 1", "task 1 after last", "per run", "mean after last",
                     "last task after last", "trace F (task 1)"], summary)]
    for v in m.values():
        tables.append(Table(f"Accuracy matrix: {v['label']} (row: after training task i; column: test accuracy on task j)",
                            header, [[i + 1] + [f"{a:.3f}" for a in row] for i, row in enumerate(v["accuracy"])]))
    return tables


def _figures(d: dict) -> list[Figure]:
    m, T = d["methods"], d["tasks"]

    def heatmaps(fig):
        fig.set_size_inches(3.2 * 4, 3.2 * 2)
        fig.set_layout_engine("constrained")  # (the report's default; set so that the colorbar is placed by it)
        axes = fig.subplots(2, 4).ravel()
        image = None
        for k, (ax, (name, v)) in enumerate(zip(axes, m.items())):
            image = ax.imshow(v["accuracy"], vmin=0, vmax=1, cmap="viridis")
            for i in range(T):
                for j in range(T):
                    a = v["accuracy"][i][j]
                    ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if a > 0.6 else "white")
            ax.set_title(PANEL[name], fontsize=9)
            ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
            ax.set_yticks(range(T), [str(i + 1) for i in range(T)])
            ax.set_xlabel("test on task", fontsize=8)
            if k % 4 == 0:
                ax.set_ylabel("after training task", fontsize=8)
        for ax in axes[len(m):]:
            ax.axis("off")
        fig.colorbar(image, ax=axes.tolist(), shrink=0.7, label="test accuracy")

    def task1(fig):
        ax = fig.subplots()
        for v in m.values():
            ax.plot(range(1, T + 1), [row[0] for row in v["accuracy"]], "o-", label=v["label"])
        ax.set_xlabel("after training task")
        ax.set_ylabel("test accuracy on task 1")
        ax.set_xticks(range(1, T + 1))
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)

    return [Figure(f"{ID}_accuracy", "Accuracy matrices, one per method: row i is after training task i, column j "
                   "the test accuracy on task j (mean over runs).", heatmaps),
            Figure(f"{ID}_task1", "Test accuracy on task 1 as the later tasks are learned, by method.", task1)]


EXPERIMENT = Experiment(id=ID, seeds="003", title="Continual learning on permuted digits: EWC and its Fishers",
                        run=run)
