"""Memory planning: the budget a call may use, and refusals that say how much a request needs.

Every large allocation of the package is planned against one budget (bytes): chunked when the work
allows it, refused up front, with the bytes it needs and the way out, when it does not.
"""
from __future__ import annotations

import math
import os

import torch


def available_bytes(device: torch.device) -> int:
    """Memory currently available on ``device``: free GPU memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def resolve_budget(memory_budget, device: torch.device) -> int:
    """The budget in bytes: ``memory_budget`` when given (a positive whole number of bytes), else half
    of the memory available on ``device``. ValueError/TypeError naming the argument otherwise."""
    if memory_budget is None:
        return max(1, available_bytes(device) // 2)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise TypeError(f"memory_budget: expected a number of bytes (an int such as 2**30), got "
                        f"{type(memory_budget).__name__} {memory_budget!r}")
    if not math.isfinite(memory_budget) or memory_budget < 1 or memory_budget != int(memory_budget):
        raise ValueError(f"memory_budget: must be a positive whole number of bytes, got {memory_budget!r}")
    return int(memory_budget)


def require(nbytes: int, budget: int, what: str, hint: str) -> None:
    """Refuses, before any work, a single allocation of ``nbytes`` that exceeds ``budget``."""
    if nbytes > budget:
        raise ValueError(f"{what} needs {nbytes:,} bytes but the memory budget is {budget:,} bytes; {hint}")

