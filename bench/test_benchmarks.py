"""pytest-benchmark over every (workload, impl) of ``bench.workloads`` at the quick sizes, on the CPU.

Run with ``pytest bench/ --benchmark-only``; not part of the test suite (``pytest`` collects only
``tests/``). Each workload is one benchmark group, so its impls are reported side by side; a peer that is
not installed is skipped. ``python -m bench.run`` is the benchmark proper (fresh processes, memory,
errors against float64).
"""
import pytest

from bench.workloads import all_workloads

CASES = [pytest.param(workload, impl, id=f"{workload.name}-{impl}")
         for workload in all_workloads(quick=True) for impl in workload.impls]


@pytest.mark.parametrize("workload, impl", CASES)
def test_workload(benchmark, workload, impl):
    inputs = workload.build()
    run = workload.impls[impl]
    subset = workload.subsets.get(impl)
    if subset is not None:
        inputs = subset.take(inputs)
    try:
        workload.call(run, inputs)  # warm-up; a peer that is not installed raises ImportError here
    except ImportError as exc:
        pytest.skip(f"{impl} is not installed: {exc}")
    benchmark.group = workload.name
    benchmark(workload.call, run, inputs)
