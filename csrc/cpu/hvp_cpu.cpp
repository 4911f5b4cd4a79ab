// CPU kernels of the hvp family (K3). Schemas and the math: csrc/fisherext.cpp and csrc/hvp_common.h.
//   softmax_hvp, softmax_hessian_sqrt   rows in parallel; each row's p is formed once into a scratch row
//   cg_update_                           fixed row chunks in parallel, per-chunk partial sums combined in
//                                        chunk order: the result does not depend on the thread count
//   cg_direction_, lissa_update_, neumann_update_   one parallel elementwise pass
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "hvp_common.h"

namespace fisherext {
namespace {

// Elements below which work is not worth a thread (ATen's GRAIN_SIZE).
constexpr int64_t kGrain = int64_t(1) << 15;

// Rows per task when each row costs `per_row` elements of work.
int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(per_row, 1)); }

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

// ---- cg_update_ ----

template <typename scalar_t, bool kHasInv>
void cg_update_kernel(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p, const at::Tensor& Ap,
                      const CgUpdateProblem& q) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = q.d.P, K = q.d.K;
  scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* r_ptr = r.data_ptr<scalar_t>();
  const scalar_t* p_ptr = p.const_data_ptr<scalar_t>();
  const scalar_t* Ap_ptr = Ap.const_data_ptr<scalar_t>();
  const acc_t* a = q.alpha.const_data_ptr<acc_t>();
  const scalar_t* inv = kHasInv ? q.inv_diag.const_data_ptr<scalar_t>() : nullptr;
  // Fixed chunks of rows, each with its own partial sums [rz(K) | rr(K)]: how the chunks are spread
  // over threads cannot change the rounding of the result.
  const int64_t rows = row_grain(K);
  const int64_t chunks = (P + rows - 1) / rows;
  std::vector<reduce_t> partial(chunks * 2 * K, reduce_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      reduce_t* rz = partial.data() + c * 2 * K;
      reduce_t* rr = rz + K;
      for (int64_t i = c * rows; i < std::min(P, (c + 1) * rows); ++i) {
        const reduce_t w = kHasInv ? static_cast<reduce_t>(inv[i]) : reduce_t(1);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t e = i * K + k;
          x_ptr[e] = static_cast<scalar_t>(static_cast<acc_t>(x_ptr[e]) + a[k] * static_cast<acc_t>(p_ptr[e]));
          r_ptr[e] = static_cast<scalar_t>(static_cast<acc_t>(r_ptr[e]) - a[k] * static_cast<acc_t>(Ap_ptr[e]));
          // The sums are of the r that is stored (rounded), the one the next iteration continues from.
          const reduce_t rv = static_cast<reduce_t>(r_ptr[e]);
          rr[k] += rv * rv;
          if constexpr (kHasInv) rz[k] += rv * rv * w;
        }
      }
    }
  });
  acc_t* rz_out = q.rz.data_ptr<acc_t>();
  acc_t* rr_out = q.rr.data_ptr<acc_t>();
  for (int64_t k = 0; k < K; ++k) {
    reduce_t rz = 0, rr = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      rz += partial[c * 2 * K + k];
      rr += partial[c * 2 * K + K + k];
    }
    rr_out[k] = static_cast<acc_t>(rr);
    rz_out[k] = static_cast<acc_t>(kHasInv ? rz : rr);
  }
}

std::tuple<at::Tensor, at::Tensor> cg_update_cpu(at::Tensor& x, at::Tensor& r, const at::Tensor& p,
                                                 const at::Tensor& Ap, const at::Tensor& alpha,
                                                 const std::optional<at::Tensor>& inv_diag) {
  const CgUpdateProblem q = prepare_cg_update(x, r, p, Ap, alpha, inv_diag);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cg_update_cpu", [&] {
    if (q.inv_diag.defined())
      cg_update_kernel<scalar_t, true>(x, r, p, Ap, q);
    else
      cg_update_kernel<scalar_t, false>(x, r, p, Ap, q);
  });
  return {q.rz, q.rr};
}

// ---- cg_direction_ ----

void cg_direction_cpu(at::Tensor& p, const at::Tensor& r, const at::Tensor& beta,
                      const std::optional<at::Tensor>& inv_diag) {
  const CgDirectionProblem q = prepare_cg_direction(p, r, beta, inv_diag);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "cg_direction_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* p_ptr = p.data_ptr<scalar_t>();
    const scalar_t* r_ptr = r.const_data_ptr<scalar_t>();
    const acc_t* b = q.beta.const_data_ptr<acc_t>();
    const scalar_t* inv_ptr = q.inv_diag.defined() ? q.inv_diag.const_data_ptr<scalar_t>() : nullptr;
    const int64_t K = q.d.K;
    at::parallel_for(0, q.d.P, row_grain(K), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t w = inv_ptr ? static_cast<acc_t>(inv_ptr[i]) : acc_t(1);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t e = i * K + k;
          p_ptr[e] = static_cast<scalar_t>(w * static_cast<acc_t>(r_ptr[e]) + b[k] * static_cast<acc_t>(p_ptr[e]));
        }
      }
    });
  });
}

// ---- lissa_update_, neumann_update_ ----

void lissa_update_cpu(at::Tensor& h, const at::Tensor& v, const at::Tensor& Hh, double damping, double scale) {
  check_lissa_update(h, v, Hh, damping, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "lissa_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* h_ptr = h.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    const scalar_t* Hh_ptr = Hh.const_data_ptr<scalar_t>();
    const acc_t keep = static_cast<acc_t>(1.0 - damping), inv_scale = static_cast<acc_t>(1.0 / scale);
    at::parallel_for(0, h.numel(), kGrain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e)
        h_ptr[e] = static_cast<scalar_t>(lissa_step(static_cast<acc_t>(v_ptr[e]), static_cast<acc_t>(h_ptr[e]),
                                                    static_cast<acc_t>(Hh_ptr[e]), keep, inv_scale));
    });
  });
}

void neumann_update_cpu(at::Tensor& term, at::Tensor& acc, const at::Tensor& Aterm, double scale) {
  check_neumann_update(term, acc, Aterm, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, term.scalar_type(), "neumann_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* t_ptr = term.data_ptr<scalar_t>();
    scalar_t* a_ptr = acc.data_ptr<scalar_t>();
    const scalar_t* At_ptr = Aterm.const_data_ptr<scalar_t>();
    const acc_t inv_scale = static_cast<acc_t>(1.0 / scale);
    at::parallel_for(0, term.numel(), kGrain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const scalar_t t = static_cast<scalar_t>(static_cast<acc_t>(t_ptr[e]) - static_cast<acc_t>(At_ptr[e]) * inv_scale);
        t_ptr[e] = t;
        // acc adds the stored (rounded) term, so acc is exactly the sum of the terms it reports.
        a_ptr[e] = static_cast<scalar_t>(static_cast<acc_t>(a_ptr[e]) + static_cast<acc_t>(t));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CPU, m) {
  m.impl("softmax_hvp", &softmax_hvp_cpu);
  m.impl("softmax_hessian_sqrt", &softmax_hessian_sqrt_cpu);
  m.impl("cg_update_", &cg_update_cpu);
  m.impl("cg_direction_", &cg_direction_cpu);
  m.impl("lissa_update_", &lissa_update_cpu);
  m.impl("neumann_update_", &neumann_update_cpu);
}

// softmax_hvp's autograd is registered in Python (fisherext/_ops.py). The other ops are not
// differentiable (the square root serves true-Fisher backprop of detached logits; the solver updates run
// under no_grad): autograd passes them through, so their outputs never carry a grad_fn that would
// backpropagate nothing.
TORCH_LIBRARY_IMPL(fisherext, Autograd, m) {
  m.impl("softmax_hessian_sqrt", torch::CppFunction::makeFallthrough());
  m.impl("cg_update_", torch::CppFunction::makeFallthrough());
  m.impl("cg_direction_", torch::CppFunction::makeFallthrough());
  m.impl("lissa_update_", torch::CppFunction::makeFallthrough());
  m.impl("neumann_update_", torch::CppFunction::makeFallthrough());
}

}  // namespace fisherext
