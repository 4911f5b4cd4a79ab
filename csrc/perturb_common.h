// Shared by the CPU and CUDA kernels of the perturb family (K2): argument checks and the per-row
// math of fd_fisher_reduce, written once as host/device code so that both backends compute the same
// formulas (they differ only in summation order).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"

namespace fisherext {

// ---- unflatten_axpy_ ----

// One byte range [begin, end) of a contiguous tensor: where overlaps of unflatten_axpy_'s operands are found.
struct ByteSpan {
  uintptr_t begin, end;
  size_t index;  // in out
};

inline ByteSpan span_of(const at::Tensor& t, size_t itemsize, size_t index) {
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {begin, begin + static_cast<size_t>(t.numel()) * itemsize, index};
}

// The tensors of out are written from x and v in one parallel pass (through __restrict__ pointers), so one
// that shares memory with another or with x or v gives garbage: refused. Every operand is contiguous, so it
// covers one byte range (`spans`: those of the nonempty tensors of out). Sorted by start, the ranges of out
// are disjoint iff each ends before the next begins (n log n, not a check of every pair: the list is a
// model's parameters, checked on every perturbation), and x (or v) then meets out iff it meets the first
// range that ends after x begins. x and v may overlap each other: both are only read.
inline void check_unflatten_disjoint(std::vector<ByteSpan>& spans, const at::Tensor& x,
                                     const std::optional<at::Tensor>& v) {
  // Parameters allocated one after another are often in address order already: no sort then.
  const auto by_begin = [](const ByteSpan& a, const ByteSpan& b) { return a.begin < b.begin; };
  if (!std::is_sorted(spans.begin(), spans.end(), by_begin)) std::sort(spans.begin(), spans.end(), by_begin);
  const auto refuse = [](size_t i, const std::string& other) {
    TORCH_CHECK_VALUE(false, "fisherext.unflatten_axpy_: argument 'out[", i, "]' overlaps argument '", other,
                      "' in memory (an in-place output must not share memory with another argument)");
  };
  for (size_t j = 1; j < spans.size(); ++j) {
    const ByteSpan &a = spans[j - 1], &b = spans[j];
    if (b.begin < a.end)
      refuse(std::min(a.index, b.index), "out[" + std::to_string(std::max(a.index, b.index)) + "]");
  }
  const auto refuse_if_meets_out = [&](const char* name, const at::Tensor& t) {
    const ByteSpan f = span_of(t, t.element_size(), 0);
    const auto first =
        std::partition_point(spans.begin(), spans.end(), [&](const ByteSpan& s) { return s.end <= f.begin; });
    if (first != spans.end() && first->begin < f.end) refuse(first->index, name);
  };
  refuse_if_meets_out("x", x);
  if (v.has_value() && v->defined()) refuse_if_meets_out("v", *v);
}

// out: a nonempty list of contiguous tensors of x's dtype and device, sharing no memory with each other or
// with x and v; x (and v): contiguous, 1-D, with as many elements as the list together. Returns that
// number. Names are formatted only on failure: the list is a model's parameters, checked on every
// perturbation (so the byte ranges are collected in the same pass as the other checks).
inline int64_t check_unflatten_axpy(at::TensorList out, const at::Tensor& x, const std::optional<at::Tensor>& v,
                                    double eps) {
  const char* op = "unflatten_axpy_";
  TORCH_CHECK_VALUE(!out.empty(), "fisherext.", op, ": argument 'out' is an empty list");
  check_float(op, "x", x);
  const size_t itemsize = x.element_size();
  std::vector<ByteSpan> spans;
  spans.reserve(out.size());
  int64_t total = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const at::Tensor& t = out[i];
    if (!t.defined() || t.scalar_type() != x.scalar_type() || t.device() != x.device() || !t.is_contiguous()) {
      const std::string name = "out[" + std::to_string(i) + "]";
      check_like(op, name.c_str(), t, "x", x);
      TORCH_CHECK_VALUE(t.is_contiguous(), "fisherext.", op, ": argument '", name, "' must be contiguous");
    }
    total += t.numel();
    if (t.numel() > 0) spans.push_back(span_of(t, itemsize, i));
  }
  const auto check_flat = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), "fisherext.", op, ": argument '", name,
                      "' must be a contiguous 1-D tensor, got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.numel() == total, "fisherext.", op, ": argument '", name, "' has ", t.numel(),
                      " elements but the tensors of 'out' have ", total, " together");
  };
  check_flat("x", x);
  if (v.has_value() && v->defined()) {
    check_like(op, "v", *v, "x", x);
    check_flat("v", *v);
  }
  check_finite_scalar(op, "eps", eps, /*positive=*/false);
  check_unflatten_disjoint(spans, x, v);
  return total;
}

// ---- fd_fisher_reduce ----
//
// Per row n, with Δ_c = l⁺_c − l⁻_c and lse = log Σ_c exp(l_c) of each logit row:
//   Σ_c (log p⁺_c − log p⁻_c)(p⁺_c − p⁻_c) = Σ_c (Δ_c − (lse⁺ − lse⁻))(p⁺_c − p⁻_c) = E_{p⁺}[Δ] − E_{p⁻}[Δ]
// because Σ_c p⁺_c = Σ_c p⁻_c = 1, and
//   KL(p⁰ ‖ p⁺) = E_{p⁰}[l⁰ − l⁺] + lse⁺ − lse⁰,         KL(p⁰ ‖ p⁻) = E_{p⁰}[l⁰ − l⁻] + lse⁻ − lse⁰,
//   KL(p⁻ ‖ p⁺) = −E_{p⁻}[Δ] + lse⁺ − lse⁻,              KL(p⁺ ‖ p⁻) = E_{p⁺}[Δ] − (lse⁺ − lse⁻).
// So every output is an expectation under a softmax plus log-normalizer differences: one pass over the
// row accumulates, per logit row, its max, Σ exp(l − max) and the exp-weighted sums of the differences.

// Softmax statistics of one row of logits l in one pass (online log-sum-exp): max = max_c l_c,
// sum = Σ_c e_c and moment[k] = Σ_c f_kc e_c with e_c = exp(l_c − max), so that E_p[f_k] = moment[k] / sum
// and lse = max + log(sum). When a larger logit arrives, the sums so far are rescaled by
// exp(old max − new max), so no exp ever exceeds 1.
template <typename acc_t, int K>
struct SoftmaxMoments {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = acc_t(0);
  acc_t moment[K] = {};

  C10_HOST_DEVICE void add(acc_t l, const acc_t (&f)[K]) {
    if (l > max) {
      rescale(std::exp(max - l));
      max = l;
    }
    const acc_t e = std::exp(l - max);
    sum += e;
    for (int k = 0; k < K; ++k) moment[k] += f[k] * e;
  }

  // Adds the statistics of another, disjoint part of the row.
  C10_HOST_DEVICE void merge(const SoftmaxMoments& o) {
    if (o.sum == acc_t(0)) return;  // o has seen no element (its max is −inf)
    if (o.max > max) {
      rescale(std::exp(max - o.max));
      max = o.max;
    }
    const acc_t s = std::exp(o.max - max);
    sum += s * o.sum;
    for (int k = 0; k < K; ++k) moment[k] += s * o.moment[k];
  }

  // The statistics with f applied to every field (CUDA: fetch another lane's statistics).
  template <typename F>
  C10_HOST_DEVICE SoftmaxMoments map(F f) const {
    SoftmaxMoments r;
    r.max = f(max);
    r.sum = f(sum);
    for (int k = 0; k < K; ++k) r.moment[k] = f(moment[k]);
    return r;
  }

  C10_HOST_DEVICE acc_t mean(int k) const { return moment[k] / sum; }

 private:
  C10_HOST_DEVICE void rescale(acc_t s) {
    sum *= s;
    for (int k = 0; k < K; ++k) moment[k] *= s;
  }
};

// lse_a − lse_b, without forming either lse (each would round at the scale of its max).
template <typename acc_t, int Ka, int Kb>
C10_HOST_DEVICE acc_t lse_diff(const SoftmaxMoments<acc_t, Ka>& a, const SoftmaxMoments<acc_t, Kb>& b) {
  return (a.max - b.max) + (std::log(a.sum) - std::log(b.sum));
}

template <typename acc_t>
struct FdRowResult {
  acc_t quad, kl_plus, kl_minus;
};

// All statistics of one row of fd_fisher_reduce; kHasBase: logits_0 is given.
template <typename acc_t, bool kHasBase>
struct FdRowStats {
  SoftmaxMoments<acc_t, 1> plus, minus;  // f = Δ under p⁺ and p⁻
  SoftmaxMoments<acc_t, 2> base;         // f = (l⁰ − l⁺, l⁰ − l⁻) under p⁰; unused without logits_0

  C10_HOST_DEVICE void add(acc_t lp, acc_t lm, acc_t l0) {
    const acc_t delta[1] = {lp - lm};
    plus.add(lp, delta);
    minus.add(lm, delta);
    if constexpr (kHasBase) {
      const acc_t f[2] = {l0 - lp, l0 - lm};
      base.add(l0, f);
    }
  }

  C10_HOST_DEVICE void merge(const FdRowStats& o) {
    plus.merge(o.plus);
    minus.merge(o.minus);
    if constexpr (kHasBase) base.merge(o.base);
  }

  template <typename F>
  C10_HOST_DEVICE FdRowStats map(F f) const {
    FdRowStats r;
    r.plus = plus.map(f);
    r.minus = minus.map(f);
    if constexpr (kHasBase) r.base = base.map(f);
    return r;
  }

  // inv_4eps2 = 1 / (2 eps)^2.
  C10_HOST_DEVICE FdRowResult<acc_t> finish(acc_t inv_4eps2) const {
    const acc_t e_plus = plus.mean(0), e_minus = minus.mean(0);
    FdRowResult<acc_t> r;
    r.quad = (e_plus - e_minus) * inv_4eps2;
    if constexpr (kHasBase) {
      r.kl_plus = base.mean(0) + lse_diff(plus, base);
      r.kl_minus = base.mean(1) + lse_diff(minus, base);
    } else {
      const acc_t d = lse_diff(plus, minus);
      r.kl_plus = d - e_minus;
      r.kl_minus = e_plus - d;
    }
    return r;
  }
};

// Checked, contiguous inputs of fd_fisher_reduce and its outputs [N] in the compute dtype.
struct FdProblem {
  at::Tensor plus, minus, base;  // base is undefined without logits_0
  int64_t N, C;
  double inv_4eps2;
  at::Tensor quad, kl_plus, kl_minus;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {quad, kl_plus, kl_minus}; }
};

inline FdProblem prepare_fd_fisher_reduce(const at::Tensor& logits_plus, const at::Tensor& logits_minus,
                                          const std::optional<at::Tensor>& logits_0, double eps) {
  const char* op = "fd_fisher_reduce";
  check_logits(op, "logits_plus", logits_plus);
  check_logits_like(op, "logits_minus", logits_minus, "logits_plus", logits_plus);
  const bool has_base = logits_0.has_value() && logits_0->defined();
  if (has_base) check_logits_like(op, "logits_0", *logits_0, "logits_plus", logits_plus);
  check_finite_scalar(op, "eps", eps, /*positive=*/true);
  FdProblem p;
  p.plus = logits_plus.contiguous();
  p.minus = logits_minus.contiguous();
  if (has_base) p.base = logits_0->contiguous();
  p.N = logits_plus.size(0);
  p.C = logits_plus.size(1);
  p.inv_4eps2 = 1.0 / (4.0 * eps * eps);
  // Outputs stay in the compute dtype: the KL terms are O(eps^2) and would underflow in half precision.
  const auto options = logits_plus.options().dtype(opmath_type(logits_plus.scalar_type()));
  p.quad = at::empty({p.N}, options);
  p.kl_plus = at::empty({p.N}, options);
  p.kl_minus = at::empty({p.N}, options);
  return p;
}

}  // namespace fisherext
