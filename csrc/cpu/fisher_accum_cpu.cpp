// CPU kernels of the fisher_accum family (K1). Schemas and the math: csrc/fisherext.cpp.
//
// Memory: every kernel streams samples in chunks whose scratch is bounded by a fixed element budget
// (kScratchElems and friends), so peak extra memory is O(output) and independent of N.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "fisher_accum_common.h"

namespace fisherext {
namespace {

// Per-chunk scratch for linear_sq_grad: ~1 MiB of float, so a chunk of per-sample gradients stays
// in cache while it is squared and summed (the other kernels use kScratchElems, fisher_accum_common.h).
constexpr int64_t kSqScratchElems = int64_t(1) << 18;
// Tile edge of the symmetric rank-k update: only tiles on or above the diagonal are computed.
constexpr int64_t kSymTile = 512;

// Chunks processed one per task by at::parallel_for, each with single-threaded GEMMs: one parallel
// region per op instead of one per chunk (every region costs a thread barrier, which is slow when
// the cores are shared). Rows are capped so that every thread gets at least one chunk.
int64_t thread_chunk_rows(int64_t per_row, int64_t budget, int64_t n) {
  const int64_t per_thread = (n + at::get_num_threads() - 1) / at::get_num_threads();
  return std::min(chunk_rows(per_row, budget, n), std::max<int64_t>(per_thread, 1));
}

// Calls body(start, rows) for consecutive chunks [start, start + rows) of n samples, in parallel.
template <typename Body>
void for_each_chunk(int64_t n, int64_t rows, Body body) {
  const int64_t chunks = (n + rows - 1) / rows;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c * rows, std::min(rows, n - c * rows));
  });
}

// acc[j] += sum_b w_b * g[b, j]^2 over a chunk g [B, M] (serial; the inner loop vectorizes).
template <typename scalar_t>
void square_accumulate(scalar_t* acc, const scalar_t* g, const scalar_t* w, int64_t B, int64_t M) {
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t wb = w ? w[b] : scalar_t(1);
    const scalar_t* row = g + b * M;
    for (int64_t j = 0; j < M; ++j) acc[j] += wb * row[j] * row[j];
  }
}

// lower triangle <- upper triangle, so the result is exactly symmetric.
void mirror_upper(at::Tensor& out) {
  const int64_t P = out.size(0);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mirror_upper", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(1, P, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < i; ++j) o[i * P + j] = o[j * P + i];
    });
  });
}

// out <- beta * out + alpha * X^T diag(w) X for X [M, P], out [P, P] contiguous in X's dtype.
// Only tiles on or above the diagonal are multiplied (half the GEMM work), then mirrored.
void sym_rank_k(at::Tensor& out, const at::Tensor& X, const at::Tensor& w, double alpha, double beta) {
  const int64_t P = X.size(1);
  const at::Tensor Xw = w.defined() ? X.mul(w.unsqueeze(1)) : X;
  for (int64_t i0 = 0; i0 < P; i0 += kSymTile) {
    const int64_t bi = std::min(kSymTile, P - i0);
    const at::Tensor lhs = Xw.narrow(1, i0, bi).t();
    // Within the tile row, one GEMM covers all column tiles from the diagonal on.
    at::Tensor block = out.narrow(0, i0, bi).narrow(1, i0, P - i0);
    block.addmm_(lhs, X.narrow(1, i0, P - i0), beta, alpha);
  }
  mirror_upper(out);
}

at::Tensor linear_sq_grad_cpu(const at::Tensor& a, const at::Tensor& delta,
                              const std::optional<at::Tensor>& weight) {
  const char* op = "linear_sq_grad";
  const LinearDims d = check_linear(op, a, delta, /*class_axis=*/false);
  check_weight(op, weight, "a", a, d.N);
  const at::Tensor A = as_compute(with_positions(a, 3));      // [N, T, I]
  const at::Tensor D = as_compute(with_positions(delta, 3));  // [N, T, O]
  const at::Tensor W = optional_compute(weight);
  at::Tensor out = at::zeros({d.O, d.I}, A.options());
  if (d.T == 1) {
    // g_n = delta_n a_n^T, so sum_n w_n g_n^2 = (w * delta^2)^T (a^2): one GEMM per chunk.
    const int64_t rows = chunk_rows(d.I + d.O, kScratchElems, d.N);
    for (int64_t s = 0; s < d.N; s += rows) {
      const int64_t b = std::min(rows, d.N - s);
      at::Tensor d2 = D.narrow(0, s, b).select(1, 0).square();
      if (W.defined()) d2.mul_(W.narrow(0, s, b).unsqueeze(1));
      out.addmm_(d2.t(), A.narrow(0, s, b).select(1, 0).square());
    }
  } else {
    // Chunks of per-sample gradients small enough to stay in cache, squared and summed at once into
    // one accumulator per thread; the accumulators are added in thread order (deterministic).
    const int64_t M = d.O * d.I;
    const int64_t rows = thread_chunk_rows(M, kSqScratchElems, d.N);
    std::vector<at::Tensor> partial(at::get_num_threads());
    for_each_chunk(d.N, rows, [&](int64_t s, int64_t b) {
      at::Tensor& acc = partial[at::get_thread_num()];
      if (!acc.defined()) acc = at::zeros({d.O, d.I}, A.options());
      const at::Tensor g = at::bmm(D.narrow(0, s, b).transpose(1, 2), A.narrow(0, s, b));
      AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "linear_sq_grad_cpu", [&] {
        square_accumulate(acc.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                          W.defined() ? W.data_ptr<scalar_t>() + s : nullptr, b, M);
      });
    });
    for (const at::Tensor& acc : partial)
      if (acc.defined()) out.add_(acc);
  }
  return out.to(a.scalar_type());
}

void linear_outer_accum_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& delta,
                            const std::optional<at::Tensor>& weight, double alpha) {
  const char* op = "linear_outer_accum_";
  const LinearDims d = check_linear(op, a, delta, /*class_axis=*/false);
  check_weight(op, weight, "a", a, d.N);
  const int64_t P = d.O * d.I;
  check_square_out(op, out, "a", a, P);
  const at::Tensor A = as_compute(with_positions(a, 3));
  const at::Tensor D = as_compute(with_positions(delta, 3));
  const at::Tensor W = optional_compute(weight);
  const int64_t rows = chunk_rows(P, kScratchElems, d.N);
  at::Tensor buf = at::empty({rows, d.O, d.I}, A.options());
  update_in_place(out, [&](at::Tensor& work) {
    for (int64_t s = 0; s < d.N; s += rows) {
      const int64_t b = std::min(rows, d.N - s);
      at::Tensor g = buf.narrow(0, 0, b);
      at::bmm_out(g, D.narrow(0, s, b).transpose(1, 2), A.narrow(0, s, b));
      sym_rank_k(work, g.view({b, P}), W.defined() ? W.narrow(0, s, b) : at::Tensor(), alpha, 1.0);
    }
  });
}

void sym_outer_accum_cpu(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         double alpha, double beta) {
  const char* op = "sym_outer_accum_";
  const LinearDims d = check_rows(op, x);
  check_weight(op, weight, "x", x, d.N);
  check_square_out(op, out, "x", x, d.I);
  const at::Tensor X = as_compute(x).view({d.N * d.T, d.I});
  at::Tensor W = optional_compute(weight);
  if (W.defined() && d.T > 1) W = W.repeat_interleave(d.T);
  update_in_place(out, [&](at::Tensor& work) { sym_rank_k(work, X, W, alpha, beta); });
}

at::Tensor class_gram_cpu(const at::Tensor& a, const at::Tensor& delta) {
  const char* op = "class_gram";
  const LinearDims d = check_linear(op, a, delta, /*class_axis=*/true);
  const int64_t N = d.N, C = d.C, T = d.T, I = d.I, O = d.O;
  const at::Tensor A = as_compute(with_positions(a, 3));      // [N, T, I]
  const at::Tensor D = as_compute(with_positions(delta, 4));  // [N, C, T, O]
  at::Tensor K = at::empty({N, C, C}, A.options());
  // Two exact ways to K_n[c, c'] = <g_nc, g_nc'>:
  //  gram:        sum_{t,s} (a_t . a_s)(delta_ct . delta_c's)   ~ T^2 I + C T^2 O + C^2 T O flops
  //  materialize: g_nc = delta_c^T a, then J J^T              ~ C T O I + C^2 O I flops
  const double cost_gram = double(T) * T * I + double(C) * T * T * O + double(C) * C * T * O;
  const double cost_mat = double(C) * T * O * I + double(C) * C * O * I;
  const bool use_gram = T == 1 || cost_gram <= cost_mat;
  const int64_t per_sample = use_gram ? T * T + 2 * C * T * O : C * O * I;
  // Every chunk writes its own rows of K: chunks run in parallel, each with serial GEMMs.
  for_each_chunk(N, thread_chunk_rows(per_sample, kScratchElems, N), [&](int64_t s, int64_t b) {
    const at::Tensor Ac = A.narrow(0, s, b), Dc = D.narrow(0, s, b);
    at::Tensor Kc = K.narrow(0, s, b);
    if (T == 1) {
      const at::Tensor Dv = Dc.select(2, 0);  // [b, C, O]
      at::bmm_out(Kc, Dv, Dv.transpose(1, 2));
      Kc.mul_(Ac.select(1, 0).square().sum(-1).view({b, 1, 1}));
    } else if (use_gram) {
      const at::Tensor Ga = at::bmm(Ac, Ac.transpose(1, 2));                      // [b, T, T]
      const at::Tensor Dt = Dc.permute({0, 2, 1, 3}).reshape({b, T, C * O});      // [b, T, C O]
      const at::Tensor H = at::bmm(Ga, Dt).view({b, T, C, O}).permute({0, 2, 1, 3}).reshape({b, C, T * O});
      at::bmm_out(Kc, Dc.reshape({b, C, T * O}), H.transpose(1, 2));
    } else {
      const at::Tensor J = at::matmul(Dc.transpose(2, 3), Ac.unsqueeze(1)).view({b, C, O * I});
      at::bmm_out(Kc, J, J.transpose(1, 2));
    }
  });
  K = K.add(K.transpose(1, 2)).mul_(0.5);  // exact symmetry regardless of GEMM summation order
  return K.to(a.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CPU, m) {
  m.impl("linear_sq_grad", &linear_sq_grad_cpu);
  m.impl("linear_outer_accum_", &linear_outer_accum_cpu);
  m.impl("sym_outer_accum_", &sym_outer_accum_cpu);
  m.impl("class_gram", &class_gram_cpu);
}

}  // namespace fisherext
