// The fisher_accum ops as compositions of ATen GEMMs, for any device (see csrc/fisher_accum_gemm.h for who
// runs what). Schemas and the math: csrc/fisherext.cpp.
//
// Precision: every result accumulates in the compute dtype (float32 for half/bfloat16 inputs). A GEMM whose
// operands are both inputs multiplies them in their own dtype on CUDA, through ATen's out_dtype GEMMs
// (cuBLAS on tensor cores, float32 accumulation and result); on the CPU, which has no such GEMMs, it
// multiplies float32 copies (gemm_upcasts). Intermediate products (Grams, per-sample gradients) stay in the
// compute dtype, and so do the GEMMs that read them.
//
// Memory: scratch is bounded by scratch_elems() (fisher_accum_common.h) independent of N, except where an
// op's own layout needs more (one [D, D] working copy of a non-contiguous or half-precision `out`).
#include "fisher_accum_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/triu.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <utility>

#include "fisher_accum_common.h"

namespace fisherext {

bool gemm_upcasts(const at::Tensor& t) { return opmath_type(t.scalar_type()) != t.scalar_type() && !t.is_cuda(); }

namespace {

// Tile edge of the symmetric rank-k updates: only tiles on or above the diagonal are multiplied.
constexpr int64_t kSymTile = 512;

at::ScalarType compute_type(const at::Tensor& t) { return opmath_type(t.scalar_type()); }

bool low_precision(const at::Tensor& t) { return compute_type(t) != t.scalar_type(); }

// t as a GEMM operand: itself, or a float32 copy where gemm_upcasts.
at::Tensor gemm_operand(const at::Tensor& t) { return gemm_upcasts(t) ? t.to(at::kFloat) : t; }

// out [B, m, n] <- x @ y for x [B, m, k], y [B, k, n] of one dtype: out's (the compute dtype), or
// half/bfloat16 on CUDA.
void bmm_compute_out(const at::Tensor& out, const at::Tensor& x, const at::Tensor& y) {
  at::Tensor o = out;
  if (x.scalar_type() == out.scalar_type())
    at::bmm_out(o, x, y);
  else
    at::bmm_out(o, x, y, out.scalar_type());
}

at::Tensor bmm_compute(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor out = at::empty({x.size(0), x.size(1), y.size(2)}, x.options().dtype(compute_type(x)));
  bmm_compute_out(out, x, y);
  return out;
}

// out [m, n] (compute dtype, any strides) <- beta out + alpha x @ y; operands as for bmm_compute_out. With
// beta = 0 the old content is not read (BLAS semantics: NaN in it is ignored).
void addmm_compute_(const at::Tensor& out, const at::Tensor& x, const at::Tensor& y, double beta, double alpha) {
  if (x.scalar_type() == out.scalar_type()) {
    out.addmm_(x, y, beta, alpha);
  } else {
    // The out_dtype form of addmm takes no float32 accumulator with half operands; baddbmm's does.
    at::Tensor o = out.unsqueeze(0);
    at::baddbmm_out(o, o, x.unsqueeze(0), y.unsqueeze(0), out.scalar_type(), beta, alpha);
  }
}

// ---- symmetric rank-k updates ----

// out [D, D] (compute dtype, contiguous) <- beta out + alpha (s ⊙ R)^T R on and above the diagonal, for rows
// R [M, D] (GEMM operands) and row scales s [M] (undefined: all ones). Tile row i0 is one GEMM over the
// columns from the diagonal on: about M D^2 (1 + kSymTile / D) / 2 multiply-adds, half of the full product;
// its rows of s ⊙ R are formed when it needs them ([M, kSymTile] of scratch). The lower triangle is left
// stale (mirror_upper); the upper one is the only part of out that is read.
void sym_rank_k_upper(const at::Tensor& out, const at::Tensor& R, const at::Tensor& s, double alpha, double beta) {
  const int64_t D = out.size(0);
  const at::Tensor scale = s.defined() ? s.to(R.scalar_type()).unsqueeze(1) : at::Tensor();
  for (int64_t i0 = 0; i0 < D; i0 += kSymTile) {
    const int64_t bi = std::min(kSymTile, D - i0);
    const at::Tensor Ri = R.narrow(1, i0, bi);
    addmm_compute_(out.narrow(0, i0, bi).narrow(1, i0, D - i0), (scale.defined() ? Ri.mul(scale) : Ri).t(),
                   R.narrow(1, i0, D - i0), beta, alpha);
  }
}

// Lower triangle <- upper triangle, so the result is exactly symmetric. On the CPU a blocked transpose in
// place, one parallel task per row of 64 x 64 blocks: within a block the 64 source rows it reads (64 floats
// each) stay in L1, where a plain row loop reads a column with stride D, one cache miss an element (D = 9610:
// 0.44 s against 0.05 s, 2 threads). Elsewhere tile by tile with ATen copies (scratch of one tile).
void mirror_upper(const at::Tensor& out) {
  const int64_t D = out.size(0);
  if (out.is_cpu()) {
    constexpr int64_t kBlock = 64;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mirror_upper", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, (D + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bi = begin; bi < end; ++bi) {
          const int64_t i0 = bi * kBlock, i1 = std::min(D, i0 + kBlock);
          for (int64_t j0 = 0; j0 <= i0; j0 += kBlock)
            for (int64_t i = i0; i < i1; ++i)
              for (int64_t j = j0, j1 = std::min(j0 + kBlock, i); j < j1; ++j) o[i * D + j] = o[j * D + i];
        }
      });
    });
    return;
  }
  for (int64_t i0 = 0; i0 < D; i0 += kSymTile) {
    const int64_t bi = std::min(kSymTile, D - i0), rest = D - i0 - bi;
    const at::Tensor diag = out.narrow(0, i0, bi).narrow(1, i0, bi);
    diag.copy_(at::triu(diag).add_(at::triu(diag, 1).t()));
    if (rest > 0)
      out.narrow(0, i0 + bi, rest).narrow(1, i0, bi).copy_(out.narrow(0, i0, bi).narrow(1, i0 + bi, rest).t());
  }
}

// Rows R and row scales s with (s ⊙ R)^T R = sum_r w_r x_r x_r^T, for rows X [m, D] and weights w [m]
// (compute dtype; undefined: all ones). Full precision: R = X, s = w. Half/bfloat16 rows stay in their dtype
// and the weight is split over both sides: R = √|w| ⊙ X, rounded once, and s = sign(w) (exact): w_r x_r on
// one side would leave float16's range for weights far from 1 (1/N of a large batch, say), and the square
// root spends half as much of it.
std::pair<at::Tensor, at::Tensor> weighted_rows(const at::Tensor& X, const at::Tensor& w) {
  if (!w.defined()) return {gemm_operand(X), at::Tensor()};
  if (!low_precision(X)) return {X, w};
  return {gemm_operand(X.mul(w.abs().sqrt_().unsqueeze(1)).to(X.scalar_type())), w.sign()};
}

}  // namespace

void sym_outer_accum_gemm(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          double alpha, double beta) {
  const LinearInputs in = prepare_sym_outer_accum(out, x, weight, /*to_compute=*/false);
  const at::Tensor &X = in.A, &W = in.W;  // rows x_nt [M, D] in x's dtype; one weight per row, or undefined
  const int64_t M = X.size(0), D = X.size(1);
  // Rows are taken in chunks where they need scratch (a copy of the rows where weighted in half precision or
  // upcast, a tile row of scaled rows where weighted), else all at once, read in place.
  const bool copied = gemm_upcasts(X) || (W.defined() && low_precision(X));
  const int64_t per_row = (copied ? D : 0) + (W.defined() ? std::min(kSymTile, D) : 0);
  const int64_t rows = per_row > 0 ? chunk_rows(per_row, scratch_elems(), M) : M;
  update_in_place(out, [&](at::Tensor& work) {
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
      const int64_t m = std::min(rows, M - r0);
      const auto [R, s] = weighted_rows(X.narrow(0, r0, m), W.defined() ? W.narrow(0, r0, m) : at::Tensor());
      sym_rank_k_upper(work, R, s, alpha, r0 == 0 ? beta : 1.0);
    }
    mirror_upper(work);
  });
}

void linear_outer_accum_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& delta,
                             const std::optional<at::Tensor>& weight, double alpha) {
  const LinearInputs in = prepare_linear_outer_accum(out, a, delta, weight, /*to_compute=*/false);
  const LinearDims& d = in.d;
  const at::Tensor &A = in.A, &D = in.D, &W = in.W;  // [N, T, I], [N, T, O], [N] or undefined
  const int64_t P = d.O * d.I;
  // Per sample: its gradient (compute dtype), a tile row of it weighted, float32 copies of its rows where
  // upcast.
  const int64_t per_sample =
      P + (W.defined() ? std::min(kSymTile, P) : 0) + (gemm_upcasts(A) ? d.T * (d.I + d.O) : 0);
  const int64_t rows = chunk_rows(per_sample, scratch_elems(), d.N);
  const at::Tensor G = at::empty({rows, d.O, d.I}, A.options().dtype(compute_type(A)));
  update_in_place(out, [&](at::Tensor& work) {
    for (int64_t s = 0; s < d.N; s += rows) {
      const int64_t b = std::min(rows, d.N - s);
      // g_n = delta_n^T a_n (2 T O I flops each), then out += alpha G^T diag(w) G on the upper tiles.
      const at::Tensor g = G.narrow(0, 0, b);
      bmm_compute_out(g, gemm_operand(D.narrow(0, s, b)).transpose(1, 2), gemm_operand(A.narrow(0, s, b)));
      sym_rank_k_upper(work, g.view({b, P}), W.defined() ? W.narrow(0, s, b) : at::Tensor(), alpha, 1.0);
    }
    mirror_upper(work);
  });
}

// ---- class_gram ----

GramForm class_gram_form(const LinearDims& d) {
  if (d.T == 1) return GramForm::kNorms;
  const double T = d.T, C = d.C, I = d.I, O = d.O;
  const double positions = T * T * I + C * T * T * O + C * C * T * O;
  const double gradients = C * T * O * I + C * C * O * I;
  return positions <= gradients ? GramForm::kPositions : GramForm::kGradients;
}

int64_t class_gram_scratch_per_sample(const LinearDims& d, GramForm form, bool upcast) {
  const int64_t copies = upcast ? d.T * (d.I + d.C * d.O) : 0;  // float32 copies of a_n and delta_n
  switch (form) {
    case GramForm::kNorms:
      return copies + 1;
    case GramForm::kPositions:
      return copies + d.T * d.T + 2 * d.C * d.T * d.O;  // Ga_n, delta_n transposed, X_n
    case GramForm::kGradients:
      return copies + d.C * d.T * d.O + d.C * d.O * d.I;  // delta_n transposed, J_n
  }
  return copies;
}

void class_gram_chunk(const at::Tensor& A_in, const at::Tensor& D_in, at::Tensor& K, GramForm form) {
  const at::Tensor A = gemm_operand(A_in), D = gemm_operand(D_in);  // [b, T, I], [b, C, T, O]
  const int64_t b = A.size(0), T = A.size(1), I = A.size(2), C = D.size(1), O = D.size(3);
  switch (form) {
    case GramForm::kNorms: {
      const at::Tensor Dv = D.select(2, 0);  // [b, C, O]
      bmm_compute_out(K, Dv, Dv.transpose(1, 2));
      K.mul_(bmm_compute(A, A.transpose(1, 2)));  // |a_n|^2 as [b, 1, 1]
      return;
    }
    case GramForm::kPositions: {
      // Dp_n[c, o, t] = delta_n[c, t, o] in the compute dtype (it meets the Gram, which is in it).
      const at::Tensor Dp = at::empty({b, C, O, T}, K.options()).copy_(D.transpose(2, 3));
      const at::Tensor Ga = bmm_compute(A, A.transpose(1, 2));  // [b, T, T]
      // X_n[c', o, t] = sum_s delta_n[c', s, o] Ga_n[s, t]; K_n[c, c'] = sum_{o,t} Dp_n[c, o, t] X_n[c', o, t].
      const at::Tensor X = at::bmm(Dp.view({b, C * O, T}), Ga);
      at::bmm_out(K, Dp.view({b, C, O * T}), X.view({b, C, O * T}).transpose(1, 2));
      return;
    }
    case GramForm::kGradients: {
      // J_n[c] = vec(delta_nc^T a_n) as the rows [C, O I] of one GEMM per sample over (c, o).
      const at::Tensor Dp = D.transpose(2, 3).contiguous();  // [b, C, O, T]
      const at::Tensor J = bmm_compute(Dp.view({b, C * O, T}), A).view({b, C, O * I});
      at::bmm_out(K, J, J.transpose(1, 2));
      return;
    }
  }
}

at::Tensor class_gram_gemm(const at::Tensor& a, const at::Tensor& delta) {
  const LinearInputs in = prepare_class_gram(a, delta, /*to_compute=*/false);
  const LinearDims& d = in.d;
  const GramForm form = class_gram_form(d);
  at::Tensor K = at::empty({d.N, d.C, d.C}, in.A.options().dtype(compute_type(in.A)));
  const int64_t rows =
      chunk_rows(class_gram_scratch_per_sample(d, form, gemm_upcasts(in.A)), scratch_elems(), d.N);
  for (int64_t s = 0; s < d.N; s += rows) {
    const int64_t b = std::min(rows, d.N - s);
    at::Tensor Kc = K.narrow(0, s, b);
    class_gram_chunk(in.A.narrow(0, s, b), in.D.narrow(0, s, b), Kc, form);
  }
  return symmetric_gram(K, a.scalar_type());
}

at::Tensor symmetric_gram(const at::Tensor& K, at::ScalarType dtype) {
  return K.add(K.transpose(1, 2)).mul_(0.5).to(dtype);
}

// ---- linear_sq_grad ----

at::Tensor linear_sq_grad_gemm(const at::Tensor& a, const at::Tensor& delta, const std::optional<at::Tensor>& weight) {
  const LinearInputs in = prepare_linear_sq_grad(a, delta, weight, /*to_compute=*/false);
  const LinearDims& d = in.d;
  const at::Tensor &A = in.A, &D = in.D, &W = in.W;  // [N, T, I], [N, T, O], [N] or undefined
  const auto ct = compute_type(A);
  at::Tensor S = at::zeros({d.O, d.I}, A.options().dtype(ct));
  if (d.T == 1) {
    // g_n = delta_n a_n^T, so sum_n w_n g_n^2 = (w ⊙ delta^2)^T (a^2): one GEMM per chunk (N O I
    // multiply-adds in all), on squares formed in the compute dtype.
    const int64_t rows = chunk_rows(d.I + d.O, scratch_elems(), d.N);
    for (int64_t s = 0; s < d.N; s += rows) {
      const int64_t b = std::min(rows, d.N - s);
      at::Tensor d2 = D.narrow(0, s, b).select(1, 0).to(ct).square();
      if (W.defined()) d2.mul_(W.narrow(0, s, b).unsqueeze(1));
      S.addmm_(d2.t(), A.narrow(0, s, b).select(1, 0).to(ct).square());
    }
  } else {
    // g_n = delta_n^T a_n by a batched GEMM (T O I multiply-adds per sample), squared in place and summed
    // with the weights by a GEMV: the per-sample gradients of a chunk make one round trip through memory.
    const int64_t per_sample = d.O * d.I + (gemm_upcasts(A) ? d.T * (d.I + d.O) : 0);
    const int64_t rows = chunk_rows(per_sample, scratch_elems(), d.N);
    const at::Tensor G = at::empty({rows, d.O, d.I}, A.options().dtype(ct));
    const at::Tensor ones = W.defined() ? at::Tensor() : at::ones({rows}, G.options());
    at::Tensor Sv = S.view({d.O * d.I});
    for (int64_t s = 0; s < d.N; s += rows) {
      const int64_t b = std::min(rows, d.N - s);
      const at::Tensor g = G.narrow(0, 0, b);
      bmm_compute_out(g, gemm_operand(D.narrow(0, s, b)).transpose(1, 2), gemm_operand(A.narrow(0, s, b)));
      g.square_();
      Sv.addmv_(g.view({b, d.O * d.I}).t(), W.defined() ? W.narrow(0, s, b) : ones.narrow(0, 0, b));
    }
  }
  return S.to(a.scalar_type());
}

}  // namespace fisherext
