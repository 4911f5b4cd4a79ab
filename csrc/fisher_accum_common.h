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
