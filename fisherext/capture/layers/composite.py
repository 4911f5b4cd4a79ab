"""Composite functions the engine runs with the registry active inside: attention's own body, and the
recurrent layers step by step (``fisherext._core.recurrent``)."""
from __future__ import annotations

import types

import torch.nn.functional as F

from ..._core.recurrent import STEPWISE


def _without_dispatch(fn):
    """``fn`` (a torch.nn.functional function) whose own __torch_function__ check is switched off, so that
    a function mode can run its body with the mode active and see the calls inside it."""
    env = dict(fn.__globals__)
    for name in ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic"):
        env[name] = lambda *args, **kwargs: False
    body = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    body.__kwdefaults__ = fn.__kwdefaults__
    return body


# Functions the engine runs with the registry active inside: attention's own body, and the recurrent
# layers step by step (fisherext._core.recurrent).
DESCEND = {F.multi_head_attention_forward: _without_dispatch(F.multi_head_attention_forward), **STEPWISE}
