// Every fisherext op schema, in one place, plus the Python module fisherext._C (build_info). Each family has
// a CPU kernel file, a CUDA kernel file, the checks shared by both (csrc/<family>_common.h, on csrc/checks.h),
// a Python module with the wrappers, fakes and docstrings with the math (fisherext/ops/), and pure-PyTorch
// twins (fisherext/reference.py). Autograd behaviour of every op: csrc/autograd.cpp. Where the two backends
// compute an op by different algorithms, the schema's comment says so ("CPU: ... / CUDA: ..."); elsewhere
// they compute the same formulas and differ only in summation order.
//
// Kernel family K1 (fisher_accum): per-sample outer-product accumulation for linear maps.
// Notation: a linear layer maps a [N, (T,) I] to outputs whose gradient is delta [N, (T,) O];
// the per-sample weight gradient is g_n = sum_t delta_nt a_nt^T (O x I, row-major vec index o*I + i).
//   csrc/fisher_accum_gemm.cpp (ATen GEMM compositions for any device), csrc/cpu/fisher_accum_cpu.cpp,
//   csrc/cuda/fisher_accum_cuda.cu, csrc/fisher_accum_common.h, fisherext/ops/linear.py
//
// Kernel family K2 (perturb): finite differences in parameter space. Parameters are set to
// theta_saved ± eps v for all tensors at once (and restored by a bitwise copy), and the logits at
// theta ± eps v are reduced per sample to the central-difference Fisher quadratic.
//   csrc/cpu/perturb_cpu.cpp, csrc/cuda/perturb_cuda.cu (+ csrc/cuda/multi_tensor_apply.cuh),
//   csrc/perturb_common.h, fisherext/ops/perturb.py
//
// Kernel family K3, in two parts:
// softmax: the softmax cross-entropy Hessian H = diag(p) − p pᵀ of each logit row applied to vectors
// (Gauss-Newton/Fisher-vector products) or factored into its square-root columns (true-Fisher backprop).
//   csrc/cpu/softmax_cpu.cpp, csrc/cuda/softmax_cuda.cu, csrc/softmax_common.h, fisherext/ops/softmax.py
// solver_update: fused flat-vector updates of the linear solvers (CG, LiSSA, Neumann), so that a solver
// iteration is one matvec plus one launch.
//   csrc/cpu/solver_update_cpu.cpp, csrc/cuda/solver_update_cuda.cu, csrc/solver_update_common.h,
//   fisherext/ops/solver_updates.py
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <atomic>

#include "fisher_accum_common.h"
#include "fisher_accum_gemm.h"

TORCH_LIBRARY(fisherext, m) {
  // sum_n w_n (g_n ⊙ g_n) -> [O, I], never writing the N x O x I per-sample gradients.
  // Both: T = 1 as one GEMM per chunk, (w ⊙ delta²)ᵀ a². T > 1: CPU a register-tiled micro-kernel per
  // thread; CUDA a shared-memory tiled per-sample product whose tiles are squared in registers, or for long
  // sequences (T >= 64 for half/bfloat16, >= 128 otherwise) batched GEMMs writing a chunk of g_n.
  m.def("linear_sq_grad(Tensor a, Tensor delta, Tensor? weight=None) -> Tensor");
  // out[OI, OI] += alpha * sum_n w_n vec(g_n) vec(g_n)^T; reads out's upper triangle, writes it symmetric.
  // out has a's dtype, or float32 for half/bfloat16 a.
  // Both: a chunk of per-sample gradients by a batched GEMM, then a symmetric rank-k update by GEMMs on
  // the 512-wide tile rows of the upper triangle.
  m.def(
      "linear_outer_accum_(Tensor(a!) out, Tensor a, Tensor delta, Tensor? weight=None, "
      "float alpha=1.0) -> ()");
  // out[D, D] <- beta * out + alpha * sum_n w_n sum_t x_nt x_nt^T, x [N, D] or [N, T, D]; out has x's
  // dtype, or float32 for half/bfloat16 x. Serves full/block Fisher from a per-sample gradient chunk
  // G [N, P] and the KFAC factors. Both: GEMMs on the 512-wide tile rows of the upper triangle.
  m.def(
      "sym_outer_accum_(Tensor(a!) out, Tensor x, Tensor? weight=None, float alpha=1.0, "
      "float beta=1.0) -> ()");
  // K_n = J_n J_n^T [N, C, C] with J_n[c] = vec(sum_t delta_nct a_nt^T); delta [N, C, (T,) O].
  // Both: batched GEMMs from the position Gram a_n a_nᵀ or from the materialized g_nc, whichever needs
  // fewer flops (csrc/fisher_accum_gemm.h); CPU chunks in parallel, CUDA one chunk after another.
  m.def("class_gram(Tensor a, Tensor delta) -> Tensor");
  // out[i] <- x[o_i : o_i + n_i] + eps * v[o_i : o_i + n_i] for every tensor i of the list, where x and v
  // are flat [sum_i n_i], n_i = out[i].numel() and o_i = n_0 + ... + n_{i-1} (elements in memory order);
  // a pure copy of x when v is None. One pass over the whole list: CPU one parallel loop over fixed
  // chunks; CUDA one launch over the list (multi_tensor_apply).
  m.def("unflatten_axpy_(Tensor(a!)[] out, Tensor x, Tensor? v, float eps) -> ()");
  // Logits [N, C] at theta + eps v, theta - eps v (and theta) -> per sample n, all [N]:
  //   quad     = sum_c (log p+_c - log p-_c)(p+_c - p-_c) / (2 eps)^2   (central-difference v^T F_n v)
  //   kl_plus  = KL(p0 || p+), kl_minus = KL(p0 || p-)   with logits_0,
  //            = KL(p- || p+),            = KL(p+ || p-)   without.
  m.def(
      "fd_fisher_reduce(Tensor logits_plus, Tensor logits_minus, Tensor? logits_0, float eps) "
      "-> (Tensor, Tensor, Tensor)");

  // K3 softmax. Per logit row z [N, C], p = softmax(z):
  // H u = p ⊙ u − p (pᵀu) for u [N, C] or [K, N, C] (K directions sharing the logits); u's shape and dtype.
  m.def("softmax_hvp(Tensor logits, Tensor u) -> Tensor");
  // S [C, N, C] with S[k, n] = √p_nk (e_k − p_n), so Σ_k S[k, n] S[k, n]ᵀ = diag(p_n) − p_n p_nᵀ.
  m.def("softmax_hessian_sqrt(Tensor logits) -> Tensor");
  // K3 solver updates. Vectors [P] or [P, K] (columns), per-column scalars [] or [K] in the compute
  // dtype, inv_diag [P]:
  // x += alpha p; r −= alpha Ap; returns (rz, rr) = (Σ_i r_i z_i, Σ_i r_i²) of the new r, z = inv_diag ⊙ r.
  m.def(
      "cg_update_(Tensor(a!) x, Tensor(b!) r, Tensor p, Tensor Ap, Tensor alpha, Tensor? inv_diag=None) "
      "-> (Tensor, Tensor)");
  // p <- z + beta p, z = inv_diag ⊙ r (z = r without inv_diag).
  m.def("cg_direction_(Tensor(a!) p, Tensor r, Tensor beta, Tensor? inv_diag=None) -> ()");
  // h <- v + (1 − damping) h − Hh / scale.
  m.def("lissa_update_(Tensor(a!) h, Tensor v, Tensor Hh, float damping, float scale) -> ()");
  // term <- term − Aterm / scale; acc <- acc + term.
  m.def("neumann_update_(Tensor(a!) term, Tensor(b!) acc, Tensor Aterm, float scale) -> ()");
}

namespace fisherext {

// 0: the default budget.
std::atomic<int64_t> scratch_elems_set{0};
std::atomic<bool> gemm_kernels_on_cpu_set{false};

int64_t scratch_elems() {
  const int64_t set = scratch_elems_set.load(std::memory_order_relaxed);
  return set > 0 ? set : kScratchElems;
}

bool gemm_kernels_on_cpu() { return gemm_kernels_on_cpu_set.load(std::memory_order_relaxed); }

}  // namespace fisherext

PYBIND11_MODULE(_C, m) {
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef FISHEREXT_WITH_CUDA
    info["cuda_compiled"] = true;
    info["cuda_arch_list"] = FISHEREXT_CUDA_ARCH_LIST;
#else
    info["cuda_compiled"] = false;
    info["cuda_arch_list"] = pybind11::none();
#endif
    info["cplusplus"] = static_cast<long>(__cplusplus);
    return info;
  });
  // Test hook: sets the fisher_accum kernels' per-chunk scratch budget (elements; 0 restores the default) so
  // that small inputs cross chunk boundaries, and returns the previous setting.
  m.def("_set_scratch_elems", [](int64_t elems) {
    TORCH_CHECK_VALUE(elems >= 0, "fisherext._C._set_scratch_elems: elems must be >= 0, got ", elems);
    return fisherext::scratch_elems_set.exchange(elems);
  });
  // Test hook: the CPU kernels of class_gram and linear_sq_grad run the device-generic GEMM compositions
  // that CUDA runs (csrc/fisher_accum_gemm.h), so CPU tests check them; returns the previous setting.
  m.def("_set_gemm_kernels_on_cpu", [](bool enabled) { return fisherext::gemm_kernels_on_cpu_set.exchange(enabled); });
}
