r"""Streaming at scale: the data-set-wide quantities take time linear in N and memory flat in N.

``python -m bench.scale [--quick] [--md PATH] [--json PATH] [--only NAME ...] [--sizes N ...]``

Every workload streams a data set of N samples through a DataLoader (a TensorDataset, batch_size 1000)
into one public call of fisherext, for N = 10³, 10⁴, 10⁵ (``--quick``: 10², 10³, 10⁴). Each (workload,
N) runs in a fresh process (forked from ``bench.measure``'s server), on 1 thread, so that its peak
resident set is its own. Model: an MLP 64-64-10 (ReLU, P = 4,810, seeded, eval, float32) on synthetic
inputs x ~ N(0, I) [N, 64] with uniform random labels (seeded). Fishers are means over samples,
:math:`F = \frac1N\sum_n F_n`, with per-sample losses :math:`-\log p(y_n|x_n)`.

Workloads (``WORKLOADS``):

- ``loader``: one pass over the DataLoader, nothing computed (what the data pipeline itself costs);
- ``fisher_diag``: ``fx.fisher(kind="true", structure="diag").diag()``,
  :math:`\frac1N\sum_n\sum_c p_{nc}\,g_{nc}\odot g_{nc}` [P];
- ``fisher_kfac``: ``fx.fisher(kind="true", structure="kfac")``, the factors (A, G) per Linear layer;
- ``per_sample_trace``: ``fx.per_sample_fisher(model, data, batch_size=1000)``, :math:`\mathrm{tr}F_n`
  for every sample [N], streamed by the engine (the data-set form of ``per_sample_fisher``; where a
  version lacks it, its row says so);
- ``per_sample_trace_batches``: the same values by the caller's loop over the batches, one
  ``fx.per_sample_fisher(model, x, y)`` per batch, concatenated;
- ``influence``: ``InfluenceFunctions(model, "cross_entropy", train, solver="cg", damping=1e-2,
  curvature="ggn", batch_size=1000).influence(test)`` for 10 test points,
  :math:`I = -G_{test}(H+\lambda I)^{-1}G_{train}^\top` [10, N], CG fixed at 10 iterations;
- ``self_influence_cg``: the same object's ``self_influence()``,
  :math:`-\nabla\ell(z_i)^\top(H+\lambda I)^{-1}\nabla\ell(z_i)` [N]: each training point is its own
  right-hand side and every CG iteration streams all N points, so its cost is O(N²) by construction; it
  runs at N ≤ 10³ only, where it shows that growth;
- ``self_influence_exact``: ``self_influence()`` with ``solver="exact"`` on the last layer
  (``params=[model[2]]``, P = 650): the dense GGN is built once (650 product columns over the data) and
  factored, then the training gradients stream past it: O(N).

The curvature of the influence workloads is the GGN: the Hessian of this untrained model on random
labels is indefinite (smallest eigenvalue ≈ −0.06 on 2·10³ samples, below −λ = −0.01), and CG on
H + λI stops at a direction of negative curvature (at its second iteration, N = 10³); a GGN product streams the data just as a Hessian
product does. CG runs exactly ``CG_ITERATIONS`` products (tol 1e-30: never reached; tol=0 is refused), so
that its cost per N does not change with how fast it would converge.

Measured per (workload, N): wall and process CPU time of the call (after a warm-up call on the first 200
samples; the median of repeats where one call is fast, ``bench.measure.TIMING``), and the peak resident
set of the process (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its resident set before the model and
data were made. That extra peak holds the data (x float32 [N, 64] and y int64 [N]: 264 bytes a sample,
O(N) and not the method's) and the output (O(N) for the per-sample values and the influence matrix,
which are results the caller asked for); the method's own memory is the rest,
:math:`M_{method} = M_{peak} - M_{data} - M_{output}`, and is what stays flat. Linearity at N is
:math:`(t(N)/N)\,/\,(t(N_0)/N_0)` against the smallest N measured, so 1 is linear; a fixed cost per call
pulls it below 1 at large N.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fisherext as fx

from .measure import MIN_REPEATS, TIMING, cpu_count, cpu_name, in_fresh_process, one_line, reset_cpu_peak

FEATURES, HIDDEN, CLASSES = 64, 64, 10
BATCH = 1000
N_TEST = 10
DAMPING = 1e-2
CG_ITERATIONS = 10
CG_TOL = 1e-30     # never reached, so every solve runs CG_ITERATIONS products
WARMUP = 200       # samples of the warm-up call
SIZES = {False: (1_000, 10_000, 100_000), True: (100, 1_000, 10_000)}
MODEL_SEED, DATA_SEED, TEST_SEED = 0, 1, 2


# ---- model and data ----------------------------------------------------------------------------------

def build_model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The MLP 64-64-10 (ReLU), seeded, in eval mode; P = 4,810."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    return model.to(dtype).eval()


def make_data(N: int, seed: int = DATA_SEED, dtype: torch.dtype = torch.float32):
    """Synthetic (x [N, 64] ~ N(0, I), y [N] uniform over the 10 classes), seeded."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, FEATURES, generator=generator, dtype=dtype)
    return x, torch.randint(0, CLASSES, (N,), generator=generator)


def loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def kfac_factors(F) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (A, G) pairs of a K-FAC FisherMatrix, in parameter order (the bias as A's last row/column)."""
    parts = sorted((p for p in F.parts if p.kind == "kron"), key=lambda p: int(p.idx.min()))
    return [(p.A, p.G) for p in parts]


# ---- the workloads -----------------------------------------------------------------------------------

def streams_data_sets() -> str | None:
    """Why ``fx.per_sample_fisher`` cannot stream a data set here (it lacks ``batch_size``), or None."""
    if "batch_size" in inspect.signature(fx.per_sample_fisher).parameters:
        return None
    return ("not available: fx.per_sample_fisher takes no data set yet (no batch_size argument in this "
            "version); see per_sample_trace_batches")


def _cg_influence(model, data):
    return fx.InfluenceFunctions(model, "cross_entropy", data, solver="cg", damping=DAMPING, curvature="ggn",
                                 batch_size=BATCH, solver_kwargs=dict(maxiter=CG_ITERATIONS, tol=CG_TOL))


def _loader_pass(model, data, test):
    return torch.tensor([sum(x.shape[0] for x, _ in data)])


def _fisher_diag(model, data, test):
    return fx.fisher(model, data, kind="true", structure="diag", batch_size=BATCH).diag()


def _fisher_kfac(model, data, test):
    return kfac_factors(fx.fisher(model, data, kind="true", structure="kfac", batch_size=BATCH))


def _per_sample_trace(model, data, test):
    return fx.per_sample_fisher(model, data, batch_size=BATCH)


def _per_sample_trace_batches(model, data, test):
    return torch.cat([fx.per_sample_fisher(model, x, y) for x, y in data])


def _influence(model, data, test):
    return _cg_influence(model, data).influence(test)


def _self_influence_cg(model, data, test):
    return _cg_influence(model, data).self_influence()


def _self_influence_exact(model, data, test):
    return fx.InfluenceFunctions(model, "cross_entropy", data, solver="exact", damping=DAMPING, curvature="ggn",
                                 batch_size=BATCH, params=[model[2]]).self_influence()


@dataclass(frozen=True)
class ScaleWorkload:
    """One public call over a data set: ``run(model, data, test)``; ``output`` says what it returns and
    how it grows; ``sizes`` replaces the default N (by ``--quick``), ``max_N`` caps them (also ``--sizes``);
    ``unavailable()`` says why it cannot run in this version, or None."""
    name: str
    output: str
    run: Callable
    sizes: dict[bool, tuple[int, ...]] | None = None
    max_N: int | None = None
    unavailable: Callable[[], str | None] = lambda: None

    def sizes_for(self, quick: bool, chosen: tuple[int, ...] | None = None) -> tuple[int, ...]:
        sizes = chosen or (self.sizes or SIZES)[quick]
        return tuple(n for n in sizes if self.max_N is None or n <= self.max_N)


WORKLOADS = {w.name: w for w in [
    ScaleWorkload("loader", "sample count (the DataLoader alone)", _loader_pass),
    ScaleWorkload("fisher_diag", "[P] diagonal true Fisher", _fisher_diag),
    ScaleWorkload("fisher_kfac", "K-FAC factors (A, G) of the 2 layers", _fisher_kfac),
    ScaleWorkload("per_sample_trace", "[N] tr F_n, streamed by the engine (O(N) output)", _per_sample_trace,
                  unavailable=streams_data_sets),
    ScaleWorkload("per_sample_trace_batches", "[N] tr F_n, caller's loop over batches (O(N) output)",
                  _per_sample_trace_batches),
    ScaleWorkload("influence", f"[{N_TEST}, N] influence matrix (O(N) output), CG", _influence),
    ScaleWorkload("self_influence_cg", "[N] self-influence, CG: O(N²) time", _self_influence_cg,
                  sizes={False: (100, 1_000), True: (100, 300)}, max_N=1_000),
    ScaleWorkload("self_influence_exact", "[N] self-influence, exact solve, last layer (P = 650)",
                  _self_influence_exact),
]}


# ---- measuring one (workload, N), in a fresh process -------------------------------------------------

def _baseline_rss() -> int:
    """The resident set now in bytes, freed heap handed back first and the kernel's high-water mark reset to
    it (a forked process starts with its parent's resident set as its high-water mark)."""
    kib = reset_cpu_peak()
    if kib is None:
        raise OSError("the resident set cannot be read here (/proc/self/status): the memory columns need Linux")
    return kib * 1024


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _nbytes(result) -> int:
    if isinstance(result, torch.Tensor):
        return result.nbytes
    return sum(_nbytes(r) for r in result)


def _timed(call: Callable[[], object]):
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure_one(name: str, N: int, quick: bool, keep_result: bool = False) -> dict:
    """One row: wall and CPU seconds of the workload's call over N samples, the process's extra peak
    resident set and its parts (data, output, the method's own). ``keep_result`` adds the result and the
    data it was computed on, and times one call only (for tests, at small N). Meant for a fresh process
    (``in_fresh_process``): the resident set is the process's."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*did not reach tol")  # CG stops at its fixed iterations
    workload = WORKLOADS[name]
    row = {"workload": name, "N": N, "output": workload.output, "error": workload.unavailable(), "wall_s": None,
           "cpu_s": None, "repeats": 0, "data_bytes": None, "output_bytes": None, "peak_extra_bytes": None,
           "method_bytes": None}
    if row["error"]:
        return row
    timing = TIMING[quick]
    before = _baseline_rss()
    model = build_model()
    x, y = make_data(N)
    test = make_data(N_TEST, TEST_SEED)
    data = loader(x, y)
    row["data_bytes"] = x.nbytes + y.nbytes
    try:
        w = min(N, WARMUP)
        workload.run(model, loader(x[:w], y[:w]), test)
        result, wall, cpu = _timed(lambda: workload.run(model, data, test))
        row["output_bytes"] = _nbytes(result)
        if keep_result:
            row.update(result=result, x=x, y=y, x_test=test[0], y_test=test[1])
        del result  # a repeat's output must not be counted twice
        walls, cpus = [wall], [cpu]
        if wall < timing.slow_s and not keep_result:
            repeats = min(timing.repeats, max(MIN_REPEATS, math.floor(timing.max_total_s / max(wall, 1e-9))))
            while len(walls) < repeats:
                _, wall, cpu = _timed(lambda: workload.run(model, data, test))
                walls.append(wall)
                cpus.append(cpu)
    except Exception as exc:  # a workload that cannot run is a row, not the end of the benchmark
        row["error"] = one_line(exc)
        return row
    peak = _peak_rss() - before
    row.update(wall_s=statistics.median(walls), cpu_s=statistics.median(cpus), repeats=len(walls),
               peak_extra_bytes=peak, method_bytes=peak - row["data_bytes"] - row["output_bytes"])
    return row


# ---- the report --------------------------------------------------------------------------------------

def table(header: list[str], lines: list[list[str]], text: tuple[int, ...] = (0,)) -> list[str]:
    """A markdown table, the columns ``text`` (indices) left-aligned, the others (numbers) right-aligned."""
    align = ["---" if i in text else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(line) + " |" for line in lines)]


def machine_lines(command: list[str], seconds: float, loads: tuple[float, float]) -> list[str]:
    """The run's command, date, machine (CPU, cores, load average at its start and end) and torch."""
    cpu = cpu_name()
    return [f"- command: `{shlex.join(command)}`",
            f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; the run took {seconds / 60:.1f} min",
            f"- machine: {cpu}, {cpu_count()} CPUs, load average {loads[0]:.2f} at the start and {loads[1]:.2f} "
            "at the end (the machine is shared)",
            f"- torch {torch.__version__}, fisherext {fx.__version__}, 1 thread per process"]


def write_section(path: str | Path, key: str, text: str) -> None:
    """Writes ``text`` into the markdown file ``path`` as the section of ``key`` (between two comment
    markers), replacing that section where it is there already and keeping the others: bench.scale and
    bench.distributed share one file (bench/SCALING.md)."""
    path = Path(path)
    begin, end = f"<!-- {key}: begin -->", f"<!-- {key}: end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        rest = rest.split(end, 1)[1]
        new = head + block + (rest[1:] if rest.startswith("\n") else rest)  # the block ends with that newline
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def write_outputs(key: str, report: str, rows: list[dict], md: str | None, json_path: str | None) -> None:
    """Prints the report; writes it as the section ``key`` of the file ``md`` and the rows to ``json_path``."""
    print(report)
    if md:
        write_section(md, key, report)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")


def _mb(n) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}"


def _ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def add_linearity(rows: list[dict]) -> None:
    """``linearity_wall`` / ``linearity_cpu``: (t(N)/N) / (t(N₀)/N₀), N₀ the workload's smallest N measured."""
    for name in dict.fromkeys(r["workload"] for r in rows):
        done = sorted((r for r in rows if r["workload"] == name and r["wall_s"]), key=lambda r: r["N"])
        for r in done:
            for key in ("wall", "cpu"):
                base = done[0][f"{key}_s"] / done[0]["N"]
                r[f"linearity_{key}"] = (r[f"{key}_s"] / r["N"]) / base if base > 0 else None


def markdown(rows: list[dict], header: list[str]) -> str:
    lines, errors = [], []
    last = None
    for r in rows:
        name = f"`{r['workload']}`" if r["workload"] != last else ""
        last = r["workload"]
        if r["error"]:
            errors.append(f"{len(errors) + 1}. `{r['workload']}` at N = {r['N']:,}: {r['error']}")
            lines.append([name, f"{r['N']:,}", f"error [{len(errors)}]"] + ["—"] * 8)
            continue
        per_k = r["wall_s"] / r["N"] * 1e6
        lines.append([name, f"{r['N']:,}", _mb(r["data_bytes"]), _mb(r["output_bytes"]), f"{r['wall_s']:.3g}",
                      f"{r['cpu_s']:.3g}", f"{per_k:.3g}", _ratio(r.get("linearity_wall")),
                      _ratio(r.get("linearity_cpu")), _mb(r["peak_extra_bytes"]), _mb(r["method_bytes"])])
    summary = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        done = [r for r in rows if r["workload"] == name and r["wall_s"]]
        if len(done) < 2:
            continue
        small, large = done[0], done[-1]
        summary.append([f"`{name}`", f"{small['N']:,} → {large['N']:,}", f"{large['N'] // small['N']}×",
                        _ratio(large["linearity_wall"]), _ratio(large["linearity_cpu"]),
                        f"{_mb(small['method_bytes'])} → {_mb(large['method_bytes'])}",
                        f"{_mb(small['data_bytes'])} → {_mb(large['data_bytes'])}", WORKLOADS[name].output])
    out = ["# Streaming at scale: time and memory against N (bench/scale.py)", "", *header, "",
           "## Summary", "",
           *table(["workload", "N", "N ×", "time/sample × (wall)", "time/sample × (CPU)", "method MB",
                   "data MB", "result"], summary, text=(0, 1, 7)),
           "", "time/sample × = (t(N)/N) / (t(N₀)/N₀) between the smallest and the largest N: 1 is linear time. "
           "method MB = extra peak resident set − data − output: flat is constant memory.",
           "", "## Every (workload, N)", "",
           *table(["workload", "N", "data MB", "output MB", "wall s", "CPU s", "ms / 10³ samples",
                   "linearity wall", "linearity CPU", "extra peak MB", "method MB"], lines, text=(0,)),
           "", "## Notes", "", *(f"- {n}" for n in NOTES)]
    if errors:
        out += ["", "## Errors", "", *errors]
    return "\n".join(out) + "\n"


NOTES = [
    f"Model: MLP 64-64-10 (ReLU, P = 4,810, float32, eval), synthetic x ~ N(0, I) [N, 64] and uniform random "
    f"labels; the data set is a DataLoader over a TensorDataset, batch_size {BATCH}, in order. Influence: "
    f"{N_TEST} test points, damping λ = {DAMPING:g}, curvature GGN (this untrained model's Hessian is "
    f"indefinite beyond −λ), CG fixed at {CG_ITERATIONS} products per solve.",
    "Each (workload, N) runs in a fresh process on 1 thread; a warm-up call on the first "
    f"{WARMUP} samples, then the median of repeats where a call is fast (bench.measure.TIMING).",
    "extra peak MB = getrusage(RUSAGE_SELF).ru_maxrss − the resident set before the model and data were "
    "made; it holds the data (264 bytes a sample: x float32 [N, 64], y int64 [N]) and the output, both O(N) "
    "and not the method's: per-sample values [N] and the influence matrix [10, N] are what the caller asked "
    "for. method MB = extra peak − data − output; the resident set moves by a few MB between processes "
    "(allocator arenas, page granularity), so a difference of that size is noise.",
    "linearity = (t(N)/N) / (t(N₀)/N₀) against the smallest N of the workload; a fixed cost per call (set-up, "
    "the solve of the test gradients) makes it fall below 1 at large N. CPU time is the process's; on a "
    "shared machine wall time exceeds it when other work takes the core.",
    "The per-sample rows keep one small result per batch while each batch's temporaries come and go; "
    "with glibc's default (dynamic) mmap threshold the freed temporaries then stay in a heap that the kept "
    "results pin, and the resident set grows by tens of bytes a sample beyond the output, which is not live "
    "memory (malloc_trim hands it back; a fixed MALLOC_MMAP_THRESHOLD_ keeps it flat but slows every call). "
    "An output preallocated at [N] and filled batch by batch would not pin the heap.",
    "`loader` is the DataLoader alone (one __getitem__ per sample, then collation): part of every other "
    "workload's time.",
    "`self_influence_cg` solves one right-hand side per training point and streams all N points at each CG "
    "iteration: O(N²) time by construction, run at N ≤ 10³ only; `self_influence_exact` (dense GGN of the "
    "last layer, built once) is the O(N) way.",
    "`per_sample_trace` is the engine's own streaming over a data set (fx.per_sample_fisher(model, data, "
    "batch_size=...)); where this version lacks it, the row says so and `per_sample_trace_batches` (the "
    "caller's loop) stands in.",
]


# ---- the command -------------------------------------------------------------------------------------

def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 10², 10³, 10⁴ and fewer repeats")
    parser.add_argument("--md", metavar="PATH", help="write the markdown report into PATH, as its bench.scale "
                        "section (other sections of the file are kept)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list to PATH")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"workloads, of {', '.join(WORKLOADS)}")
    parser.add_argument("--sizes", nargs="+", type=int, metavar="N", help="the N to run (default by --quick)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.only or [] if n not in WORKLOADS]
    if unknown:
        parser.error(f"--only: unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    if args.sizes and min(args.sizes) < 1:
        parser.error("--sizes: every N must be a positive integer")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # The measuring processes call this module's function under its package name, also when it runs as
    # __main__ (python -m), so that they import it as bench.scale.
    from bench import scale

    start, load = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for name in args.only or WORKLOADS:
        for N in WORKLOADS[name].sizes_for(args.quick, tuple(args.sizes) if args.sizes else None):
            ok, value = in_fresh_process(scale.measure_one, (name, N, args.quick), TIMING[args.quick].timeout_s)
            row = value if ok else {"workload": name, "N": N, "output": WORKLOADS[name].output, "error": value,
                                    "wall_s": None}
            rows.append(row)
            shown = row["error"] or f"{row['wall_s']:.3g} s, method {_mb(row['method_bytes'])} MB"
            print(f"  {name} N={N}: {shown}", file=sys.stderr, flush=True)
    add_linearity(rows)
    header = machine_lines(["python", "-m", "bench.scale", *argv], time.perf_counter() - start,
                           (load, os.getloadavg()[0]))
    if args.quick:
        header[:0] = ["**Quick run** (`--quick`): small N; it shows that the harness runs, not the scaling.", ""]
    write_outputs("bench.scale", markdown(rows, header), rows, args.md, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
