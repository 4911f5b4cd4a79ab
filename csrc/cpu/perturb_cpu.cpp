// CPU kernels of the perturb family (K2). Schemas and the math: csrc/fisherext.cpp and
// csrc/perturb_common.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/grain.h"
#include "perturb_common.h"

namespace fisherext {
namespace {

// ---- unflatten_axpy_ ----

// kGrain (cpu/grain.h) is also the size of an unflatten_axpy_ work item: small enough to balance a few large
// tensors over the threads.

// Elements [begin, begin + n) of tensor `index` of the list, which start at `offset` in the flat x and v.
struct Chunk {
  size_t index;
  int64_t offset, begin, n;
};

std::vector<Chunk> list_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  int64_t offset = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    for (int64_t b = 0; b < tensors[i].numel(); b += kGrain)
      chunks.push_back({i, offset + b, b, std::min(kGrain, tensors[i].numel() - b)});
    offset += tensors[i].numel();
  }
  return chunks;
}

// out = x + eps v in the compute dtype, rounded once to scalar_t.
template <typename scalar_t>
void axpy(scalar_t* __restrict__ out, const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,
          at::opmath_type<scalar_t> eps, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + eps * static_cast<acc_t>(v[i]));
}

template <typename scalar_t>
using AxpyFn = void (*)(scalar_t*, const scalar_t*, const scalar_t*, at::opmath_type<scalar_t>, int64_t);

// The build targets baseline x86-64 (SSE2): on x86-64 the loop is also compiled for AVX2 and AVX-512
// (`flatten` inlines it into each) and picked at run time, as linear_sq_grad does. A parameter list is
// hot in cache between perturbations, so the wider vectors pay: measured 1.3-1.5x on 268k floats.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <typename scalar_t>
__attribute__((target("avx512f"), flatten)) void axpy_avx512(scalar_t* out, const scalar_t* x, const scalar_t* v,
                                                             at::opmath_type<scalar_t> eps, int64_t n) {
  axpy(out, x, v, eps, n);
}
template <typename scalar_t>
__attribute__((target("avx2"), flatten)) void axpy_avx2(scalar_t* out, const scalar_t* x, const scalar_t* v,
                                                        at::opmath_type<scalar_t> eps, int64_t n) {
  axpy(out, x, v, eps, n);
}
#endif

template <typename scalar_t>
AxpyFn<scalar_t> pick_axpy() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx512f")) return &axpy_avx512<scalar_t>;
  if (__builtin_cpu_supports("avx2")) return &axpy_avx2<scalar_t>;
#endif
  return &axpy<scalar_t>;
}

void unflatten_axpy_cpu(at::TensorList out, const at::Tensor& x, const std::optional<at::Tensor>& v, double eps) {
  const int64_t total = check_unflatten_axpy(out, x, v, eps);
  const bool has_v = v.has_value() && v->defined();
  // One parallel region over every (tensor, chunk) pair: many small parameter tensors share threads
  // instead of each paying a parallel region of its own.
  const std::vector<Chunk> chunks = list_chunks(out);
  // Grain in chunks: on average at least kGrain elements per thread (many tiny tensors stay serial).
  const int64_t count = static_cast<int64_t>(chunks.size());
  const int64_t grain = std::max<int64_t>(1, (kGrain * count + total - 1) / std::max<int64_t>(total, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unflatten_axpy_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* vp = has_v ? v->const_data_ptr<scalar_t>() : nullptr;
    const auto step = static_cast<at::opmath_type<scalar_t>>(eps);
    const AxpyFn<scalar_t> axpy_chunk = pick_axpy<scalar_t>();
    at::parallel_for(0, count, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        scalar_t* dst = out[ch.index].data_ptr<scalar_t>() + ch.begin;
        if (has_v)
          axpy_chunk(dst, xp + ch.offset, vp + ch.offset, step, ch.n);
        else
          std::memcpy(dst, xp + ch.offset, ch.n * sizeof(scalar_t));  // bitwise, whatever the values
      }
    });
  });
}

// ---- fd_fisher_reduce ----

template <typename scalar_t, bool kHasBase>
void fd_fisher_rows(const FdProblem& p, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* lp = p.plus.const_data_ptr<scalar_t>();
  const scalar_t* lm = p.minus.const_data_ptr<scalar_t>();
  const scalar_t* l0 = kHasBase ? p.base.const_data_ptr<scalar_t>() : nullptr;
  acc_t* quad = p.quad.data_ptr<acc_t>();
  acc_t* kl_plus = p.kl_plus.data_ptr<acc_t>();
  acc_t* kl_minus = p.kl_minus.data_ptr<acc_t>();
  for (int64_t n = r0; n < r1; ++n) {
    FdRowStats<acc_t, kHasBase> st;
    for (int64_t c = n * p.C; c < (n + 1) * p.C; ++c)
      st.add(static_cast<acc_t>(lp[c]), static_cast<acc_t>(lm[c]), kHasBase ? static_cast<acc_t>(l0[c]) : acc_t(0));
    const FdRowResult<acc_t> r = st.finish(static_cast<acc_t>(p.inv_4eps2));
    quad[n] = r.quad;
    kl_plus[n] = r.kl_plus;
    kl_minus[n] = r.kl_minus;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_fisher_reduce_cpu(const at::Tensor& logits_plus,
                                                                     const at::Tensor& logits_minus,
                                                                     const std::optional<at::Tensor>& logits_0,
                                                                     double eps) {
  const FdProblem p = prepare_fd_fisher_reduce(logits_plus, logits_minus, logits_0, eps);
  // Rows per task: at least kGrain logits.
  const int64_t grain = std::max<int64_t>(1, kGrain / p.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.plus.scalar_type(), "fd_fisher_reduce_cpu", [&] {
    at::parallel_for(0, p.N, grain, [&](int64_t r0, int64_t r1) {
      if (p.base.defined())
        fd_fisher_rows<scalar_t, true>(p, r0, r1);
      else
        fd_fisher_rows<scalar_t, false>(p, r0, r1);
    });
  });
  return p.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CPU, m) {
  m.impl("unflatten_axpy_", &unflatten_axpy_cpu);
  m.impl("fd_fisher_reduce", &fd_fisher_reduce_cpu);
}

}  // namespace fisherext
