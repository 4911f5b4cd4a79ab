// Shared by the CPU and CUDA kernels of the softmax family: argument checks and the prepared problems
// (contiguous inputs, sizes, outputs), written once so that both backends check the same things.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "checks.h"

namespace fisherext {

// ---- softmax_hvp / softmax_hessian_sqrt ----
//
// Per row of logits z with p = softmax(z), the Hessian of −log softmax(z)_y w.r.t. z is
// H = diag(p) − p pᵀ (for every label y). softmax_hvp applies it: H u = p ⊙ (u − pᵀu);
// softmax_hessian_sqrt returns its C square-root columns S[k] = √p_k (e_k − p), Σ_k S[k] S[k]ᵀ = H.
// Both need per row only max_c z_c and Σ_c exp(z_c − max), so that p_c = exp(z_c − max) / sum
// never overflows.

// Checked, contiguous inputs of softmax_hvp and its output (u's shape and dtype).
struct SoftmaxHvpProblem {
  at::Tensor logits, u, out;
  int64_t K, N, C;  // u is [K, N, C]; K = 1 for u [N, C]
};

inline SoftmaxHvpProblem prepare_softmax_hvp(const at::Tensor& logits, const at::Tensor& u) {
  const char* op = "softmax_hvp";
  check_logits(op, "logits", logits);
  check_like(op, "u", u, "logits", logits);
  const bool batched = u.dim() == 3;
  TORCH_CHECK_VALUE((u.dim() == 2 || batched) && u.sizes().slice(u.dim() - 2) == logits.sizes(), "fisherext.",
                    op, ": argument 'u' must have shape ", logits.sizes(), " or [K, ", logits.size(0), ", ",
                    logits.size(1), "] to match 'logits', got ", u.sizes());
  check_nonempty(op, "u", u);
  SoftmaxHvpProblem p;
  p.logits = logits.contiguous();
  p.u = u.contiguous();
  p.out = at::empty(u.sizes(), u.options());
  p.K = batched ? u.size(0) : 1;
  p.N = logits.size(0);
  p.C = logits.size(1);
  return p;
}

struct SoftmaxSqrtProblem {
  at::Tensor logits, out;  // out [C, N, C]
  int64_t N, C;
};

inline SoftmaxSqrtProblem prepare_softmax_hessian_sqrt(const at::Tensor& logits) {
  check_logits("softmax_hessian_sqrt", "logits", logits);
  SoftmaxSqrtProblem p;
  p.logits = logits.contiguous();
  p.N = logits.size(0);
  p.C = logits.size(1);
  p.out = at::empty({p.C, p.N, p.C}, logits.options());
  return p;
}

}  // namespace fisherext
