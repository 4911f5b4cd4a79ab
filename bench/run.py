"""Benchmark runner: ``python -m bench.run [--json FILE] [--device cpu|cuda] [--quick] [--only NAME ...]``.

Measures every (workload, impl) pair of ``bench.workloads`` in a fresh spawned process: median wall
time after a warm-up, peak extra memory of one call, and the relative error of its result against
the workload's baseline impl. Prints a markdown table; ``--json`` writes the rows DESIGN.md specifies.
An impl that raises (or whose process dies) gets ``median_s: null`` and ``error``; the run goes on.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from .measure import MIN_REPEATS, empty_row, measure, relative_error
from .workloads import Workload, select

TIMING = {  # keyed by --quick
    False: dict(repeats=7, min_repeat_s=0.1, max_total_s=10.0),
    True: dict(repeats=3, min_repeat_s=0.02, max_total_s=10.0),
}


def measure_in_fresh_process(workload_name: str, impl: str, device: str, quick: bool):
    # A new process per pair: peak RSS is per process, and a crash or OOM kill takes only this row.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure, workload_name, impl, device, quick, **TIMING[quick]).result()
        except BrokenProcessPool:
            return empty_row(workload_name, impl, "the measuring process died (crashed, or killed: out of memory?)"), None


def run_workload(workload: Workload, device: str, quick: bool) -> list[dict]:
    """Rows for every impl of ``workload``, the baseline first (the others are checked against its result)."""
    name = workload.name(quick)
    impls = [workload.baseline] + [impl for impl in workload.impls if impl != workload.baseline]
    rows, baseline_result = [], None
    for impl in impls:
        row, result = measure_in_fresh_process(name, impl, device, quick)
        if impl == workload.baseline:
            baseline_result = result
        if result is not None and baseline_result is not None:
            try:
                row["rel_err"] = relative_error(torch.from_numpy(result), torch.from_numpy(baseline_result))
            except ValueError as exc:
                row["error"] = str(exc)
        rows.append(row)
        print(f"  {name} {impl}: " + (row["error"] or f"{row['median_s'] * 1e3:.2f} ms"), file=sys.stderr, flush=True)
    return rows


def markdown_table(rows: list[dict], baseline_of: dict[str, str]) -> str:
    median_of = {(r["workload"], r["impl"]): r["median_s"] for r in rows}
    lines = ["| workload | impl | median ms | peak extra MB | rel err | speedup vs reference |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        base = median_of.get((r["workload"], baseline_of[r["workload"]]))
        cells = [
            r["workload"], r["impl"],
            "error" if r["median_s"] is None else f"{r['median_s'] * 1e3:.2f}",
            "—" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 1e6:.1f}",
            "—" if r["rel_err"] is None else f"{r['rel_err']:.1e}",
            "—" if r["median_s"] is None or base is None else f"{base / r['median_s']:.2f}×",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['workload']} / {r['impl']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(lines + ([""] + errors if errors else []))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="Time, peak extra memory and relative error of fisherext's kernels "
                                     "against their baselines; prints a markdown table.")
    parser.add_argument("--json", metavar="FILE", help="write the rows as a JSON list to FILE")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="workloads to run: an op name (all its sizes) or a full workload name")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        chosen = select(args.only, args.quick)
    except ValueError as exc:
        print(f"python -m bench.run: {exc}", file=sys.stderr)
        return 2
    rows = []
    for workload in chosen:
        rows += run_workload(workload, args.device, args.quick)
    timing = TIMING[args.quick]
    fewer = (f" (down to {MIN_REPEATS} for calls over {timing['max_total_s'] / timing['repeats']:.1f} s)"
             if timing["repeats"] > MIN_REPEATS else "")
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"float32 (influence: float64); median of {timing['repeats']} repeats after a warm-up{fewer}; "
          f"peak extra memory of one call "
          f"({'allocated CUDA memory' if args.device == 'cuda' else 'growth of the resident set'})\n")
    print(markdown_table(rows, {w.name(args.quick): w.baseline for w in chosen}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
