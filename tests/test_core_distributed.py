"""Reductions across ranks (fisherext._core.distributed): with 2 and 4 gloo processes on the CPU, each
streaming its own uneven shard, fisher() in every structure, per-sample traces over a data set, the
streamed curvature products, CG on an operator and influence (CG, exact, LiSSA) equal one process over all the data, in
float64; a rank that raises makes every rank raise; without a process group nothing is reduced."""
import contextlib
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fisherext as fx
from fisherext._core.distributed import all_or_none, all_reduce_sum_, gathered_rows, process_group
from support import assert_close
from support.models import make_data, make_model

# the samples of each rank, uneven
SHARDS = {2: {"mlp": [7, 4], "cnn": [6, 2]}, 4: {"mlp": [3, 1, 5, 2], "cnn": [2, 1, 3, 1]}}
# a collective that waits longer than this for a rank fails the test instead of hanging it
TIMEOUT = datetime.timedelta(seconds=60)


@contextlib.contextmanager
def joined(rank, world, init_file, timeout=TIMEOUT):
    """This process as rank ``rank`` of a gloo group of ``world`` (rendezvous through ``init_file``), left on exit."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def quantities(name, x, y, **kw):
    """Every reduced quantity of model ``name`` on (x, y): fisher() in each structure and kind, per-sample
    traces over the data set, an HVP and a GGN operator product along a fixed direction, CG on the damped
    GGN, and the influence of every training sample on two fixed test points (the same on every rank)."""
    model = make_model(name)
    out = {}
    for structure in ("diag", "full", "block", "kfac"):
        for kind in ("true", "empirical"):
            out[f"{structure}/{kind}"] = fx.fisher(model, (x, y), kind=kind, structure=structure, batch_size=3,
                                                   **kw).dense()
    out["trace"] = fx.per_sample_fisher(model, x, y, batch_size=2)
    out["trace/empirical"] = fx.per_sample_fisher(model, x, y, kind="empirical", batch_size=3)
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out["hvp"] = fx.hvp(model, "cross_entropy", (x, y), v, batch_size=3)
    ggn = fx.GGNOperator(model, "cross_entropy", (x, y), batch_size=3)
    out["ggn"] = ggn @ v
    out["cg"] = fx.solvers.cg(ggn, v, damping=0.5, tol=1e-12, maxiter=100)
    xt, yt = make_data(name, n=2, seed=11)
    influence = fx.InfluenceFunctions(model, "cross_entropy", (x, y), damping=0.5, solver="cg", curvature="ggn",
                                      batch_size=3, solver_kwargs=dict(tol=1e-12, maxiter=200))
    out["influence"] = influence.influence((xt, yt))
    out["num_train"] = torch.tensor(float(influence.num_train), dtype=torch.float64)
    if name == "mlp":
        exact = fx.InfluenceFunctions(model, "cross_entropy", (x, y), damping=0.5, curvature="ggn", batch_size=3)
        out["self_influence"] = exact.self_influence()
        lissa = fx.InfluenceFunctions(model, "cross_entropy", (x, y), damping=0.5, solver="lissa", curvature="ggn",
                                      batch_size=3, solver_kwargs=dict(depth=40))  # its scale by power iteration
        out["lissa"] = lissa.influence((xt, yt))
    return out


def _rank(rank, world, init_file, result_file):
    with joined(rank, world, init_file):
        torch.set_num_threads(1)
        results = {}
        for name, sizes in SHARDS[world].items():
            x, y = make_data(name, n=sum(sizes))
            start = sum(sizes[:rank])
            results[name] = quantities(name, x[start:start + sizes[rank]], y[start:start + sizes[rank]])
        torch.save(results, f"{result_file}.{rank}")


def spawn(fn, world, tmp_path):
    mp.spawn(fn, args=(world, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=world, join=True)
    return [f"{tmp_path / 'result'}.{rank}" for rank in range(world)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_on_uneven_shards_equal_one_process(tmp_path, world, one_thread):
    files = spawn(_rank, world, tmp_path)
    for name, sizes in SHARDS[world].items():
        x, y = make_data(name, n=sum(sizes))
        expected = quantities(name, x, y)
        for file in files:
            got = torch.load(file)[name]
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                assert_close(got[key], value)  # float64: 1e-10 relative to the largest entry


def test_a_single_process_reduces_nothing():
    assert not (dist.is_available() and dist.is_initialized())
    assert process_group() is None and process_group(False) is None
    t = torch.ones(3)
    all_reduce_sum_([t], None)
    assert torch.equal(t, torch.ones(3)) and gathered_rows(t, torch.tensor([3.0]), None) is t
    with all_or_none(None, width=2) as shared:
        shared.values = [4, 2.5]
    assert shared.total(0) == 4 and torch.equal(shared.rows, torch.tensor([[4.0, 2.5]], dtype=torch.float64))
    marker = object()
    assert process_group(marker) is marker                 # a group given is used as it is


def test_the_reduction_is_off_with_group_false(monkeypatch):
    # group=False must never reach torch.distributed, even where a default group would be used
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert process_group() is dist.group.WORLD and process_group(False) is None
    x, y = make_data("mlp", n=5)
    model = make_model("mlp")
    alone = fx.fisher(model, (x, y), structure="diag", group=False).diag()
    monkeypatch.undo()
    assert_close(alone, fx.fisher(model, (x, y), structure="diag").diag())


def _outcome(call) -> str:
    """What ``call()`` did on this rank: "ok", or the type and message of its error."""
    try:
        call()
        return "ok"
    except Exception as err:  # noqa: BLE001 (the test reads every outcome)
        return f"{type(err).__name__}: {err}"


def _mismatched_rank(rank, world, init_file, result_file):
    with joined(rank, world, init_file):
        x, y = make_data("mlp", n=4)
        model = make_model("mlp")
        P = sum(p.numel() for p in model.parameters())
        v = torch.full((P,), 1.0 + rank, dtype=torch.float64)  # a different direction on each rank
        outcomes = {"hvp": _outcome(lambda: fx.hvp(model, "cross_entropy", (x, y), v)),
                    "v-columns": _outcome(lambda: fx.per_sample_fisher(model, x, y, quantity="quad", batch_size=2,
                                                                       v=v[:, None].repeat(1, rank + 1)))}
        if rank == 1:  # this rank's model has one more parameter tensor than rank 0's
            model.extra = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        outcomes["fisher"] = _outcome(lambda: fx.fisher(model, (x, y), structure="diag"))
        torch.save(outcomes, f"{result_file}.{rank}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ranks_with_different_parameters_or_vectors_fail_on_every_rank(tmp_path):
    for file in spawn(_mismatched_rank, 2, tmp_path):
        got = torch.load(file)
        assert got["fisher"].startswith("ValueError: fisherext.fisher: argument 'params' the selected parameters") \
            and "differ across the ranks" in got["fisher"], got
        assert got["hvp"].startswith("ValueError: fisherext.hvp: argument 'v' the vectors") and \
            "differ across the ranks" in got["hvp"], got
        assert got["v-columns"].startswith("ValueError: fisherext.per_sample_fisher: argument 'v' the per-sample "
                                           "values' sizes or dtypes differ across the ranks"), got


def _failing_rank(rank, world, init_file, result_file):
    """Rank 1 raises in its own shard (a label out of range, a shard without samples); rank 0 is fine."""
    with joined(rank, world, init_file):
        x, y = make_data("mlp", n=6)
        model = make_model("mlp")
        P = sum(p.numel() for p in model.parameters())
        v = torch.ones(P, dtype=torch.float64)
        bad = y.clone()
        if rank == 1:
            bad[4] = 1000  # rank 1's sample 4 has a label no class has
        empty = (x, y) if rank == 0 else (x[:0], y[:0])
        calls = {
            "fisher": lambda: fx.fisher(model, (x, bad), kind="empirical", batch_size=2),
            "fisher/kfac": lambda: fx.fisher(model, (x, bad), kind="empirical", structure="kfac"),
            "fisher/empty": lambda: fx.fisher(model, empty),
            "hvp": lambda: fx.hvp(model, "cross_entropy", (x, bad), v, batch_size=2),
            "hvp/empty": lambda: fx.hvp(model, "cross_entropy", empty, v),
            "trace": lambda: fx.per_sample_fisher(model, x, bad, kind="empirical", batch_size=2),
            "influence": lambda: fx.InfluenceFunctions(model, "cross_entropy", (x, bad), damping=0.5,
                                                       curvature="ggn").influence((x[:2], y[:2])),
            "after": lambda: fx.fisher(model, (x, y)),  # the group still works after the failures
        }
        torch.save({k: _outcome(call) for k, call in calls.items()}, f"{result_file}.{rank}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_rank_that_raises_makes_every_rank_raise(tmp_path):
    rank0, rank1 = (torch.load(file) for file in spawn(_failing_rank, 2, tmp_path))
    assert rank0["after"] == rank1["after"] == "ok"
    for call in ("fisher", "fisher/kfac", "hvp", "trace", "influence"):
        kind = rank1[call].split(":", 1)[0]  # rank 1's own error (torch's IndexError where its loss sees the label)
        assert kind in ("ValueError", "IndexError") and "1000" in rank1[call], (call, rank1[call])
        assert rank0[call].startswith(f"RuntimeError: fisherext: rank 1 of the process group's 2 raised {kind}: "), \
            (call, rank0[call])
        assert "1000" in rank0[call], (call, rank0[call])  # rank 1's own message, quoted
    for call in ("fisher/empty", "hvp/empty"):
        assert "argument 'data' no samples" in rank1[call], rank1[call]
        assert rank0[call].startswith("RuntimeError: fisherext: rank 1") and "no samples" in rank0[call], rank0[call]


def _dying_rank(rank, world, init_file, result_file):
    with joined(rank, world, init_file, timeout=datetime.timedelta(seconds=20)):
        x, y = make_data("mlp", n=6)
        model = make_model("mlp")
        if rank == 1:  # the process ends in the middle of its shard, with no exception to share
            model.register_forward_hook(lambda *_: os._exit(3))
        start = time.monotonic()
        message = _outcome(lambda: fx.fisher(model, (x, y), batch_size=2))
        with open(f"{result_file}.{rank}", "w") as f:
            f.write(f"{time.monotonic() - start:.1f}\n{message}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_rank_that_dies_makes_the_others_fail_within_the_timeout(tmp_path):
    context = mp.start_processes(_dying_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2,
                                 join=False, start_method="spawn")
    for process in context.processes:
        process.join(120)
    assert [p.exitcode for p in context.processes] == [0, 3]
    seconds, message = open(f"{tmp_path / 'result'}.0").read().split("\n", 1)
    assert message != "ok" and float(seconds) < 20 + 10, (seconds, message)


def _ddp_rank(rank, world, init_file, result_file):
    with joined(rank, world, init_file):
        x, y = make_data("mlp", n=7)
        x, y = (x[:4], y[:4]) if rank == 0 else (x[4:], y[4:])
        model = make_model("mlp")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        P = sum(p.numel() for p in model.parameters())
        v = torch.randn(P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        results = {f"{s}/{m}": fx.fisher(net, (x, y), structure=s).dense()
                   for s in ("diag", "kfac") for m, net in (("ddp", ddp), ("plain", model))}
        results["hvp/ddp"] = fx.hvp(ddp, "cross_entropy", (x, y), v)
        results["hvp/plain"] = fx.hvp(model, "cross_entropy", (x, y), v)
        torch.save(results, f"{result_file}.{rank}")
        del ddp  # before the group goes: DDP's reducer holds it


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_ddp_wrapped_model_gives_the_wrapped_models_results(tmp_path):
    spawn(_ddp_rank, 2, tmp_path)
    x, y = make_data("mlp", n=7)
    whole = {s: fx.fisher(make_model("mlp"), (x, y), structure=s).dense() for s in ("diag", "kfac")}
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'result'}.{rank}")
        for s in ("diag", "kfac"):
            assert_close(got[f"{s}/ddp"], got[f"{s}/plain"])
            assert_close(got[f"{s}/ddp"], whole[s])          # and both are the Fisher of all 7 samples
        assert_close(got["hvp/ddp"], got["hvp/plain"])


def _fsdp_rank(rank, world, init_file, result_file):
    with joined(rank, world, init_file):
        from torch.distributed.fsdp import fully_shard

        x, y = make_data("mlp", n=4)
        model = make_model("mlp")
        fully_shard(model)  # FSDP2: every parameter becomes a DTensor holding this rank's slice
        P = sum(p.numel() for p in model.parameters())
        outcomes = {"fisher": _outcome(lambda: fx.fisher(model, (x, y))),
                    "hvp": _outcome(lambda: fx.hvp(model, "cross_entropy", (x, y), torch.ones(P, dtype=torch.float64)))}
        torch.save(outcomes, f"{result_file}.{rank}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_an_fsdp_sharded_model_is_refused_with_what_to_do(tmp_path):
    for file in spawn(_fsdp_rank, 2, tmp_path):
        for call, message in torch.load(file).items():
            assert message.startswith(f"ValueError: fisherext.{call}: argument 'model' its parameters are sharded by "
                                      "FSDP") and "DistributedDataParallel" in message, message


def _counting_rank(rank, world, init_file, result_file):
    with joined(rank, world, init_file):
        x, y = make_data("mlp", n=6)
        x, y = x[3 * rank:3 * rank + 3], y[3 * rank:3 * rank + 3]
        model = make_model("mlp")
        P = sum(p.numel() for p in model.parameters())
        v = torch.ones(P, dtype=torch.float64)
        calls = {"fisher/diag": lambda: fx.fisher(model, (x, y), batch_size=2),
                 "fisher/kfac": lambda: fx.fisher(model, (x, y), structure="kfac"),
                 "fisher/float32-kfac": lambda: fx.fisher(make_model("mlp", dtype=torch.float32), (x.float(), y),
                                                          structure="kfac"),
                 "hvp": lambda: fx.hvp(model, "cross_entropy", (x, y), v, batch_size=2),
                 "trace": lambda: fx.per_sample_fisher(model, x, y, batch_size=2)}
        counts = {}
        for name, call in calls.items():
            made = []
            originals = {op: getattr(dist, op) for op in ("all_reduce", "all_gather", "broadcast_object_list")}
            for op, fn in originals.items():
                setattr(dist, op, (lambda op, fn: lambda *a, **k: (made.append(op), fn(*a, **k))[1])(op, fn))
            try:
                call()
            finally:
                for op, fn in originals.items():
                    setattr(dist, op, fn)
            counts[name] = made
        torch.save(counts, f"{result_file}.{rank}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_call_makes_two_collectives(tmp_path):
    """One all-gather (every rank's outcome, counts and fingerprints), then the reduction itself: one
    collective per dtype of the sums (the float32 K-FAC factors and their float64 row counts: two)."""
    for file in spawn(_counting_rank, 2, tmp_path):
        counts = torch.load(file)
        assert counts == {"fisher/diag": ["all_gather", "all_reduce"], "fisher/kfac": ["all_gather", "all_reduce"],
                          "fisher/float32-kfac": ["all_gather", "all_reduce", "all_reduce"],
                          "hvp": ["all_gather", "all_reduce"], "trace": ["all_gather", "all_gather"]}, counts


def _sampler_rank(rank, world, init_file, result_file):
    with joined(rank, world, init_file):
        x, y = make_data("mlp", n=10)
        model = make_model("mlp")
        dataset = torch.utils.data.TensorDataset(x, y)
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False, drop_last=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler)
        torch.save({"diag": fx.fisher(model, loader).diag(), "trace": fx.per_sample_fisher(model, loader)},
                   f"{result_file}.{rank}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_distributed_sampler_gives_the_whole_data_sets_fisher(tmp_path):
    """DistributedSampler hands rank r the samples r, r + W, ...: the Fisher is that of all samples, and the
    per-sample values come rank by rank."""
    x, y = make_data("mlp", n=10)
    model = make_model("mlp")
    order = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    for file in spawn(_sampler_rank, 2, tmp_path):
        got = torch.load(file)
        assert_close(got["diag"], fx.fisher(model, (x, y)).diag())
        assert_close(got["trace"], fx.per_sample_fisher(model, x)[order])
