"""Measuring one (workload, impl) pair, each in a fresh process: median time, peak extra memory, rel err.

``bench.run`` computes each workload's float64 reference once (``compute_reference``, its own process,
saved to a file), then calls ``measure`` for every impl in a fresh process: peak memory is per process,
and one impl's allocations, caches, hooks or crash cannot leak into another's figures. Processes fork
from a server that has imported torch and fisherext once (``in_fresh_process``), so a row costs its
own work, not an interpreter start.
"""
from __future__ import annotations

import ctypes
import gc
import math
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .compare import to_cpu64
from .workloads import Workload, as_float64, by_name, to_device

_LIBC = ctypes.CDLL(None)


@dataclass(frozen=True)
class Timing:
    """Median of ``repeats`` timed repeats after a warm-up call; a repeat of a fast call loops it for at
    least ``min_repeat_s``; fewer repeats where ``repeats`` would take over ``max_total_s`` (never below
    ``MIN_REPEATS``), and one where a call takes over ``slow_s`` (the seed-style loops at full size)."""
    repeats: int
    min_repeat_s: float
    max_total_s: float
    slow_s: float
    timeout_s: float  # a process that takes longer is killed, and its row says so


MIN_REPEATS = 3
TIMING = {  # keyed by --quick
    False: Timing(repeats=7, min_repeat_s=0.1, max_total_s=6.0, slow_s=4.0, timeout_s=900.0),
    True: Timing(repeats=3, min_repeat_s=0.02, max_total_s=2.0, slow_s=1.0, timeout_s=300.0),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def reset_cpu_peak() -> int | None:
    """Resets the kernel's high-water mark (VmHWM) to the current resident set; that size, or None
    where it can't be read (not Linux). torch's CPU allocations bypass tracemalloc."""
    gc.collect()
    # Hand freed heap pages back to the OS first: otherwise glibc reuses what the warm-up freed and
    # the next call looks cheaper than it is.
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return _proc_status_kib("VmRSS")
    except OSError:
        return None


def timed_with_peak(call: Callable[[], object], device: torch.device):
    """(result, seconds, peak extra bytes) of one call: memory beyond what was there before it (its
    inputs), the output included; growth of the resident set on the CPU, allocated memory on CUDA."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = reset_cpu_peak()
    start = time.perf_counter()
    result = call()
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = None if before is None else (_proc_status_kib("VmHWM") - before) * 1024
    return result, seconds, peak


def median_seconds(call: Callable[[], object], device: torch.device, first_s: float,
                   timing: Timing) -> tuple[float, int]:
    """(median seconds of one call, repeats): ``first_s`` is one timed call already made, warm."""
    repeats = min(timing.repeats, max(MIN_REPEATS, math.floor(timing.max_total_s / max(first_s, 1e-9))))
    # Fast calls are looped within a repeat so the timer's resolution and launch jitter don't dominate.
    calls_per_repeat = max(1, math.ceil(timing.min_repeat_s / max(first_s, 1e-9)))
    samples = [first_s] if calls_per_repeat == 1 else []
    while len(samples) < repeats:
        start = time.perf_counter()
        for _ in range(calls_per_repeat):
            call()
        synchronize(device)
        samples.append((time.perf_counter() - start) / calls_per_repeat)
    return statistics.median(samples), len(samples)


def empty_row(workload: str, impl: str, error: str | None = None) -> dict:
    """A row of ``python -m bench.run --json`` (DESIGN.md, "Machine-readable outputs"), nothing measured."""
    return {"workload": workload, "impl": impl, "median_s": None, "peak_mem_bytes": None, "rel_err": None,
            "error": error}


def one_line(exc: BaseException) -> str:
    first_line = next(iter(str(exc).splitlines()), "")
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def measure_workload(workload: Workload, impl: str, device: str, timing: Timing, reference_path: str | None) -> dict:
    """One row: the impl's median time, peak extra memory and relative error against the reference file."""
    row = empty_row(workload.name, impl)
    device = torch.device(device)
    subset = workload.subsets.get(impl)
    inputs = to_device(workload.build(), device)
    if subset is not None:
        inputs = subset.take(inputs)
        row["note"] = subset.note
    if isinstance(inputs.get("model"), torch.nn.Module):
        row["P"] = sum(p.numel() for p in inputs["model"].parameters() if p.requires_grad)
    run = workload.impls[impl]
    call = lambda: workload.call(run, inputs)  # noqa: E731
    try:
        # The first call warms up (lazy imports and init, thread pools) and is the one checked: in-place
        # ops accumulate into their inputs at every later call. The second is timed and its memory measured.
        result = to_cpu64(call())
        _, second_s, peak = timed_with_peak(call, device)
        median, repeats = (second_s, 1) if second_s >= timing.slow_s else median_seconds(call, device, second_s, timing)
    except ImportError as exc:  # a peer that is not installed
        row["error"] = f"not installed ({one_line(exc)})"
        return row
    except Exception as exc:  # an impl that cannot run is a result, not a crash of the benchmark
        row["error"] = one_line(exc)
        return row
    scale = 1.0 if subset is None else subset.scale
    row.update(median_s=median * scale, peak_mem_bytes=peak, repeats=repeats)
    if reference_path is not None:
        expected = torch.load(reference_path)
        if subset is not None:
            expected = subset.expected(expected)
        try:
            row["rel_err"] = workload.compare(result, expected)
        except ValueError as exc:
            row["error"] = f"wrong result: {exc}"
    return row


def _fresh(threads: int | None) -> None:
    """Set-up of a measuring process: its thread count, and what it inherited kept out of the garbage
    collector's scans (a full collection before each memory reading would walk torch and the peers)."""
    gc.freeze()
    if threads is not None:
        torch.set_num_threads(threads)


def measure(name: str, impl: str, device: str, quick: bool, reference_path: str | None,
            threads: int | None = None) -> dict:
    """``measure_workload`` for the workload of that name (run in a fresh process by ``bench.run``)."""
    _fresh(threads)
    return measure_workload(by_name(name, quick), impl, device, TIMING[quick], reference_path)


def compute_reference(name: str, device: str, quick: bool, path: str, threads: int | None = None) -> None:
    """The workload's float64 reference, saved to ``path`` (float64, on the CPU)."""
    _fresh(threads)
    workload = by_name(name, quick)
    inputs = as_float64(to_device(workload.build(), torch.device(device)))
    torch.save(to_cpu64(workload.call(workload.reference, inputs)), path)


# ---- fresh processes ---------------------------------------------------------------------------------

_CONTEXT = None


# Imported by the fork server, once: this module, the workloads (torch, fisherext, scikit-learn) and the
# peers that are installed (the server skips the others). Imports only: a torch op in the server would
# start its OpenMP thread pool, and a process forked from it would hang in its first parallel region.
PRELOAD = [__name__, "bench.matrix", "bench.influence", "bench.kernels", "bench.peers",
           "backpack", "nngeometry", "curvlinops", "opacus", "asdl"]


def _context():
    """A forkserver context whose server has imported ``PRELOAD``: each process forks from it in
    milliseconds, not the seconds an import of torch takes; spawn where forkserver is missing."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _CONTEXT = multiprocessing.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(PRELOAD)
        else:
            _CONTEXT = multiprocessing.get_context("spawn")
    return _CONTEXT


def _serve(conn, target, args):
    try:
        value = (True, target(*args))
    except BaseException as exc:  # a failure of the harness itself in the child, reported to the parent
        value = (False, one_line(exc))
    conn.send(value)
    conn.close()


def in_fresh_process(target: Callable, args: tuple, timeout_s: float):
    """(True, target(*args)) from a fresh process, or (False, why not: its exception, its death, a timeout)."""
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_serve, args=(sender, target, args), daemon=True)  # ends with bench.run
    process.start()
    sender.close()
    value = None
    if receiver.poll(timeout_s):
        try:
            value = receiver.recv()
        except EOFError:  # it closed the pipe without a word: it died
            pass
    else:
        process.kill()
        value = False, f"timed out after {timeout_s:g} s (killed)"
    receiver.close()
    process.join()
    if value is None:
        code = process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        value = False, f"the measuring process died ({how})"
    return value


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu
