// CPU kernels of the perturb family (K2). Schemas and the math: csrc/fisherext.cpp and
// csrc/perturb_common.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "perturb_common.h"

namespace fisherext {
namespace {

// ---- axpy_list_ ----

// Elements below which work is not worth a thread (ATen's GRAIN_SIZE). It is also the size of an
// axpy_list_ work item: small enough to balance a few large tensors over the threads.
constexpr int64_t kGrain = int64_t(1) << 15;

// Elements [begin, begin + n) of tensor `index` of the lists.
struct Chunk {
  size_t index;
  int64_t begin, n;
};

std::vector<Chunk> list_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < tensors.size(); ++i)
    for (int64_t b = 0; b < tensors[i].numel(); b += kGrain)
      chunks.push_back({i, b, std::min(kGrain, tensors[i].numel() - b)});
  return chunks;
}

// out = x + eps v in the compute dtype, rounded once to scalar_t. out may be x or v itself.
template <typename scalar_t>
void axpy(scalar_t* out, const scalar_t* x, const scalar_t* v, at::opmath_type<scalar_t> eps, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + eps * static_cast<acc_t>(v[i]));
}

void axpy_list_cpu(at::TensorList out, at::TensorList x, at::TensorList v, double eps) {
  check_axpy_list(out, x, v, eps);
  // One parallel region over every (tensor, chunk) pair of the lists: many small parameter tensors
  // share threads instead of each paying a parallel region of its own.
  const std::vector<Chunk> chunks = list_chunks(out);
  int64_t total = 0;
  for (const at::Tensor& t : out) total += t.numel();
  // Grain in chunks: on average at least kGrain elements per thread (many tiny tensors stay serial).
  const int64_t count = static_cast<int64_t>(chunks.size());
  const int64_t grain = std::max<int64_t>(1, (kGrain * count + total - 1) / std::max<int64_t>(total, 1));
  at::parallel_for(0, count, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      // Entries of the lists may differ in dtype (entry i matches across the lists).
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out[ch.index].scalar_type(), "axpy_list_cpu", [&] {
        axpy(out[ch.index].data_ptr<scalar_t>() + ch.begin, x[ch.index].const_data_ptr<scalar_t>() + ch.begin,
             v[ch.index].const_data_ptr<scalar_t>() + ch.begin, static_cast<at::opmath_type<scalar_t>>(eps), ch.n);
      });
    }
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

// ---- registrations for every backend (this file is always built) ----

// Reached only when no list holds a tensor (the dispatcher then has no backend to pick): the checks
// name the empty argument. A tensor on a device without a fisherext kernel lands here too.
void axpy_list_no_backend(at::TensorList out, at::TensorList x, at::TensorList v, double eps) {
  check_axpy_list(out, x, v, eps);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "fisherext.axpy_list_: no kernel for tensors on ", out[0].device());
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CPU, m) {
  m.impl("axpy_list_", &axpy_list_cpu);
  m.impl("fd_fisher_reduce", &fd_fisher_reduce_cpu);
}

TORCH_LIBRARY_IMPL(fisherext, CompositeExplicitAutograd, m) {
  m.impl("axpy_list_", &axpy_list_no_backend);
}

// Neither op is differentiable (both serve finite differences under no_grad): autograd passes them
// through, so outputs never require grad, instead of carrying a grad_fn that backpropagates nothing.
TORCH_LIBRARY_IMPL(fisherext, Autograd, m) {
  m.impl("axpy_list_", torch::CppFunction::makeFallthrough());
  m.impl("fd_fisher_reduce", torch::CppFunction::makeFallthrough());
}

}  // namespace fisherext
