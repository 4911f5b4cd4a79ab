"""The scaling benchmarks (bench/scale.py, bench/distributed.py) at their smallest sizes.

No time is checked (no timed tests): the runs show that every row and report is well formed, that the
scale workloads compute the quantities they name (against plain autograd on the data they ran on), and
that the distributed results of W gloo ranks equal one process over all shards and plain autograd on
the concatenated shards, in float64.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import loops  # noqa: E402
from bench.compare import kfac_error, relative_error  # noqa: E402
from bench.distributed import CALLS, CG_ITERATIONS, direction, median_over_rounds  # noqa: E402
from bench.scale import (DAMPING, N_TEST, WORKLOADS, build_model, make_data, measure_one,  # noqa: E402
                         streams_data_sets, write_section)

SIZES = (20, 60)
BYTES_PER_SAMPLE = 64 * 4 + 8          # x float32 [64], y int64
P = 64 * 64 + 64 + 10 * 64 + 10


def run(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


# ---- bench.scale -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    done = run("bench.scale", "--quick", "--sizes", *map(str, SIZES), "--json", str(folder / "rows.json"),
               "--md", str(folder / "SCALING.md"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "rows.json").read_text()), (folder / "SCALING.md").read_text()


def expected_output_bytes(name, N):
    return {"loader": 8, "fisher_diag": 4 * P, "fisher_kfac": 4 * (65 * 65 + 64 * 64 + 65 * 65 + 10 * 10),
            "influence": 4 * N_TEST * N}.get(name, 4 * N)  # the rest: one float32 per training sample


def test_scale_rows_cover_every_workload_and_size_and_add_up(scale_run):
    rows, _ = scale_run
    assert [(r["workload"], r["N"]) for r in rows] == [(name, N) for name in WORKLOADS for N in SIZES]
    for r in rows:
        if r["workload"] == "per_sample_trace" and streams_data_sets():
            assert r["error"] == streams_data_sets() and r["wall_s"] is None  # this version lacks the API
            continue
        assert r["error"] is None, r
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["repeats"] >= 1, r
        assert r["data_bytes"] == BYTES_PER_SAMPLE * r["N"]
        assert r["output_bytes"] == expected_output_bytes(r["workload"], r["N"]), r
        assert r["peak_extra_bytes"] > 0
        assert r["method_bytes"] == r["peak_extra_bytes"] - r["data_bytes"] - r["output_bytes"]
        first = next(q for q in rows if q["workload"] == r["workload"] and q["N"] == SIZES[0])
        for key in ("wall", "cpu"):  # (t(N)/N) / (t(N0)/N0), 1 at the smallest N
            per_sample = (r[f"{key}_s"] / r["N"]) / (first[f"{key}_s"] / first["N"])
            assert r[f"linearity_{key}"] == pytest.approx(per_sample)


def test_scale_report_has_its_tables_in_its_own_section(scale_run):
    rows, report = scale_run
    assert report.startswith("<!-- bench.scale: begin -->\n# Streaming at scale")
    assert report.rstrip().endswith("<!-- bench.scale: end -->")
    assert "**Quick run**" in report and "load average" in report
    assert "| workload | N | data MB | output MB | wall s | CPU s | ms / 10³ samples |" in report
    for name in WORKLOADS:
        assert f"| `{name}` | {SIZES[0]} → {SIZES[1]} |" in report  # a summary line per workload


def test_write_section_replaces_its_own_and_keeps_the_others(tmp_path):
    path = tmp_path / "SCALING.md"
    write_section(path, "a", "# A\n\nfirst\n")
    write_section(path, "b", "# B\n")
    write_section(path, "a", "# A\n\nsecond\n")
    text = path.read_text()
    assert text == "<!-- a: begin -->\n# A\n\nsecond\n<!-- a: end -->\n\n<!-- b: begin -->\n# B\n<!-- b: end -->\n"


@pytest.fixture(scope="module")
def results(one_thread):
    """measure_one run here (not in a fresh process: its times and memory mean nothing), with its results
    and the data they were computed on."""
    names = ["fisher_diag", "fisher_kfac", "per_sample_trace", "per_sample_trace_batches", "influence",
             "self_influence_exact"]
    if streams_data_sets():
        names.remove("per_sample_trace")
    return {name: measure_one(name, 40, quick=True, keep_result=True) for name in names}


def _float64_model():
    return build_model().double()


def test_scale_fisher_workloads_are_the_true_fisher_of_their_data(results):
    got = results["fisher_diag"]
    x, y = make_data(40)
    assert torch.equal(got["x"], x) and torch.equal(got["y"], y)
    model = _float64_model()
    assert relative_error(got["result"].double(), loops.diag_true(model, x.double(), y)) < 1e-5
    assert kfac_error([(A.double(), G.double()) for A, G in results["fisher_kfac"]["result"]],
                      loops.kfac(model, x.double(), y)) < 1e-5


def test_scale_per_sample_workloads_are_each_samples_trace(results):
    got = results["per_sample_trace_batches"]
    expected = loops.trace_true(_float64_model(), got["x"].double(), got["y"])
    assert relative_error(got["result"].double(), expected) < 1e-5
    if "per_sample_trace" in results:
        assert relative_error(results["per_sample_trace"]["result"].double(), expected) < 1e-5


def _last_layer_jacobian(model, x1):
    """d logits / d (weight, bias) of the last layer for one input [1, 64]: [10, 650], class by class."""
    out = model(x1)[0]
    params = list(model[2].parameters())
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[c], params, retain_graph=True)])
                        for c in range(out.shape[0])])


def test_scale_self_influence_exact_is_the_damped_last_layer_ggn_solve(results):
    got = results["self_influence_exact"]
    model, x, y = _float64_model(), got["x"].double(), got["y"]
    J = torch.stack([_last_layer_jacobian(model, x[n:n + 1]) for n in range(x.shape[0])])   # [N, 10, 650]
    p = torch.softmax(model(x), 1).detach()
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("nca,ncd,ndb->ab", J, Lam, J) / x.shape[0] + DAMPING * torch.eye(J.shape[2], dtype=x.dtype)
    grads = torch.einsum("nc,nca->na", p - torch.nn.functional.one_hot(y, 10).double(), J)   # ∇ℓ_n, last layer
    expected = -(grads * torch.linalg.solve(G, grads.T).T).sum(1)
    assert (expected < 0).all()
    assert relative_error(got["result"].double(), expected) < 1e-4


def test_scale_influence_has_one_row_per_test_point(results):
    got = results["influence"]
    assert got["result"].shape == (N_TEST, 40) and torch.isfinite(got["result"]).all()


# ---- bench.distributed -------------------------------------------------------------------------------

PER_RANK = 48


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    folder = tmp_path_factory.mktemp("distributed")
    done = run("bench.distributed", "--quick", "--worlds", "1", "2", "--per-rank", str(PER_RANK), "--repeats", "1",
               "--dtype", "float64", "--save", str(folder), "--json", str(folder / "rows.json"),
               "--md", str(folder / "SCALING.md"))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_distributed_rows_are_well_formed_and_equal_one_process(distributed_run):
    rows = json.loads((distributed_run / "rows.json").read_text())
    assert [(r["workload"], r["world"]) for r in rows] == \
        [(c, 1) for c in CALLS] + [(c, 2) for c in CALLS] + [("all_reduce", 2)]
    cores = len(os.sched_getaffinity(0))
    for r in rows:
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["N"] == r["world"] * PER_RANK and r["rounds"] == 1
        assert r["cpu_share"] == min(1.0, cores / r["world"])
        assert r["normalized_s"] == pytest.approx(r["wall_s"] * r["cpu_share"])
        if r["workload"] == "all_reduce":
            assert r["rel_err"] is None and r["ratio"] is None and r["collectives"] == 1
            continue
        # one process, or a rank's own shard, meets no other rank; a reduced call does at least once
        alone = r["world"] == 1 or r["workload"] == "fisher_diag_local"
        assert (r["collectives"] == 0) == alone, r
        assert r["rel_err"] < 1e-12, r                    # float64: equal to rounding
        alone = next(q for q in rows if q["workload"] == r["workload"] and q["world"] == 1)
        assert r["ratio"] == pytest.approx(r["wall_s"] / alone["wall_s"])
    report = (distributed_run / "SCALING.md").read_text()
    assert report.startswith("<!-- bench.distributed: begin -->\n# Weak scaling over gloo processes")
    assert "| call | W = 1 | W = 2 |" in report and "What the machine bounds: it has" in report


def _plain_cg(apply, b, damping, iterations):
    """Textbook conjugate gradients on (A + damping·I) x = b, from x = 0, a fixed number of iterations."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), r @ r
    for _ in range(iterations):
        Ap = apply(p) + damping * p
        alpha = rr / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        rr, rr_old = r @ r, rr
        p = r + (rr / rr_old) * p
    return x


def test_two_ranks_equal_plain_autograd_over_both_shards(distributed_run):
    got = torch.load(distributed_run / "world-2.pt")
    model = _float64_model()
    x, y = make_data(2 * PER_RANK, dtype=torch.float64)
    assert relative_error(got["fisher_diag"], loops.diag_true(model, x, y)) < 1e-10
    # the local call is rank 0's shard alone, no reduction
    assert relative_error(got["fisher_diag_local"], loops.diag_true(model, x[:PER_RANK], y[:PER_RANK])) < 1e-10
    assert kfac_error(got["fisher_kfac"], loops.kfac(model, x, y)) < 1e-10
    v = direction(P, torch.float64)
    ggn = lambda u: loops.ggn(model, x, y, u[:, None])[:, 0]  # noqa: E731  (mean loss over all 2·N_r samples)
    assert relative_error(got["ggn_product"], ggn(v)) < 1e-10
    assert relative_error(got["cg"], _plain_cg(ggn, v, DAMPING, CG_ITERATIONS)) < 1e-8


def test_rounds_give_the_median_time_and_the_largest_error():
    rounds = [[{"workload": "cg", "world": 2, "wall_s": t, "cpu_s": 2 * t, "rel_err": e}]
              for t, e in ((3.0, 1e-9), (1.0, 1e-7), (2.0, None))]
    (row,) = median_over_rounds(rounds)
    assert (row["wall_s"], row["cpu_s"], row["rel_err"], row["rounds"]) == (2.0, 4.0, 1e-7, 3)
