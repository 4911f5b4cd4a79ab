// CUDA kernels of the perturb family (K2). Schemas and the math: csrc/fisherext.cpp and
// csrc/perturb_common.h; the CPU kernels (csrc/cpu/perturb_cpu.cpp) have the same semantics.
//   unflatten_axpy_   one multi_tensor_apply launch (multi_tensor_apply.cuh; more only for very long lists)
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
#include <array>
#include <vector>

#include "checks.h"
#include "multi_tensor_apply.cuh"
#include "perturb_common.h"

namespace fisherext {
namespace {

// ---- unflatten_axpy_ ----

// out = x + eps v on one chunk, in the compute dtype and rounded once (ptr: out, x, v).
template <typename scalar_t>
struct AxpyChunk {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t eps;

  __device__ void operator()(void* const (&ptr)[3], int64_t begin, int n) const {
    scalar_t* __restrict__ out = static_cast<scalar_t*>(ptr[0]) + begin;
    const scalar_t* __restrict__ x = static_cast<const scalar_t*>(ptr[1]) + begin;
    const scalar_t* __restrict__ v = static_cast<const scalar_t*>(ptr[2]) + begin;
#pragma unroll 4
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      out[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + eps * static_cast<acc_t>(v[i]));
  }
};

// out = x on one chunk, bit for bit (ptr: out, x).
template <typename scalar_t>
struct CopyChunk {
  __device__ void operator()(void* const (&ptr)[2], int64_t begin, int n) const {
    scalar_t* __restrict__ out = static_cast<scalar_t*>(ptr[0]) + begin;
    const scalar_t* __restrict__ x = static_cast<const scalar_t*>(ptr[1]) + begin;
#pragma unroll 4
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = x[i];
  }
};

// Entry i of the list: out[i] and the slices of the flat operands that start at its offset.
template <int Depth>
std::vector<mta::ListEntry<Depth>> flat_entries(at::TensorList out, const std::array<const at::Tensor*, Depth - 1>& flat) {
  std::vector<mta::ListEntry<Depth>> entries;
  entries.reserve(out.size());
  const int64_t itemsize = static_cast<int64_t>(out[0].element_size());
  int64_t offset = 0;
  for (const at::Tensor& t : out) {
    mta::ListEntry<Depth> e;
    e.ptr[0] = t.data_ptr();
    for (int d = 1; d < Depth; ++d) e.ptr[d] = static_cast<char*>(flat[d - 1]->data_ptr()) + offset * itemsize;
    e.numel = t.numel();
    entries.push_back(e);
    offset += t.numel();
  }
  return entries;
}

void unflatten_axpy_cuda(at::TensorList out, const at::Tensor& x, const std::optional<at::Tensor>& v, double eps) {
  check_unflatten_axpy(out, x, v, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unflatten_axpy_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (v.has_value() && v->defined())
      mta::multi_tensor_apply<3>(flat_entries<3>(out, {&x, &*v}), AxpyChunk<scalar_t>{static_cast<acc_t>(eps)},
                                 stream);
    else
      mta::multi_tensor_apply<2>(flat_entries<2>(out, {&x}), CopyChunk<scalar_t>{}, stream);
  });
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
  m.impl("unflatten_axpy_", &unflatten_axpy_cuda);
  m.impl("fd_fisher_reduce", &fd_fisher_reduce_cuda);
}

}  // namespace fisherext
