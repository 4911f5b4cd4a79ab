"""pytest-benchmark over ``bench.workloads`` at their quick sizes, on the CPU.

Run with ``pytest bench/ --benchmark-only``. Not part of the test suite (``pytest`` collects only
``tests/``); each workload is one benchmark group, so its impls are reported side by side.
"""
import pytest

from bench.workloads import WORKLOADS

CASES = [pytest.param(workload, impl, id=f"{workload.name(quick=True)}-{impl}")
         for workload in WORKLOADS for impl in workload.impls]


# Peers that are bench-only, optional dependencies (bench/fisher_workloads.py): skipped when not installed.
OPTIONAL_PEERS = {"backpack": "backpack", "nngeometry": "nngeometry"}


@pytest.mark.parametrize("workload, impl", CASES)
def test_fisher_accum(benchmark, workload, impl):
    if impl in OPTIONAL_PEERS:
        pytest.importorskip(OPTIONAL_PEERS[impl])
    inputs = workload.inputs("cpu", quick=True)
    benchmark.group = workload.name(quick=True)
    benchmark(workload.impls[impl], **inputs)
