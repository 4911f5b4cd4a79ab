// CPU kernels of the softmax family. Schemas and the math: csrc/fisherext.cpp and csrc/softmax_common.h.
//   softmax_hvp, softmax_hessian_sqrt   rows in parallel; each row's p is formed once into a scratch row
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/grain.h"
#include "softmax_common.h"

namespace fisherext {
namespace {

// p = softmax(z) of one row of C logits into `p`, after subtracting the row max (no exp overflows).
template <typename scalar_t, typename acc_t>
void softmax_row(const scalar_t* z, acc_t* p, int64_t C) {
  acc_t max = static_cast<acc_t>(z[0]);
  for (int64_t c = 1; c < C; ++c) max = std::max(max, static_cast<acc_t>(z[c]));
  acc_t sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    p[c] = std::exp(static_cast<acc_t>(z[c]) - max);
    sum += p[c];
  }
  const acc_t inv_sum = acc_t(1) / sum;
  for (int64_t c = 0; c < C; ++c) p[c] *= inv_sum;
}

// ---- softmax_hvp ----

at::Tensor softmax_hvp_cpu(const at::Tensor& logits, const at::Tensor& u) {
  const SoftmaxHvpProblem q = prepare_softmax_hvp(logits, u);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.u.scalar_type(), "softmax_hvp_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = q.logits.const_data_ptr<scalar_t>();
    const scalar_t* u_ptr = q.u.const_data_ptr<scalar_t>();
    scalar_t* out = q.out.data_ptr<scalar_t>();
    at::parallel_for(0, q.N, row_grain(q.C * (q.K + 1)), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> p(q.C);
      for (int64_t n = r0; n < r1; ++n) {
        softmax_row(z + n * q.C, p.data(), q.C);
        // The K directions of this row share p.
        for (int64_t k = 0; k < q.K; ++k) {
          const int64_t row = (k * q.N + n) * q.C;
          acc_t s = 0;
          for (int64_t c = 0; c < q.C; ++c) s += p[c] * static_cast<acc_t>(u_ptr[row + c]);
          // p ⊙ (u − pᵀu): one product per entry, and no cancellation between two products.
          for (int64_t c = 0; c < q.C; ++c)
            out[row + c] = static_cast<scalar_t>(p[c] * (static_cast<acc_t>(u_ptr[row + c]) - s));
        }
      }
    });
  });
  return q.out;
}

// ---- softmax_hessian_sqrt ----

at::Tensor softmax_hessian_sqrt_cpu(const at::Tensor& logits) {
  const SoftmaxSqrtProblem q = prepare_softmax_hessian_sqrt(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.logits.scalar_type(), "softmax_hessian_sqrt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = q.logits.const_data_ptr<scalar_t>();
    scalar_t* out = q.out.data_ptr<scalar_t>();
    at::parallel_for(0, q.N, row_grain(q.C * q.C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> p(q.C);
      for (int64_t n = r0; n < r1; ++n) {
        softmax_row(z + n * q.C, p.data(), q.C);
        for (int64_t k = 0; k < q.C; ++k) {
          scalar_t* s = out + (k * q.N + n) * q.C;
          const acc_t root = std::sqrt(p[k]);
          for (int64_t c = 0; c < q.C; ++c) s[c] = static_cast<scalar_t>(-root * p[c]);
          s[k] = static_cast<scalar_t>(root * (acc_t(1) - p[k]));
        }
      }
    });
  });
  return q.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CPU, m) {
  m.impl("softmax_hvp", &softmax_hvp_cpu);
  m.impl("softmax_hessian_sqrt", &softmax_hessian_sqrt_cpu);
}

}  // namespace fisherext
