"""The benchmark harness (bench/) in its quick mode: the CLI, its rows and report, and how it fails.

Times are not checked (no timed tests): the runs here show that every row carries the keys scripts rely
on (DESIGN.md, "Machine-readable outputs"), that fisherext and the seed-style loops agree with the
float64 reference, and that a failing impl, a dying process or a bad name is reported, not a crash.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.compare import kfac_error  # noqa: E402
from bench.measure import TIMING, in_fresh_process, measure_workload  # noqa: E402
from bench.workloads import Workload, select  # noqa: E402

PINNED_KEYS = {"workload", "impl", "median_s", "peak_mem_bytes", "rel_err", "error"}
# The accuracy target for float32 results against float64.
REL_TOL = 1e-5
# One workload per kind of result: a diagonal, per-input values, K-FAC factor pairs, a product, an
# optimizer step, attacked inputs, and the gradients the "× gradient" column divides by.
ONLY = ["gradient:mlp", "diag_empirical:mlp", "trace_true:convnet", "kfac:cnn", "ggn:lstm", "sam_step", "pgd"]


def bench_run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    done = bench_run("--quick", "--threads", "1", "--impl", "fisherext", "autograd-loop",
                     "--json", str(folder / "rows.json"), "--md", str(folder / "report.md"), "--only", *ONLY)
    return done, folder


def test_quick_run_writes_rows_and_report(quick_run):
    done, folder = quick_run
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((folder / "rows.json").read_text())
    workloads = {row["workload"] for row in rows}
    # gradient:mlp is the MLP's three batch sizes (the matrix's two, the applications' training batch)
    assert len(workloads) == len(select(ONLY, quick=True)) == 9
    report = (folder / "report.md").read_text()
    assert report.startswith("# Benchmark results") and "**Quick run**" in report
    assert "| quantity | impl | median ms | peak extra MB | rel err | × gradient | vs loop |" in report
    assert "## Applications" in report and "`sam_step(mlp,N=32)`" in report
    assert report == done.stdout.rstrip("\n") + "\n"  # --md writes what it prints
    for row in rows:
        assert PINNED_KEYS <= row.keys()
        assert row["impl"] in ("fisherext", "autograd-loop")
        assert row["error"] is None, row
        assert row["median_s"] > 0 and row["rel_err"] <= REL_TOL, row


def test_quick_run_relates_rows_to_the_gradient_and_the_loop(quick_run):
    done, folder = quick_run
    rows = json.loads((folder / "rows.json").read_text())
    gradient = {row["N"]: row["median_s"] for row in rows if row["workload"].startswith("gradient(mlp")}
    (fisherext,) = [row for row in rows
                    if row["workload"].startswith("diag_empirical(mlp") and row["impl"] == "fisherext"]
    (loop,) = [row for row in rows if row["workload"] == fisherext["workload"] and row["impl"] == "autograd-loop"]
    assert fisherext["ratio_to_gradient"] == pytest.approx(fisherext["median_s"] / gradient[fisherext["N"]])
    assert fisherext["speedup_vs_baseline"] == pytest.approx(loop["median_s"] / fisherext["median_s"])
    # models without a gradient row among the workloads run get no ratio
    assert all("ratio_to_gradient" not in row for row in rows if row["model"] != "mlp")


@pytest.mark.parametrize("args, what", [(["--only", "no_such_workload"], "no_such_workload"),
                                        (["--impl", "no_such_impl"], "no_such_impl")])
def test_unknown_name_exits_2(args, what):
    done = bench_run("--quick", *args, timeout=120)
    assert done.returncode == 2
    assert what in done.stderr and "unknown" in done.stderr


def _raises(exc):
    def impl(x):
        raise exc
    return impl


@pytest.mark.parametrize("exc, error", [(RuntimeError("boom\nsecond line"), "RuntimeError: boom"),
                                        (ModuleNotFoundError("No module named 'peer'"),
                                         "not installed (ModuleNotFoundError: No module named 'peer')")])
def test_a_failing_impl_is_an_error_row(exc, error):
    workload = Workload(name="failing", group="models", quantity="gradient", build=lambda: {"x": torch.ones(3)},
                        impls={"fisherext": _raises(exc)}, reference=None)
    row = measure_workload(workload, "fisherext", "cpu", TIMING[True], None)
    assert PINNED_KEYS <= row.keys()
    assert row["error"] == error  # one line
    assert row["median_s"] is None and row["peak_mem_bytes"] is None and row["rel_err"] is None


def test_a_wrong_result_keeps_its_time_and_says_why(tmp_path):
    torch.save(torch.ones(4, dtype=torch.float64), tmp_path / "ref.pt")
    workload = Workload(name="wrong", group="models", quantity="gradient", build=lambda: {"x": torch.ones(3)},
                        impls={"fisherext": lambda x: x * 2}, reference=None)
    row = measure_workload(workload, "fisherext", "cpu", TIMING[True], str(tmp_path / "ref.pt"))
    assert row["median_s"] > 0 and row["rel_err"] is None
    assert row["error"] == "wrong result: result has shape (3,), the reference (4,)"


def test_fresh_process_returns_the_value_or_why_it_died():
    assert in_fresh_process(divmod, (7, 2), timeout_s=120) == (True, (3, 1))
    ok, why = in_fresh_process(os._exit, (3,), timeout_s=120)
    assert not ok and why == "the measuring process died (exit status 3)"


def _sum_of_ones(n: int) -> float:
    return torch.ones(n).sum().item()


def test_fresh_process_runs_torch_in_parallel():
    # A process forked from a server whose OpenMP pool has started hangs in its first parallel region:
    # the server must only import. A reduction over 2^22 floats runs on all of torch's threads.
    assert in_fresh_process(_sum_of_ones, (2 ** 22,), timeout_s=120) == (True, 2 ** 22)


def test_kfac_error_ignores_how_the_scale_is_split_between_the_factors():
    A, G = torch.eye(3, dtype=torch.float64) + 1, torch.diag(torch.arange(1.0, 3.0, dtype=torch.float64))
    assert kfac_error([(2 * A, G / 2)], [(A, G)]) < 1e-15
    assert kfac_error([(2 * A, G)], [(A, G)]) == pytest.approx(1.0)         # the product is off by 2
    assert kfac_error([(A, G.flip(0).flip(1))], [(A, G)]) == pytest.approx(0.5)  # G/‖G‖ differs
    with pytest.raises(ValueError, match="2 layers"):
        kfac_error([(A, G), (A, G)], [(A, G)])
