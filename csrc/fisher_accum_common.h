// Host-side helpers shared by the CPU and CUDA kernels of the fisher_accum family (K1): input
// layout, compute dtype, chunk sizing and the in-place update protocol of the accumulating ops.
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>

#include "checks.h"

namespace fisherext {

// Per-chunk scratch budget (elements) of the outer-product and Gram kernels, independent of N.
constexpr int64_t kScratchElems = int64_t(1) << 22;

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

// Checked arguments of linear_outer_accum_ (both backends); returns the sizes.
inline LinearDims check_linear_outer_accum(const at::Tensor& out, const at::Tensor& a, const at::Tensor& delta,
                                           const std::optional<at::Tensor>& weight) {
  const char* op = "linear_outer_accum_";
  const LinearDims d = check_linear(op, a, delta, /*class_axis=*/false);
  check_weight(op, weight, "a", a, d.N);
  check_square_out(op, out, "a", a, d.O * d.I);
  check_no_overlap(op, {{"out", out}}, {{"a", a}, {"delta", delta}, {"weight", weight.value_or(at::Tensor())}});
  return d;
}

// Checked arguments of sym_outer_accum_ (both backends); returns the sizes {N, T, D = I}.
inline LinearDims check_sym_outer_accum(const at::Tensor& out, const at::Tensor& x,
                                        const std::optional<at::Tensor>& weight) {
  const char* op = "sym_outer_accum_";
  const LinearDims d = check_rows(op, x);
  check_weight(op, weight, "x", x, d.N);
  check_square_out(op, out, "x", x, d.I);
  check_no_overlap(op, {{"out", out}}, {{"x", x}, {"weight", weight.value_or(at::Tensor())}});
  return d;
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
