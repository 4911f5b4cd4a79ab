"""Accumulation of per-sample terms into fisher()'s structures: K-FAC of convolutions against an explicit
per-sample reference (torch's own unfold of each sample's input, autograd output gradients)."""
import pytest
import torch
from torch import nn

import fisherext as fx
from support import assert_close
from support.models import kfac_dense, reference_kfac_factors


def conv_net(nd):
    torch.manual_seed(3)
    conv = nn.Conv1d if nd == 1 else nn.Conv2d
    return nn.Sequential(
        conv(2, 3, 3, padding=1), nn.Tanh(),
        conv(3, 4, 2, stride=2, dilation=1, bias=False), nn.Tanh(),
        conv(4, 2, 3, padding=2, dilation=2), nn.Flatten(), nn.LazyLinear(3),
    ).double().eval()


def conv_data(nd, n=5):
    g = torch.Generator().manual_seed(nd)
    shape = (n, 2, 7) if nd == 1 else (n, 2, 6, 5)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("nd", [1, 2])
def test_conv_kfac_equals_the_unfolded_reference(nd, kind, device):
    x, y = conv_data(nd)
    model = conv_net(nd)
    model(x)  # materializes the lazy layer
    A, G = reference_kfac_factors(model, x, y, kind, "cross_entropy")          # on the CPU
    expected = kfac_dense(model, A, {k: v.mean(0) for k, v in G.items()}).to(device)
    F = fx.fisher(model.to(device), (x.to(device), y.to(device)), kind=kind, structure="kfac", batch_size=2)
    assert_close(F.dense(), expected)


def test_conv_kfac_is_not_the_exact_block(device):
    # the Kronecker factorization is an approximation for more than one position: the test above would
    # pass vacuously if fisher() returned exact blocks
    nd = 2
    x, y = conv_data(nd)
    model = conv_net(nd)
    model(x)
    model.to(device)
    x, y = x.to(device), y.to(device)
    kfac = fx.fisher(model, (x, y), kind="true", structure="kfac").dense()
    block = fx.fisher(model, (x, y), kind="true", structure="block").dense()
    assert (kfac - block).abs().max() > 1e-3 * block.abs().max()
