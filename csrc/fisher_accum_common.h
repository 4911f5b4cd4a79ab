// Host-side prologue shared by the CPU and CUDA kernels of the fisher_accum family (K1): the argument
// checks and the staged inputs of every op (done once here for both backends), chunk sizing and the
// in-place update protocol of the accumulating ops.
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>

#include "checks.h"

namespace fisherext {

// Per-chunk scratch budget (elements) of the outer-product and Gram kernels, independent of N.
constexpr int64_t kScratchElems = int64_t(1) << 22;

// The budget in force: kScratchElems, unless a test has set another (fisherext._C._set_scratch_elems, so
// that small inputs cross chunk boundaries; the results do not depend on it). Defined in fisherext.cpp.
int64_t scratch_elems();

// Rows per chunk when each row needs `per_row` scratch elements: in [1, n].
inline int64_t chunk_rows(int64_t per_row, int64_t budget, int64_t n) {
  return std::clamp<int64_t>(budget / std::max<int64_t>(per_row, 1), 1, n);
}

// Inserts the position axis T = 1 when absent: [N, I] -> [N, 1, I], [N, C, O] -> [N, C, 1, O].
inline at::Tensor with_positions(const at::Tensor& t, int64_t pos_dim) {
  return t.dim() == pos_dim ? t : t.unsqueeze(pos_dim - 2);
}

// Contiguous copy in the compute dtype (half/bfloat16 -> float32); no copy when already so.
inline at::Tensor as_compute(const at::Tensor& t) {
  return t.to(opmath_type(t.scalar_type())).contiguous();
}

inline at::Tensor optional_compute(const std::optional<at::Tensor>& w) {
  return (w.has_value() && w->defined()) ? as_compute(*w) : at::Tensor();
}

// The checked inputs of an op, staged for its kernels: A = a as [N, T, I] (sym_outer_accum_: the rows x_nt
// as [N T, D]) and D = delta as [N, (C,) T, O] (undefined for sym_outer_accum_), contiguous, in the compute
// dtype where `to_compute` (the CPU kernels, which call ATen GEMMs) or else in the input dtype (the CUDA
// kernels convert as they stage tiles); W the per-sample weights in the compute dtype (one per row x_nt
// for sym_outer_accum_), undefined without.
struct LinearInputs {
  LinearDims d;
  at::Tensor A, D, W;
};

inline at::Tensor staged(const at::Tensor& t, bool to_compute) { return to_compute ? as_compute(t) : t.contiguous(); }

inline LinearInputs stage_linear(const LinearDims& d, const at::Tensor& a, const at::Tensor& delta,
                                 const std::optional<at::Tensor>& weight, bool class_axis, bool to_compute) {
  return {d, staged(with_positions(a, 3), to_compute), staged(with_positions(delta, class_axis ? 4 : 3), to_compute),
          optional_compute(weight)};
}

inline LinearInputs prepare_linear_sq_grad(const at::Tensor& a, const at::Tensor& delta,
                                           const std::optional<at::Tensor>& weight, bool to_compute) {
  const char* op = "linear_sq_grad";
  const LinearDims d = check_linear(op, a, delta, /*class_axis=*/false);
  check_weight(op, weight, "a", a, d.N);
  return stage_linear(d, a, delta, weight, /*class_axis=*/false, to_compute);
}

inline LinearInputs prepare_linear_outer_accum(const at::Tensor& out, const at::Tensor& a, const at::Tensor& delta,
                                               const std::optional<at::Tensor>& weight, bool to_compute) {
  const char* op = "linear_outer_accum_";
  const LinearDims d = check_linear(op, a, delta, /*class_axis=*/false);
  check_weight(op, weight, "a", a, d.N);
  check_square_out(op, out, "a", a, d.O * d.I);
  check_no_overlap(op, {{"out", out}}, {{"a", a}, {"delta", delta}, {"weight", weight.value_or(at::Tensor())}});
  return stage_linear(d, a, delta, weight, /*class_axis=*/false, to_compute);
}

// Sizes {N, T, D = I}.
inline LinearInputs prepare_sym_outer_accum(const at::Tensor& out, const at::Tensor& x,
                                            const std::optional<at::Tensor>& weight, bool to_compute) {
  const char* op = "sym_outer_accum_";
  const LinearDims d = check_rows(op, x);
  check_weight(op, weight, "x", x, d.N);
  check_square_out(op, out, "x", x, d.I);
  check_no_overlap(op, {{"out", out}}, {{"x", x}, {"weight", weight.value_or(at::Tensor())}});
  at::Tensor W = optional_compute(weight);
  if (W.defined() && d.T > 1) W = W.repeat_interleave(d.T);
  return {d, staged(x, to_compute).view({d.N * d.T, d.I}), at::Tensor(), W};
}

inline LinearInputs prepare_class_gram(const at::Tensor& a, const at::Tensor& delta, bool to_compute) {
  const LinearDims d = check_linear("class_gram", a, delta, /*class_axis=*/true);
  return stage_linear(d, a, delta, std::nullopt, /*class_axis=*/true, to_compute);
}

// Runs `body(work)` on out, or on a contiguous compute-dtype copy that is written back afterwards.
template <typename Body>
void update_in_place(const at::Tensor& out, Body body) {
  const auto ct = opmath_type(out.scalar_type());
  if (out.is_contiguous() && out.scalar_type() == ct) {
    at::Tensor work = out;
    body(work);
  } else {
    at::Tensor work = out.to(ct).contiguous();
    body(work);
    out.copy_(work);
  }
}

}  // namespace fisherext
