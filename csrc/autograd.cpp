// Every op's autograd behaviour, in one place (the Autograd dispatch key of every fisherext op is set here,
// except softmax_hvp's):
//
//   softmax_hvp                          differentiable in both arguments: its derivative is registered in
//                                        Python, next to the op (fisherext/ops/softmax.py)
//   linear_sq_grad, linear_outer_accum_, not differentiable, and a backward through one raises an error
//   sym_outer_accum_, class_gram         naming it: they accumulate Fisher statistics from captured
//                                        activations and output gradients, whose derivative nothing needs
//                                        and which no kernel here computes (NotDifferentiable below)
//   unflatten_axpy_, fd_fisher_reduce,   not differentiable and passed through: they serve finite
//   softmax_hessian_sqrt, cg_update_,    differences, a constant cotangent and solver steps under no_grad,
//   cg_direction_, lissa_update_,        so their outputs never require grad (instead of carrying a grad_fn
//   neumann_update_                      that would backpropagate nothing)
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

namespace fisherext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline at::Tensor detached(const at::Tensor& t) { return t.detach(); }
inline std::optional<at::Tensor> detached(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->detach()) : std::nullopt;
}
inline double detached(double x) { return x; }

// Runs the op below autograd; its output (for an in-place op, the written first argument) gets a grad_fn
// whose backward raises. The kernel sees detached tensors: the CPU kernels run ATen ops in at::parallel_for
// worker threads, which inherit neither this thread's dispatch guard nor its grad mode.
template <typename Kernel>
struct NotDifferentiable : torch::autograd::Function<NotDifferentiable<Kernel>> {
  template <typename... Args>
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& first, const Args&... rest) {
    at::AutoDispatchBelowADInplaceOrView guard;
    if constexpr (Kernel::kInPlace) {
      Kernel::run(first.detach(), detached(rest)...);
      ctx->mark_dirty({first});
      return first;
    } else {
      return Kernel::run(first.detach(), detached(rest)...);
    }
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "fisherext.", Kernel::kName,
                ": not differentiable (it accumulates Fisher statistics from captured activations and output "
                "gradients); call it on detached tensors, or compute the quantity with the differentiable "
                "twin in fisherext.reference");
  }
};

inline bool needs_grad(const at::Tensor& t) { return t.requires_grad(); }
inline bool needs_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }
inline bool needs_grad(double) { return false; }

// The Autograd kernel of a NotDifferentiable op. Arguments none of which requires grad go straight to the
// kernel below autograd, as they are: nothing can be recorded, and detaching them would add alias nodes to a
// graph that torch.compile traces (inductor re-traces an in-place op's replacement and requires the same
// nodes both times).
template <typename Kernel, typename... Args>
decltype(auto) not_differentiable(const Args&... args) {
  if (!(needs_grad(args) || ...)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return Kernel::run(args...);
  }
  if constexpr (Kernel::kInPlace) {
    NotDifferentiable<Kernel>::apply(args...);
  } else {
    return NotDifferentiable<Kernel>::apply(args...);
  }
}

struct LinearSqGrad {
  static constexpr const char* kName = "linear_sq_grad";
  static constexpr bool kInPlace = false;
  static at::Tensor run(const at::Tensor& a, const at::Tensor& delta, const std::optional<at::Tensor>& weight) {
    static const auto op =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>(
            "fisherext::linear_sq_grad");
    return op.call(a, delta, weight);
  }
};

struct LinearOuterAccum {
  static constexpr const char* kName = "linear_outer_accum_";
  static constexpr bool kInPlace = true;
  static void run(const at::Tensor& out, const at::Tensor& a, const at::Tensor& delta,
                  const std::optional<at::Tensor>& weight, double alpha) {
    static const auto op = op_handle<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, double)>("fisherext::linear_outer_accum_");
    op.call(out, a, delta, weight, alpha);
  }
};

struct SymOuterAccum {
  static constexpr const char* kName = "sym_outer_accum_";
  static constexpr bool kInPlace = true;
  static void run(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& weight, double alpha,
                  double beta) {
    static const auto op = op_handle<void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                          double, double)>("fisherext::sym_outer_accum_");
    op.call(out, x, weight, alpha, beta);
  }
};

struct ClassGram {
  static constexpr const char* kName = "class_gram";
  static constexpr bool kInPlace = false;
  static at::Tensor run(const at::Tensor& a, const at::Tensor& delta) {
    static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("fisherext::class_gram");
    return op.call(a, delta);
  }
};

at::Tensor linear_sq_grad_autograd(const at::Tensor& a, const at::Tensor& delta,
                                   const std::optional<at::Tensor>& weight) {
  return not_differentiable<LinearSqGrad>(a, delta, weight);
}

void linear_outer_accum_autograd(const at::Tensor& out, const at::Tensor& a, const at::Tensor& delta,
                                 const std::optional<at::Tensor>& weight, double alpha) {
  not_differentiable<LinearOuterAccum>(out, a, delta, weight, alpha);
}

void sym_outer_accum_autograd(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                              double alpha, double beta) {
  not_differentiable<SymOuterAccum>(out, x, weight, alpha, beta);
}

at::Tensor class_gram_autograd(const at::Tensor& a, const at::Tensor& delta) {
  return not_differentiable<ClassGram>(a, delta);
}

}  // namespace

TORCH_LIBRARY_IMPL(fisherext, Autograd, m) {
  m.impl("linear_sq_grad", &linear_sq_grad_autograd);
  m.impl("linear_outer_accum_", &linear_outer_accum_autograd);
  m.impl("sym_outer_accum_", &sym_outer_accum_autograd);
  m.impl("class_gram", &class_gram_autograd);
  for (const char* op : {"unflatten_axpy_", "fd_fisher_reduce", "softmax_hessian_sqrt", "cg_update_", "cg_direction_",
                         "lissa_update_", "neumann_update_"})
    m.impl(op, torch::CppFunction::makeFallthrough());
}

}  // namespace fisherext
