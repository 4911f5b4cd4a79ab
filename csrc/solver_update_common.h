// Shared by the CPU and CUDA kernels of the solver-update family: argument checks, the prepared problems
// and the per-element math, written once so that both backends compute the same formulas (they differ only
// in summation order).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>

#include <optional>
#include <string>

#include "checks.h"

namespace fisherext {

// Fused solver updates on flat vectors.
//
// Vectors are contiguous [P] or [P, K] (K right-hand sides as columns, element (i, k) at i*K + k); the
// per-column scalars alpha/beta are [] (for [P]) or [K], in the compute dtype of the vectors (float32
// for half/bfloat16), so a solver passes its reductions back in without a host sync.

// Sizes of the vectors of one solver op.
struct FlatDims {
  int64_t P, K;
  bool columns;  // [P, K] (else [P], K = 1)
};

inline FlatDims check_flat(const char* op, const char* name, const at::Tensor& x) {
  check_float(op, name, x);
  TORCH_CHECK_VALUE(x.dim() == 1 || x.dim() == 2, "fisherext.", op, ": argument '", name,
                    "' must have shape [P] or [P, K], got ", x.sizes());
  check_nonempty(op, name, x);
  TORCH_CHECK_VALUE(x.is_contiguous(), "fisherext.", op, ": argument '", name, "' must be contiguous");
  return {x.size(0), x.dim() == 2 ? x.size(1) : 1, x.dim() == 2};
}

// Another vector of the op: dtype, device and shape of `ref`, contiguous.
inline void check_flat_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                            const at::Tensor& ref) {
  check_like(op, name, t, ref_name, ref);
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "fisherext.", op, ": argument '", name, "' must have the shape ",
                    ref.sizes(), " of '", ref_name, "', got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "fisherext.", op, ": argument '", name, "' must be contiguous");
}

// A per-column scalar: shape [] for vectors [P], [K] for [P, K]; the compute dtype of `ref`. Returns it
// contiguous, as the kernels index it s[k]: any strides are accepted (an expanded 0-dim step shared by all
// columns is the natural way to pass one), since a copy of K elements is nothing next to the P·K of the
// vectors, and a contiguous s (every solver's) is returned as is.
inline at::Tensor check_column_scalar(const char* op, const char* name, const at::Tensor& s, const char* ref_name,
                                      const at::Tensor& ref, const FlatDims& d) {
  check_float(op, name, s);
  const c10::ScalarType want = opmath_type(ref.scalar_type());
  TORCH_CHECK_TYPE(s.scalar_type() == want, "fisherext.", op, ": argument '", name, "' must have dtype ", want,
                   " (the compute dtype of '", ref_name, "' ", ref.scalar_type(), "), got ", s.scalar_type());
  check_same_device(op, name, s, ref_name, ref);
  const bool ok = d.columns ? (s.dim() == 1 && s.size(0) == d.K) : s.dim() == 0;
  TORCH_CHECK_VALUE(ok, "fisherext.", op, ": argument '", name, "' must have shape ",
                    d.columns ? "[" + std::to_string(d.K) + "] (one per column)" : std::string("[]"), " for '",
                    ref_name, "' of shape ", ref.sizes(), ", got ", s.sizes());
  return s.contiguous();
}

// The optional inverse diagonal preconditioner [P]; returns it contiguous (undefined when absent).
inline at::Tensor check_inv_diag(const char* op, const std::optional<at::Tensor>& inv_diag, const char* ref_name,
                                 const at::Tensor& ref, const FlatDims& d) {
  if (!inv_diag.has_value() || !inv_diag->defined()) return at::Tensor();
  check_like(op, "inv_diag", *inv_diag, ref_name, ref);
  TORCH_CHECK_VALUE(inv_diag->dim() == 1 && inv_diag->size(0) == d.P, "fisherext.", op,
                    ": argument 'inv_diag' must have shape [", d.P, "] (one entry per row of '", ref_name,
                    "'), got ", inv_diag->sizes());
  return inv_diag->contiguous();
}

// Reductions of cg_update_ accumulate in double on both backends: the op is memory-bound, so the wider
// adds cost nothing measurable, and rz, rr (which set CG's step sizes and stopping test) carry no
// cancellation error from long float32 sums.
using reduce_t = double;

// Checked inputs of cg_update_ and its outputs rz, rr ([] or [K], compute dtype).
struct CgUpdateProblem {
  FlatDims d;
  at::Tensor alpha;     // contiguous
  at::Tensor inv_diag;  // undefined without a preconditioner
  at::Tensor rz, rr;
};

inline CgUpdateProblem prepare_cg_update(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
                                         const at::Tensor& Ap, const at::Tensor& alpha,
                                         const std::optional<at::Tensor>& inv_diag) {
  const char* op = "cg_update_";
  CgUpdateProblem q;
  q.d = check_flat(op, "x", x);
  check_flat_like(op, "r", r, "x", x);
  check_flat_like(op, "p", p, "x", x);
  check_flat_like(op, "Ap", Ap, "x", x);
  q.alpha = check_column_scalar(op, "alpha", alpha, "x", x, q.d);
  q.inv_diag = check_inv_diag(op, inv_diag, "x", x, q.d);
  check_no_overlap(op, {{"x", x}, {"r", r}},
                   {{"p", p}, {"Ap", Ap}, {"alpha", alpha}, {"inv_diag", inv_diag.value_or(at::Tensor())}});
  q.rz = at::empty(alpha.sizes(), alpha.options());
  q.rr = at::empty(alpha.sizes(), alpha.options());
  return q;
}

struct CgDirectionProblem {
  FlatDims d;
  at::Tensor beta;      // contiguous
  at::Tensor inv_diag;  // undefined without a preconditioner
};

inline CgDirectionProblem prepare_cg_direction(const at::Tensor& p, const at::Tensor& r, const at::Tensor& beta,
                                               const std::optional<at::Tensor>& inv_diag) {
  const char* op = "cg_direction_";
  CgDirectionProblem q;
  q.d = check_flat(op, "p", p);
  check_flat_like(op, "r", r, "p", p);
  q.beta = check_column_scalar(op, "beta", beta, "p", p, q.d);
  q.inv_diag = check_inv_diag(op, inv_diag, "p", p, q.d);
  check_no_overlap(op, {{"p", p}}, {{"r", r}, {"beta", beta}, {"inv_diag", inv_diag.value_or(at::Tensor())}});
  return q;
}

inline void check_lissa_update(const at::Tensor& h, const at::Tensor& v, const at::Tensor& Hh, double damping,
                               double scale) {
  const char* op = "lissa_update_";
  check_flat(op, "h", h);
  check_flat_like(op, "v", v, "h", h);
  check_flat_like(op, "Hh", Hh, "h", h);
  check_finite_scalar(op, "damping", damping, /*positive=*/false);
  TORCH_CHECK_VALUE(damping >= 0 && damping < 1, "fisherext.", op, ": argument 'damping' must be in [0, 1), got ",
                    damping);
  check_finite_scalar(op, "scale", scale, /*positive=*/true);
  check_no_overlap(op, {{"h", h}}, {{"v", v}, {"Hh", Hh}});
}

inline void check_neumann_update(const at::Tensor& term, const at::Tensor& acc, const at::Tensor& Aterm,
                                 double scale) {
  const char* op = "neumann_update_";
  check_flat(op, "term", term);
  check_flat_like(op, "acc", acc, "term", term);
  check_flat_like(op, "Aterm", Aterm, "term", term);
  check_finite_scalar(op, "scale", scale, /*positive=*/true);
  check_no_overlap(op, {{"term", term}, {"acc", acc}}, {{"Aterm", Aterm}});
}

// h ← v + (1 − damping) h − Hh / scale, with keep = 1 − damping and inv_scale = 1 / scale.
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t lissa_step(acc_t v, acc_t h, acc_t Hh, acc_t keep, acc_t inv_scale) {
  return v + keep * h - Hh * inv_scale;
}

}  // namespace fisherext
