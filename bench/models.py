r"""The benchmark's models and their data: seeded, eval mode, float32, each at a full and a quick size.

Every model maps a batch to logits [N, 10]; the loss is the mean cross-entropy over the class labels y.
Data are fixed by seeds (scikit-learn's digits, pixels / 16, or seeded random draws), so every impl, each
in its own process, sees the same model and the same numbers.

- ``mlp`` (P = 85,002; N = 1024, quick 64): the digits MLP 64-256-256-10, ReLU
  (``fisherext.experiments.demo.build_mlp``), on the digits [N, 64].
- ``mlp_small`` (P = 9,610; N = 256, quick 32): MLP 64-128-10, ReLU, for the dense Fisher (quick:
  64-32-10, P = 2,410), on the digits.
- ``wide_mlp`` (P = 95,410; N = 1024, quick 64): MLP 784-120-10, ReLU, on the digits upsampled to
  28×28 and flattened [N, 784].
- ``cnn`` (P = 10,250; N = 256, quick 16): Conv2d 3→16 (3×3, pad 1), GroupNorm(4, 16), ReLU, Conv2d
  16→32 (3×3, stride 2, pad 1), ReLU, AdaptiveAvgPool2d(4), Linear 512→10, on N(0, 1) images
  [N, 3, 32, 32] with random labels.
- ``convnet`` (P = 38,390; N = 256, quick 16): seed 000's ConvNet, Conv2d 1→10 (5×5), MaxPool 2, ReLU,
  Conv2d 10→20 (5×5), MaxPool 2, ReLU, Dropout2d (eval), Linear 320→100, ReLU, Linear 100→10, on the
  digits upsampled to [N, 1, 28, 28].
- ``transformer`` (P = 9,962; N = 256, quick 16): Embedding(32, 32), one TransformerEncoderLayer
  (d_model 32, 4 heads, feed-forward 64, no dropout, batch_first), LayerNorm, mean over positions,
  Linear 32→10, on random tokens [N, 16] with random labels.
- ``lstm`` (P = 19,594; N = 256, quick 16): LSTM(8 → 64, batch_first), its last hidden state, Linear
  64→10, on each digit as a sequence of its 8 rows of 8 pixels [N, 8, 8].

The batch sizes keep each seed-style loop (N·C backward passes of batch size one) near 2 s a call on
2 cores, so that the loops run on the same inputs as every other impl.

Departures from seed 000's ConvNet, each a bug of the seed: it returns ``log_softmax`` without ``dim``
and feeds it to ``CrossEntropyLoss`` (a second softmax), and it has no nonlinearity between fc1 and fc2;
here the model returns logits and fc1 is followed by a ReLU. MNIST is not on the project's machines, so
the 28×28 inputs are the digits upsampled (bilinear); the labels are the digits'.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import sklearn.datasets  # noqa: F401  (imported here, so that bench.run's fork server imports it once)
import torch
import torch.nn.functional as F
from torch import nn

from fisherext.experiments.demo import build_mlp, load_digits_tensors

CLASSES = 10


@dataclass(frozen=True)
class ModelSpec:
    """A model id, how to build it (seeded, eval), its data and the batch sizes it is measured at.

    ``build(quick)`` returns the model, ``data(N, quick)`` the inputs x [N, ...] and labels y [N];
    ``N`` / ``quick_N`` are the batch sizes of the full run and of ``--quick``.
    """
    id: str
    description: str
    build: Callable[[bool], nn.Module]
    data: Callable[[int, bool], tuple[torch.Tensor, torch.Tensor]]
    N: int
    quick_N: int

    def batch(self, quick: bool) -> int:
        return self.quick_N if quick else self.N


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _tiled(t: torch.Tensor, N: int) -> torch.Tensor:
    """The first N rows, the set repeated where N exceeds it (repeats change nothing timed or checked)."""
    return t.repeat(-(-N // t.shape[0]), *([1] * (t.dim() - 1)))[:N]


@functools.cache
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits, loaded once per process."""
    return load_digits_tensors()


def digits(N: int, quick: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_tensors()
    return _tiled(x, N), _tiled(y, N)


def digit_images(N: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as [N, 1, size, size] images, upsampled bilinearly from 8×8."""
    x, y = digits(N)
    return F.interpolate(x.view(-1, 1, 8, 8), size=(size, size), mode="bilinear", align_corners=False), y


def _random_labels(generator: torch.Generator, N: int) -> torch.Tensor:
    return torch.randint(0, CLASSES, (N,), generator=generator)


# ---- the models ------------------------------------------------------------------------------------

def mlp_small(quick: bool) -> nn.Module:
    hidden = 32 if quick else 128
    return _seeded(0, lambda: nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)))


def wide_mlp(quick: bool) -> nn.Module:
    return _seeded(0, lambda: nn.Sequential(nn.Linear(784, 120), nn.ReLU(), nn.Linear(120, CLASSES)))


def wide_mlp_data(N: int, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digit_images(N, 28)
    return x.flatten(1), y


def cnn(quick: bool) -> nn.Module:
    return _seeded(0, lambda: nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 4 * 4, CLASSES)))


def cnn_data(N: int, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, 32, 32, generator=generator), _random_labels(generator, N)


class ConvNet(nn.Module):
    """Seed 000's MNIST ConvNet, its architecture (see the module docstring for what differs)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.drop2d = nn.Dropout2d(p=0.25)
        self.fc1 = nn.Linear(320, 100)
        self.fc2 = nn.Linear(100, CLASSES)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = self.drop2d(x).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def convnet_data(N: int, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return digit_images(N, 28)


class TransformerClassifier(nn.Module):
    """Building one turns off torch's fused inference path of the encoder layer for the process (it has no
    derivatives, and under torch.func's transforms the parameters do not look trainable to it)."""
    VOCAB, D_MODEL, LENGTH = 32, 32, 16

    def __init__(self):
        super().__init__()
        torch.backends.mha.set_fastpath_enabled(False)
        self.embed = nn.Embedding(self.VOCAB, self.D_MODEL)
        self.encoder = nn.TransformerEncoderLayer(self.D_MODEL, nhead=4, dim_feedforward=64, dropout=0.0,
                                                  batch_first=True)
        self.norm = nn.LayerNorm(self.D_MODEL)
        self.head = nn.Linear(self.D_MODEL, CLASSES)

    def forward(self, tokens):
        return self.head(self.norm(self.encoder(self.embed(tokens))).mean(1))


def transformer_data(N: int, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TransformerClassifier.VOCAB, (N, TransformerClassifier.LENGTH), generator=generator)
    return tokens, _random_labels(generator, N)


class LSTMClassifier(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 64):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def lstm_data(N: int, quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits(N)
    return x.view(-1, 8, 8), y


MODELS: dict[str, ModelSpec] = {spec.id: spec for spec in [
    ModelSpec("mlp", "digits MLP 64-256-256-10", lambda quick: build_mlp(), digits, N=1024, quick_N=64),
    ModelSpec("mlp_small", "MLP 64-128-10 (quick: 64-32-10)", mlp_small, digits, N=256, quick_N=32),
    ModelSpec("wide_mlp", "MLP 784-120-10 on upsampled digits", wide_mlp, wide_mlp_data, N=1024, quick_N=64),
    ModelSpec("cnn", "CNN 3→16 GroupNorm 16→32/2 pool Linear, 32×32", cnn, cnn_data, N=256, quick_N=16),
    ModelSpec("convnet", "seed 000's ConvNet, 28×28", lambda quick: _seeded(0, ConvNet), convnet_data,
              N=256, quick_N=16),
    ModelSpec("transformer", "Embedding + TransformerEncoderLayer(32, 4 heads) + LayerNorm, T = 16",
              lambda quick: _seeded(0, TransformerClassifier), transformer_data, N=256, quick_N=16),
    ModelSpec("lstm", "LSTM 8→64 over the 8 rows of a digit", lambda quick: _seeded(0, LSTMClassifier), lstm_data,
              N=256, quick_N=16),
]}


def math_attention():
    """Attention by the math kernel, for second-order products: torch's fused attention kernels have no
    second derivatives (a no-op for models without attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
