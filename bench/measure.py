"""Measuring one (workload, impl) pair: median wall time, peak extra memory, and the result to check.

``measure`` is meant to run in a fresh process (``bench.run`` spawns one per pair), so that one
impl's allocations, caches and crashes cannot leak into another's figures.
"""
from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from . import workloads

_LIBC = ctypes.CDLL(None)
MIN_REPEATS = 3  # the fewest repeats a median is taken over, however slow the call


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(call: Callable[[], object], device: torch.device, repeats: int, min_repeat_s: float,
                   max_total_s: float | None = None) -> float:
    """Median over ``repeats`` of the mean time of one call; assumes ``call`` is already warm.

    With ``max_total_s``, a call so slow that ``repeats`` of it would exceed that budget gets fewer
    repeats, never below ``MIN_REPEATS``: the seeds' loops take seconds a call, and more repeats of
    them would add minutes without moving a median that already varies less than this machine does.
    """
    start = time.perf_counter()
    call()
    synchronize(device)
    once = time.perf_counter() - start
    if max_total_s is not None:
        repeats = min(repeats, max(MIN_REPEATS, math.floor(max_total_s / max(once, 1e-9))))
    # Fast ops are called several times per repeat so the timer's resolution and launch jitter don't dominate.
    calls_per_repeat = max(1, math.ceil(min_repeat_s / max(once, 1e-9)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls_per_repeat):
            call()
        synchronize(device)
        samples.append((time.perf_counter() - start) / calls_per_repeat)
    return statistics.median(samples)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _cpu_peak_extra_bytes(call: Callable[[], object]) -> int | None:
    """Peak growth of the resident set during one call (Linux), or None where it can't be measured.

    torch's CPU allocations bypass tracemalloc, so this reads the kernel's high-water mark (VmHWM)
    after resetting it to the current RSS. The op's output counts: it is memory the op adds.
    """
    gc.collect()
    # Hand freed heap pages back to the OS first: otherwise glibc reuses what the warm-up freed and
    # the second call looks cheaper than it is (measured: half the twin's scratch went unseen).
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS
        before = _proc_status_kib("VmRSS")
    except OSError:
        return None
    result = call()
    peak = _proc_status_kib("VmHWM")
    del result
    return (peak - before) * 1024


def _cuda_peak_extra_bytes(call: Callable[[], object], device: torch.device) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - before


def peak_extra_memory_bytes(call: Callable[[], object], device: torch.device) -> int | None:
    """Memory one call needs beyond what was allocated before it (inputs), its output included."""
    if device.type == "cuda":
        return _cuda_peak_extra_bytes(call, device)
    return _cpu_peak_extra_bytes(call)


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    """max |result - expected| / max |expected| (float64; an all-zero ``expected`` divides by 1)."""
    if result.shape != expected.shape:
        raise ValueError(f"result has shape {tuple(result.shape)}, the baseline {tuple(expected.shape)}")
    result, expected = result.double(), expected.double()
    if not torch.isfinite(result).all():
        raise ValueError("result has non-finite values")
    scale = expected.abs().max().item() or 1.0
    return (result - expected).abs().max().item() / scale


def empty_row(workload_name: str, impl: str, error: str | None = None) -> dict:
    """A row of ``python -m bench.run --json`` (DESIGN.md, "Machine-readable outputs"), nothing measured yet."""
    return {"workload": workload_name, "impl": impl, "median_s": None, "peak_mem_bytes": None,
            "rel_err": None, "error": error}


def _one_line(exc: Exception) -> str:
    first_line = next(iter(str(exc).splitlines()), "")
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def measure(workload_name: str, impl: str, device: str, quick: bool, repeats: int, min_repeat_s: float,
            max_total_s: float | None = None) -> tuple[dict, np.ndarray | None]:
    """One benchmark row (rel_err left None) and the impl's result on fresh inputs, for the caller to check."""
    row = empty_row(workload_name, impl)
    try:
        device = torch.device(device)
        workload = workloads.by_name(workload_name, quick)
        run_impl = workload.impls[impl]
        inputs = workload.inputs(device, quick)
        # The first call warms up (lazy init, thread pools) and is the one checked: in-place ops
        # accumulate into their inputs on every later call.
        result = run_impl(**inputs).detach().cpu().numpy().copy()
        call = lambda: run_impl(**inputs)  # noqa: E731
        row["peak_mem_bytes"] = peak_extra_memory_bytes(call, device)
        row["median_s"] = median_seconds(call, device, repeats, min_repeat_s, max_total_s)
        return row, result
    except Exception as exc:  # an impl that cannot run is a result, not a crash of the benchmark
        row.update(median_s=None, peak_mem_bytes=None, error=_one_line(exc))
        return row, None
