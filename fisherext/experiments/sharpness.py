r"""Experiment ``sharpness`` (seeds 000 + 004): sharpness-aware and natural-gradient training on clean and
noisy digits labels, the sharpness :math:`\lambda_{max}` of the solutions, and seed 004's optimizers at the
curvature learning rate :math:`\eta = 1/\lambda_{max}`.

An MLP is trained from one initialization, on one sequence of minibatches and with one cosine decay of
the learning rate, by SGD (with momentum), SAM
(:class:`fisherext.optim.SAM`, :math:`\varepsilon = \rho\, g/\|g\|`), Fisher SAM
(:class:`fisherext.optim.FisherSAM`, the ellipsoid of :math:`f = 1 + \eta\, g\odot g`: seed 000's
unfinished check was its premise :math:`\mathrm{KL} \approx \tfrac12\varepsilon^\top F\varepsilon`) and
K-FAC natural gradient (:class:`fisherext.optim.NaturalGradient`), on the clean labels and on labels of
which a fraction (40 %) is replaced by a random *other* class (:func:`noisy_labels`). Each solution's
sharpness is the largest eigenvalue of the Hessian of the mean training loss on the labels it was
trained on,

.. math:: \lambda_{max} = \max_{\|u\|=1} u^\top \nabla^2 L(\theta)\, u, \qquad
          L(\theta) = \frac1N \sum_n -\log p(y_n|x_n,\theta)

(:func:`fisherext.optim.max_eigenvalue`, Lanczos on Hessian-vector products). At the initialization,
:math:`\lambda_{max}` by Lanczos and by power iteration, and :math:`\eta = 1/\lambda_{max}`
(:func:`fisherext.optim.curvature_learning_rate`: on a quadratic, gradient descent at that rate removes the
top direction's error in one step and is stable below :math:`2/\lambda_{max}`); seed 004's optimizers
(full-batch GD, SGD, momentum, Adagrad, RMSprop, Adam) are then run at it from the same initialization
(:func:`fisherext.optim.compare_optimizers`). Seed 004 states the rate for a constant Hessian and picks 0.1
by hand; a network's Hessian is not constant, which the loss curves show.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import optim
from .._core.entry import entry_point
from . import data
from .registry import Config, Experiment, Figure, Outcome, Result, Table

__all__ = ["EXPERIMENT", "OPTIMIZERS", "SEED_OPTIMIZERS", "noisy_labels"]

#: The trainers of the first part, with their settings (one learning rate 0.1 and momentum 0.9 for the
#: SGD-based ones, as in seed 004's working example).
OPTIMIZERS = {
    "sgd": dict(lr=0.1, momentum=0.9),
    "sam": dict(lr=0.1, momentum=0.9, rho=0.05),
    "fisher_sam": dict(lr=0.1, momentum=0.9, rho=0.1, eta=1.0),
    "natural": dict(lr=0.02, momentum=0.9, damping=0.1, update_interval=10),
}
_NAMES = {"sgd": "SGD", "sam": "SAM", "fisher_sam": "FisherSAM", "natural": "natural gradient"}
#: Seed 004's optimizers, run at η = 1/λ_max by compare_optimizers.
SEED_OPTIMIZERS = ("gd", "sgd", "momentum", "adagrad", "rmsprop", "adam")
NOISE = 0.4
_BATCH = 64
_POWER_TOL = 1e-3  # power iteration stops at a residual ‖Au − λu‖ ≤ 1e-3 |λ|


@entry_point(name="experiments.sharpness.noisy_labels")
def noisy_labels(y: torch.Tensor, fraction: float, classes: int, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Labels with a fraction of them replaced by a random other class.

    :math:`k = \mathrm{round}(\text{fraction}\cdot N)` positions are drawn without replacement (a random
    permutation's first k), and each label there becomes :math:`(y_n + s_n) \bmod C` with :math:`s_n`
    uniform on :math:`\{1, \dots, C-1\}`: uniform over the other classes, never the true one.

    Args:
        y: integer class labels [N] in [0, classes).
        fraction: the fraction of labels replaced, in [0, 1].
        classes: the number of classes C ≥ 2.
        generator: the CPU ``torch.Generator`` of the draws (None: torch's global one).

    Returns:
        A new tensor like y; exactly k entries differ from y.

    Raises:
        ValueError: fraction outside [0, 1], classes < 2, y not 1-D integer labels in [0, classes).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction: must be a number in [0, 1], got {fraction!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes: must be an int >= 2, got {classes!r}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y: expected integer class labels [N], got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.numel() and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"y: labels must lie in [0, {classes}), got [{int(y.min())}, {int(y.max())}]")
    k = round(fraction * y.numel())
    where = torch.randperm(y.numel(), generator=generator)[:k].to(y.device)
    shift = torch.randint(1, classes, (k,), generator=generator).to(y.device, y.dtype)
    out = y.clone()
    out[where] = (y[where] + shift) % classes
    return out


def _sizes(quick: bool) -> dict:
    if quick:
        return dict(hidden=32, n_train=500, epochs=6, steps=30, lanczos_m=20, power_iters=100)
    return dict(hidden=64, n_train=None, epochs=40, steps=200, lanczos_m=None, power_iters=200)


def _optimizer(name: str, model):
    s = OPTIMIZERS[name]
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"])
    if name == "sam":
        return optim.SAM(model.parameters(), torch.optim.SGD, rho=s["rho"], lr=s["lr"], momentum=s["momentum"])
    if name == "fisher_sam":
        return optim.FisherSAM(model.parameters(), torch.optim.SGD, rho=s["rho"], eta=s["eta"], lr=s["lr"],
                               momentum=s["momentum"])
    return optim.NaturalGradient(model, lr=s["lr"], momentum=s["momentum"], damping=s["damping"],
                                 update_interval=s["update_interval"])


def _fit(name: str, model, x, y, epochs: int, generator) -> list[float]:
    """Minibatch training with optimizer ``name`` and a cosine decay of its learning rate over the epochs
    (without it, the final iterate's test accuracy on noisy labels swings by several points from epoch to
    epoch); the mean training loss of each epoch. (data.train steps a plain optimizer; SAM needs the
    closure at θ + ε and natural gradient the batch of its factors.)"""
    opt = _optimizer(name, model)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    losses = []
    model.train()
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(x.shape[0], generator=generator).split(_BATCH):
            idx = idx.to(x.device)
            xb, yb = x[idx], y[idx]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            loss = closure()  # the gradient at θ (SAM perturbs from it)
            if name in ("sam", "fisher_sam"):
                opt.step(closure)
            elif name == "natural":
                opt.step(batch=(xb, yb))
            else:
                opt.step()
            total += loss.item() * idx.numel()
        losses.append(total / x.shape[0])
        schedule.step()
    model.eval()
    return losses


def run(config: Config) -> Result:
    sz = _sizes(config.quick)
    dev, progress = config.device, config.progress
    split = data.load("digits", seed=config.seed).subset(n_train=sz["n_train"]).to(dev)
    x, xt, yt = split.x_train, split.x_test, split.y_test
    labels = {"clean": split.y_train,
              "noisy": noisy_labels(split.y_train.cpu(), NOISE, split.classes, generator=config.generator(11)).to(dev)}
    sizes = [split.features, sz["hidden"], split.classes]
    lanczos = dict(m=sz["lanczos_m"], progress=progress)

    runs, epoch_losses = {}, {}
    for which, y in labels.items():
        runs[which] = {}
        for name in OPTIMIZERS:
            model = data.mlp(sizes, seed=config.seed).to(dev)
            curve = _fit(name, model, x, y, sz["epochs"], config.generator(12))  # the same batches for all
            epoch_losses[f"{which}/{name}"] = curve
            with torch.no_grad():
                out = model(x)
                train_loss = F.cross_entropy(out, y).item()
                train_acc = (out.argmax(1) == y).double().mean().item()
            lam = optim.max_eigenvalue(model, "cross_entropy", (x, y), generator=config.generator(13), **lanczos).item()
            runs[which][name] = {"test_accuracy": data.accuracy(model, xt, yt), "final_train_loss": train_loss,
                                 "train_accuracy": train_acc, "lambda_max": lam,
                                 "curvature_lr": 1.0 / lam if lam > 0 else math.nan}

    # λ_max at the initialization, two ways, and seed 004's optimizers at η = 1/λ_max.
    init = data.mlp(sizes, seed=config.seed).to(dev)
    y = labels["clean"]
    eta = optim.curvature_learning_rate(init, "cross_entropy", (x, y), generator=config.generator(14), **lanczos)
    lam_lanczos = 1.0 / eta  # curvature_learning_rate's λ_max (Lanczos)
    lam_power = optim.max_eigenvalue(init, "cross_entropy", (x, y), method="power", maxiter=sz["power_iters"],
                                     tol=_POWER_TOL, generator=config.generator(14), progress=progress).item()
    cmp = optim.compare_optimizers(init, "cross_entropy", (x, y), optimizers=SEED_OPTIMIZERS, lr=eta,
                                   steps=sz["steps"], batch_size=_BATCH, test_data=(xt, yt),
                                   generator=config.generator(15), progress=progress)
    increases = {k: sum(1 for a, b in zip(c, c[1:]) if not b <= a) for k, c in cmp.losses.items()}

    out = {
        "model": {"sizes": sizes, "epochs": sz["epochs"], "batch_size": _BATCH, "train_samples": int(x.shape[0])},
        "noise": {"fraction": NOISE, "flipped": int((labels["noisy"] != labels["clean"]).sum())},
        "settings": {k: dict(v) for k, v in OPTIMIZERS.items()},
        "runs": runs,
        "epoch_losses": epoch_losses,
        "init": {"lambda_max_lanczos": lam_lanczos, "lambda_max_power": lam_power,
                 "power_rel_diff": abs(lam_power - lam_lanczos) / abs(lam_lanczos), "curvature_lr": eta},
        "comparison": {"steps": cmp.steps, "lr": eta, "losses": cmp.losses, "loss_increases": increases,
                       "final_loss": {k: c[-1] for k, c in cmp.losses.items()},
                       "test_accuracy": cmp.test_accuracy},
    }
    return Result(id="sharpness", title=EXPERIMENT.title, summary=_summary(out), data=out, outcomes=_outcomes(out),
                  tables=_tables(out), figures=_figures(out))


def _outcomes(d: dict) -> list[Outcome]:
    r, c = d["runs"], d["comparison"]
    lam = {w: {k: v["lambda_max"] for k, v in r[w].items()} for w in r}
    acc = {w: {k: v["test_accuracy"] for k, v in r[w].items()} for w in r}
    gd = c["losses"]["gd"]
    noisy = acc["noisy"]
    noise_cost = acc["clean"]["sgd"] - noisy["sgd"]
    power = d["init"]["power_rel_diff"]
    sharpening = lam["clean"]["sgd"] / d["init"]["lambda_max_lanczos"]
    minibatch = {k: v for k, v in c["final_loss"].items() if k != "gd"}
    best_other = min((v for v in minibatch.values() if v == v), default=math.inf)
    return [
        Outcome("SAM's solution is flatter than SGD's on clean labels: λ_max(SAM) < λ_max(SGD) (value: their ratio)",
                lam["clean"]["sam"] < lam["clean"]["sgd"], lam["clean"]["sam"] / lam["clean"]["sgd"]),
        Outcome("SAM's solution is flatter than SGD's on 40 % noisy labels too (value: λ_max ratio SAM / SGD)",
                lam["noisy"]["sam"] < lam["noisy"]["sgd"], lam["noisy"]["sam"] / lam["noisy"]["sgd"]),
        Outcome("FisherSAM's solution is flatter than SGD's on clean labels (value: λ_max ratio FisherSAM / SGD)",
                lam["clean"]["fisher_sam"] < lam["clean"]["sgd"], lam["clean"]["fisher_sam"] / lam["clean"]["sgd"]),
        Outcome("40 % label noise costs SGD ≥ 0.03 of test accuracy (value: clean − noisy accuracy)",
                noise_cost >= 0.03, noise_cost),
        Outcome("SAM's test accuracy on noisy labels is above SGD's (value: SAM − SGD)",
                noisy["sam"] > noisy["sgd"], noisy["sam"] - noisy["sgd"]),
        Outcome("FisherSAM's test accuracy on noisy labels is ≥ SGD's − 0.01 (value: FisherSAM − SGD)",
                noisy["fisher_sam"] - noisy["sgd"] >= -0.01, noisy["fisher_sam"] - noisy["sgd"]),
        Outcome("natural gradient fits the noisy labels more and generalizes less: its noisy-label test accuracy "
                "is below SGD's (value: natural gradient − SGD)", noisy["natural"] < noisy["sgd"],
                noisy["natural"] - noisy["sgd"]),
        Outcome("power iteration and Lanczos agree on λ_max at the initialization within 0.1 % (value: relative "
                "difference)", power <= 1e-3, power),
        Outcome("the Hessian is not constant: SGD's clean solution is sharper than the initialization, "
                "λ_max(SGD) / λ_max(θ₀) > 1 (value: that ratio)", sharpening > 1, sharpening),
        Outcome("so GD at η = 1/λ_max(θ₀) does not decrease the loss monotonically: its training loss rises at "
                "some step (value: the number of steps at which it rose)", c["loss_increases"]["gd"] > 0,
                c["loss_increases"]["gd"]),
        Outcome("GD at η = 1/λ_max(θ₀) still lowers the training loss by ≥ 75 % over the run (value: final / "
                "initial loss)", gd[-1] <= 0.25 * gd[0], gd[-1] / gd[0]),
        Outcome("η = 1/λ_max is a rate for full-batch GD, not for the minibatch and adaptive optimizers: GD ends "
                "below every one of them at that rate (value: GD's final loss − the best other's)",
                gd[-1] < best_other, gd[-1] - best_other),
    ]


def _tables(d: dict) -> list[Table]:
    rows = []
    for which, runs in d["runs"].items():
        for name, r in runs.items():
            rows.append([which, _NAMES[name], f"{r['test_accuracy']:.3f}", f"{r['train_accuracy']:.3f}",
                         f"{r['final_train_loss']:.3f}", f"{r['lambda_max']:.3f}", f"{r['curvature_lr']:.3f}"])
    c = d["comparison"]
    seed_rows = [[k, f"{c['lr']:.3f}", f"{c['losses'][k][0]:.3f}", f"{c['final_loss'][k]:.4g}",
                  f"{min(c['losses'][k]):.4g}", str(c["loss_increases"][k]),
                  f"{c['test_accuracy'].get(k, math.nan):.3f}"] for k in c["losses"]]
    i = d["init"]
    return [
        Table(f"Trained solutions ({d['model']['epochs']} epochs, batch {d['model']['batch_size']}; noisy: "
              f"{d['noise']['flipped']} of {d['model']['train_samples']} training labels replaced by another class; "
              "λ_max of the Hessian of the training loss on the labels trained on)",
              ["labels", "optimizer", "test acc.", "train acc.", "final train loss", "λ_max", "1/λ_max"], rows),
        Table(f"Seed 004's optimizers at η = 1/λ_max(θ₀) = {c['lr']:.3f} (λ_max(θ₀): Lanczos "
              f"{i['lambda_max_lanczos']:.4f}, power iteration {i['lambda_max_power']:.4f}), {c['steps']} steps",
              ["optimizer", "η", "initial loss", "final loss", "lowest loss", "steps with a rise", "test acc."],
              seed_rows),
    ]


def _summary(d: dict) -> str:
    r, c, i = d["runs"], d["comparison"], d["init"]
    lam = {w: {k: v["lambda_max"] for k, v in r[w].items()} for w in r}
    acc = {w: {k: v["test_accuracy"] for k, v in r[w].items()} for w in r}

    def listing(values, fmt):
        return ", ".join(f"{_NAMES[k]} {format(v, fmt)}" for k, v in values.items())

    sharper = all(lam["noisy"][k] > lam["clean"][k] for k in OPTIMIZERS)
    return (
        f"Trained {d['model']['epochs']} epochs from one initialization on one sequence of minibatches (cosine "
        f"learning-rate decay). Test accuracy on clean labels: {listing(acc['clean'], '.3f')}; with 40 % of the "
        f"training labels replaced by another class: {listing(acc['noisy'], '.3f')}. Sharpness λ_max of the "
        f"solutions, clean: {listing(lam['clean'], '.3f')}; noisy: {listing(lam['noisy'], '.3f')}"
        + (" (noisy labels give sharper solutions for every optimizer)" if sharper else "") + ". "
        f"At the initialization λ_max = {i['lambda_max_lanczos']:.4f} (Lanczos; power iteration "
        f"{i['lambda_max_power']:.4f}), so η = 1/λ_max = {c['lr']:.3f}: the rate seed 004 calls optimal, which "
        f"holds for a constant Hessian (the seed picks 0.1 by hand). A network's Hessian is not constant: SGD's "
        f"solution has {lam['clean']['sgd'] / i['lambda_max_lanczos']:.2f}× the initial λ_max, and full-batch GD "
        f"at η does not decrease the loss monotonically (it rose at {c['loss_increases']['gd']} of {c['steps']} "
        f"steps) though it ends at {c['final_loss']['gd']:.3g} from {c['losses']['gd'][0]:.3g}. For the minibatch "
        f"and adaptive optimizers the same rate is far too large (final losses: "
        + ", ".join(f"{k} {v:.3g}" for k, v in c["final_loss"].items() if k != "gd") + ")."
    )


def _figures(d: dict) -> list[Figure]:
    c, runs = d["comparison"], d["runs"]

    def curves(fig):
        left, right = fig.subplots(1, 2)
        for k, curve in c["losses"].items():
            left.plot(range(len(curve)), curve, lw=1, label=k)
        left.set_yscale("log")
        left.set_xlabel("step")
        left.set_ylabel("training loss")
        left.set_title(f"seed 004's optimizers at η = 1/λ_max = {c['lr']:.2f}", fontsize=9)
        left.legend(fontsize=7)
        for j, name in enumerate(OPTIMIZERS):
            for which, style in (("clean", "-"), ("noisy", "--")):
                curve = d["epoch_losses"][f"{which}/{name}"]
                right.plot(range(1, len(curve) + 1), curve, style, color=f"C{j}", lw=1,
                           label=f"{_NAMES[name]}, {which}")
        right.set_yscale("log")
        right.set_xlabel("epoch")
        right.set_ylabel("mean minibatch loss")
        right.set_title("SGD, SAM, FisherSAM, natural gradient", fontsize=9)
        right.legend(fontsize=6)
        fig.set_size_inches(10, 4)
        fig.tight_layout()

    def bars(fig):
        left, right = fig.subplots(1, 2)
        names = list(OPTIMIZERS)
        width = 0.38
        for j, which in enumerate(("clean", "noisy")):
            pos = [i + (j - 0.5) * width for i in range(len(names))]
            left.bar(pos, [runs[which][n]["test_accuracy"] for n in names], width, label=f"{which} labels")
            right.bar(pos, [runs[which][n]["lambda_max"] for n in names], width, label=f"{which} labels")
        for ax, label in ((left, "test accuracy"), (right, "λ_max of the training loss")):
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([_NAMES[n] for n in names], fontsize=8)
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        lo = min(runs[w][n]["test_accuracy"] for w in runs for n in names)
        left.set_ylim(max(0.0, lo - 0.1), 1.0)
        fig.set_size_inches(10, 4)
        fig.tight_layout()

    return [
        Figure("sharpness_optimizers", "Training loss of seed 004's optimizers at the curvature rate η = 1/λ_max "
               "of the initialization (left), and of SGD, SAM, FisherSAM and natural gradient on clean and 40 % "
               "noisy labels (right).", curves),
        Figure("sharpness_accuracy", "Test accuracy (left) and sharpness λ_max (right) of the trained solutions, "
               "clean against noisy labels.", bars),
    ]


EXPERIMENT = Experiment(id="sharpness", seeds="000 + 004", title="Sharpness: SAM, FisherSAM, natural gradient and "
                        "the curvature learning rate", run=run)
