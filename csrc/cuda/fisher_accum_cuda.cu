// CUDA kernels of the fisher_accum family (K1). Schemas and the math: csrc/fisherext.cpp; the CPU
// kernels (csrc/cpu/fisher_accum_cpu.cpp) have the same semantics.
//
// Two tiled kernels serve all four ops. Both give each block a kTile x kTile output tile, stage
// kStage rows of the contraction at a time in shared memory (converted to the compute type acc_t),
// and give each of the 16 x 16 threads a 4 x 4 register micro-tile (rows ty + 16r, columns tx + 16c,
// so shared-memory reads are conflict-free and global stores coalesce):
//   per_sample_gemm_kernel  P_b = sum_t L_bt^T R_bt for every sample b, each handed to an epilogue:
//                           SquareSumEpilogue (sum_b w_b P_b ⊙ P_b in registers) or StoreEpilogue.
//   sym_kernel              out_b <- beta out_b + alpha s_b sum_k w_k L_b[k]^T R_b[k] on tile pairs
//                           bi <= bj only; each block writes out[p, q] and out[q, p], so the result
//                           is exactly symmetric and only the upper triangle of out is read.
// Where a launch would have too few tiles to fill the GPU, the contraction is split over blockIdx.z
// into a bounded workspace that a second kernel sums in a fixed order (deterministic, no atomics).
// Scratch is bounded by scratch_elems() (fisher_accum_common.h), independent of N.
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

namespace fisherext {
namespace {

constexpr int kTile = 64;                                   // output tile edge
constexpr int kStage = 16;                                  // contraction rows per shared-memory stage
constexpr int kEdge = 16;                                   // threads along a tile edge
constexpr int kMicro = kTile / kEdge;                       // register micro-tile edge
constexpr int kThreads = kEdge * kEdge;
constexpr int kLoadsPerThread = kStage * kTile / kThreads;  // elements one thread stages per operand
// Padded row of a stage: stores that walk the contraction axis (k-contiguous operands) hit distinct banks.
constexpr int kLd = kTile + 1;
constexpr int64_t kMaxGridYZ = 65535;
// Blocks per SM that a z-split aims for: several resident blocks hide the latency of the stage loads.
constexpr int kBlocksPerSM = 4;
// Fewest contraction rows per z-slice: below this a block's epilogue and partial write dominate.
constexpr int64_t kMinSplitRows = 2 * kStage;

static_assert(kStage * kTile % kThreads == 0, "stage must split evenly over the threads");

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
using Stage = acc_t[kStage][kLd];

// The block's output tile and the calling thread's place in it.
struct TileCoord {
  int64_t m0, n0;  // first row and column of the tile
  int64_t M, N;    // extent of the output matrix (elements past it are neither read nor written)
  int ty, tx;      // the thread owns rows m0 + ty + kEdge r and columns n0 + tx + kEdge c
  __device__ int64_t row(int r) const { return m0 + ty + kEdge * r; }
  __device__ int64_t col(int c) const { return n0 + tx + kEdge * c; }
};

// S[k][p] <- X[(k0 + k) k_stride + (p0 + p) p_stride] (times row_weight[k0 + k] when given) for the
// stage's kcount rows and the tile's columns below P; zero elsewhere, so padded lanes add nothing.
template <typename in_t, typename acc_t>
__device__ __forceinline__ void load_stage(Stage<acc_t>& S, const in_t* __restrict__ X, int64_t k0, int kcount,
                                           int64_t k_stride, int64_t p_stride, int64_t p0, int64_t P,
                                           const acc_t* __restrict__ row_weight) {
  // Consecutive threads walk X's contiguous axis so the global loads coalesce.
  const bool along_p = p_stride == 1;
#pragma unroll
  for (int j = 0; j < kLoadsPerThread; ++j) {
    const int e = threadIdx.x + j * kThreads;
    const int k = along_p ? e / kTile : e % kStage;
    const int p = along_p ? e % kTile : e / kStage;
    acc_t v = acc_t(0);
    if (k < kcount && p0 + p < P) {
      v = static_cast<acc_t>(X[(k0 + k) * k_stride + (p0 + p) * p_stride]);
      if (row_weight != nullptr) v *= row_weight[k0 + k];
    }
    S[k][p] = v;
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
// Per-sample products P_b = sum_{t<T} L[bT + t]^T R[bT + t] (L [B T, M], R [B T, N] row-major).
// With L = delta, R = a this is the per-sample gradient g_b = sum_t delta_bt a_bt^T.
//
// The block owns one tile of P and walks the samples blockIdx.z * samples_per_z onward. Rows are
// staged kStage at a time regardless of sample boundaries (small T packs several samples into one
// stage); when a sample's last row has been added, its tile goes to the epilogue and the registers
// restart from zero. The epilogue has `begin(State&, tile)`, `sample(State&, b, P_b tile, tile)` and
// `end(const State&, tile, z)`.

// sum_b w_b P_b ⊙ P_b, kept in registers across the block's samples and written once to partial[z].
template <typename acc_t>
struct SquareSumEpilogue {
  const acc_t* weight;  // [B], or null for all ones
  acc_t* partial;       // [Z, M, N]
  struct State {
    acc_t sum[kMicro][kMicro];
  };
  __device__ void begin(State& st, const TileCoord&) const { zero_tile(st.sum); }
  __device__ void sample(State& st, int64_t b, const acc_t (&g)[kMicro][kMicro], const TileCoord&) const {
    const acc_t w = weight != nullptr ? weight[b] : acc_t(1);
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) st.sum[r][c] += w * g[r][c] * g[r][c];
  }
  __device__ void end(const State& st, const TileCoord& tile, int64_t z) const {
    acc_t* dst = partial + z * tile.M * tile.N;
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c)
        if (tile.row(r) < tile.M && tile.col(c) < tile.N) dst[tile.row(r) * tile.N + tile.col(c)] = st.sum[r][c];
  }
};

// Writes each P_b: element (m, n) goes to out[b sample_stride + m row_stride + col_offset(n)] with
// col_offset(n) = (n / col_split) col_hi + (n % col_split) col_lo, which lets class_gram store its
// [T, (C, O)] products class-major as [C, T, O].
template <typename acc_t>
struct StoreEpilogue {
  acc_t* out;
  int64_t sample_stride, row_stride;
  int64_t col_split, col_hi, col_lo;
  struct State {
    int64_t row[kMicro], col[kMicro];  // offsets of the thread's rows and columns; -1 past the matrix
  };
  __device__ void begin(State& st, const TileCoord& tile) const {
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t m = tile.row(i), n = tile.col(i);
      st.row[i] = m < tile.M ? m * row_stride : -1;
      st.col[i] = n < tile.N ? (n / col_split) * col_hi + (n % col_split) * col_lo : -1;
    }
  }
  __device__ void sample(State& st, int64_t b, const acc_t (&g)[kMicro][kMicro], const TileCoord&) const {
    acc_t* dst = out + b * sample_stride;
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c)
        if (st.row[r] >= 0 && st.col[c] >= 0) dst[st.row[r] + st.col[c]] = g[r][c];
  }
  __device__ void end(const State&, const TileCoord&, int64_t) const {}
};

template <typename in_t, typename acc_t, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    per_sample_gemm_kernel(const in_t* __restrict__ L, const in_t* __restrict__ R, int64_t M, int64_t N, int64_t T,
                           int64_t B, int64_t samples_per_z, const Epilogue epi) {
  __shared__ Stage<acc_t> Ls, Rs;
  const int64_t tiles_n = ceil_div(N, kTile);
  const int64_t tile_id = blockIdx.x;
  const TileCoord tile{(tile_id / tiles_n) * kTile, (tile_id % tiles_n) * kTile, M, N,
                       static_cast<int>(threadIdx.x) / kEdge, static_cast<int>(threadIdx.x) % kEdge};
  const int64_t z = blockIdx.z;
  const int64_t b_begin = z * samples_per_z;
  const int64_t row_end = std::min(B, b_begin + samples_per_z) * T;

  typename Epilogue::State st;
  epi.begin(st, tile);
  acc_t g[kMicro][kMicro];
  zero_tile(g);
  int64_t b = b_begin;
  int64_t t = 0;  // rows of sample b added so far (uniform across the block)
  for (int64_t r0 = b_begin * T; r0 < row_end; r0 += kStage) {
    const int kcount = static_cast<int>(std::min<int64_t>(kStage, row_end - r0));
    load_stage(Ls, L, r0, kcount, M, 1, tile.m0, M, static_cast<const acc_t*>(nullptr));
    load_stage(Rs, R, r0, kcount, N, 1, tile.n0, N, static_cast<const acc_t*>(nullptr));
    __syncthreads();
    for (int k = 0; k < kcount; ++k) {
      rank1_step(g, Ls, Rs, k, tile.ty, tile.tx);
      if (++t == T) {
        epi.sample(st, b, g, tile);
        zero_tile(g);
        t = 0;
        ++b;
      }
    }
    __syncthreads();
  }
  epi.end(st, tile, z);
}

// ---------------------------------------------------------------------------------------------------
// Symmetric tile-pair GEMM: for each batch entry b and p <= q,
//   out_b[p, q] = out_b[q, p] = beta out_b[p, q] + alpha s_b sum_k w_k L_b[k, p] R_b[k, q],
// with operands addressed X_b[k, p] = X[b batch_stride + k k_stride + p p_stride]. With L = R = X it
// is the rank-k update X^T diag(w) X; class_gram also uses it with L != R where L^T R is symmetric
// by construction. beta == 0 never reads out (old NaN is ignored).

template <typename in_t, typename acc_t>
struct SymParams {
  const in_t* L;
  const in_t* R;
  int64_t batch_stride, k_stride, p_stride;
  int64_t K, D, batch;
  const acc_t* row_weight;  // [K] row weights w_k (batch == 1 only), or null for all ones
  const acc_t* scale;       // [batch] factors s_b, or null for all ones
  acc_t alpha, beta;
  acc_t* out;               // [batch, D, D] contiguous
  acc_t* partial;           // [Z, D, D] raw sums of each K-slice (batch == 1 only), or null
  int64_t k_per_z;
};

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sym_kernel(const SymParams<in_t, acc_t> args) {
  __shared__ Stage<acc_t> Ls, Rs;
  // blockIdx.x enumerates the upper-triangle tile pairs column by column: id = bj (bj + 1) / 2 + bi.
  const int64_t id = blockIdx.x;
  int64_t bj = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(id) + 1.0) - 1.0) / 2.0);
  while (bj * (bj + 1) / 2 > id) --bj;  // guards against rounding of the square root
  while ((bj + 1) * (bj + 2) / 2 <= id) ++bj;
  const int64_t bi = id - bj * (bj + 1) / 2;
  const int64_t D = args.D;
  const TileCoord tile{bi * kTile, bj * kTile, D, D, static_cast<int>(threadIdx.x) / kEdge,
                       static_cast<int>(threadIdx.x) % kEdge};
  const int64_t z = blockIdx.z;
  const int64_t k_begin = z * args.k_per_z;
  const int64_t k_end = std::min(args.K, k_begin + args.k_per_z);

  for (int64_t b = blockIdx.y; b < args.batch; b += gridDim.y) {
    const in_t* Lb = args.L + b * args.batch_stride;
    const in_t* Rb = args.R + b * args.batch_stride;
    acc_t acc[kMicro][kMicro];
    zero_tile(acc);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kStage) {
      const int kcount = static_cast<int>(std::min<int64_t>(kStage, k_end - k0));
      load_stage(Ls, Lb, k0, kcount, args.k_stride, args.p_stride, tile.m0, D, args.row_weight);
      load_stage(Rs, Rb, k0, kcount, args.k_stride, args.p_stride, tile.n0, D, static_cast<const acc_t*>(nullptr));
      __syncthreads();
      // Rows past kcount were staged as zeros, so the full unrolled stage is exact.
#pragma unroll
      for (int k = 0; k < kStage; ++k) rank1_step(acc, Ls, Rs, k, tile.ty, tile.tx);
      __syncthreads();
    }
    const acc_t s = args.scale != nullptr ? args.alpha * args.scale[b] : args.alpha;
    acc_t* out = args.out + b * D * D;
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const int64_t p = tile.row(r), q = tile.col(c);
        if (p >= D || q >= D || p > q) continue;
        if (args.partial != nullptr) {
          args.partial[z * D * D + p * D + q] = acc[r][c];
        } else {
          acc_t v = s * acc[r][c];
          if (args.beta != acc_t(0)) v += args.beta * out[p * D + q];
          out[p * D + q] = v;
          out[q * D + p] = v;
        }
      }
  }
}

// Finishes a K-split sym_kernel: out[p, q] = out[q, p] = beta out[p, q] + alpha sum_z partial[z, p, q]
// for p <= q, summing z in order.
template <typename acc_t>
__global__ void sym_finalize_kernel(acc_t* __restrict__ out, const acc_t* __restrict__ partial, int64_t Z,
                                    int64_t D, acc_t alpha, acc_t beta) {
  const int64_t DD = D * D;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < DD;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = idx / D, q = idx % D;
    if (p > q) continue;
    acc_t sum = acc_t(0);
    for (int64_t z = 0; z < Z; ++z) sum += partial[z * DD + idx];
    acc_t v = alpha * sum;
    if (beta != acc_t(0)) v += beta * out[idx];
    out[idx] = v;
    out[q * D + p] = v;
  }
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

struct Launch {
  int device;
  cudaStream_t stream;
  at::TensorOptions acc_options;  // workspace: the input's device, the compute dtype
};

Launch launch_for(const at::Tensor& ref) {
  const auto device = static_cast<c10::DeviceIndex>(ref.get_device());
  return {device, c10::cuda::getCurrentCUDAStream(device).stream(), ref.options().dtype(opmath_type(ref.scalar_type()))};
}

dim3 elementwise_grid(int64_t n) { return dim3(static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 8192))); }

// Items (samples or contraction rows of `rows_per_item` rows each) per z-slice: enough slices that
// `tiles` blocks per slice fill the GPU a few blocks per SM deep, but at most max_z (workspace
// budget) and gridDim.z, and each slice at least kMinSplitRows rows.
int64_t items_per_split(int64_t tiles, int64_t items, int64_t rows_per_item, int64_t max_z, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t want = ceil_div(int64_t(kBlocksPerSM) * sms, tiles);
  const int64_t by_rows = items * rows_per_item / kMinSplitRows;
  const int64_t most = std::max<int64_t>(1, std::min({max_z, by_rows, items, kMaxGridYZ}));
  return ceil_div(items, std::clamp<int64_t>(want, 1, most));
}

int64_t tile_count(int64_t M, int64_t N) { return ceil_div(M, kTile) * ceil_div(N, kTile); }

template <typename in_t, typename acc_t, typename Epilogue>
void launch_per_sample_gemm(const in_t* L, const in_t* R, int64_t M, int64_t N, int64_t T, int64_t B,
                            int64_t samples_per_z, const Epilogue& epi, const Launch& ctx) {
  const int64_t tiles = tile_count(M, N), Z = ceil_div(B, samples_per_z);
  TORCH_CHECK(tiles <= INT_MAX && Z <= kMaxGridYZ, "fisherext: per-sample product of ", M, " x ", N,
              " over ", B, " samples exceeds the CUDA grid");
  per_sample_gemm_kernel<in_t, acc_t, Epilogue><<<dim3(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(Z)),
                                                   kThreads, 0, ctx.stream>>>(L, R, M, N, T, B, samples_per_z, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs sym_kernel on args (partial and k_per_z are filled in here), splitting K over a workspace when
// a single batch entry has too few tile pairs to fill the GPU.
template <typename in_t, typename acc_t>
void launch_sym(SymParams<in_t, acc_t> args, const Launch& ctx) {
  const int64_t nt = ceil_div(args.D, kTile), pairs = nt * (nt + 1) / 2;
  TORCH_CHECK(pairs <= INT_MAX, "fisherext: symmetric update of size ", args.D, " exceeds the CUDA grid");
  args.k_per_z = args.K;
  if (args.batch == 1 && args.scale == nullptr)
    args.k_per_z = items_per_split(pairs, args.K, 1, scratch_elems() / (args.D * args.D), ctx.device);
  const int64_t Z = ceil_div(args.K, args.k_per_z);
  at::Tensor workspace;
  args.partial = nullptr;
  if (Z > 1) {
    workspace = at::empty({Z, args.D, args.D}, ctx.acc_options);
    args.partial = workspace.data_ptr<acc_t>();
  }
  const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(std::min(args.batch, kMaxGridYZ)),
                  static_cast<unsigned>(Z));
  sym_kernel<in_t, acc_t><<<grid, kThreads, 0, ctx.stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (Z > 1) {
    sym_finalize_kernel<acc_t><<<elementwise_grid(args.D * args.D), 256, 0, ctx.stream>>>(
        args.out, args.partial, Z, args.D, args.alpha, args.beta);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
const T* optional_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

at::Tensor linear_sq_grad_cuda(const at::Tensor& a, const at::Tensor& delta, const std::optional<at::Tensor>& weight) {
  const c10::cuda::CUDAGuard guard(a.device());
  const LinearInputs in = prepare_linear_sq_grad(a, delta, weight, /*to_compute=*/false);
  const LinearDims& d = in.d;
  const at::Tensor &A = in.A, &D = in.D, &W = in.W;  // [N, T, I], [N, T, O], [N] or undefined
  const Launch ctx = launch_for(a);
  at::Tensor out = at::empty({d.O, d.I}, a.options());
  // Samples are split over z when the [O, I] tiles alone cannot fill the GPU; the [Z, O, I] partial
  // sums stay within the scratch budget. One slice in the compute dtype accumulates into out itself.
  const int64_t per_z =
      items_per_split(tile_count(d.O, d.I), d.N, d.T, scratch_elems() / (d.O * d.I), ctx.device);
  const int64_t Z = ceil_div(d.N, per_z);
  const bool direct = Z == 1 && out.scalar_type() == opmath_type(out.scalar_type());
  const at::Tensor partial = direct ? out : at::empty({Z, d.O, d.I}, ctx.acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "linear_sq_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // S = sum_n w_n g_n ⊙ g_n with g_n = sum_t delta_nt a_nt^T: L = delta, R = a.
    const SquareSumEpilogue<acc_t> epi{optional_ptr<acc_t>(W), partial.data_ptr<acc_t>()};
    launch_per_sample_gemm<scalar_t, acc_t>(D.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), d.O, d.I, d.T, d.N,
                                            per_z, epi, ctx);
    if (!direct) {
      sum_partials_kernel<scalar_t, acc_t><<<elementwise_grid(d.O * d.I), 256, 0, ctx.stream>>>(
          out.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), Z, d.O * d.I);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

void linear_outer_accum_cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& delta,
                             const std::optional<at::Tensor>& weight, double alpha) {
  const c10::cuda::CUDAGuard guard(a.device());
  const LinearInputs in = prepare_linear_outer_accum(out, a, delta, weight, /*to_compute=*/false);
  const LinearDims& d = in.d;
  const at::Tensor &A = in.A, &D = in.D, &W = in.W;  // [N, T, I], [N, T, O], [N] or undefined
  const int64_t P = d.O * d.I;
  const Launch ctx = launch_for(a);
  // A chunk of per-sample gradients G [rows, P] within the scratch budget.
  const int64_t rows = chunk_rows(P, scratch_elems(), d.N);
  const at::Tensor G = at::empty({rows, P}, ctx.acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "linear_outer_accum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    update_in_place(out, [&](at::Tensor& work) {
      for (int64_t s = 0; s < d.N; s += rows) {
        const int64_t b = std::min(rows, d.N - s);
        // G[j] = vec(g_{s+j}), row-major o * I + i.
        const StoreEpilogue<acc_t> epi{G.data_ptr<acc_t>(), P, d.I, d.I, 0, 1};
        launch_per_sample_gemm<scalar_t, acc_t>(D.data_ptr<scalar_t>() + s * d.T * d.O,
                                                A.data_ptr<scalar_t>() + s * d.T * d.I, d.O, d.I, d.T, b,
                                                items_per_split(tile_count(d.O, d.I), b, d.T, kMaxGridYZ, ctx.device),
                                                epi, ctx);
        // out += alpha G^T diag(w) G.
        const acc_t* w = W.defined() ? W.data_ptr<acc_t>() + s : nullptr;
        launch_sym(SymParams<acc_t, acc_t>{G.data_ptr<acc_t>(), G.data_ptr<acc_t>(), 0, P, 1, b, P, 1, w, nullptr,
                                           static_cast<acc_t>(alpha), acc_t(1), work.data_ptr<acc_t>()},
                   ctx);
      }
    });
  });
}

void sym_outer_accum_cuda(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          double alpha, double beta) {
  const c10::cuda::CUDAGuard guard(x.device());
  const LinearInputs in = prepare_sym_outer_accum(out, x, weight, /*to_compute=*/false);
  const LinearDims& d = in.d;
  const at::Tensor &X = in.A, &W = in.W;  // rows x_nt of length D (row n T + t), one weight per row
  const Launch ctx = launch_for(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sym_outer_accum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    update_in_place(out, [&](at::Tensor& work) {
      launch_sym(SymParams<scalar_t, acc_t>{X.data_ptr<scalar_t>(), X.data_ptr<scalar_t>(), 0, d.I, 1, d.N * d.T,
                                            d.I, 1, optional_ptr<acc_t>(W), nullptr, static_cast<acc_t>(alpha),
                                            static_cast<acc_t>(beta), work.data_ptr<acc_t>()},
                 ctx);
    });
  });
}

at::Tensor class_gram_cuda(const at::Tensor& a, const at::Tensor& delta) {
  const c10::cuda::CUDAGuard guard(a.device());
  const LinearInputs in = prepare_class_gram(a, delta, /*to_compute=*/false);
  const int64_t N = in.d.N, C = in.d.C, T = in.d.T, I = in.d.I, O = in.d.O;
  const at::Tensor &A = in.A, &D = in.D;  // [N, T, I], [N, C, T, O]
  const Launch ctx = launch_for(a);
  const bool low_precision = a.scalar_type() != opmath_type(a.scalar_type());
  at::Tensor K = at::empty({N, C, C}, ctx.acc_options);
  // Position-Gram form: K_n[c, c'] = sum_{t,s} (a_t . a_s)(delta_ct . delta_c's), per chunk of samples:
  //   Ga_n = a_n a_n^T                       [T, T]     (sym_kernel, K = I)
  //   H_n[c', t, :] = sum_s Ga[t, s] delta_c's [C, T, O] (per_sample_gemm_kernel, contraction over s)
  //   K_n = delta_n H_n^T over (t, o)        [C, C]     (sym_kernel, K = T O; symmetric by construction)
  // For T = 1, Ga_n = |a_n|^2 and K_n = Ga_n delta_n delta_n^T directly.
  const int64_t per_sample = T == 1 ? 1 : T * T + 3 * C * T * O;  // Ga, delta [T, C, O], H, delta in acc_t
  const int64_t rows = chunk_rows(per_sample, scratch_elems(), N);
  const at::Tensor Ga = at::empty({rows, T, T}, ctx.acc_options);
  at::Tensor Dt, H, Dc;
  if (T > 1) {
    Dt = at::empty({rows, T, C, O}, ctx.acc_options);
    H = at::empty({rows, C, T, O}, ctx.acc_options);
    if (low_precision) Dc = at::empty({rows, C, T, O}, ctx.acc_options);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "class_gram_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t s = 0; s < N; s += rows) {
      const int64_t b = std::min(rows, N - s);
      const scalar_t* As = A.data_ptr<scalar_t>() + s * T * I;
      acc_t* Ks = K.data_ptr<acc_t>() + s * C * C;
      // Ga_n[t, t'] = a_nt . a_nt': operand X_n[k = i, p = t] = a[n, t, i].
      launch_sym(SymParams<scalar_t, acc_t>{As, As, T * I, 1, I, I, T, b, nullptr, nullptr, acc_t(1), acc_t(0),
                                            Ga.data_ptr<acc_t>()},
                 ctx);
      if (T == 1) {
        // K_n = Ga_n delta_n delta_n^T: operand X_n[k = o, p = c] = delta[n, c, o].
        const scalar_t* Ds = D.data_ptr<scalar_t>() + s * C * O;
        launch_sym(SymParams<scalar_t, acc_t>{Ds, Ds, C * O, 1, O, O, C, b, nullptr, Ga.data_ptr<acc_t>(), acc_t(1),
                                              acc_t(0), Ks},
                   ctx);
        continue;
      }
      const at::Tensor Dchunk = D.narrow(0, s, b);               // [b, C, T, O]
      Dt.narrow(0, 0, b).copy_(Dchunk.permute({0, 2, 1, 3}));    // [b, T, C, O] in acc_t
      // H_n[t, (c, o)] = sum_s Ga_n[s, t] delta_n[c, s, o] (Ga is exactly symmetric), stored as [C, T, O].
      const StoreEpilogue<acc_t> epi{H.data_ptr<acc_t>(), C * T * O, O, O, T * O, 1};
      launch_per_sample_gemm<acc_t, acc_t>(Ga.data_ptr<acc_t>(), Dt.data_ptr<acc_t>(), T, C * O, T, b,
                                           items_per_split(tile_count(T, C * O), b, T, kMaxGridYZ, ctx.device), epi,
                                           ctx);
      // K_n[c, c'] = sum_{t,o} delta_n[c, t, o] H_n[c', t, o]: operands X_n[k = (t, o), p = c].
      const at::Tensor Dl = low_precision ? Dc.narrow(0, 0, b).copy_(Dchunk) : Dchunk;
      launch_sym(SymParams<acc_t, acc_t>{Dl.data_ptr<acc_t>(), H.data_ptr<acc_t>(), C * T * O, 1, T * O, T * O, C, b, nullptr, nullptr,
                                         acc_t(1), acc_t(0), Ks},
                 ctx);
    }
  });
  return K.to(a.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, CUDA, m) {
  m.impl("linear_sq_grad", &linear_sq_grad_cuda);
  m.impl("linear_outer_accum_", &linear_outer_accum_cuda);
  m.impl("sym_outer_accum_", &sym_outer_accum_cuda);
  m.impl("class_gram", &class_gram_cuda);
}

}  // namespace fisherext
