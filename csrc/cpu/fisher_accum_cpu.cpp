// CPU kernels of the fisher_accum family (K1). Schemas and the math: csrc/fisherext.cpp.
//
// sym_outer_accum_ and linear_outer_accum_ are the device-generic GEMM compositions of
// csrc/fisher_accum_gemm.cpp, as on CUDA, and so is linear_sq_grad for T = 1. Here: linear_sq_grad for T > 1
// (a fused register-tiled micro-kernel) and class_gram (the shared per-chunk body, chunks in parallel).
//
// Memory: peak extra memory is independent of N. The GEMM-based kernels stream samples in chunks
// whose scratch is bounded by scratch_elems() (fisher_accum_common.h); linear_sq_grad (T > 1) needs one [O, I] accumulator
// and at most one sample's padded copy per thread.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Unroll.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "fisher_accum_common.h"
#include "fisher_accum_gemm.h"

namespace fisherext {
namespace {

// Multiply-adds below which a task is not worth a thread (ATen's GRAIN_SIZE).
constexpr int64_t kMinTaskMacs = int64_t(1) << 15;
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

// The position axis of a linear op's input a [N, I] or [N, T, I] (1 when absent, or when a is malformed:
// the GEMM composite then raises the error naming it).
int64_t positions(const at::Tensor& a) { return a.dim() == 3 ? a.size(1) : 1; }

at::Tensor linear_sq_grad_cpu(const at::Tensor& a, const at::Tensor& delta,
                              const std::optional<at::Tensor>& weight) {
  // T = 1 is one GEMM per chunk, (w ⊙ delta²)ᵀ a², as on CUDA.
  if (positions(a) == 1 || gemm_kernels_on_cpu()) return linear_sq_grad_gemm(a, delta, weight);
  const LinearInputs in = prepare_linear_sq_grad(a, delta, weight, /*to_compute=*/true);
  const LinearDims& d = in.d;
  const at::Tensor &A = in.A, &D = in.D, &W = in.W;  // [N, T, I], [N, T, O], [N] or undefined
  at::Tensor out = at::zeros({d.O, d.I}, A.options());
  // One contiguous range of samples per thread, each into its own accumulator; the accumulators are added
  // in thread order (deterministic for a given thread count).
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
  return out.to(a.scalar_type());
}

at::Tensor class_gram_cpu(const at::Tensor& a, const at::Tensor& delta) {
  if (gemm_kernels_on_cpu()) return class_gram_gemm(a, delta);
  const LinearInputs in = prepare_class_gram(a, delta, /*to_compute=*/true);
  const LinearDims& d = in.d;
  const at::Tensor &A = in.A, &D = in.D;  // [N, T, I], [N, C, T, O]
  const GramForm form = class_gram_form(d);
  at::Tensor K = at::empty({d.N, d.C, d.C}, A.options());
  // Every chunk writes its own rows of K: chunks run in parallel, each with serial GEMMs.
  const int64_t per_sample = class_gram_scratch_per_sample(d, form, /*upcast=*/false);
  for_each_chunk(d.N, thread_chunk_rows(per_sample, scratch_elems(), d.N), [&](int64_t s, int64_t b) {
    at::Tensor Kc = K.narrow(0, s, b);
    class_gram_chunk(A.narrow(0, s, b), D.narrow(0, s, b), Kc, form);
  });
  return symmetric_gram(K, a.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CPU, m) {
  m.impl("linear_sq_grad", &linear_sq_grad_cpu);
  m.impl("linear_outer_accum_", &linear_outer_accum_gemm);
  m.impl("sym_outer_accum_", &sym_outer_accum_gemm);
  m.impl("class_gram", &class_gram_cpu);
}

}  // namespace fisherext
