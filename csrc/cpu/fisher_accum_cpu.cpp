// CPU kernels of the fisher_accum family (K1). Schemas and the math: csrc/fisherext.cpp.
//
// Memory: peak extra memory is independent of N. The GEMM-based kernels stream samples in chunks
// whose scratch is bounded by scratch_elems() (fisher_accum_common.h); linear_sq_grad (T > 1) needs one [O, I] accumulator
// and at most one sample's padded copy per thread.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Unroll.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "fisher_accum_common.h"

namespace fisherext {
namespace {

// Multiply-adds below which a task is not worth a thread (ATen's GRAIN_SIZE).
constexpr int64_t kMinTaskMacs = int64_t(1) << 15;
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

// ---- linear_sq_grad, T > 1: a fused micro-kernel that never writes g_n ----
//
// g_n = D_n^T A_n with K = T tiny, so a GEMM library spends its time on overhead and g_n round-trips
// through memory. Instead an R x W tile of g_n is summed over t in registers and immediately squared
// into the thread's accumulator S [O, I]. Every tile runs the same full-width loop over t (A_n and
// D_n are read from zero-padded copies when I or O is ragged); only the edge tiles' write-back is
// cut to the valid rows and columns.

template <typename scalar_t>
struct SqGradArgs {
  const scalar_t* A;  // [N, T, I]
  const scalar_t* D;  // [N, T, O]
  const scalar_t* w;  // [N], or nullptr for all ones
  int64_t T, I, O;
};

// kBytes of scalar_t as one GCC/Clang vector: mapped to the target's SIMD registers, or split into
// several narrower ones where the target's are narrower.
template <typename scalar_t, int kBytes>
struct SimdOf {
  typedef scalar_t type __attribute__((vector_size(kBytes)));
};

// Unaligned vector load/store. By reference, not by value: a vector wider than the baseline ISA's
// registers has no stable by-value ABI (-Wpsabi), and these are always inlined anyway.
template <typename V, typename scalar_t>
inline void load_vec(V& v, const scalar_t* p) {
  std::memcpy(&v, p, sizeof(v));
}
template <typename V, typename scalar_t>
inline void store_vec(scalar_t* p, const V& v) {
  std::memcpy(p, &v, sizeof(v));
}

// Adds w * (sum_t Dp[t, 0:R]^T Ap[t, 0:W])^2, W = NV vectors, to the rows x cols corner of S (leading
// dim ldS). acc is indexed only by compile-time constants (c10::ForcedUnroll) and never has its
// address taken, so the compiler keeps all R * NV vectors in registers; a runtime-indexed array is
// zeroed and spilled through the stack every tile. Edge tiles (kFull false) are a separate
// instantiation that writes back only the valid rows and columns.
template <typename scalar_t, int R, int NV, int kBytes, bool kFull>
inline void sq_grad_tile(scalar_t* S, int64_t ldS, const scalar_t* Dp, int64_t ldD, const scalar_t* Ap,
                         int64_t ldA, int64_t T, scalar_t w, int64_t rows, int64_t cols) {
  using V = typename SimdOf<scalar_t, kBytes>::type;
  constexpr int L = kBytes / sizeof(scalar_t);
  V acc[R * NV] = {};  // acc[r * NV + k]: row r, columns [k L, (k + 1) L)
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* d = Dp + t * ldD;
    V a[NV];
    c10::ForcedUnroll<NV>{}([&](auto k) { load_vec(a[k], Ap + t * ldA + k * L); });
    c10::ForcedUnroll<R * NV>{}([&](auto j) { acc[j] += d[j / NV] * a[j % NV]; });
  }
  c10::ForcedUnroll<R * NV>{}([&](auto j) {
    constexpr int r = decltype(j)::value / NV, k = decltype(j)::value % NV;
    V sq = w * acc[j] * acc[j];
    scalar_t* s = S + r * ldS + k * L;
    if constexpr (kFull) {
      V old;
      load_vec(old, s);
      store_vec(s, old + sq);
    } else if (r < rows) {
      scalar_t lanes[L];
      std::memcpy(lanes, &sq, sizeof(sq));
      for (int64_t v = 0; v < std::min<int64_t>(L, cols - k * L); ++v) s[v] += lanes[v];
    }
  });
}

// One sample's [T, n] rows as the tiles read them, with leading dim ld() = n rounded up to the tile
// width: the input itself when n is a multiple of it, else a copy whose padding columns are zero,
// so that full-width tiles never read past the sample.
template <typename scalar_t>
class TilePanel {
 public:
  TilePanel(int64_t T, int64_t n, int64_t width) : T_(T), n_(n), ld_((n + width - 1) / width * width) {
    if (ld_ != n_) copy_.assign(T_ * ld_, scalar_t(0));
  }
  int64_t ld() const { return ld_; }
  const scalar_t* rows(const scalar_t* src) {
    if (copy_.empty()) return src;
    for (int64_t t = 0; t < T_; ++t) std::copy_n(src + t * n_, n_, copy_.data() + t * ld_);
    return copy_.data();
  }

 private:
  int64_t T_, n_, ld_;
  std::vector<scalar_t> copy_;
};

// S [O, I] += sum_{n0 <= n < n1} w_n g_n^2, serially (one call per thread).
template <typename scalar_t, int R, int NV, int kBytes>
void sq_grad_samples(scalar_t* S, const SqGradArgs<scalar_t>& p, int64_t n0, int64_t n1) {
  constexpr int W = NV * kBytes / sizeof(scalar_t);
  const int64_t T = p.T, I = p.I, O = p.O;
  TilePanel<scalar_t> a_panel(T, I, W), d_panel(T, O, R);
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* Ap = a_panel.rows(p.A + n * T * I);
    const scalar_t* Dp = d_panel.rows(p.D + n * T * O);
    const scalar_t w = p.w ? p.w[n] : scalar_t(1);
    // Column blocks outer: the T x W block of A_n stays in L1 while D_n is swept.
    for (int64_t i = 0; i < I; i += W) {
      const int64_t cols = std::min<int64_t>(W, I - i);
      for (int64_t o = 0; o < O; o += R) {
        const int64_t rows = std::min<int64_t>(R, O - o);
        scalar_t* s = S + o * I + i;
        const scalar_t *d = Dp + o, *a = Ap + i;
        if (rows == R && cols == W)
          sq_grad_tile<scalar_t, R, NV, kBytes, true>(s, I, d, d_panel.ld(), a, a_panel.ld(), T, w, R, W);
        else
          sq_grad_tile<scalar_t, R, NV, kBytes, false>(s, I, d, d_panel.ld(), a, a_panel.ld(), T, w, rows, cols);
      }
    }
  }
}

// The build targets baseline x86-64 (SSE2), so on x86-64 the kernel is also compiled for AVX2+FMA and
// AVX-512 and picked at run time. `flatten` inlines the generic code into each target-specific
// function, so its vectors and FMAs are compiled for that ISA. Each ISA gets its own tile (R rows x
// NV vectors), sized so that the R * NV accumulators plus operands fit its vector registers; GCC's
// target_clones cannot do that, as every clone shares one body.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FISHEREXT_X86_DISPATCH 1
template <typename scalar_t>
__attribute__((target("avx512f"), flatten)) void sq_grad_avx512(scalar_t* S, const SqGradArgs<scalar_t>& p,
                                                                int64_t n0, int64_t n1) {
  sq_grad_samples<scalar_t, 8, 2, 64>(S, p, n0, n1);  // 16 zmm accumulators
}
template <typename scalar_t>
__attribute__((target("avx2,fma"), flatten)) void sq_grad_avx2(scalar_t* S, const SqGradArgs<scalar_t>& p,
                                                               int64_t n0, int64_t n1) {
  sq_grad_samples<scalar_t, 6, 2, 32>(S, p, n0, n1);  // 12 ymm accumulators
}
#endif

template <typename scalar_t>
using SqGradFn = void (*)(scalar_t*, const SqGradArgs<scalar_t>&, int64_t, int64_t);

template <typename scalar_t>
SqGradFn<scalar_t> pick_sq_grad() {
#ifdef FISHEREXT_X86_DISPATCH
  if (__builtin_cpu_supports("avx512f")) return &sq_grad_avx512<scalar_t>;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &sq_grad_avx2<scalar_t>;
#endif
  return &sq_grad_samples<scalar_t, 4, 2, 16>;  // 8 accumulators of 16-byte vectors
}

at::Tensor linear_sq_grad_cpu(const at::Tensor& a, const at::Tensor& delta,
                              const std::optional<at::Tensor>& weight) {
  const LinearInputs in = prepare_linear_sq_grad(a, delta, weight, /*to_compute=*/true);
  const LinearDims& d = in.d;
  const at::Tensor &A = in.A, &D = in.D, &W = in.W;  // [N, T, I], [N, T, O], [N] or undefined
  at::Tensor out = at::zeros({d.O, d.I}, A.options());
  if (d.T == 1) {
    // g_n = delta_n a_n^T, so sum_n w_n g_n^2 = (w * delta^2)^T (a^2): one GEMM per chunk.
    const int64_t rows = chunk_rows(d.I + d.O, scratch_elems(), d.N);
    for (int64_t s = 0; s < d.N; s += rows) {
      const int64_t b = std::min(rows, d.N - s);
      at::Tensor d2 = D.narrow(0, s, b).select(1, 0).square();
      if (W.defined()) d2.mul_(W.narrow(0, s, b).unsqueeze(1));
      out.addmm_(d2.t(), A.narrow(0, s, b).select(1, 0).square());
    }
  } else {
    // One contiguous range of samples per thread, each into its own accumulator; the accumulators
    // are added in thread order (deterministic for a given thread count).
    std::vector<at::Tensor> partial(at::get_num_threads());
    const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (d.T * d.O * d.I));
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "linear_sq_grad_cpu", [&] {
      const SqGradArgs<scalar_t> p{A.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(),
                                   W.defined() ? W.data_ptr<scalar_t>() : nullptr, d.T, d.I, d.O};
      const SqGradFn<scalar_t> kernel = pick_sq_grad<scalar_t>();
      at::parallel_for(0, d.N, grain, [&](int64_t n0, int64_t n1) {
        at::Tensor& acc = partial[at::get_thread_num()];
        if (!acc.defined()) acc = at::zeros({d.O, d.I}, A.options());
        kernel(acc.data_ptr<scalar_t>(), p, n0, n1);
      });
    });
    for (const at::Tensor& acc : partial)
      if (acc.defined()) out.add_(acc);
  }
  return out.to(a.scalar_type());
}

void linear_outer_accum_cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& delta,
                            const std::optional<at::Tensor>& weight, double alpha) {
  const LinearInputs in = prepare_linear_outer_accum(out, a, delta, weight, /*to_compute=*/true);
  const LinearDims& d = in.d;
  const at::Tensor &A = in.A, &D = in.D, &W = in.W;  // [N, T, I], [N, T, O], [N] or undefined
  const int64_t P = d.O * d.I;
  const int64_t rows = chunk_rows(P, scratch_elems(), d.N);
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
  const LinearInputs in = prepare_sym_outer_accum(out, x, weight, /*to_compute=*/true);
  const at::Tensor &X = in.A, &W = in.W;
  update_in_place(out, [&](at::Tensor& work) { sym_rank_k(work, X, W, alpha, beta); });
}

at::Tensor class_gram_cpu(const at::Tensor& a, const at::Tensor& delta) {
  const LinearInputs in = prepare_class_gram(a, delta, /*to_compute=*/true);
  const int64_t N = in.d.N, C = in.d.C, T = in.d.T, I = in.d.I, O = in.d.O;
  const at::Tensor &A = in.A, &D = in.D;  // [N, T, I], [N, C, T, O]
  at::Tensor K = at::empty({N, C, C}, A.options());
  // Two exact ways to K_n[c, c'] = <g_nc, g_nc'>:
  //  gram:        sum_{t,s} (a_t . a_s)(delta_ct . delta_c's)   ~ T^2 I + C T^2 O + C^2 T O flops
  //  materialize: g_nc = delta_c^T a, then J J^T              ~ C T O I + C^2 O I flops
  const double cost_gram = double(T) * T * I + double(C) * T * T * O + double(C) * C * T * O;
  const double cost_mat = double(C) * T * O * I + double(C) * C * O * I;
  const bool use_gram = T == 1 || cost_gram <= cost_mat;
  const int64_t per_sample = use_gram ? T * T + 2 * C * T * O : C * O * I;
  // Every chunk writes its own rows of K: chunks run in parallel, each with serial GEMMs.
  for_each_chunk(N, thread_chunk_rows(per_sample, scratch_elems(), N), [&](int64_t s, int64_t b) {
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
