// Launch helpers of the softmax and solver-update CUDA kernels: the current stream, grid sizes and warp
// reductions.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace fisherext {

constexpr int kWarp = 32;
constexpr int64_t kMaxGrid = 65535;

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

// Blocks for `work` items at `per_block` per block, at least one and at most kMaxGrid (grid-stride loops
// cover the rest).
inline unsigned grid_for(int64_t work, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, kMaxGrid)));
}

template <typename T>
__device__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ T warp_max(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

}  // namespace fisherext
