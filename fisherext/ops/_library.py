"""The compiled library ``fisherext._C`` and what every kernel family's wrappers share: ``build_info`` and
the argument checks.

Each op is declared in ``csrc/fisherext.cpp``; its CPU kernel is in ``csrc/cpu/``, its CUDA kernel in
``csrc/cuda/``, its wrapper, fake kernel and autograd behaviour in the module of its family here, and its
pure-PyTorch twin in ``fisherext/reference.py``.

The checks below run in the fake kernels (the compiled kernels run the same checks in C++: csrc/checks.h
and the ``*_common.h`` of each family), except overlap between arguments (an in-place output sharing memory
with another argument, checks.h ``check_no_overlap``): that needs the arguments' addresses, and a meta
tensor has none (data pointer 0). Each failure names the op and the argument: dtype problems raise
TypeError, shapes, devices and empty inputs ValueError.
"""
from __future__ import annotations

import math

import torch

from .._version import __version__
from .._C import build_info as compiled_build_info  # loading _C registers torch.ops.fisherext.* (torch first)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def build_info() -> dict:
    """What was compiled: version, torch, whether CUDA kernels were built, arch list, and op names."""
    info = dict(compiled_build_info())
    info["version"] = __version__
    info["torch"] = torch.__version__
    info["ops"] = sorted(
        name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("fisherext::")
    )
    return info


# ---- argument checks of the wrappers (Python objects) ----


def tensor_arg(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fisherext.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    return t


def scalar_arg(op, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fisherext.{op}: argument '{name}' must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"fisherext.{op}: argument '{name}' must be finite, got {value}")
    return float(value)


# ---- mirrors of csrc/checks.h for the fake kernels ----


def check_tensor(op, name, t):
    """Mirror of check_float."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fisherext.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fisherext.{op}: argument '{name}' must be a floating-point tensor "
            f"(float16/bfloat16/float32/float64), got {t.dtype}"
        )


def check_same_device(op, name, t, ref_name, ref):
    if t.device != ref.device:
        raise ValueError(f"fisherext.{op}: argument '{name}' is on {t.device} but '{ref_name}' is on {ref.device}")


def check_like(op, name, t, ref_name, ref):
    check_tensor(op, name, t)
    if t.dtype != ref.dtype:
        raise TypeError(f"fisherext.{op}: argument '{name}' has dtype {t.dtype} but '{ref_name}' has {ref.dtype}")
    check_same_device(op, name, t, ref_name, ref)


def check_nonempty(op, name, t):
    if t.numel() == 0:
        raise ValueError(f"fisherext.{op}: argument '{name}' is empty (shape {tuple(t.shape)})")


def check_same_shape(op, name, t, ref_name, ref):
    """Mirror of check_logits_like (and the shape part of check_flat_like)."""
    check_like(op, name, t, ref_name, ref)
    if t.shape != ref.shape:
        raise ValueError(
            f"fisherext.{op}: argument '{name}' must have the shape {tuple(ref.shape)} of '{ref_name}', "
            f"got {tuple(t.shape)}")


def check_logits(op, name, t):
    check_tensor(op, name, t)
    if t.dim() != 2:
        raise ValueError(f"fisherext.{op}: argument '{name}' must have shape [N, C], got {tuple(t.shape)}")
    check_nonempty(op, name, t)


def check_finite_scalar(op, name, value, positive):
    """Mirror of check_finite_scalar (the schema has already made the value a float)."""
    if not math.isfinite(value):
        raise ValueError(f"fisherext.{op}: argument '{name}' must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"fisherext.{op}: argument '{name}' must be > 0, got {value}")


def opmath_dtype(dtype):
    """Mirror of opmath_type: half and bfloat16 are computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
