// Argument checks shared by the CPU and CUDA kernels of every op. Each failure names the op and the
// argument: dtype problems raise TypeError, shapes/devices/empty inputs raise ValueError.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <utility>

namespace fisherext {

// Sizes of a linear-map input pair: a [N, (T,) I], delta [N, (C,) (T,) O].
struct LinearDims {
  int64_t N, C, T, I, O;
};

inline bool is_supported_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Compute dtype: half/bfloat16 inputs accumulate in float32.
inline c10::ScalarType opmath_type(c10::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "fisherext.", op, ": argument '", name, "' is undefined");
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "fisherext.", op, ": argument '", name,
                   "' must be a floating-point tensor (float16/bfloat16/float32/float64), got ",
                   t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fisherext.", op, ": argument '", name,
                    "' is on ", t.device(), " but '", ref_name, "' is on ", ref.device());
}

inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  check_float(op, name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "fisherext.", op, ": argument '", name,
                   "' has dtype ", t.scalar_type(), " but '", ref_name, "' has ", ref.scalar_type());
  check_same_device(op, name, t, ref_name, ref);
}

inline void check_nonempty(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.numel() > 0, "fisherext.", op, ": argument '", name,
                    "' is empty (shape ", t.sizes(), ")");
}

// a [N, I] with delta [N, (C,) O], or a [N, T, I] with delta [N, (C,) T, O].
inline LinearDims check_linear(const char* op, const at::Tensor& a, const at::Tensor& delta,
                               bool class_axis) {
  check_float(op, "a", a);
  check_like(op, "delta", delta, "a", a);
  TORCH_CHECK_VALUE(a.dim() == 2 || a.dim() == 3, "fisherext.", op,
                    ": argument 'a' must have shape [N, I] or [N, T, I], got ", a.sizes());
  const int64_t extra = class_axis ? 1 : 0;
  TORCH_CHECK_VALUE(delta.dim() == a.dim() + extra, "fisherext.", op, ": argument 'delta' must have shape ",
                    class_axis ? (a.dim() == 2 ? "[N, C, O]" : "[N, C, T, O]")
                               : (a.dim() == 2 ? "[N, O]" : "[N, T, O]"),
                    " to match a ", a.sizes(), ", got ", delta.sizes());
  check_nonempty(op, "a", a);
  check_nonempty(op, "delta", delta);
  LinearDims d;
  d.N = a.size(0);
  d.T = a.dim() == 3 ? a.size(1) : 1;
  d.I = a.size(-1);
  d.C = class_axis ? delta.size(1) : 1;
  d.O = delta.size(-1);
  TORCH_CHECK_VALUE(delta.size(0) == d.N, "fisherext.", op, ": 'a' and 'delta' disagree on N (", d.N,
                    " vs ", delta.size(0), ")");
  if (a.dim() == 3) {
    TORCH_CHECK_VALUE(delta.size(1 + extra) == d.T, "fisherext.", op,
                      ": 'a' and 'delta' disagree on T (", d.T, " vs ", delta.size(1 + extra), ")");
  }
  return d;
}

// Optional per-sample weights: a 1-D tensor of length N, dtype and device of `ref`.
inline void check_weight(const char* op, const std::optional<at::Tensor>& weight, const char* ref_name,
                         const at::Tensor& ref, int64_t N) {
  if (!weight.has_value() || !weight->defined()) return;
  check_like(op, "weight", *weight, ref_name, ref);
  TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == N, "fisherext.", op,
                    ": argument 'weight' must have shape [", N, "] (one weight per sample), got ",
                    weight->sizes());
}

// Whether no two elements of t share a memory location. ATen's has_internal_overlap decides only dense
// tensors (a strided view such as a column slice is TooHard), so this takes the dimensions in increasing
// stride and requires each stride to exceed the largest offset reachable through the smaller ones:
// sufficient for distinct elements, true for every slice of a dense tensor, and false for any expanded
// (zero stride) or self-overlapping as_strided view.
inline bool has_distinct_elements(const at::Tensor& t) {
  c10::SmallVector<std::pair<int64_t, int64_t>, 4> dims;  // (stride, size) of the dimensions of size > 1
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.size(i) > 1) dims.emplace_back(t.stride(i), t.size(i));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += stride * (size - 1);
  }
  return true;
}

// A square accumulator out [D, D] on `ref`'s device, in `ref`'s dtype or its compute dtype (a float32
// accumulator for half/bfloat16 inputs, so that the sum is never rounded to half precision), with one memory
// location per element (an element written twice would keep whichever write lands last).
inline void check_square_out(const char* op, const at::Tensor& out, const char* ref_name,
                             const at::Tensor& ref, int64_t D) {
  check_float(op, "out", out);
  TORCH_CHECK_TYPE(out.scalar_type() == ref.scalar_type() || out.scalar_type() == opmath_type(ref.scalar_type()),
                   "fisherext.", op, ": argument 'out' has dtype ", out.scalar_type(), " but '", ref_name, "' has ",
                   ref.scalar_type(), " (out must have its dtype, or float32 for float16/bfloat16)");
  check_same_device(op, "out", out, ref_name, ref);
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == D && out.size(1) == D, "fisherext.", op,
                    ": argument 'out' must have shape [", D, ", ", D, "], got ", out.sizes());
  TORCH_CHECK_VALUE(has_distinct_elements(out), "fisherext.", op,
                    ": argument 'out' has elements that share memory (strides ", out.strides(),
                    ", e.g. an expanded tensor); an in-place output needs one memory location per element");
}

// An argument by name for check_no_overlap; undefined for an absent optional argument.
struct NamedTensor {
  const char* name;
  const at::Tensor& tensor;
};

// In-place ops write their outputs while still reading the other arguments (through __restrict__
// pointers, on both backends), so an output that shares memory with another argument gives garbage:
// refused, for every written argument against every other one. ATen decides overlap exactly between
// dense tensors and answers TooHard when either is not dense; that passes, because every op reads and
// writes a non-dense argument through a contiguous copy (vectors that must be contiguous are dense).
inline void check_no_overlap(const char* op, std::initializer_list<NamedTensor> written,
                             std::initializer_list<NamedTensor> read) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    const auto refuse_overlap = [&](const NamedTensor& other) {
      if (!other.tensor.defined()) return;
      const at::MemOverlapStatus s = at::get_overlap_status(w->tensor, other.tensor);
      TORCH_CHECK_VALUE(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial, "fisherext.", op,
                        ": argument '", w->name, "' overlaps argument '", other.name,
                        "' in memory (an in-place output must not share memory with another argument)");
    };
    std::for_each(w + 1, written.end(), refuse_overlap);
    std::for_each(read.begin(), read.end(), refuse_overlap);
  }
}

// x [N, D] or [N, T, D] for sym_outer_accum_: returns {N, T, D}.
inline LinearDims check_rows(const char* op, const at::Tensor& x) {
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "fisherext.", op,
                    ": argument 'x' must have shape [N, D] or [N, T, D], got ", x.sizes());
  check_nonempty(op, "x", x);
  LinearDims d;
  d.N = x.size(0);
  d.C = 1;
  d.T = x.dim() == 3 ? x.size(1) : 1;
  d.I = x.size(-1);
  d.O = 1;
  return d;
}

// A scalar argument that must be finite, and > 0 when `positive` (Python floats can be nan/inf).
inline void check_finite_scalar(const char* op, const char* name, double value, bool positive) {
  TORCH_CHECK_VALUE(std::isfinite(value), "fisherext.", op, ": argument '", name, "' must be finite, got ",
                    value);
  TORCH_CHECK_VALUE(!positive || value > 0, "fisherext.", op, ": argument '", name, "' must be > 0, got ", value);
}

// Logits [N, C] with N, C >= 1.
inline void check_logits(const char* op, const char* name, const at::Tensor& t) {
  check_float(op, name, t);
  TORCH_CHECK_VALUE(t.dim() == 2, "fisherext.", op, ": argument '", name, "' must have shape [N, C], got ",
                    t.sizes());
  check_nonempty(op, name, t);
}

// Logits of the same [N, C] shape, dtype and device as `ref`.
inline void check_logits_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  check_like(op, name, t, ref_name, ref);
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "fisherext.", op, ": argument '", name, "' must have the shape ",
                    ref.sizes(), " of '", ref_name, "', got ", t.sizes());
}

}  // namespace fisherext
