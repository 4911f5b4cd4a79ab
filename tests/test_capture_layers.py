"""The layer registry's building blocks, each against torch's own implementation: the N-d unfold against
convolutions, the step-by-step recurrent layers against nn.RNN/LSTM/GRU, and attention's body run without
its dispatch check against F.multi_head_attention_forward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherext._core.recurrent import STEPWISE
from fisherext.capture.layers import DESCEND, unfold
from fisherext.capture.layers.conv import _same_padding

D64 = torch.float64


@pytest.mark.parametrize("nd,kernel,stride,padding,dilation", [
    (1, (3,), (2,), (1,), (1,)),
    (1, (4,), (1,), (0,), (2,)),
    (2, (3, 2), (1, 2), (1, 0), (2, 1)),
    (3, (2, 3, 1), (1, 2, 1), (1, 0, 2), (1, 1, 2)),
    (3, (3, 3, 3), (2, 2, 2), (0, 0, 0), (1, 2, 1)),
])
def test_unfold_times_the_weight_is_the_convolution(nd, kernel, stride, padding, dilation, device):
    g = torch.Generator().manual_seed(nd)
    x = torch.randn(2, 3, *([7] * nd), generator=g, dtype=D64).to(device)
    w = torch.randn(4, 3, *kernel, generator=g, dtype=D64).to(device)
    conv = getattr(F, f"conv{nd}d")(x, w, stride=stride, padding=padding, dilation=dilation)
    patches = unfold(x, kernel, stride, [(p, p) for p in padding], dilation)   # [B, L, C·Πk]
    got = (patches @ w.flatten(1).T).transpose(1, 2).reshape(conv.shape)
    torch.testing.assert_close(got, conv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,dilation", [((4,), (1,)), ((3, 4), (2, 1)), ((2, 2, 3), (1, 3, 1))])
def test_same_padding_matches_torch(kernel, dilation, device):
    nd = len(kernel)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, *([6] * nd), generator=g, dtype=D64).to(device)
    w = torch.randn(3, 2, *kernel, generator=g, dtype=D64).to(device)
    conv = getattr(F, f"conv{nd}d")(x, w, padding="same", dilation=dilation)
    patches = unfold(x, kernel, (1,) * nd, _same_padding(kernel, dilation), dilation)
    torch.testing.assert_close((patches @ w.flatten(1).T).transpose(1, 2).reshape(conv.shape), conv,
                               rtol=1e-12, atol=1e-12)


RECURRENT = [
    lambda: nn.RNN(3, 4, num_layers=2, nonlinearity="tanh"),
    lambda: nn.RNN(3, 4, nonlinearity="relu", bias=False, batch_first=True),
    lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True),
    lambda: nn.GRU(3, 5, batch_first=True),
    lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True),
    lambda: nn.LSTM(3, 6, proj_size=2),
    lambda: nn.LSTM(3, 4, bias=False, proj_size=3, bidirectional=True),
]


@pytest.mark.parametrize("build", RECURRENT, ids=["rnn2", "relu", "gru-bi2", "gru-bf", "lstm-bi2", "lstm-proj",
                                                  "lstm-nobias-proj-bi"])
def test_stepwise_recurrent_layers_equal_torch(build, device):
    torch.manual_seed(0)
    module = build().double().eval().to(device)
    x = torch.randn(5, 2, 3, dtype=D64).to(device)  # [T, B, I] or [B, T, I]: both shapes are valid inputs
    expected = module(x)
    calls = []

    from torch.overrides import TorchFunctionMode

    class Stepwise(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in STEPWISE:
                calls.append(func)
                return STEPWISE[func](*args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Stepwise():
        got = module(x)
    assert calls, "the fused recurrent call was not seen"
    flat = lambda o: [t for part in o for t in (part if isinstance(part, tuple) else (part,))]  # noqa: E731
    for a, b in zip(flat(got), flat(expected)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", ["self", "cross", "separate"])
def test_attention_body_equals_torch(case, batch_first, device):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(6, 2, batch_first=batch_first, kdim=None if case != "separate" else 4,
                                vdim=None if case != "separate" else 4).double().eval().to(device)
    q = torch.randn(3, 5, 6, dtype=D64).to(device)
    k = q if case == "self" else torch.randn(3, 4, 6 if case == "cross" else 4, dtype=D64).to(device)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    mask = torch.zeros(3, k.shape[1 if batch_first else 0], dtype=torch.bool, device=device)
    mask[0, -1] = True
    expected = mha(q, k, k, key_padding_mask=mask)
    body = DESCEND[F.multi_head_attention_forward]
    original = F.multi_head_attention_forward
    try:
        F.multi_head_attention_forward = body
        got = mha(q, k, k, key_padding_mask=mask)
    finally:
        F.multi_head_attention_forward = original
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
