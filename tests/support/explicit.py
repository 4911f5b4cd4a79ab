"""Plain-autograd references: Jacobians, output Hessians, GGN and Hessian matrices, per-sample gradients
and influence, each entry by its own backward (small models only)."""
import torch


def flat(grads, params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def explicit_jacobian(model, x, params=None):
    """J [M, P]: every entry of model(x) (flattened) differentiated by its own backward."""
    params = list(model.parameters()) if params is None else params
    out = model(x).reshape(-1)
    return torch.stack([flat(torch.autograd.grad(o, params, retain_graph=True, allow_unused=True), params)
                        for o in out])


def explicit_output_hessian(loss_fn, out, y):
    """∇²_z loss_fn(z, y) at z = out, [M, M] (torch.autograd.functional.hessian)."""
    H = torch.autograd.functional.hessian(lambda z: loss_fn(z, y), out.detach())
    return H.reshape(out.numel(), out.numel())


def explicit_ggn(model, loss_fn, x, y, params=None):
    """Jᵀ H J with J the Jacobian of all outputs and H the loss Hessian in the outputs."""
    J = explicit_jacobian(model, x, params)
    return J.T @ explicit_output_hessian(loss_fn, model(x), y) @ J


def explicit_hessian(model, loss_fn, x, y, params=None):
    """∇² loss_fn(model(x), y) by double backprop, one row per parameter entry."""
    params = list(model.parameters()) if params is None else params
    g = flat(torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True), params)
    return torch.stack([flat(torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True), params)
                        for i in range(g.numel())])


def explicit_sample_grads(model, loss_fn, x, y, params=None):
    """[N, P]: ∇ loss of each sample (a batch of one)."""
    params = list(model.parameters()) if params is None else params
    return torch.stack([flat(torch.autograd.grad(loss_fn(model(x[n:n + 1]), y[n:n + 1]), params,
                                                 allow_unused=True), params) for n in range(x.shape[0])])


def explicit_influence(H, G_train, G_test, damping):
    M = H + damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    assert torch.linalg.eigvalsh(M)[0] > 1e-4, "test set-up: H + damping*I must be positive definite"
    return -G_test @ torch.linalg.solve(M, G_train.T)
