r"""Weak scaling on one machine: 1, 2, 4 gloo processes, each with the same work on its own shard.

``python -m bench.distributed [--quick] [--md PATH] [--json PATH] [--worlds W ...] [--per-rank N]
[--repeats R] [--dtype float32|float64] [--save DIR]``

For each world size W, W processes (``torch.multiprocessing.spawn``, a process group on the gloo backend
initialized through a ``file://`` rendezvous, 1 thread each) hold N_r samples each (4000; ``--quick``:
500), shard r being samples [r·N_r, (r+1)·N_r) of one seeded synthetic data set of W·N_r samples, and
call, as one process would over all of them:

- ``fisher_diag_local``: ``fx.fisher(..., structure="diag", group=False)``, each rank its own shard with no
  reduction: the same work in W independent processes, so its ratio to W = 1 is what the machine alone
  (shared cores, memory, other users' load) does to W concurrent processes, with no communication;
- ``fisher_diag``: ``fx.fisher(model, shard, kind="true", structure="diag").diag()``, the mean over all
  W·N_r samples :math:`\frac1N\sum_n F_n` (its sums and N add across the ranks);
- ``fisher_kfac``: ``fx.fisher(..., structure="kfac")``, the K-FAC factors;
- ``ggn_product``: one ``fx.GGNOperator(model, "cross_entropy", shard) @ v`` (v seeded, unit norm), the
  GGN of the mean loss over all shards times v;
- ``cg``: ``fx.solvers.cg(GGN, v, damping=1e-2, maxiter=10)``, 10 iterations exactly (tol 1e-30, never
  reached; tol=0 is refused), so 10 reduced products plus the solver's local vector updates;
- ``all_reduce``: ``torch.distributed.all_reduce`` of P floats alone, the collective a diagonal Fisher
  adds to its local work (W > 1 only).

The reductions happen inside fisherext under the process group; nothing in the calls names the ranks.
Model and data: ``bench.scale`` (MLP 64-64-10, P = 4,810; x ~ N(0, I), random labels), batch_size 1000.

Timing: after a warm-up call (its result is the one checked), each of R repetitions starts at a barrier
and each rank times its own call; a repetition's time is the largest over the ranks (the ranks meet in
the collectives, so the slowest one sets the pace), and a world size's figure is the median over the
repetitions; the world sizes are run K times in turn (1, 2, 4, 1, 2, 4, ...: ``--rounds``, 3; quick 1)
and the median over the rounds is reported, so that a drift of the machine's load does not land on one
world size only. Weak scaling is ideal when that time stays at its W = 1 value. On a machine of C cores, W > C ranks
share the cores and each gets C/W of one, so the table also gives the time × min(1, C/W), normalized by
that share: its ratio to W = 1 is what remains (communication, synchronization) once the machine's own
bound is taken out.

The warm-up call also counts the torch.distributed collectives it makes (``counting_collectives``):
each is a point where every rank waits for the slowest, which on a shared machine costs more than the
bytes it moves.

Every result is compared with one process (no process group) over all W·N_r samples: the relative error
:math:`\max|r - r_1| / \max|r_1|` (K-FAC: ``bench.compare.kfac_error``). ``--dtype float64`` makes that
comparison exact to rounding (~1e-15); in float32 it shows the effect of the other summation order.
``--save DIR`` writes rank 0's results of each world size to ``DIR/world-W.pt``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fisherext as fx

from .compare import kfac_error, relative_error, to_cpu64
from .measure import cpu_count
from .scale import BATCH, DAMPING, build_model, kfac_factors, machine_lines, make_data, table, write_outputs

CG_ITERATIONS = 10
CG_TOL = 1e-30          # never reached, so cg runs CG_ITERATIONS products
WORLDS = (1, 2, 4)
PER_RANK = {False: 4000, True: 500}
REPEATS = {False: 15, True: 3}   # a call over 4000 samples takes milliseconds: many repeats are cheap
REDUCE_REPEATS = 20
# Passes over the world sizes (1, 2, 4, 1, 2, 4, ...): the load of a shared machine drifts over the
# seconds a world size takes, and a drift would otherwise land on one W only.
ROUNDS = {False: 3, True: 1}
DIRECTION_SEED = 3
# The collectives counted in a call (torch.distributed's functions, looked up by the engine at each call).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "barrier", "all_gather_object", "gather",
               "scatter", "reduce")
CALLS = ("fisher_diag_local", "fisher_diag", "fisher_kfac", "ggn_product", "cg")


def direction(P: int, dtype: torch.dtype) -> torch.Tensor:
    """The seeded unit vector of the GGN product and the right-hand side of CG."""
    v = torch.randn(P, generator=torch.Generator().manual_seed(DIRECTION_SEED), dtype=torch.float64)
    return (v / v.norm()).to(dtype)


def calls(model, data, v) -> dict:
    """The timed calls on this process's data (under a process group: its shard, reduced over all but
    ``fisher_diag_local``, which is this process's shard alone)."""
    ggn = fx.GGNOperator(model, "cross_entropy", data, batch_size=BATCH)
    return {
        "fisher_diag_local": lambda: fx.fisher(model, data, kind="true", structure="diag", batch_size=BATCH,
                                               group=False).diag(),
        "fisher_diag": lambda: fx.fisher(model, data, kind="true", structure="diag", batch_size=BATCH).diag(),
        "fisher_kfac": lambda: kfac_factors(fx.fisher(model, data, kind="true", structure="kfac",
                                                      batch_size=BATCH)),
        "ggn_product": lambda: ggn @ v,
        "cg": lambda: fx.solvers.cg(ggn, v, damping=DAMPING, tol=CG_TOL, maxiter=CG_ITERATIONS),
    }


def shard(world: int, rank: int, per_rank: int, dtype: torch.dtype):
    x, y = make_data(world * per_rank, dtype=dtype)
    return x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]


@contextlib.contextmanager
def counting_collectives(counts: dict):
    """Counts, into ``counts``, the calls of torch.distributed's collectives inside the block (each one a
    meeting point of every rank), the functions restored after it."""
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return call

    try:
        for name, fn in saved.items():
            setattr(dist, name, counted(name, fn))
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _seconds_over_ranks(samples: list[float]) -> list[float]:
    """Each repetition's largest time over the ranks (every rank gets the same list)."""
    t = torch.tensor(samples, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _timed_repeats(call, repeats: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeats):
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": statistics.median(_seconds_over_ranks(walls)),
            "cpu_s": statistics.median(_seconds_over_ranks(cpus))}


def run_rank(rank: int, world: int, init_file: str, out_file: str, per_rank: int, repeats: int,
             dtype_name: str) -> None:
    """One rank (``torch.multiprocessing.spawn``'s target): times every call, rank 0 saves times and results."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore", message=".*did not reach tol")  # cg stops at its fixed iterations
        dtype = getattr(torch, dtype_name)
        model = build_model(dtype)
        P = sum(p.numel() for p in model.parameters())
        timings, results = {}, {}
        for name, call in calls(model, shard(world, rank, per_rank, dtype), direction(P, dtype)).items():
            with counting_collectives({}) as counts:
                results[name] = to_cpu64(call())  # the warm-up
            timings[name] = {**_timed_repeats(call, repeats), "collectives": sum(counts.values())}
        if world > 1:
            buffer = torch.zeros(P, dtype=dtype)
            dist.all_reduce(buffer)
            timings["all_reduce"] = {**_timed_repeats(lambda: dist.all_reduce(buffer), REDUCE_REPEATS),
                                     "collectives": 1}
        if rank == 0:
            torch.save({"timings": timings, "results": results}, out_file)
    finally:
        dist.destroy_process_group()


def one_process(world: int, per_rank: int, dtype: torch.dtype) -> dict:
    """Every call's result in this process alone (no process group) over all world·per_rank samples;
    ``fisher_diag_local`` over rank 0's shard."""
    model = build_model(dtype)
    P = sum(p.numel() for p in model.parameters())
    data = make_data(world * per_rank, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not reach tol")
        out = {name: to_cpu64(call()) for name, call in calls(model, data, direction(P, dtype)).items()}
        local = calls(model, shard(world, 0, per_rank, dtype), None)["fisher_diag_local"]
        out["fisher_diag_local"] = to_cpu64(local())  # rank 0's shard alone: what its local call saw
    return out


def rel_err(name: str, got, expected) -> float:
    return kfac_error(got, expected) if name == "fisher_kfac" else relative_error(got, expected)


def measure_world(world: int, per_rank: int, repeats: int, dtype_name: str, save: str | None) -> list[dict]:
    """The rows of one world size: times of every call, and its error against one process."""
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as folder:
        out = os.path.join(folder, "rank0.pt")
        mp.spawn(run_rank, args=(world, os.path.join(folder, "init"), out, per_rank, repeats, dtype_name),
                 nprocs=world, join=True)
        got = torch.load(out)
    if save:
        Path(save).mkdir(parents=True, exist_ok=True)
        torch.save(got["results"], Path(save) / f"world-{world}.pt")
    expected = one_process(world, per_rank, getattr(torch, dtype_name))
    rows = []
    for name, timing in got["timings"].items():
        row = {"workload": name, "world": world, "per_rank": per_rank, "N": world * per_rank, **timing,
               "rel_err": rel_err(name, got["results"][name], expected[name]) if name in expected else None}
        rows.append(row)
    return rows


def median_over_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (call, W): the median over the rounds of wall_s and cpu_s, the largest rel_err."""
    rows = []
    for first in rounds[0]:
        same = [r for rows_ in rounds for r in rows_
                if (r["workload"], r["world"]) == (first["workload"], first["world"])]
        errors = [r["rel_err"] for r in same if r["rel_err"] is not None]
        rows.append({**first, "wall_s": statistics.median(r["wall_s"] for r in same),
                     "cpu_s": statistics.median(r["cpu_s"] for r in same), "rounds": len(same),
                     "rel_err": max(errors) if errors else None})
    return rows


def add_ratios(rows: list[dict], cores: int) -> None:
    """ratio (to W = 1), cpu_share = min(1, cores/W), normalized_s = wall × share and its ratio to W = 1."""
    for r in rows:
        r["cpu_share"] = min(1.0, cores / r["world"])
        r["normalized_s"] = r["wall_s"] * r["cpu_share"]
    alone = {r["workload"]: r for r in rows if r["world"] == 1}
    for r in rows:
        base = alone.get(r["workload"])
        r["ratio"] = r["wall_s"] / base["wall_s"] if base else None
        r["normalized_ratio"] = r["normalized_s"] / base["normalized_s"] if base else None


def _ms(s) -> str:
    return f"{s * 1e3:.3g}"


def _x(r) -> str:
    return "—" if r is None else f"{r:.2f}×"


def markdown(rows: list[dict], header: list[str], cores: int, worlds: tuple[int, ...]) -> str:
    lines, last = [], None
    for r in rows:
        lines.append([f"`{r['workload']}`" if r["workload"] != last else "", str(r["world"]), f"{r['per_rank']:,}",
                      f"{r['N']:,}", _ms(r["wall_s"]), _ms(r["cpu_s"]), _x(r["ratio"]), f"{r['cpu_share']:.2f}",
                      _ms(r["normalized_s"]), _x(r["normalized_ratio"]), str(r["collectives"]),
                      "—" if r["rel_err"] is None else f"{r['rel_err']:.1e}"])
        last = r["workload"]
    summary = []
    for name in CALLS:
        mine = {r["world"]: r for r in rows if r["workload"] == name}
        summary.append([f"`{name}`", *(_x(mine[w]["ratio"]) + " / " + _x(mine[w]["normalized_ratio"])
                                       if w in mine else "—" for w in worlds)])
    reduce = {r["world"]: r for r in rows if r["workload"] == "all_reduce"}
    diag = {r["world"]: r for r in rows if r["workload"] == "fisher_diag"}
    share = [f"W = {w}: {_ms(reduce[w]['wall_s'])} ms, {reduce[w]['wall_s'] / diag[w]['wall_s']:.1%} of fisher_diag"
             for w in worlds if w in reduce and w in diag]
    most = max(worlds)
    shared = (f"(W = {most}: {cores / most:.2f} of a core each)" if most > cores else
              f"(no W here exceeds {cores})")
    bound = (f"What the machine bounds: it has {cores} cores, shared with other users. Up to W = {cores} each rank "
             f"has a core of its own, beyond it the ranks share them {shared}, so there ideal weak scaling is a "
             f"plain ratio of W/{cores}, and the normalized one (time × min(1, {cores}/W)) takes that out. "
             "`fisher_diag_local` is the same work as `fisher_diag` in W processes that never communicate: its "
             "ratio is the machine's own slow-down of W concurrent processes (other users' load, shared caches "
             "and memory), and the gap from it to `fisher_diag` is what the process group costs.")
    out = ["# Weak scaling over gloo processes (bench/distributed.py)", "", *header, "", "## Summary", "",
           "Time per rank relative to one process (same work per rank), plain / normalized by the CPU share "
           "min(1, cores/W); 1.00× is ideal weak scaling.", "",
           *table(["call", *(f"W = {w}" for w in worlds)], summary), "", bound, "",
           "## Every (call, world size)", "",
           *table(["call", "W", "N per rank", "N total", "ms per rank", "CPU ms per rank", "× W = 1",
                   "CPU share", "ms × share", "normalized × W = 1", "collectives", "rel err vs 1 process"], lines),
           "",
           "## Notes", "",
           "- ms per rank: each repetition starts at a barrier and takes the slowest rank's wall time; the median "
           "over the repetitions after a warm-up, then the median over the rounds through the world sizes. "
           "CPU ms: the same for each rank's process CPU time (gloo's "
           "threads included).",
           "- collectives: the torch.distributed collectives one call makes (counted in the warm-up call): "
           "each is a point where every rank waits for the slowest, so on a loaded machine each costs the "
           "scheduling delay of the slowest rank on top of its transfer.",
           "- rel err: max |result − one process over all W·N_r samples| / max |that|, for the warm-up call "
           "(K-FAC: the factors up to the split of scale between A and G; `fisher_diag_local`: against one "
           "process over rank 0's shard).",
           "- `all_reduce`: one torch.distributed.all_reduce of the P floats of a diagonal Fisher, alone: "
           + ("; ".join(share) if share else "W = 1 has none") + ".",
           f"- cg: {CG_ITERATIONS} iterations, each one reduced GGN product plus local vector updates; damping "
           f"{DAMPING:g}; fisher calls and products stream their shard in batches of {BATCH}."]
    return "\n".join(out) + "\n"


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{PER_RANK[True]} samples per rank, fewer repeats")
    parser.add_argument("--md", metavar="PATH", help="write the markdown report into PATH, as its "
                        "bench.distributed section (other sections of the file are kept)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list to PATH")
    parser.add_argument("--worlds", nargs="+", type=int, default=list(WORLDS), metavar="W",
                        help="world sizes (default 1 2 4)")
    parser.add_argument("--per-rank", type=int, metavar="N", help="samples per rank (default by --quick)")
    parser.add_argument("--repeats", type=int, metavar="R", help="timed repetitions (default by --quick)")
    parser.add_argument("--rounds", type=int, metavar="K", help="passes over the world sizes, the median "
                        "taken over them (default by --quick)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--save", metavar="DIR", help="write rank 0's results to DIR/world-W.pt")
    args = parser.parse_args(argv)
    for name in ("per_rank", "repeats", "rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be a positive integer")
    if min(args.worlds) < 1:
        parser.error("--worlds: every world size must be a positive integer")
    if 1 not in args.worlds:
        parser.error("--worlds: must include 1 (the ratios are taken against it)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not dist.is_available():
        print("python -m bench.distributed: torch.distributed is not available", file=sys.stderr)
        return 2
    # The spawned ranks run this module's function under its package name, also when it runs as
    # __main__ (python -m), so that they import it as bench.distributed.
    from bench import distributed

    torch.set_num_threads(1)
    per_rank = args.per_rank or PER_RANK[args.quick]
    repeats = args.repeats or REPEATS[args.quick]
    rounds = args.rounds or ROUNDS[args.quick]
    worlds = tuple(sorted(set(args.worlds)))
    start, load = time.perf_counter(), os.getloadavg()[0]
    passes = []
    for k in range(rounds):
        passes.append([])
        for world in worlds:
            got = distributed.measure_world(world, per_rank, repeats, args.dtype, args.save)
            passes[-1] += got
            print(f"  round {k + 1}, W={world}: " + ", ".join(f"{r['workload']} {_ms(r['wall_s'])} ms" for r in got),
                  file=sys.stderr, flush=True)
    rows = median_over_rounds(passes)
    cores = cpu_count()
    add_ratios(rows, cores)
    header = machine_lines(["python", "-m", "bench.distributed", *argv], time.perf_counter() - start,
                           (load, os.getloadavg()[0]))
    header.append(f"- {per_rank:,} samples per rank, {args.dtype}; per world size the median of {repeats} "
                  f"repetitions ({REDUCE_REPEATS} for all_reduce), then the median over {rounds} round"
                  f"{'s' if rounds > 1 else ''} through the world sizes; gloo over a file:// rendezvous")
    if args.quick:
        header[:0] = ["**Quick run** (`--quick`): small shards; it shows that the harness runs, not the scaling.",
                      ""]
    write_outputs("bench.distributed", markdown(rows, header, cores, worlds), rows, args.md, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
