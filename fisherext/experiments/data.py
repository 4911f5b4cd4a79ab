"""The suite's data and models: scikit-learn's digits (embedded: they ship with scikit-learn, so the suite
runs offline on a fresh machine), MNIST and CIFAR-10 through torchvision when a user has them on disk,
seeded train/test splits, small classifiers, and one seeded training loop."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DATASETS = ("digits", "mnist", "cifar10")


class DataUnavailable(ValueError):
    """A data set the run asked for is not on this machine (the message says where it was looked for)."""


@dataclass(frozen=True)
class Split:
    """A classification data set split into train and test: inputs as float32 images [N, C, H, W] scaled
    to [0, 1] (``flat`` gives [N, C·H·W]), integer labels [N]."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def features(self) -> int:
        return self.x_train[0].numel()

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def to(self, device) -> Split:
        return Split(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                     self.y_test.to(device), self.classes)

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Split:
        """The first n_train / n_test samples of each part (the split is already shuffled)."""
        return Split(self.name, self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test],
                     self.y_test[:n_test], self.classes)


def digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """scikit-learn's 1797 digits, 8×8 pixels / 16 as [N, 1, 8, 8], shuffled by ``seed``, the last
    ``test_fraction`` for testing."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.as_tensor(data.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = int(round(test_fraction * x.shape[0]))
    return Split("digits", x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:], 10)


def _torchvision(name: str, root: str) -> Split:
    try:
        import torchvision
    except ImportError as exc:
        raise DataUnavailable(f"data: {name} needs torchvision (pip install torchvision)") from exc
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        train, test = cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataUnavailable(f"data: {name} is not under {os.path.abspath(root)!r} ({exc}); put torchvision's "
                              f"copy there (it is never downloaded), or use the embedded digits") from exc

    def tensors(ds):
        x = torch.as_tensor(ds.data)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x.float() / 255.0, torch.as_tensor(ds.targets, dtype=torch.long)

    (xa, ya), (xb, yb) = tensors(train), tensors(test)
    return Split(name, xa, ya, xb, yb, 10)


def load(name: str = "digits", *, seed: int = 0, data_root: str | None = None) -> Split:
    """A data set by name: "digits" (embedded), or "mnist" / "cifar10" from torchvision's files under
    ``data_root``; :class:`DataUnavailable` when they are not there."""
    if name not in DATASETS:
        raise ValueError(f"data: unknown data set {name!r}; choose one of {list(DATASETS)}")
    if name == "digits":
        return digits(seed)
    if data_root is None:
        raise DataUnavailable(f"data: {name} needs --data-root, the folder holding torchvision's copy of it")
    return _torchvision(name, data_root)


def mlp(sizes, *, seed: int = 0, activation=nn.ReLU) -> nn.Sequential:
    """A seeded MLP on flattened inputs: Flatten, then Linear layers of ``sizes`` (in, hidden..., out) with
    ``activation`` between them; the global random state is left as it was."""
    layers: list[nn.Module] = [nn.Flatten()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, lr: float = 0.1,
          batch_size: int = 64, momentum: float = 0.9, weight_decay: float = 0.0,
          generator: torch.Generator | None = None, optimizer: torch.optim.Optimizer | None = None,
          penalty: Callable[[], torch.Tensor] | None = None) -> list[float]:
    """Mini-batch training of ``model`` on (x, y) with cross entropy (SGD with ``lr``, ``momentum`` and
    ``weight_decay`` unless an ``optimizer`` is given), batches drawn by ``generator``, ``penalty()`` (e.g. an
    EWC penalty) added to every batch's loss; the mean training loss (cross entropy alone) of each epoch. The
    model is left in eval mode."""
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    model.train()
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(x.shape[0], generator=generator).split(batch_size):
            idx = idx.to(x.device)
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            (loss if penalty is None else loss + penalty()).backward()
            opt.step()
            total += loss.item() * idx.numel()
        losses.append(total / x.shape[0])
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).double().mean().item()
