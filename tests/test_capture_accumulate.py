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


class GroupedSame(nn.Module):
    """A grouped convolution with padding="same" of an even kernel (an odd total: one more on the right)
    and a dilated, grouped one without bias, then a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv1 = nn.Conv2d(4, 6, (2, 3), padding="same", groups=2)
        self.conv2 = nn.Conv2d(6, 4, 2, dilation=2, stride=(2, 1), groups=2, bias=False)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).flatten(1))


def _explicit_conv_kron(model, conv, x, y, kind):
    """G_g ⊗ A_g of each group of ``conv``, from an unfold of its whole batch input (A: all rows and
    positions, whatever sample they belong to) and, per sample and class, the autograd gradient of that
    sample's loss at the convolution's output (G): [(rows of the weight, G ⊗ A)] per group."""
    seen = {}
    handle = conv.register_forward_hook(lambda m, inp, out: seen.update(a=inp[0], z=out))
    try:
        logp = torch.log_softmax(model(x), -1)
    finally:
        handle.remove()
    a, z = seen["a"], seen["z"]
    if conv.padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(conv.kernel_size, conv.dilation)]
        a = nn.functional.pad(a, [p for pair in reversed(pads) for p in pair])
        padding = 0
    else:
        padding = conv.padding
    U = nn.functional.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    groups, O = conv.groups, conv.out_channels
    N = x.shape[0]
    out = []
    for g, Ug in enumerate(U.chunk(groups, 1)):                     # [B, C/G·Πk, L]
        rows = Ug.transpose(1, 2).reshape(-1, Ug.shape[1])
        if conv.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
        A = rows.T @ rows / rows.shape[0]
        G = 0
        for n in range(N):
            classes = range(logp.shape[1]) if kind == "true" else [int(y[n])]
            for c in classes:
                w = logp[n, c].exp().detach() if kind == "true" else 1.0
                dz = torch.autograd.grad(-logp[n, c], z, retain_graph=True)[0]
                d = dz.chunk(groups, 1)[g].flatten(2).transpose(1, 2).reshape(-1, O // groups)
                G = G + w * d.T @ d
        out.append((g * (O // groups), torch.kron(G / N, A)))
    return out


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("case", ["grouped_same", "frames", "frames_minor"])
def test_conv_kfac_from_whole_batch_patches(case, kind, device):
    """K-FAC's factors of convolutions, taken from the patches and output gradients of the whole batch:
    groups, "same" padding with an odd total, no bias, and frames folded into the batch (a sample owns
    several rows of it, sample-major or frame-major)."""
    from support.zoo import FramesCNN
    torch.manual_seed(0)
    if case == "grouped_same":
        model, x = GroupedSame().double().eval(), torch.randn(4, 4, 5, 6, dtype=torch.float64)
        convs = [model.conv1, model.conv2]
    else:
        model = FramesCNN(frame_major=case == "frames_minor").double().eval()
        x = torch.randn(4, FramesCNN.FRAMES, 2, 4, 4, dtype=torch.float64)
        convs = [model.conv]
    y = torch.randint(0, 3, (x.shape[0],))
    model(x)
    expected = {conv: _explicit_conv_kron(model, conv, x, y, kind) for conv in convs}
    F = fx.fisher(model.to(device), (x.to(device), y.to(device)), kind=kind, structure="kfac", batch_size=3)
    offsets, o = {}, 0
    for p in model.parameters():
        offsets[p], o = o, o + p.numel()
    parts = {int(part.idx[0, 0]): part for part in F.parts if part.kind == "kron"}
    for conv, groups in expected.items():
        cols = conv.weight[0].numel()
        for row0, GA in groups:
            part = parts[offsets[conv.weight] + row0 * cols]
            assert part.idx.shape == (conv.out_channels // conv.groups, cols + (conv.bias is not None))
            assert_close(torch.kron(part.G, part.A), GA.to(device))
