// CUDA kernels of the solver-update family. Schemas and the math: csrc/fisherext.cpp and
// csrc/solver_update_common.h; the CPU kernels (csrc/cpu/solver_update_cpu.cpp) have the same semantics.
//   cg_update_                           one launch updating x, r and writing per-block partial sums of
//                                        each column, then a tiny launch adding the partials of each
//                                        column in a fixed order (deterministic, no atomics)
//   cg_direction_, lissa_update_, neumann_update_   one grid-stride elementwise launch
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "cuda/launch.cuh"
#include "solver_update_common.h"

namespace fisherext {
namespace {

constexpr int kThreads = 256;
// Resident blocks per SM that cg_update_'s grid aims for: enough threads in flight to saturate memory
// (its rows are walked grid-stride beyond that).
constexpr int kBlocksPerSM = 8;

// ---- cg_update_ ----

// Sum of (a, b) over the block, valid in thread 0; a fixed tree, so the same inputs give the same bits.
__device__ void block_sum2(reduce_t& a, reduce_t& b) {
  __shared__ reduce_t shared[2][kThreads / kWarp];
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    shared[0][warp] = a;
    shared[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / kWarp ? shared[0][lane] : reduce_t(0);
    b = lane < kThreads / kWarp ? shared[1][lane] : reduce_t(0);
    a = warp_sum(a);
    b = warp_sum(b);
  }
  __syncthreads();  // shared is reused by the next column of the calling loop
}

// The [P, K] vectors are walked in their memory order: a block is blockDim.x columns (all K when K <= 256)
// by blockDim.y rows, thread (tx, ty) holds column k = blockIdx.x blockDim.x + tx and rows
// ty + blockDim.y (blockIdx.y + gridDim.y j), so consecutive threads touch consecutive elements of a row
// and consecutive rows follow each other: every warp's loads and stores coalesce, for any K. Each thread
// sums its column's share; the block then adds them over ty (a fixed tree) and writes the partial (rz, rr)
// of column k and row group blockIdx.y to partial[(k gridDim.y + blockIdx.y) 2 + {0, 1}].
template <typename scalar_t, bool kHasInv>
__global__ void __launch_bounds__(kThreads)
    cg_update_kernel(scalar_t* __restrict__ x, scalar_t* __restrict__ r, const scalar_t* __restrict__ p,
                     const scalar_t* __restrict__ Ap, const at::opmath_type<scalar_t>* __restrict__ alpha,
                     const scalar_t* __restrict__ inv, reduce_t* __restrict__ partial, int64_t P, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ reduce_t shared[2][kThreads];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  reduce_t rz = 0, rr = 0;
  if (k < K) {
    const acc_t a = alpha[k];
    for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; i < P;
         i += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      const int64_t e = i * K + k;
      x[e] = static_cast<scalar_t>(static_cast<acc_t>(x[e]) + a * static_cast<acc_t>(p[e]));
      const scalar_t r_new = static_cast<scalar_t>(static_cast<acc_t>(r[e]) - a * static_cast<acc_t>(Ap[e]));
      r[e] = r_new;
      // The sums are of the r that is stored (rounded), the one the next iteration continues from.
      const reduce_t rv = static_cast<reduce_t>(r_new);
      rr += rv * rv;
      if constexpr (kHasInv) rz += rv * rv * static_cast<reduce_t>(inv[i]);
    }
  }
  const int lin = threadIdx.y * blockDim.x + threadIdx.x;
  shared[0][lin] = kHasInv ? rz : rr;
  shared[1][lin] = rr;
  __syncthreads();
  unsigned step = 1;  // the tree over ty: halves of the next power of two, the upper half added to the lower
  while (step < blockDim.y) step *= 2;
  for (step /= 2; step > 0; step /= 2) {
    if (threadIdx.y < step && threadIdx.y + step < blockDim.y) {
      shared[0][lin] += shared[0][lin + step * blockDim.x];
      shared[1][lin] += shared[1][lin + step * blockDim.x];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && k < K) {
    partial[(k * gridDim.y + blockIdx.y) * 2] = shared[0][threadIdx.x];
    partial[(k * gridDim.y + blockIdx.y) * 2 + 1] = shared[1][threadIdx.x];
  }
}

// Column k's partials of every block, added by block k (strided) in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    cg_finish_kernel(const reduce_t* __restrict__ partial, int64_t blocks, int64_t K, acc_t* __restrict__ rz_out,
                     acc_t* __restrict__ rr_out) {
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    reduce_t rz = 0, rr = 0;
    for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) {
      rz += partial[(k * blocks + b) * 2];
      rr += partial[(k * blocks + b) * 2 + 1];
    }
    block_sum2(rz, rr);
    if (threadIdx.x == 0) {
      rz_out[k] = static_cast<acc_t>(rz);
      rr_out[k] = static_cast<acc_t>(rr);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> cg_update_cuda(at::Tensor& x, at::Tensor& r, const at::Tensor& p,
                                                  const at::Tensor& Ap, const at::Tensor& alpha,
                                                  const std::optional<at::Tensor>& inv_diag) {
  const CgUpdateProblem q = prepare_cg_update(x, r, p, Ap, alpha, inv_diag);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = current_stream(x);
  // Threads: all K columns of a row when K <= kThreads (else kThreads-column tiles) times enough rows to make
  // up kThreads; row groups: enough blocks to fill every SM kBlocksPerSM deep, at most one per row group.
  const int64_t cols = std::min<int64_t>(q.d.K, kThreads), rows = kThreads / cols;
  const int64_t col_tiles = (q.d.K + cols - 1) / cols;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t blocks = std::clamp<int64_t>(int64_t(kBlocksPerSM) * sms / col_tiles, 1,
                                             std::min<int64_t>((q.d.P + rows - 1) / rows, kMaxGrid));
  TORCH_CHECK(col_tiles <= INT_MAX, "fisherext.cg_update_: ", q.d.K, " columns exceed the CUDA grid");
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(blocks));
  const dim3 block(static_cast<unsigned>(cols), static_cast<unsigned>(rows));
  const at::Tensor partial = at::empty({q.d.K * blocks * 2}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cg_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* inv = q.inv_diag.defined() ? q.inv_diag.const_data_ptr<scalar_t>() : nullptr;
    if (inv)
      cg_update_kernel<scalar_t, true><<<grid, block, 0, stream>>>(
          x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), Ap.const_data_ptr<scalar_t>(),
          q.alpha.const_data_ptr<acc_t>(), inv, partial.data_ptr<reduce_t>(), q.d.P, q.d.K);
    else
      cg_update_kernel<scalar_t, false><<<grid, block, 0, stream>>>(
          x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), Ap.const_data_ptr<scalar_t>(),
          q.alpha.const_data_ptr<acc_t>(), nullptr, partial.data_ptr<reduce_t>(), q.d.P, q.d.K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cg_finish_kernel<acc_t><<<grid_for(q.d.K, 1), kThreads, 0, stream>>>(
        partial.const_data_ptr<reduce_t>(), blocks, q.d.K, q.rz.data_ptr<acc_t>(), q.rr.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q.rz, q.rr};
}

// ---- cg_direction_, lissa_update_, neumann_update_ ----

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cg_direction_kernel(scalar_t* __restrict__ p, const scalar_t* __restrict__ r,
                        const at::opmath_type<scalar_t>* __restrict__ beta, const scalar_t* __restrict__ inv,
                        int64_t numel, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t w = inv ? static_cast<acc_t>(inv[e / K]) : acc_t(1);
    p[e] = static_cast<scalar_t>(w * static_cast<acc_t>(r[e]) + beta[e % K] * static_cast<acc_t>(p[e]));
  }
}

void cg_direction_cuda(at::Tensor& p, const at::Tensor& r, const at::Tensor& beta,
                       const std::optional<at::Tensor>& inv_diag) {
  const CgDirectionProblem q = prepare_cg_direction(p, r, beta, inv_diag);
  const c10::cuda::CUDAGuard guard(p.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "cg_direction_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cg_direction_kernel<scalar_t><<<grid_for(p.numel(), kThreads), kThreads, 0, current_stream(p)>>>(
        p.data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), q.beta.const_data_ptr<acc_t>(),
        q.inv_diag.defined() ? q.inv_diag.const_data_ptr<scalar_t>() : nullptr, p.numel(), q.d.K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    lissa_update_kernel(scalar_t* __restrict__ h, const scalar_t* __restrict__ v, const scalar_t* __restrict__ Hh,
                        at::opmath_type<scalar_t> keep, at::opmath_type<scalar_t> inv_scale, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    h[e] = static_cast<scalar_t>(lissa_step(static_cast<acc_t>(v[e]), static_cast<acc_t>(h[e]),
                                            static_cast<acc_t>(Hh[e]), keep, inv_scale));
}

void lissa_update_cuda(at::Tensor& h, const at::Tensor& v, const at::Tensor& Hh, double damping, double scale) {
  check_lissa_update(h, v, Hh, damping, scale);
  const c10::cuda::CUDAGuard guard(h.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "lissa_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lissa_update_kernel<scalar_t><<<grid_for(h.numel(), kThreads), kThreads, 0, current_stream(h)>>>(
        h.data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), Hh.const_data_ptr<scalar_t>(),
        static_cast<acc_t>(1.0 - damping), static_cast<acc_t>(1.0 / scale), h.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    neumann_update_kernel(scalar_t* __restrict__ term, scalar_t* __restrict__ acc, const scalar_t* __restrict__ Aterm,
                          at::opmath_type<scalar_t> inv_scale, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t t = static_cast<scalar_t>(static_cast<acc_t>(term[e]) - static_cast<acc_t>(Aterm[e]) * inv_scale);
    term[e] = t;
    acc[e] = static_cast<scalar_t>(static_cast<acc_t>(acc[e]) + static_cast<acc_t>(t));
  }
}

void neumann_update_cuda(at::Tensor& term, at::Tensor& acc, const at::Tensor& Aterm, double scale) {
  check_neumann_update(term, acc, Aterm, scale);
  const c10::cuda::CUDAGuard guard(term.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, term.scalar_type(), "neumann_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    neumann_update_kernel<scalar_t><<<grid_for(term.numel(), kThreads), kThreads, 0, current_stream(term)>>>(
        term.data_ptr<scalar_t>(), acc.data_ptr<scalar_t>(), Aterm.const_data_ptr<scalar_t>(),
        static_cast<acc_t>(1.0 / scale), term.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CUDA, m) {
  m.impl("cg_update_", &cg_update_cuda);
  m.impl("cg_direction_", &cg_direction_cuda);
  m.impl("lissa_update_", &lissa_update_cuda);
  m.impl("neumann_update_", &neumann_update_cuda);
}

}  // namespace fisherext
