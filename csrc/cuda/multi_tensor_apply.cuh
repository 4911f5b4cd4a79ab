// One kernel launch over a whole list of tensors (in the manner of apex's multi_tensor_apply).
//
// Entry i of the list is a tuple of Depth operands of equal numel (e.g. out[i] and its slices of flat x and v), contiguous
// and on the current device. Every entry is cut into chunks of kChunk elements, and a launch runs one
// block per chunk. What block b works on (a tensor slot and a chunk index) and each slot's pointers and
// numel travel in a metadata struct passed by value as the kernel argument, so a launch needs no
// host-to-device copy and no device allocation. The struct holds at most kMaxBlocks chunks and
// TensorListMeta<Depth>::kMaxTensors slots (kernel arguments are limited to 4 KB); when either fills,
// the launch is issued and the struct is refilled from empty, carrying over the tensor whose remaining
// chunks did not fit. So a model of up to ~kMaxTensors parameter tensors and kMaxBlocks * kChunk
// elements takes one launch.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <vector>

namespace fisherext {
namespace mta {

constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kThreads = 512;      // threads per block: kChunk / kThreads = 128 elements each
constexpr int kMaxBlocks = 320;    // chunks per launch
constexpr int kArgBytes = 4096;    // CUDA's portable limit on a kernel's arguments
constexpr int kOpBytes = 64;       // left for the per-chunk functor passed beside the metadata

// Slots per launch for Depth operands: what the argument budget leaves after the per-block entries,
// each slot taking Depth pointers and a numel.
template <int Depth>
constexpr int max_tensors() {
  return static_cast<int>((kArgBytes - kOpBytes - kMaxBlocks * (sizeof(int32_t) + sizeof(uint8_t))) /
                          (Depth * sizeof(void*) + sizeof(int64_t)));
}

template <int Depth>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors<Depth>();
  void* ptr[Depth][kMaxTensors];  // operand d of the tensor in slot s
  int64_t numel[kMaxTensors];
  // Block b works on chunk chunk[b] of slot slot[b] (int32 holds the chunk index of any tensor below
  // 2^47 elements).
  int32_t chunk[kMaxBlocks];
  uint8_t slot[kMaxBlocks];
};

// Entry i of the list: its Depth operands and their common numel.
template <int Depth>
struct ListEntry {
  std::array<void*, Depth> ptr;
  int64_t numel;
};

// Block b calls op(ptr, begin, n): operands ptr[d] of its tensor (base pointers, untyped), and the
// chunk's elements [begin, begin + n), n <= kChunk.
template <int Depth, typename Op>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const TensorListMeta<Depth> meta, const Op op) {
  const int slot = meta.slot[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.chunk[blockIdx.x]) * kChunk;
  const int64_t left = meta.numel[slot] - begin;
  const int n = static_cast<int>(left < kChunk ? left : kChunk);
  void* ptr[Depth];
#pragma unroll
  for (int d = 0; d < Depth; ++d) ptr[d] = meta.ptr[d][slot];
  op(ptr, begin, n);
}

template <int Depth, typename Op>
void launch(const TensorListMeta<Depth>& meta, int blocks, const Op& op, cudaStream_t stream) {
  multi_tensor_kernel<Depth, Op><<<blocks, kThreads, 0, stream>>>(meta, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int Depth>
void set_slot(TensorListMeta<Depth>& meta, int slot, const ListEntry<Depth>& e) {
  for (int d = 0; d < Depth; ++d) meta.ptr[d][slot] = e.ptr[d];
  meta.numel[slot] = e.numel;
}

// Runs op on every chunk of every entry, on `stream`, in as few launches as the metadata allows.
template <int Depth, typename Op>
void multi_tensor_apply(const std::vector<ListEntry<Depth>>& entries, const Op& op, cudaStream_t stream) {
  using Meta = TensorListMeta<Depth>;
  static_assert(Meta::kMaxTensors >= 1 && Meta::kMaxTensors <= 256, "slots must fit the uint8 slot index");
  static_assert(sizeof(Meta) + kOpBytes <= kArgBytes, "metadata must fit the kernel-argument limit");
  static_assert(sizeof(Op) <= kOpBytes, "functor too large for the kernel-argument budget");
  Meta meta{};
  int tensors = 0, blocks = 0;
  for (const ListEntry<Depth>& e : entries) {
    if (e.numel == 0) continue;
    int slot = tensors++;
    set_slot(meta, slot, e);
    const int64_t chunks = (e.numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.slot[blocks] = static_cast<uint8_t>(slot);
      meta.chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == chunks;
      if (blocks == kMaxBlocks || (last_chunk && tensors == Meta::kMaxTensors)) {
        launch(meta, blocks, op, stream);
        // The kernel argument was copied at launch: refill from empty, this tensor first if unfinished.
        blocks = 0;
        tensors = 0;
        if (!last_chunk) {
          slot = tensors++;
          set_slot(meta, slot, e);
        }
      }
    }
  }
  if (blocks > 0) launch(meta, blocks, op, stream);
}

}  // namespace mta
}  // namespace fisherext
