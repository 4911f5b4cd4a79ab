// Every fisherext op schema, in one place, plus the Python module fisherext._C (build_info).
//
// Kernel family K1 (fisher_accum): per-sample outer-product accumulation for linear maps.
// Notation: a linear layer maps a [N, (T,) I] to outputs whose gradient is delta [N, (T,) O];
// the per-sample weight gradient is g_n = sum_t delta_nt a_nt^T (O x I, row-major vec index o*I + i).
//   csrc/cpu/fisher_accum_cpu.cpp    CPU kernels
//   csrc/cuda/fisher_accum_cuda.cu   CUDA kernels
//   fisherext/_ops.py                fakes and Python wrappers
//   fisherext/reference.py           pure-PyTorch twins
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(fisherext, m) {
  // sum_n w_n (g_n ⊙ g_n) -> [O, I], never writing the N x O x I per-sample gradients.
  m.def("linear_sq_grad(Tensor a, Tensor delta, Tensor? weight=None) -> Tensor");
  // out[OI, OI] += alpha * sum_n w_n vec(g_n) vec(g_n)^T; reads out's upper triangle, writes it symmetric.
  m.def(
      "linear_outer_accum_(Tensor(a!) out, Tensor a, Tensor delta, Tensor? weight=None, "
      "float alpha=1.0) -> ()");
  // out[D, D] <- beta * out + alpha * sum_n w_n sum_t x_nt x_nt^T, x [N, D] or [N, T, D].
  // Serves full/block Fisher from a per-sample gradient chunk G [N, P] and the KFAC factors.
  m.def(
      "sym_outer_accum_(Tensor(a!) out, Tensor x, Tensor? weight=None, float alpha=1.0, "
      "float beta=1.0) -> ()");
  // K_n = J_n J_n^T [N, C, C] with J_n[c] = vec(sum_t delta_nct a_nt^T); delta [N, C, (T,) O].
  m.def("class_gram(Tensor a, Tensor delta) -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef FISHEREXT_WITH_CUDA
    info["cuda_compiled"] = true;
    info["cuda_arch_list"] = FISHEREXT_CUDA_ARCH_LIST;
#else
    info["cuda_compiled"] = false;
    info["cuda_arch_list"] = pybind11::none();
#endif
    info["cplusplus"] = static_cast<long>(__cplusplus);
    return info;
  });
}
