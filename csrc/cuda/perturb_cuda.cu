// CUDA kernels of the perturb family (K2). Schemas and the math: csrc/fisherext.cpp and
// csrc/perturb_common.h; the CPU kernels (csrc/cpu/perturb_cpu.cpp) have the same semantics.
//   axpy_list_        one multi_tensor_apply launch per dtype present (multi_tensor_apply.cuh)
//   fd_fisher_reduce  one warp per row: each lane folds a strided slice of the row into online
//                     softmax statistics (FdRowStats), then a shuffle butterfly merges the 32 lanes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "multi_tensor_apply.cuh"
#include "perturb_common.h"

namespace fisherext {
namespace {

// ---- axpy_list_ ----

// out = x + eps v on one chunk, in the compute dtype and rounded once. out may be x or v itself
// (each element is read and written by the same thread), hence no __restrict__.
template <typename scalar_t>
struct AxpyChunk {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t eps;

  __device__ void operator()(void* const (&ptr)[3], int64_t begin, int n) const {
    scalar_t* out = static_cast<scalar_t*>(ptr[0]) + begin;
    const scalar_t* x = static_cast<const scalar_t*>(ptr[1]) + begin;
    const scalar_t* v = static_cast<const scalar_t*>(ptr[2]) + begin;
#pragma unroll 4
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + eps * static_cast<acc_t>(v[i]));
  }
};

void axpy_list_cuda(at::TensorList out, at::TensorList x, at::TensorList v, double eps) {
  check_axpy_list(out, x, v, eps);
  const c10::cuda::CUDAGuard guard(out[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out[0].get_device()).stream();
  // A kernel is compiled per dtype, so entries are grouped by dtype: one launch sequence per dtype
  // present (a model usually has one).
  std::vector<c10::ScalarType> dtypes;
  for (const at::Tensor& t : out)
    if (std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) == dtypes.end()) dtypes.push_back(t.scalar_type());
  for (const c10::ScalarType dtype : dtypes) {
    std::vector<mta::ListEntry<3>> entries;
    for (size_t i = 0; i < out.size(); ++i)
      if (out[i].scalar_type() == dtype)
        entries.push_back({{out[i].data_ptr(), x[i].data_ptr(), v[i].data_ptr()}, out[i].numel()});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "axpy_list_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      mta::multi_tensor_apply<3>(entries, AxpyChunk<scalar_t>{static_cast<acc_t>(eps)}, stream);
    });
  }
}

// ---- fd_fisher_reduce ----

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per row
constexpr int64_t kMaxGrid = 65535;

template <typename scalar_t>
struct FdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* plus;   // [N, C]
  const scalar_t* minus;  // [N, C]
  const scalar_t* base;   // [N, C], or null without logits_0
  acc_t* quad;            // [N]
  acc_t* kl_plus;         // [N]
  acc_t* kl_minus;        // [N]
  int64_t N, C;
  acc_t inv_4eps2;
};

template <typename scalar_t, bool kHasBase>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock) fd_fisher_reduce_kernel(const FdArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  // The row index is the same for all lanes of a warp, so whole warps enter and leave the loop and
  // every shuffle below has all 32 lanes present.
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; n < a.N;
       n += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = n * a.C;
    FdRowStats<acc_t, kHasBase> st;
    // Consecutive lanes read consecutive logits: coalesced.
    for (int64_t c = lane; c < a.C; c += kWarp)
      st.add(static_cast<acc_t>(a.plus[row + c]), static_cast<acc_t>(a.minus[row + c]),
             kHasBase ? static_cast<acc_t>(a.base[row + c]) : acc_t(0));
    // Butterfly: after log2(32) exchanges every lane holds the statistics of the whole row.
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2)
      st.merge(st.map([offset](acc_t value) { return __shfl_xor_sync(0xffffffffu, value, offset); }));
    if (lane == 0) {
      const FdRowResult<acc_t> r = st.finish(a.inv_4eps2);
      a.quad[n] = r.quad;
      a.kl_plus[n] = r.kl_plus;
      a.kl_minus[n] = r.kl_minus;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_fisher_reduce_cuda(const at::Tensor& logits_plus,
                                                                      const at::Tensor& logits_minus,
                                                                      const std::optional<at::Tensor>& logits_0,
                                                                      double eps) {
  const FdProblem p = prepare_fd_fisher_reduce(logits_plus, logits_minus, logits_0, eps);
  const c10::cuda::CUDAGuard guard(p.plus.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(p.plus.get_device()).stream();
  // Rows beyond the grid are taken by the grid-stride loop.
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((p.N + kRowsPerBlock - 1) / kRowsPerBlock, kMaxGrid));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.plus.scalar_type(), "fd_fisher_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FdArgs<scalar_t> args{p.plus.const_data_ptr<scalar_t>(),
                                p.minus.const_data_ptr<scalar_t>(),
                                p.base.defined() ? p.base.const_data_ptr<scalar_t>() : nullptr,
                                p.quad.data_ptr<acc_t>(),
                                p.kl_plus.data_ptr<acc_t>(),
                                p.kl_minus.data_ptr<acc_t>(),
                                p.N,
                                p.C,
                                static_cast<acc_t>(p.inv_4eps2)};
    if (p.base.defined())
      fd_fisher_reduce_kernel<scalar_t, true><<<blocks, kWarp * kRowsPerBlock, 0, stream>>>(args);
    else
      fd_fisher_reduce_kernel<scalar_t, false><<<blocks, kWarp * kRowsPerBlock, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p.outputs();
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CUDA, m) {
  m.impl("axpy_list_", &axpy_list_cuda);
  m.impl("fd_fisher_reduce", &fd_fisher_reduce_cuda);
}

}  // namespace fisherext
