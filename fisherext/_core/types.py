"""Type aliases of the arguments every entry point shares, as they appear in signatures."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

#: The selected parameters. None selects every parameter that requires grad; otherwise parameter names,
#: modules (all their parameters) or parameter tensors, alone or in an iterable.
Params = Union[None, str, nn.Module, torch.Tensor, Iterable[Union[str, nn.Module, torch.Tensor]]]

#: The data. A DataLoader or a Dataset yielding (x, y) or x, or an (x, y) tuple of tensors (y may be None).
Data = Union[DataLoader, Dataset, tuple[torch.Tensor, Union[torch.Tensor, None]]]

#: A loss. A likelihood's name ("cross_entropy", "mse", ...) or a torch loss, a function
#: ``loss(outputs, targets) -> batch-mean loss`` or an ``nn.Module`` loss.
Loss = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], nn.Module]

__all__ = ["Data", "Loss", "Params"]
