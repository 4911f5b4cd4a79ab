// CUDA kernels of the softmax family. Schemas and the math: csrc/fisherext.cpp and csrc/softmax_common.h;
// the CPU kernels (csrc/cpu/softmax_cpu.cpp) have the same semantics.
//   softmax_hvp, softmax_hessian_sqrt   one warp per logit row: lanes stride over the classes, shuffle
//                                        reductions give the row max, Σ exp and each direction's pᵀu
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/launch.cuh"
#include "softmax_common.h"

namespace fisherext {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarp;  // one warp per logit row

// Softmax statistics of one row, held by every lane of the warp: p_c = exp(z_c − max) · inv_sum.
template <typename acc_t>
struct RowSoftmax {
  acc_t max, inv_sum;
  __device__ acc_t prob(acc_t z) const { return exp(z - max) * inv_sum; }
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ RowSoftmax<acc_t> row_softmax(const scalar_t* z, int64_t C, int lane) {
  acc_t m = -INFINITY;
  for (int64_t c = lane; c < C; c += kWarp) m = max(m, static_cast<acc_t>(z[c]));
  m = warp_max(m);
  acc_t s = 0;
  for (int64_t c = lane; c < C; c += kWarp) s += exp(static_cast<acc_t>(z[c]) - m);
  return {m, acc_t(1) / warp_sum(s)};
}

// body(n, z_n, softmax statistics of row n, lane) for every logit row n of z [N, C], one warp per row. The row
// index is the same for all lanes of a warp, so whole warps enter and leave the loop and every shuffle has all
// 32 lanes present.
template <typename scalar_t, typename Body>
__device__ void for_each_row(const scalar_t* z, int64_t N, int64_t C, Body body) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; n < N;
       n += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const scalar_t* zn = z + n * C;
    body(n, zn, row_softmax(zn, C, lane), lane);
  }
}

// ---- softmax_hvp ----

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    softmax_hvp_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ u, scalar_t* __restrict__ out,
                       int64_t K, int64_t N, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_row(z, N, C, [&](int64_t n, const scalar_t* zn, const RowSoftmax<acc_t>& sm, int lane) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = (k * N + n) * C;
      acc_t s = 0;
      for (int64_t c = lane; c < C; c += kWarp) s += sm.prob(static_cast<acc_t>(zn[c])) * static_cast<acc_t>(u[row + c]);
      s = warp_sum(s);
      for (int64_t c = lane; c < C; c += kWarp)
        out[row + c] = static_cast<scalar_t>(sm.prob(static_cast<acc_t>(zn[c])) * (static_cast<acc_t>(u[row + c]) - s));
    }
  });
}

at::Tensor softmax_hvp_cuda(const at::Tensor& logits, const at::Tensor& u) {
  const SoftmaxHvpProblem q = prepare_softmax_hvp(logits, u);
  const c10::cuda::CUDAGuard guard(q.u.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.u.scalar_type(), "softmax_hvp_cuda", [&] {
    softmax_hvp_kernel<scalar_t><<<grid_for(q.N, kRowsPerBlock), kThreads, 0, current_stream(q.u)>>>(
        q.logits.const_data_ptr<scalar_t>(), q.u.const_data_ptr<scalar_t>(), q.out.data_ptr<scalar_t>(), q.K, q.N,
        q.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return q.out;
}

// ---- softmax_hessian_sqrt ----

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    softmax_hessian_sqrt_kernel(const scalar_t* __restrict__ z, scalar_t* __restrict__ out, int64_t N, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_row(z, N, C, [&](int64_t n, const scalar_t* zn, const RowSoftmax<acc_t>& sm, int lane) {
    for (int64_t k = 0; k < C; ++k) {
      const acc_t root = sqrt(sm.prob(static_cast<acc_t>(zn[k])));
      scalar_t* s = out + (k * N + n) * C;  // consecutive lanes write consecutive classes
      for (int64_t c = lane; c < C; c += kWarp)
        s[c] = static_cast<scalar_t>(root * ((c == k ? acc_t(1) : acc_t(0)) - sm.prob(static_cast<acc_t>(zn[c]))));
    }
  });
}

at::Tensor softmax_hessian_sqrt_cuda(const at::Tensor& logits) {
  const SoftmaxSqrtProblem q = prepare_softmax_hessian_sqrt(logits);
  const c10::cuda::CUDAGuard guard(q.logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.logits.scalar_type(), "softmax_hessian_sqrt_cuda", [&] {
    softmax_hessian_sqrt_kernel<scalar_t><<<grid_for(q.N, kRowsPerBlock), kThreads, 0, current_stream(q.logits)>>>(
        q.logits.const_data_ptr<scalar_t>(), q.out.data_ptr<scalar_t>(), q.N, q.C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return q.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CUDA, m) {
  m.impl("softmax_hvp", &softmax_hvp_cuda);
  m.impl("softmax_hessian_sqrt", &softmax_hessian_sqrt_cuda);
}

}  // namespace fisherext
