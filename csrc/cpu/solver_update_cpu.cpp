// CPU kernels of the solver-update family. Schemas and the math: csrc/fisherext.cpp and
// csrc/solver_update_common.h.
//   cg_update_                           fixed row chunks in parallel, per-chunk partial sums combined in
//                                        chunk order: the result does not depend on the thread count
//   cg_direction_, lissa_update_, neumann_update_   one parallel elementwise pass
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/grain.h"
#include "solver_update_common.h"

namespace fisherext {
namespace {

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
  m.impl("cg_update_", &cg_update_cpu);
  m.impl("cg_direction_", &cg_direction_cpu);
  m.impl("lissa_update_", &lissa_update_cpu);
  m.impl("neumann_update_", &neumann_update_cpu);
}

}  // namespace fisherext
