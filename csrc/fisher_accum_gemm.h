// The fisher_accum ops (K1) as compositions of ATen GEMMs (mm/addmm_, bmm, baddbmm), written once for any
// device: on CUDA tensors every GEMM goes to cuBLAS, on CPU tensors to the CPU BLAS. Compiled by the host
// compiler (csrc/fisher_accum_gemm.cpp), so that the CUDA kernel file includes only this header.
//
// Who runs what (the schema comments in csrc/fisherext.cpp say the same):
//   sym_outer_accum_, linear_outer_accum_   both backends, always
//   class_gram                              CUDA always; the CPU kernel runs class_gram_chunk, the same body
//                                           per chunk, on chunks in parallel
//   linear_sq_grad                          both backends for T = 1; CUDA also for long sequences, where a
//                                           cuBLAS batched GEMM beats the fused kernel (csrc/cuda)
// The test hook fisherext._C._set_gemm_kernels_on_cpu(True) makes the CPU kernels of class_gram and
// linear_sq_grad run these composites as CUDA does, so that CPU tests check what only a GPU would run.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"

namespace fisherext {

// The complete ops: argument checks, chunking (scratch bounded by scratch_elems()) and the GEMMs.
void sym_outer_accum_gemm(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                          double alpha, double beta);
void linear_outer_accum_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& delta,
                             const std::optional<at::Tensor>& weight, double alpha);
at::Tensor class_gram_gemm(const at::Tensor& a, const at::Tensor& delta);
at::Tensor linear_sq_grad_gemm(const at::Tensor& a, const at::Tensor& delta, const std::optional<at::Tensor>& weight);

// ---- class_gram, shared with the CPU kernel ----

// Three exact ways to K_n[c, c'] = <g_nc, g_nc'>, with their multiply-adds per sample:
//   kNorms      T = 1: K_n = |a_n|^2 delta_n delta_n^T                  I + C^2 O
//   kPositions  through the position Gram Ga_n = a_n a_n^T [T, T]:
//               K_n[c, c'] = sum_{t,s} Ga_n[t, s] (delta_nct . delta_nc's)  T^2 I + C T^2 O + C^2 T O
//   kGradients  materialized g_nc = delta_nc^T a_n, then J_n J_n^T      C T O I + C^2 O I
// class_gram_form picks kNorms for T = 1, else whichever of the other two needs fewer.
enum class GramForm { kNorms, kPositions, kGradients };
GramForm class_gram_form(const LinearDims& d);

// Scratch elements one sample needs in class_gram_chunk (for chunk sizing).
int64_t class_gram_scratch_per_sample(const LinearDims& d, GramForm form, bool upcast);

// K [b, C, C] (compute dtype) <- the Grams of a chunk A [b, T, I], D [b, C, T, O] (contiguous, any float
// dtype: half/bfloat16 multiply as gemm_operand says).
void class_gram_chunk(const at::Tensor& A, const at::Tensor& D, at::Tensor& K, GramForm form);

// (K + K^T) / 2 in `dtype`: exactly symmetric whatever the summation order of the GEMMs.
at::Tensor symmetric_gram(const at::Tensor& K, at::ScalarType dtype);

// Whether GEMMs on t's dtype and device multiply float32 copies: half/bfloat16 on devices without ATen's
// out_dtype GEMMs (the CPU). On CUDA they multiply in their own dtype (tensor cores, float32 accumulation).
bool gemm_upcasts(const at::Tensor& t);

// The test hook's state (fisherext._C._set_gemm_kernels_on_cpu). Defined in fisherext.cpp.
bool gemm_kernels_on_cpu();

}  // namespace fisherext
