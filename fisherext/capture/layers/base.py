"""What every layer rule shares: a use of a parameter in the forward, its slots, and the Rule protocol."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import Layout
from ..terms import Term


@dataclass
class Use:
    """One call of a registered function with at least one selected parameter (or a view of one)."""

    rule: Rule
    slots: dict            # role -> Slot
    saved: dict            # what the rule needs after the backward (detached, cloned when needed)
    probe: torch.Tensor    # the tensor whose batch layout is the use's
    out_shape: torch.Size
    edge: object = None    # gradient edge of the output, taken before any later in-place op on it

    @property
    def signature(self):
        return (self.rule.name, tuple((r, s.param, s.key) for r, s in sorted(self.slots.items())), self.probe.dim())


@dataclass(frozen=True)
class Slot:
    """A selected parameter in a call: its index among the selected parameters and, when the call saw a
    view of it, the view's flat positions in the parameter (``index``, shaped like the view) and a
    hashable name of the view (``key``); both None for the parameter itself."""

    param: int
    index: torch.Tensor | None = None
    key: tuple | None = None


class Rule:
    """How one registered function forms per-sample gradients. ``arguments`` names its positional
    parameters in order, with defaults; ``slots`` the ones that can be parameters."""

    name: str
    arguments: tuple
    defaults: dict = {}
    slots: tuple = ("weight", "bias")
    kronecker = False  # K-FAC factors its weight with its bias (a linear map of the whole weight)

    def bind(self, args, kwargs) -> dict:
        named = dict(self.defaults)
        named.update(zip(self.arguments, args))
        named.update(kwargs)
        return named

    def check(self, named) -> None:
        """Refuses, before the call runs, a configuration whose per-sample gradients are undefined."""

    def record(self, named, out) -> tuple[dict, torch.Tensor]:
        """(saved tensors and values, probe tensor) of a call."""
        return {"input": named["input"]}, named["input"]

    def valid(self, layout: Layout, use: Use) -> bool:
        return True

    def scratch(self, use: Use) -> int:
        """Entries the rule's forms hold for the saved tensors of a call (the probe, by default)."""
        return use.probe.numel()

    def terms(self, use: Use, dz: torch.Tensor, layout: Layout, n: int) -> dict[str, Term]:
        raise NotImplementedError
