"""pytest-benchmark over ``bench.workloads`` at their quick sizes, on the CPU.

Run with ``pytest bench/ --benchmark-only``. Not part of the test suite (``pytest`` collects only
``tests/``); each workload is one benchmark group, so its impls are reported side by side.
"""
import pytest

from bench.workloads import WORKLOADS

CASES = [pytest.param(workload, impl, id=f"{workload.name(quick=True)}-{impl}")
         for workload in WORKLOADS for impl in workload.impls]


@pytest.mark.parametrize("workload, impl", CASES)
def test_fisher_accum(benchmark, workload, impl):
    inputs = workload.inputs("cpu", quick=True)
    benchmark.group = workload.name(quick=True)
    benchmark(workload.impls[impl], **inputs)
