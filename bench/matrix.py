r"""The model-level workloads: every model of ``bench.models`` × every quantity that applies to it.

Quantities (signatures and math: ``bench.loops``; the same for every impl, peers included):

| id | result | models |
|---|---|---|
| gradient | one gradient of the mean loss [P] (the unit of "× gradient") | every model, at each batch size used |
| diag_empirical, diag_true | diagonal Fisher [P] | the six models |
| full_empirical | dense empirical Fisher [P, P] | mlp_small (P ≈ 10⁴) |
| kfac | K-FAC factors (A, G) per Linear/Conv2d | mlp, wide_mlp, cnn, convnet |
| trace_true, quad_true | per-input tr(F_n), vᵀF_nv [N] | the six models |
| fd_quad | finite-difference vᵀF_nv [N], ε = 1e-3 | the six models |
| hvp, ggn | Hessian / GGN of the mean loss times V [P, 1] | the six models |
| ewc | diagonal true Fisher over the whole data set, streamed | mlp, all 1797 digits |

K-FAC is left out where the model's weights are not all Linear/Conv2d modules called through their own
forward (the transformer's attention projections run inside ``F.multi_head_attention_forward``, the
LSTM's gates are no Linear modules), so that every impl factors the same layers.

Directions: v for the quadratic forms is seed 001's, the gradient of the largest log-probability of the
first input, scaled to unit norm; V for the products one seeded Gaussian column of unit norm.

The float64 reference of each workload is its ``autograd-loop`` impl run in float64 on the same
inputs (model and data converted); for ``fd_quad`` it is the exact vᵀF_nv (``quad_true``'s loop), so
that the finite-difference impls show their truncation and round-off error.
"""
from __future__ import annotations

import torch

from fisherext import flatten

from .compare import kfac_error, relative_error
from .fisherext_impls import FISHEREXT
from .loops import LOOPS
from .models import MODELS, ModelSpec, num_params
from .torch_func import TORCH_FUNC
from .workloads import Workload

PER_MODEL = ("diag_empirical", "diag_true", "kfac", "trace_true", "quad_true", "fd_quad", "hvp", "ggn")
SIX_MODELS = ("mlp", "wide_mlp", "cnn", "convnet", "transformer", "lstm")
KFAC_MODELS = ("mlp", "wide_mlp", "cnn", "convnet")
EWC_N = {False: 1797, True: 128}
# The peers' quantity under which an impl of ours is listed (ewc: the diagonal true Fisher of the data set).
PEER_QUANTITY = {"ewc": "diag_true"}
REFERENCE = {"fd_quad": "quad_true"}  # the loop whose float64 run is the reference, where not the quantity's own

TITLES = {
    "gradient": "one gradient of the mean loss",
    "diag_empirical": "diagonal empirical Fisher",
    "diag_true": "diagonal true Fisher",
    "full_empirical": "dense empirical Fisher",
    "kfac": "K-FAC factors (exact, true Fisher)",
    "trace_true": "per-input tr(F_n)",
    "quad_true": "per-input vᵀF_nv",
    "fd_quad": "finite-difference vᵀF_nv (ε = 1e-3)",
    "hvp": "Hessian-vector product",
    "ggn": "GGN-vector product",
    "ewc": "EWC Fisher (diagonal true, data set streamed)",
}


def peer_impls() -> dict[str, dict]:
    """bench.peers' PEER_IMPLS, or {} where that module is not there (then no peer rows)."""
    try:
        from .peers import PEER_IMPLS
    except ImportError as exc:
        if exc.name not in ("bench.peers", __package__ + ".peers"):
            raise
        return {}
    return PEER_IMPLS


def seed_direction(model, x) -> torch.Tensor:
    """Seed 001's direction: ∇θ of the largest log-probability of the first input, at unit norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    v = flatten(torch.autograd.grad(torch.log_softmax(model(x[:1]), dim=1).max(), params))
    return v / v.norm()


def random_columns(P: int, K: int = 1) -> torch.Tensor:
    V = torch.randn(P, K, generator=torch.Generator().manual_seed(0))
    return V / V.norm(dim=0)


def model_inputs(spec: ModelSpec, quantity: str, N: int, quick: bool):
    def build():
        model = spec.build(quick)
        x, y = spec.data(N, quick)
        inputs = {"model": model, "x": x, "y": y}
        if quantity in ("quad_true", "fd_quad"):
            inputs["v"] = seed_direction(model, x)
        elif quantity in ("hvp", "ggn"):
            inputs["V"] = random_columns(num_params(model))
        return inputs
    return build


def model_workload(spec: ModelSpec, quantity: str, N: int, quick: bool, peers: dict) -> Workload:
    impls = {"fisherext": FISHEREXT.get(quantity), "autograd-loop": LOOPS[quantity],
             "torch.func": TORCH_FUNC.get(quantity),
             **peers.get(PEER_QUANTITY.get(quantity, quantity), {})}
    return Workload(
        name=f"{quantity}({spec.id},N={N})", group="models", quantity=quantity, model=spec.id, N=N,
        build=model_inputs(spec, quantity, N, quick),
        impls={name: fn for name, fn in impls.items() if fn is not None},
        reference=LOOPS[REFERENCE.get(quantity, quantity)],
        compare=kfac_error if quantity == "kfac" else relative_error,
        reference_note="exact vᵀF_nv (the quad_true loop)" if quantity == "fd_quad" else "")


def workloads(quick: bool) -> list[Workload]:
    peers = peer_impls()
    cells = [(model, q) for model in SIX_MODELS for q in PER_MODEL if q != "kfac" or model in KFAC_MODELS]
    cells += [("mlp_small", "full_empirical"), ("mlp", "ewc")]
    out = []
    for model_id in dict.fromkeys(model for model, _ in cells):
        spec = MODELS[model_id]
        mine = [q for m, q in cells if m == model_id]
        sizes = {q: EWC_N[quick] if q == "ewc" else spec.batch(quick) for q in mine}
        for N in dict.fromkeys(sizes.values()):
            out.append(model_workload(spec, "gradient", N, quick, peers))
            out += [model_workload(spec, q, N, quick, peers) for q in mine if sizes[q] == N]
    return out
