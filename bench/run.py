"""Benchmark runner: ``python -m bench.run [--quick] [--device cpu|cuda] [--json FILE] [--md FILE]
[--only NAME ...] [--impl NAME ...]``.

For every selected workload (bench.workloads: models × quantities, influence, kernels) it computes the
float64 reference once, then measures each impl in a fresh process: median wall time, peak extra memory
of one call and relative error against the reference, plus, per row, the ratio to one gradient of the
same model and the speed-up over the baseline (the autograd loop). Prints the markdown report; ``--md``
writes it to a file, ``--json`` writes the rows (DESIGN.md's keys and a few more). An impl that fails
gets a row with ``median_s: null`` and its error ("not installed" for a missing peer); the run goes on.
Exit status 2 for an unknown workload or impl name.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .matrix import peer_impls
from .measure import (MIN_REPEATS, TIMING, compute_reference, cpu_count, cpu_name, empty_row, in_fresh_process,
                      measure)
from .report import markdown
from .workloads import IMPLS, Workload, select


def _row(workload: Workload, impl: str, args: argparse.Namespace, reference: str | None) -> dict:
    ok, value = in_fresh_process(measure, (workload.name, impl, args.device, args.quick, reference, args.threads),
                                 TIMING[args.quick].timeout_s)
    row = value if ok else empty_row(workload.name, impl, value)
    row.update(group=workload.group, quantity=workload.quantity, model=workload.model, N=workload.N,
               baseline=workload.baseline)
    return row


def run_workload(workload: Workload, args: argparse.Namespace, path: Path):
    """The workload's rows (its impls in registry order) and the reference's error, if it failed; the
    reference goes through the file ``path``."""
    chosen = [i for i in workload.impls if args.impl is None or i in args.impl]
    if not chosen:
        return [], None
    ok, error = in_fresh_process(compute_reference, (workload.name, args.device, args.quick, str(path), args.threads),
                                 TIMING[args.quick].timeout_s)
    rows = []
    for impl in chosen:
        row = _row(workload, impl, args, str(path) if ok else None)
        rows.append(row)
        shown = row["error"] or f"{row['median_s'] * 1e3:.2f} ms, rel err {row['rel_err']}"
        print(f"  {workload.name} {impl}: {shown}", file=sys.stderr, flush=True)
    return rows, None if ok else f"`{workload.name}`: the float64 reference failed ({error}); no rel err"


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_gradient (against the gradient of the same model and N) and speedup_vs_baseline."""
    gradient = {(r["model"], r["N"]): r["median_s"] for r in rows if r["quantity"] == "gradient"}
    baseline = {r["workload"]: r["median_s"] for r in rows if r["impl"] == r["baseline"]}
    for r in rows:
        if r["median_s"] is None:
            continue
        g = gradient.get((r["model"], r["N"]))
        if g:
            r["ratio_to_gradient"] = r["median_s"] / g
        b = baseline.get(r["workload"])
        if b:
            r["speedup_vs_baseline"] = b / r["median_s"]


def header(args: argparse.Namespace, argv: list[str], seconds: float, load: float) -> list[str]:
    cpu = cpu_name()
    device = "CPU" if args.device == "cpu" else f"CUDA ({torch.cuda.get_device_name()})"
    timing = TIMING[args.quick]
    threads = args.threads or torch.get_num_threads()
    lines = []
    if args.quick:
        lines += ["**Quick run** (`--quick`: small sizes, few repeats). It shows that the harness runs; its figures "
                  "are not the benchmark's: `make bench` runs the full sizes.", ""]
    lines += [
        f"- command: `{shlex.join(['python', '-m', 'bench.run', *argv])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; the run took {seconds / 60:.1f} min",
        f"- machine: {cpu}, {cpu_count()} CPUs, load average {load:.1f} at the start; device {device}",
        f"- torch {torch.__version__}, {threads} thread{'s' if threads > 1 else ''} per process, float32 "
        "(influence: float64)",
        f"- timing: median of up to {timing.repeats} repeats after a warm-up (at least {MIN_REPEATS} within "
        f"{timing.max_total_s:g} s; a call over {timing.slow_s:g} s is timed once), each (workload, impl) "
        "in a fresh process",
    ]
    return lines


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="FILE", help="write the rows as a JSON list to FILE")
    parser.add_argument("--md", metavar="FILE", help="write the markdown report to FILE")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="workloads: a full name, a quantity, a model, quantity:model, a group "
                             "(models, influence, kernels) or an op")
    parser.add_argument("--impl", nargs="+", metavar="NAME", help=f"impls to run, of {', '.join(IMPLS)}")
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads per process (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads: must be a positive integer")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    unknown = [i for i in args.impl or [] if i not in IMPLS]
    try:
        if unknown:
            raise ValueError(f"unknown impl(s) {unknown}; choose from {list(IMPLS)}")
        chosen = select(args.only, args.quick)
    except ValueError as exc:
        print(f"python -m bench.run: {exc}", file=sys.stderr)
        return 2
    start, load = time.perf_counter(), os.getloadavg()[0]
    rows, notes = [], []
    if not peer_impls():
        notes.append("bench/peers.py is missing: no peer rows.")
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        for i, workload in enumerate(chosen):
            got, failed = run_workload(workload, args, Path(folder) / f"reference-{i}.pt")
            rows += got
            notes += [failed] if failed else []
    notes += sorted({f"`{r['workload']}` {r['impl']}: {r['note']}" for r in rows if r.get("note")})
    add_ratios(rows)
    report = markdown(rows, header(args, argv, time.perf_counter() - start, load), notes)
    print(report)
    for path, text in ((args.md, report), (args.json, json.dumps(rows, indent=2) + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
