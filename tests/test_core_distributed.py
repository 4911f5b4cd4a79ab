"""Reductions across ranks (fisherext._core.distributed): with 2 gloo processes on the CPU, each streaming
its own uneven shard, fisher() in every structure and the streamed curvature products equal one process
over all the data, in float64; without a process group nothing is reduced."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fisherext as fx
from fisherext._core.distributed import all_reduce_count, all_reduce_sum_, process_group
from support import assert_close
from support.models import make_data, make_model

SHARDS = {"mlp": [7, 4], "cnn": [6, 2]}     # uneven: the samples of rank 0, rank 1


def quantities(name, x, y, **kw):
    """Every reduced quantity of model ``name`` on (x, y): fisher() in each structure and kind, an HVP and a
    GGN operator product along a fixed direction."""
    model = make_model(name)
    out = {}
    for structure in ("diag", "full", "block", "kfac"):
        for kind in ("true", "empirical"):
            out[f"{structure}/{kind}"] = fx.fisher(model, (x, y), kind=kind, structure=structure, batch_size=3,
                                                   **kw).dense()
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out["hvp"] = fx.hvp(model, "cross_entropy", (x, y), v, batch_size=3)
    out["ggn"] = fx.GGNOperator(model, "cross_entropy", (x, y), batch_size=3) @ v
    return out


def _rank(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = {}
        for name, sizes in SHARDS.items():
            x, y = make_data(name, n=sum(sizes))
            start = sum(sizes[:rank])
            results[name] = quantities(name, x[start:start + sizes[rank]], y[start:start + sizes[rank]])
        torch.save(results, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_on_uneven_shards_equal_one_process(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2, join=True)
    for name, sizes in SHARDS.items():
        x, y = make_data(name, n=sum(sizes))
        expected = quantities(name, x, y)
        for rank in range(2):
            got = torch.load(f"{tmp_path / 'result'}.{rank}")[name]
            for key, value in expected.items():
                assert_close(got[key], value)  # float64: 1e-10 relative to the largest entry


def test_a_single_process_reduces_nothing():
    assert not (dist.is_available() and dist.is_initialized())
    assert process_group() is None and process_group(False) is None
    t = torch.ones(3)
    all_reduce_sum_([t], None)
    assert torch.equal(t, torch.ones(3)) and all_reduce_count(5, None) == 5
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


def _mismatched_rank(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = make_data("mlp", n=4)
        model = make_model("mlp")
        if rank == 1:  # this rank's model has one more parameter tensor than rank 0's
            model.extra = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        try:
            fx.fisher(model, (x, y), structure="diag")
            message = "no error"
        except ValueError as err:
            message = str(err)
        with open(f"{result_file}.{rank}", "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ranks_with_different_parameters_fail_on_every_rank_up_front(tmp_path):
    mp.spawn(_mismatched_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2, join=True)
    for rank in range(2):
        message = open(f"{tmp_path / 'result'}.{rank}").read()
        assert message.startswith("fisherext.fisher: argument 'params' the selected parameters") and \
            "differ across the ranks" in message, message


def _ddp_rank(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
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
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_ddp_wrapped_model_gives_the_wrapped_models_results(tmp_path):
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=2, join=True)
    x, y = make_data("mlp", n=7)
    whole = {s: fx.fisher(make_model("mlp"), (x, y), structure=s).dense() for s in ("diag", "kfac")}
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'result'}.{rank}")
        for s in ("diag", "kfac"):
            assert_close(got[f"{s}/ddp"], got[f"{s}/plain"])
            assert_close(got[f"{s}/ddp"], whole[s])          # and both are the Fisher of all 7 samples
        assert_close(got["hvp/ddp"], got["hvp/plain"])
