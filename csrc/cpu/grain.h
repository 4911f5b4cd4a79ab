// Work sizes of the CPU kernels' parallel loops.
#pragma once
#include <algorithm>
#include <cstdint>

namespace fisherext {

// Elements below which work is not worth a thread (ATen's GRAIN_SIZE).
constexpr int64_t kGrain = int64_t(1) << 15;

// Rows per task when each row costs `per_row` elements of work.
inline int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(per_row, 1)); }

}  // namespace fisherext
