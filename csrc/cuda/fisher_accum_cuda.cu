// CUDA kernels of the fisher_accum family (K1). Schemas and the math: csrc/fisherext.cpp; the CPU
// kernels (csrc/cpu/fisher_accum_cpu.cpp) have the same semantics.
//
// GEMM-shaped work goes to cuBLAS through the device-generic ATen compositions of csrc/fisher_accum_gemm.cpp
// (tensor cores for half/bfloat16, float32 accumulation): sym_outer_accum_, linear_outer_accum_,
// class_gram, and linear_sq_grad for T = 1 and for long sequences. One custom kernel remains, where fusion
// wins: linear_sq_grad for short sequences (1 < T < sq_grad_gemm_positions), whose per-sample gradients g_n
// are summed over t and squared in registers and never written (a batched GEMM would write each g_n and
// read it back twice, for 2T flops of work per element).
//
// sq_grad_kernel gives each block a kTile x kTile tile of g_b = sum_t delta_bt a_bt^T, stages
// kStage rows of the contraction at a time in shared memory (converted to the compute type acc_t), and
// gives each of the 16 x 16 threads a 4 x 4 register micro-tile (rows ty + 16r, columns tx + 16c, so
// shared-memory reads are conflict-free and global stores coalesce); each finished g_b tile is squared
// into the block's running sum. Where the [O, I] tiles alone would not fill the GPU, the samples are split
// over blockIdx.z into a bounded workspace that a second kernel sums in a fixed order (deterministic, no
// atomics). Scratch is bounded by scratch_elems() (fisher_accum_common.h), independent of N.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "checks.h"
#include "fisher_accum_common.h"
#include "fisher_accum_gemm.h"

namespace fisherext {
namespace {

constexpr int kTile = 64;                                   // output tile edge
constexpr int kStage = 16;                                  // contraction rows per shared-memory stage
constexpr int kEdge = 16;                                   // threads along a tile edge
constexpr int kMicro = kTile / kEdge;                       // register micro-tile edge
constexpr int kThreads = kEdge * kEdge;
constexpr int kLoadsPerThread = kStage * kTile / kThreads;  // elements one thread stages per operand
constexpr int64_t kMaxGridYZ = 65535;
// Blocks per SM that a z-split aims for: several resident blocks hide the latency of the stage loads.
constexpr int kBlocksPerSM = 4;
// Fewest contraction rows per z-slice: below this a block's epilogue and partial write dominate.
constexpr int64_t kMinSplitRows = 2 * kStage;

// Positions T from which linear_sq_grad runs batched GEMMs (linear_sq_grad_gemm) instead of the fused
// kernel. Per element of g_n the fused kernel does 2T flops at the SIMT FMA rate R_f; the GEMM path does
// them at cuBLAS's rate R_g and moves ~16 bytes (g_n written in float32, squared in place, read by the
// weighted GEMV) at bandwidth B, so it wins for T > 8 R_f / (B (1 - R_f / R_g)). With H100/H200 figures
// (R_f ~ 25 TFLOP/s for this kernel, B ~ 4 TB/s; R_g ~ 50 TFLOP/s in float32, ~ 600 on half-precision
// tensor cores) that is T > ~100 in float32 and T > ~52 in half precision, rounded up to 128 and 64: an
// estimate from those figures, not a measurement (no GPU has run this code yet).
int64_t sq_grad_gemm_positions(c10::ScalarType input) {
  return opmath_type(input) != input ? 64 : 128;
}

static_assert(kStage * kTile % kThreads == 0, "stage must split evenly over the threads");

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
using Stage = acc_t[kStage][kTile];

// The block's output tile and the calling thread's place in it.
struct TileCoord {
  int64_t m0, n0;  // first row and column of the tile
  int64_t M, N;    // extent of the output matrix (elements past it are neither read nor written)
  int ty, tx;      // the thread owns rows m0 + ty + kEdge r and columns n0 + tx + kEdge c
  __device__ int64_t row(int r) const { return m0 + ty + kEdge * r; }
  __device__ int64_t col(int c) const { return n0 + tx + kEdge * c; }
};

// S[k][p] <- X[(k0 + k) P + p0 + p] for the stage's kcount rows and the tile's columns below P; zero
// elsewhere, so padded lanes add nothing. Consecutive threads walk X's rows, so the global loads coalesce.
template <typename in_t, typename acc_t>
__device__ __forceinline__ void load_stage(Stage<acc_t>& S, const in_t* __restrict__ X, int64_t k0, int kcount,
                                           int64_t p0, int64_t P) {
#pragma unroll
  for (int j = 0; j < kLoadsPerThread; ++j) {
    const int e = threadIdx.x + j * kThreads;
    const int k = e / kTile, p = e % kTile;
    S[k][p] = (k < kcount && p0 + p < P) ? static_cast<acc_t>(X[(k0 + k) * P + p0 + p]) : acc_t(0);
  }
}

// acc[r][c] += Ls[k][row r] * Rs[k][column c]: one rank-1 step of the micro-tile.
template <typename acc_t>
__device__ __forceinline__ void rank1_step(acc_t (&acc)[kMicro][kMicro], const Stage<acc_t>& Ls,
                                           const Stage<acc_t>& Rs, int k, int ty, int tx) {
  acc_t l[kMicro], r[kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    l[i] = Ls[k][ty + kEdge * i];
    r[i] = Rs[k][tx + kEdge * i];
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] += l[i] * r[j];
}

template <typename acc_t>
__device__ __forceinline__ void zero_tile(acc_t (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
}

// ---------------------------------------------------------------------------------------------------
// partial[z] = sum_b w_b P_b ⊙ P_b over the samples b of slice z, with P_b = sum_{t<T} L[bT + t]^T R[bT + t]
// (L [B T, M], R [B T, N] row-major). With L = delta, R = a, P_b is the per-sample gradient g_b.
//
// The block owns one tile of P and walks the samples z * samples_per_z onward. Rows are staged kStage at a
// time regardless of sample boundaries (small T packs several samples into one stage); when a sample's last
// row has been added, its tile is squared into the running sum and the registers restart from zero.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sq_grad_kernel(const in_t* __restrict__ L, const in_t* __restrict__ R, const acc_t* __restrict__ weight,
                   acc_t* __restrict__ partial, int64_t M, int64_t N, int64_t T, int64_t B, int64_t samples_per_z) {
  __shared__ Stage<acc_t> Ls, Rs;
  const int64_t tiles_n = ceil_div(N, kTile);
  const int64_t tile_id = blockIdx.x;
  const TileCoord tile{(tile_id / tiles_n) * kTile, (tile_id % tiles_n) * kTile, M, N,
                       static_cast<int>(threadIdx.x) / kEdge, static_cast<int>(threadIdx.x) % kEdge};
  const int64_t z = blockIdx.z;
  const int64_t b_begin = z * samples_per_z;
  const int64_t row_end = std::min(B, b_begin + samples_per_z) * T;

  acc_t sum[kMicro][kMicro], g[kMicro][kMicro];
  zero_tile(sum);
  zero_tile(g);
  int64_t b = b_begin;
  int64_t t = 0;  // rows of sample b added so far (uniform across the block)
  for (int64_t r0 = b_begin * T; r0 < row_end; r0 += kStage) {
    const int kcount = static_cast<int>(std::min<int64_t>(kStage, row_end - r0));
    load_stage(Ls, L, r0, kcount, tile.m0, M);
    load_stage(Rs, R, r0, kcount, tile.n0, N);
    __syncthreads();
    for (int k = 0; k < kcount; ++k) {
      rank1_step(g, Ls, Rs, k, tile.ty, tile.tx);
      if (++t == T) {
        const acc_t w = weight != nullptr ? weight[b] : acc_t(1);
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
          for (int j = 0; j < kMicro; ++j) sum[i][j] += w * g[i][j] * g[i][j];
        zero_tile(g);
        t = 0;
        ++b;
      }
    }
    __syncthreads();
  }
  acc_t* dst = partial + z * M * N;
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j)
      if (tile.row(i) < M && tile.col(j) < N) dst[tile.row(i) * N + tile.col(j)] = sum[i][j];
}

// out[i] = sum_z partial[z, i] in order, cast to the output dtype.
template <typename out_t, typename acc_t>
__global__ void sum_partials_kernel(out_t* __restrict__ out, const acc_t* __restrict__ partial, int64_t Z,
                                    int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t sum = acc_t(0);
    for (int64_t z = 0; z < Z; ++z) sum += partial[z * n + i];
    out[i] = static_cast<out_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

// Samples per z-slice: enough slices that `tiles` blocks per slice fill the GPU a few blocks per SM deep,
// but at most max_z (workspace budget) and gridDim.z, and each slice at least kMinSplitRows rows.
int64_t samples_per_split(int64_t tiles, int64_t samples, int64_t T, int64_t max_z, const at::Tensor& ref) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ref.get_device()));
  const int64_t want = ceil_div(int64_t(kBlocksPerSM) * sms, tiles);
  const int64_t by_rows = samples * T / kMinSplitRows;
  const int64_t most = std::max<int64_t>(1, std::min({max_z, by_rows, samples, kMaxGridYZ}));
  return ceil_div(samples, std::clamp<int64_t>(want, 1, most));
}

// Guards the device of `t` (none for a CPU tensor: the op's checks then name the device mismatch).
struct DeviceOf {
  c10::cuda::OptionalCUDAGuard guard;
  explicit DeviceOf(const at::Tensor& t) {
    if (t.is_cuda()) guard.set_device(t.device());
  }
};

at::Tensor linear_sq_grad_cuda(const at::Tensor& a, const at::Tensor& delta, const std::optional<at::Tensor>& weight) {
  const DeviceOf guard(a);
  const int64_t T = a.dim() == 3 ? a.size(1) : 1;
  if (T == 1 || T >= sq_grad_gemm_positions(a.scalar_type())) return linear_sq_grad_gemm(a, delta, weight);
  const LinearInputs in = prepare_linear_sq_grad(a, delta, weight, /*to_compute=*/false);
  const LinearDims& d = in.d;
  const at::Tensor &A = in.A, &D = in.D, &W = in.W;  // [N, T, I], [N, T, O], [N] or undefined
  const at::TensorOptions acc_options = a.options().dtype(opmath_type(a.scalar_type()));
  at::Tensor out = at::empty({d.O, d.I}, a.options());
  // Samples are split over z when the [O, I] tiles alone cannot fill the GPU; the [Z, O, I] partial sums
  // stay within the scratch budget. One slice in the compute dtype accumulates into out itself.
  const int64_t tiles = ceil_div(d.O, kTile) * ceil_div(d.I, kTile);
  const int64_t per_z = samples_per_split(tiles, d.N, d.T, scratch_elems() / (d.O * d.I), a);
  const int64_t Z = ceil_div(d.N, per_z);
  TORCH_CHECK(tiles <= INT_MAX && Z <= kMaxGridYZ, "fisherext.linear_sq_grad: a per-sample product of ", d.O,
              " x ", d.I, " over ", d.N, " samples exceeds the CUDA grid");
  const bool direct = Z == 1 && out.scalar_type() == acc_options.dtype();
  const at::Tensor partial = direct ? out : at::empty({Z, d.O, d.I}, acc_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "linear_sq_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // S = sum_n w_n g_n ⊙ g_n with g_n = sum_t delta_nt a_nt^T: L = delta, R = a.
    sq_grad_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(Z)), kThreads, 0,
                                      stream>>>(D.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                                                W.defined() ? W.data_ptr<acc_t>() : nullptr,
                                                partial.data_ptr<acc_t>(), d.O, d.I, d.T, d.N, per_z);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!direct) {
      const int64_t n = d.O * d.I;
      const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 8192));
      sum_partials_kernel<scalar_t, acc_t><<<blocks, 256, 0, stream>>>(out.data_ptr<scalar_t>(),
                                                                      partial.data_ptr<acc_t>(), Z, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

void linear_outer_accum_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& delta,
                             const std::optional<at::Tensor>& weight, double alpha) {
  const DeviceOf guard(a);
  linear_outer_accum_gemm(out, a, delta, weight, alpha);
}

void sym_outer_accum_cuda(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          double alpha, double beta) {
  const DeviceOf guard(x);
  sym_outer_accum_gemm(out, x, weight, alpha, beta);
}

at::Tensor class_gram_cuda(const at::Tensor& a, const at::Tensor& delta) {
  const DeviceOf guard(a);
  return class_gram_gemm(a, delta);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CUDA, m) {
  m.impl("linear_sq_grad", &linear_sq_grad_cuda);
  m.impl("linear_outer_accum_", &linear_outer_accum_cuda);
  m.impl("sym_outer_accum_", &sym_outer_accum_cuda);
  m.impl("class_gram", &class_gram_cuda);
}

}  // namespace fisherext
