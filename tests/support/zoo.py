"""The model zoo: the patterns real models are made of, as small seeded float64 models in eval mode.

Each model isolates (or, for `mixed`, combines) a pattern that a hook-based capture engine gets wrong
silently: in-place ops that overwrite a captured output, tied weights used by two modules or twice by
one, layouts where dim 0 is not the batch (sequence-first tensors, buffers broadcast over the batch,
[N·T, D] reshapes), parametrized modules without a rule called with keyword arguments, modules whose
forward never runs (an unused head, nn.MultiheadAttention.out_proj), attention with padding masks,
padding_idx embeddings, the less common convolutions, recurrent layers, and outputs with position
axes ([N, T, C] language models, [N, C, H, W] segmentation) with ignored labels.

ZOO maps a name to a ZooModel; zoo_model(name) and zoo_data(name) build the seeded model and data.
The references (tests/support/oracles.py) and the tests (tests/test_zoo.py) read only this registry.
Nothing here calls fisherext.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # the default ignore_index of fisherext and of F.cross_entropy


# --------------------------------------------------------------------------------------------------
# 1. In-place ops
# --------------------------------------------------------------------------------------------------

class InplaceMLP(nn.Module):
    """Linear -> ReLU(inplace) -> Linear -> ReLU(inplace) -> Linear. The in-place ReLU overwrites the
    Linear's output: an engine that keeps that tensor (from a forward hook) as the point to backpropagate
    to, or reads its values later, sees the post-activation tensor instead. `inplace=False` builds the
    same function out of place (the twin the KFAC reference runs on)."""

    def __init__(self, i=6, h=8, o=4, inplace=True):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(i, h), nn.ReLU(inplace=inplace)
        self.fc2, self.act2 = nn.Linear(h, h), nn.ReLU(inplace=inplace)
        self.fc3 = nn.Linear(h, o)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class InplaceCNN(nn.Module):
    """Conv2d -> BatchNorm2d (eval, randomized statistics and affine) -> ReLU(inplace) -> Linear: the
    in-place ReLU overwrites the BatchNorm output, which holds that layer's per-sample factors."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 5 * 5, classes)

    def forward(self, x):  # x [N, 2, 5, 5]
        return self.fc(self.act(self.bn(self.conv(x))).flatten(1))


class ResidualInplace(nn.Module):
    """A ResNet basic block: conv-bn-relu(inplace)-conv-bn, then `out += identity` and ReLU(inplace):
    the in-place add modifies the second BatchNorm's output after its hook ran."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3 * 4 * 4, classes)

    def forward(self, x):  # x [N, 2, 4, 4]
        identity = self.relu(self.bn0(self.stem(x)))
        out = self.relu(self.bn1(self.conv1(identity)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.fc(self.relu(out).flatten(1))


# --------------------------------------------------------------------------------------------------
# 2. Tied weights
# --------------------------------------------------------------------------------------------------

class TwiceOverSequence(nn.Module):
    """One Linear applied twice to a sequence [N, T, D] (with a residual between the uses): its
    per-sample gradient is the sum over both calls and all positions; a hook that keeps only the last
    call, or pairs the inputs of one call with the output gradients of the other, is wrong."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x [N, T, D]
        h = self.fc(x)
        h = self.fc(torch.tanh(h)) + h
        return self.head(torch.tanh(h).mean(1))


class SharedParameter(nn.Module):
    """Two modules sharing one Parameter (`b.weight = a.weight`), each with its own bias:
    named_parameters lists the shared weight once (as a.weight), and its gradient sums both uses."""

    def __init__(self, d=5, classes=3):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TiedEmbeddingLM(nn.Module):
    """Embedding(padding_idx=0) -> Linear -> tanh -> F.linear(h, emb.weight) + bias: outputs [N, T, V].
    The embedding weight is used by the lookup (whose padding row gets no gradient from it) and as the
    output projection (where row 0 does get a gradient); the output has a position axis with ignored
    labels. Run with T == N to catch batch/position mix-ups."""

    VOCAB = 9

    def __init__(self, d=5):
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.out_bias = nn.Parameter(torch.zeros(self.VOCAB))

    def forward(self, x):  # x [N, T] long
        h = torch.tanh(self.mix(self.emb(x)))
        return F.linear(h, self.emb.weight, self.out_bias)


# --------------------------------------------------------------------------------------------------
# 3. Layouts
# --------------------------------------------------------------------------------------------------

class SequenceFirst(nn.Module):
    """Takes [N, T, D], transposes to the sequence-first [T, N, D] and applies a Linear there (dim 0 is
    T, not the batch), then either pools over T to [N, C] (`per_position=False`) or applies a second
    Linear and transposes back to per-position outputs [N, T, O]."""

    def __init__(self, d=4, h=5, o=3, per_position=False):
        super().__init__()
        self.proj = nn.Linear(d, h)
        self.head = nn.Linear(h, o)
        self.per_position = per_position

    def forward(self, x):  # x [N, T, D]
        h = torch.tanh(self.proj(x.transpose(0, 1)))       # [T, N, H]
        if self.per_position:
            return self.head(h).transpose(0, 1)             # [N, T, O]
        return self.head(h.mean(0))                         # [N, O]


class BufferBroadcast(nn.Module):
    """`x + pos_fc(pos_buf)`: a Linear applied to a buffer [T, D] that has no batch axis; its output is
    broadcast over the batch, so the per-sample gradient of pos_fc is not a slice of its batch gradient."""

    T, D = 4, 4

    def __init__(self, classes=3):
        super().__init__()
        self.register_buffer("pos_buf", torch.randn(self.T, self.D))
        self.pos_fc = nn.Linear(self.D, self.D)
        self.body = nn.Linear(self.D, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, x):  # x [N, T, D]
        h = x + self.pos_fc(self.pos_buf)
        return self.head(torch.tanh(self.body(h)).mean(1))


class FlattenTokens(nn.Module):
    """Reshapes [N, T, D] to [N*T, D] before a Linear and back after: the Linear sees N*T rows."""

    def __init__(self, d=4, h=5, o=3):
        super().__init__()
        self.fc = nn.Linear(d, h)
        self.head = nn.Linear(h, o)

    def forward(self, x):  # x [N, T, D]
        N, T, D = x.shape
        h = torch.tanh(self.fc(x.reshape(N * T, D))).reshape(N, T, -1)
        return self.head(h.mean(1))


# --------------------------------------------------------------------------------------------------
# 4. A parametrized module without a rule, called with keyword arguments
# --------------------------------------------------------------------------------------------------

class FiLM(nn.Module):
    """h * (1 + gamma_scale * gamma) + beta: no hook rule knows it (the torch.func fallback must run it),
    and it is called with a keyword argument that the fallback must pass on."""

    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(d))
        self.beta = nn.Parameter(torch.zeros(d))

    def forward(self, h, *, gamma_scale=1.0):
        return h * (1 + gamma_scale * self.gamma) + self.beta


class FiLMNet(nn.Module):
    def __init__(self, d=5, classes=3):
        super().__init__()
        self.fc = nn.Linear(4, d)
        self.film = FiLM(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.relu(self.film(self.fc(x), gamma_scale=2.0)))


# --------------------------------------------------------------------------------------------------
# 5. A module whose forward never runs
# --------------------------------------------------------------------------------------------------

class UnusedHead(nn.Module):
    """An auxiliary head that is selected (it has parameters) but never called: its Fisher rows are 0."""

    def __init__(self, classes=3):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, classes)
        self.aux_head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


# --------------------------------------------------------------------------------------------------
# 6. Attention (the out_proj of nn.MultiheadAttention is never called: its weight is used functionally)
# --------------------------------------------------------------------------------------------------

def padded_tokens(d, length):
    """Inputs [N, length, d + 1] for the attention models: d features and a last channel that flags a
    padded position (1.0), 0, 1 or 2 trailing positions per sample (never all of them)."""

    def make(g, n):
        x = torch.randn(n, length, d + 1, generator=g, dtype=torch.float64)
        x[..., d] = 0.0
        for i in range(n):
            pad = i % 3
            if pad:
                x[i, length - pad:, d] = 1.0
        return x

    return make


def masked_mean(h, pad):
    """Mean of h [N, L, E] over the positions that are not padded (pad [N, L] bool)."""
    keep = (~pad).to(h.dtype)[..., None]
    return (h * keep).sum(1) / keep.sum(1)


def seq_axis(t, batch_first):
    """A batch-first tensor in the layout a module built with `batch_first` expects, and back."""
    return t if batch_first else t.transpose(0, 1)


class AttentionClassifier(nn.Module):
    """nn.MultiheadAttention with a key_padding_mask, over inputs from padded_tokens(D, L).

    mode "self": q = k = v = inp(x), masked mean over the positions (need_weights=False: the SDPA path);
    "cross_kv": the first TQ positions query the rest, key == value (the default need_weights path);
    "cross_kdim": key != value with kdim and vdim different from embed_dim (separate q/k/v projection
    weights instead of in_proj_weight). `batch_first=False` feeds the module [L, N, E] tensors."""

    D, E, TQ = 4, 6, 2

    def __init__(self, mode, batch_first, classes=3):
        super().__init__()
        D, E = self.D, self.E
        self.mode, self.batch_first = mode, batch_first
        self.inp = nn.Linear(D, E)
        if mode == "cross_kdim":
            self.kproj, self.vproj = nn.Linear(D, 3), nn.Linear(D, 5)
            self.attn = nn.MultiheadAttention(E, 2, kdim=3, vdim=5, batch_first=batch_first)
        else:
            self.mem = nn.Linear(D, E) if mode == "cross_kv" else None
            self.attn = nn.MultiheadAttention(E, 2, batch_first=batch_first)
        self.head = nn.Linear(E, classes)

    def forward(self, x):
        feats, pad = x[..., :self.D], x[..., self.D] > 0.5
        bf = self.batch_first
        if self.mode == "self":
            h = seq_axis(self.inp(feats), bf)
            out, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
            return self.head(masked_mean(seq_axis(out, bf), pad))
        q = seq_axis(self.inp(feats[:, :self.TQ]), bf)
        mem, mem_pad = feats[:, self.TQ:], pad[:, self.TQ:]
        if self.mode == "cross_kv":
            k = v = seq_axis(self.mem(mem), bf)
        else:
            k, v = seq_axis(self.kproj(mem), bf), seq_axis(self.vproj(mem), bf)
        out, _ = self.attn(q, k, v, key_padding_mask=mem_pad)
        return self.head(seq_axis(out, bf).mean(1))


def causal_mask(T, device=None):
    """[T, T] bool, True above the diagonal (a position may not attend to later ones)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


def transformer_layer(cls, width, batch_first, norm_first=False, ff=8):
    """A 2-head nn.TransformerEncoderLayer / nn.TransformerDecoderLayer with dropout 0.1, as real models
    have it (inactive in eval mode; the refusal tests put it in train mode)."""
    return cls(width, 2, dim_feedforward=ff, dropout=0.1, batch_first=batch_first, norm_first=norm_first)


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoderLayer (dropout 0.1, inactive in eval) with a src_key_padding_mask, masked
    mean pooling; inputs from padded_tokens(D, L)."""

    D, E = 4, 6

    def __init__(self, batch_first, norm_first, classes=3):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(self.D, self.E)
        self.layer = transformer_layer(nn.TransformerEncoderLayer, self.E, batch_first, norm_first)
        self.head = nn.Linear(self.E, classes)

    def forward(self, x):
        feats, pad = x[..., :self.D], x[..., self.D] > 0.5
        h = self.layer(seq_axis(self.inp(feats), self.batch_first), src_key_padding_mask=pad)
        return self.head(masked_mean(seq_axis(h, self.batch_first), pad))


class DecoderClassifier(nn.Module):
    """nn.TransformerDecoderLayer: the first TQ positions are the target (causal tgt_mask), the rest the
    memory (memory_key_padding_mask); mean over the target positions."""

    D, E, TQ = 4, 6, 3

    def __init__(self, batch_first, norm_first, classes=3):
        super().__init__()
        self.batch_first = batch_first
        self.tgt_in = nn.Linear(self.D, self.E)
        self.mem_in = nn.Linear(self.D, self.E)
        self.layer = transformer_layer(nn.TransformerDecoderLayer, self.E, batch_first, norm_first)
        self.head = nn.Linear(self.E, classes)

    def forward(self, x):
        feats, pad = x[..., :self.D], x[..., self.D] > 0.5
        bf = self.batch_first
        tgt = seq_axis(self.tgt_in(feats[:, :self.TQ]), bf)
        mem = seq_axis(self.mem_in(feats[:, self.TQ:]), bf)
        h = self.layer(tgt, mem, tgt_mask=causal_mask(self.TQ, x.device), memory_key_padding_mask=pad[:, self.TQ:])
        return self.head(seq_axis(h, bf).mean(1))


# --------------------------------------------------------------------------------------------------
# 7. padding_idx
# --------------------------------------------------------------------------------------------------

def tokens(T, vocab):
    """Token ids [N, T] in [0, vocab) that always contain the padding index 0 (at the last position of
    even samples and the first of odd ones, besides random draws)."""

    def make(g, n):
        x = torch.randint(1, vocab, (n, T), generator=g)
        x[::2, -1] = 0
        x[1::2, 0] = 0
        x[0, 1] = 0
        return x

    return make


class PaddedEmbeddingClassifier(nn.Module):
    """nn.Embedding(padding_idx=0) -> Linear -> tanh -> mean over T -> Linear: the padding row is a
    constant of the lookup (no gradient, no Fisher), although 0 occurs in the inputs."""

    VOCAB = 7

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, d, padding_idx=0)
        self.fc = nn.Linear(d, 5)
        self.head = nn.Linear(5, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(self.emb(x))).mean(1))


# --------------------------------------------------------------------------------------------------
# 8. Convolutions; 13. segmentation
# --------------------------------------------------------------------------------------------------

class ConvClassifier(nn.Module):
    """conv -> tanh -> flatten -> Linear, for one convolution of the zoo (the conv is the subject)."""

    def __init__(self, conv, in_shape, classes=3):
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            features = conv(torch.zeros(1, *in_shape)).numel()
        self.head = nn.Linear(features, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class FramesCNN(nn.Module):
    """A clip of F frames [N, F, C, H, W] through one Conv2d over all N·F frames at once, the frames folded
    into the batch sample by sample (rows n·F + f, ``frame_major=False``) or frame by frame (rows f·N + n),
    then pooled over the frames: a convolution whose batch axis holds m = F rows per sample."""

    FRAMES = 3

    def __init__(self, frame_major=False):
        super().__init__()
        self.frame_major = frame_major
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=(1, 2))
        self.head = nn.Linear(4 * 4 * 2, 3)

    def forward(self, x):
        N = x.shape[0]
        frames = x.transpose(0, 1).flatten(0, 1) if self.frame_major else x.flatten(0, 1)
        h = torch.tanh(self.conv(frames))                        # [N·F, 4, 4, 2]
        h = h.unflatten(0, (self.FRAMES, N)).mean(0) if self.frame_major else h.unflatten(0, (N, self.FRAMES)).mean(1)
        return self.head(h.flatten(1))


class TinySegNet(nn.Module):
    """Conv2d -> BatchNorm2d (eval) -> ReLU(inplace) -> 1x1 Conv2d to C classes: outputs [N, C, H, W]
    (class axis 1) for labels [N, H, W]."""

    CLASSES = 3

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, self.CLASSES, 1)

    def forward(self, x):  # x [N, 2, H, W]
        return self.conv2(self.act(self.bn(self.conv1(x))))


# --------------------------------------------------------------------------------------------------
# 9-11. ResNet-18, a ViT-like and a GPT-like model
# --------------------------------------------------------------------------------------------------

def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=10)


class TinyViT(nn.Module):
    """Conv2d patch embedding (4x4 patches of an 8x8 image), a learned class token joined by torch.cat
    with an expanded Parameter, a position-embedding Parameter, two TransformerEncoderLayer(batch_first),
    LayerNorm, and a head on the class token."""

    E, PATCHES = 8, 4

    def __init__(self, classes=3):
        super().__init__()
        E = self.E
        self.patch = nn.Conv2d(3, E, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.PATCHES + 1, E))
        self.blocks = nn.ModuleList(transformer_layer(nn.TransformerEncoderLayer, E, True, ff=12) for _ in range(2))
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, classes)

    def forward(self, x):  # x [N, 3, 8, 8]
        h = self.patch(x).flatten(2).transpose(1, 2)                        # [N, 4, E]
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])


class TinyGPT(nn.Module):
    """Token embedding (padding_idx=0), a position nn.Embedding applied to torch.arange(T) (no batch
    axis; broadcast), a causal pre-norm TransformerEncoderLayer, final LayerNorm, and the output
    projection tied to the token embedding by F.linear: logits [N, T, V]."""

    VOCAB, E, MAX_T = 11, 8, 8

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(self.VOCAB, self.E, padding_idx=0)
        self.pos = nn.Embedding(self.MAX_T, self.E)
        self.block = transformer_layer(nn.TransformerEncoderLayer, self.E, True, norm_first=True, ff=12)
        self.ln_f = nn.LayerNorm(self.E)

    def forward(self, x):  # x [N, T] long
        T = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(T, device=x.device))
        h = self.block(h, src_mask=causal_mask(T, x.device), is_causal=True)
        return F.linear(self.ln_f(h), self.tok.weight)


# --------------------------------------------------------------------------------------------------
# 12. Recurrent classifiers; 14. a mix
# --------------------------------------------------------------------------------------------------

class RecurrentClassifier(nn.Module):
    """nn.LSTM or nn.GRU over [N, T, 3] (transposed to [T, N, 3] when batch_first=False), the output at
    the last step -> Linear."""

    def __init__(self, cell, batch_first, classes=3):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(3, 4, batch_first=batch_first)
        self.head = nn.Linear(4, classes)

    def forward(self, x):  # x [N, T, 3]
        out, _ = self.rnn(seq_axis(x, self.batch_first))
        return self.head(seq_axis(out, self.batch_first)[:, -1])


class Mixed(nn.Module):
    """Sequence-first + in-place + tie + attention: [N, T, D] -> [T, N, D]; fc, ReLU(inplace);
    self-attention (batch_first=False) added to it; ReLU(inplace); the same fc again; mean over T; head."""

    D = 6

    def __init__(self, classes=3):
        super().__init__()
        self.fc = nn.Linear(self.D, self.D)
        self.act = nn.ReLU(inplace=True)
        self.attn = nn.MultiheadAttention(self.D, 2)
        self.head = nn.Linear(self.D, classes)

    def forward(self, x):  # x [N, T, D]
        h = self.act(self.fc(x.transpose(0, 1)))
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.act(h + a)
        return self.head(self.fc(h).mean(0))


# --------------------------------------------------------------------------------------------------
# Refusals: a model with one Dropout left in train mode
# --------------------------------------------------------------------------------------------------

class DropoutNet(nn.Module):
    """Linear -> ReLU -> Dropout (qualified name "body.regularizer") -> Linear. Per-sample quantities of a
    model whose dropout is active are random and not what the user meant: every entry point must refuse
    it, naming that module and saying model.eval()."""

    DROPOUT = "body.regularizer"

    def __init__(self, classes=3):
        super().__init__()
        self.body = nn.Sequential()
        self.body.add_module("fc", nn.Linear(4, 6))
        self.body.add_module("act", nn.ReLU())
        self.body.add_module("regularizer", nn.Dropout(0.25))
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.body(x))


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------

def floats(*shape):
    return lambda g, n: torch.randn(n, *shape, generator=g, dtype=torch.float64)


@dataclass(frozen=True)
class ZooModel:
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], torch.Tensor]   # (generator, n) -> x [n, ...]
    n: int
    outputs: int                  # classes (cross_entropy) or outputs per position (mse)
    label_shape: tuple = ()       # per-sample label shape: () for [N, C], (T,) for [N, T, C], (H, W) for [N, C, H, W]
    class_dim: int = 1            # the class axis of the output [N, ...]
    pass_class_dim: bool = False  # ambiguous layout (T == C): the tests pass class_dim explicitly
    ignored: int = 0              # labels per sample set to IGNORE (the same count in every sample, see zoo_data)
    loss: str = "cross_entropy"
    subset: tuple | None = None   # params for full/block when the whole P is too large for a dense reference
    slow: bool = False

    @property
    def multi_position(self):
        return self.loss == "cross_entropy" and len(self.label_shape) > 0


def _conv(conv, in_shape, n):
    return ZooModel(lambda: ConvClassifier(conv(), in_shape), floats(*in_shape), n, 3)


RESNET_SUBSET = ("bn1.weight", "bn1.bias", "layer1.0.bn2.weight", "layer1.0.bn2.bias",
                 "layer4.1.bn2.weight", "layer4.1.bn2.bias", "fc.bias")

ZOO: dict[str, ZooModel] = {
    # 1. in-place
    "inplace_mlp": ZooModel(InplaceMLP, floats(6), 7, 4),
    "inplace_cnn": ZooModel(InplaceCNN, floats(2, 5, 5), 5, 3),
    "residual_inplace": ZooModel(ResidualInplace, floats(2, 4, 4), 5, 3),
    # 2. tied weights
    "twice_over_sequence": ZooModel(TwiceOverSequence, floats(3, 4), 7, 3),
    "shared_parameter": ZooModel(SharedParameter, floats(5), 7, 3),
    "tied_embedding_lm": ZooModel(TiedEmbeddingLM, tokens(5, TiedEmbeddingLM.VOCAB), 5, TiedEmbeddingLM.VOCAB,
                                  label_shape=(5,), class_dim=2, ignored=1),   # T == N == 5
    # 3. layouts
    "sequence_first": ZooModel(SequenceFirst, floats(4, 4), 7, 3),
    "sequence_first_t_eq_n": ZooModel(SequenceFirst, floats(5, 4), 5, 3),
    "sequence_first_mse": ZooModel(lambda: SequenceFirst(per_position=True), floats(3, 4), 5, 3,
                                   label_shape=(3, 3), loss="mse"),
    "per_position_t_eq_c": ZooModel(lambda: SequenceFirst(o=4, per_position=True), floats(4, 4), 5, 4,
                                    label_shape=(4,), class_dim=2, pass_class_dim=True, ignored=1),
    "buffer_broadcast": ZooModel(BufferBroadcast, floats(BufferBroadcast.T, BufferBroadcast.D), 7, 3),
    "flatten_tokens": ZooModel(FlattenTokens, floats(3, 4), 7, 3),
    "flatten_tokens_mse": ZooModel(lambda: FlattenTokens(o=2), floats(3, 4), 5, 2, label_shape=(2,), loss="mse"),
    # 4. a module without a rule, called with keyword arguments
    "film_kwargs": ZooModel(FiLMNet, floats(4), 7, 3),
    # 5. a forward that never runs
    "unused_head": ZooModel(UnusedHead, floats(4), 7, 3),
    # 6. attention
    "mha_self_batch_first": ZooModel(lambda: AttentionClassifier("self", True), padded_tokens(4, 4), 5, 3),
    "mha_self_seq_first": ZooModel(lambda: AttentionClassifier("self", False), padded_tokens(4, 4), 5, 3),
    "mha_cross_kv_batch_first": ZooModel(lambda: AttentionClassifier("cross_kv", True), padded_tokens(4, 5), 5, 3),
    "mha_cross_kdim_seq_first": ZooModel(lambda: AttentionClassifier("cross_kdim", False), padded_tokens(4, 5), 5, 3),
    **{f"encoder_{'bf' if bf else 'sf'}_{'pre' if nf else 'post'}":
       ZooModel(lambda bf=bf, nf=nf: EncoderClassifier(bf, nf), padded_tokens(4, 4), 5, 3)
       for bf in (True, False) for nf in (True, False)},
    **{f"decoder_{'bf' if bf else 'sf'}_{'pre' if nf else 'post'}":
       ZooModel(lambda bf=bf, nf=nf: DecoderClassifier(bf, nf), padded_tokens(4, 6), 5, 3)
       for bf in (True, False) for nf in (True, False)},
    # 7. padding_idx
    "padded_embedding": ZooModel(PaddedEmbeddingClassifier, tokens(4, PaddedEmbeddingClassifier.VOCAB), 7, 3),
    # 8. convolutions
    "conv3d": _conv(lambda: nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), dilation=(1, 1, 2),
                                      groups=2), (2, 3, 5, 6), 5),
    "conv_transpose1d": _conv(lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
                              (4, 5), 7),
    "conv_transpose2d": _conv(lambda: nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                         dilation=2), (2, 3, 4), 5),
    "conv_frames": ZooModel(FramesCNN, floats(FramesCNN.FRAMES, 2, 4, 4), 5, 3),
    "conv_frames_minor": ZooModel(lambda: FramesCNN(frame_major=True), floats(FramesCNN.FRAMES, 2, 4, 4), 5, 3),
    "conv2d_same_circular": _conv(lambda: nn.Conv2d(2, 4, (3, 4), padding="same", padding_mode="circular",
                                                    dilation=(2, 1)), (2, 5, 6), 5),
    # 9-11. real architectures
    "resnet18": ZooModel(resnet18, floats(3, 32, 32), 3, 10, subset=RESNET_SUBSET, slow=True),
    "vit": ZooModel(TinyViT, floats(3, 8, 8), 5, 3, slow=True),
    "gpt": ZooModel(TinyGPT, tokens(6, TinyGPT.VOCAB), 5, TinyGPT.VOCAB, label_shape=(6,), class_dim=2, ignored=2,
                    slow=True),
    # 12. recurrent
    **{f"{cell.__name__.lower()}_{'bf' if bf else 'sf'}":
       ZooModel(lambda cell=cell, bf=bf: RecurrentClassifier(cell, bf), floats(4, 3), 5, 3)
       for cell in (nn.LSTM, nn.GRU) for bf in (True, False)},
    # 13. segmentation
    "segmentation": ZooModel(TinySegNet, floats(2, 4, 5), 5, TinySegNet.CLASSES, label_shape=(4, 5), class_dim=1,
                             ignored=3),
    # 14. a mix
    "mixed": ZooModel(Mixed, floats(4, Mixed.D), 5, 3),
}

# modules whose affine parameters, buffers and learned embeddings are randomized after construction
_RANDOMIZED = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, FiLM)


def _randomize(model):
    """Move every parameter off the special values of its init (LayerNorm/BatchNorm weight 1 and bias 0,
    FiLM 0, class token and position embedding 0, BatchNorm running mean 0 and variance 1), so that no
    pattern is hidden by an identity map."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _RANDOMIZED):
                for name, p in m.named_parameters(recurse=False):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.3 * torch.randn_like(p))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
        for name, p in model.named_parameters():
            if name in ("cls_token", "pos_embed", "out_bias"):
                p.copy_(0.5 * torch.randn_like(p))


def zoo_model(name):
    """A fresh model of the zoo: seeded by its name, float64, eval mode, randomized (see _randomize)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(name.encode()))
        model = ZOO[name].build()
        _randomize(model)
    return model.to(torch.float64).eval()


def zoo_data(name, n=None, seed=0):
    """Seeded (x, y) for zoo model `name`. cross_entropy labels [n, *label_shape]; where the output has
    position axes, `ignored` labels of every sample are IGNORE, at random positions but the same count
    per sample (so that a token-mean loss over a batch is the mean of the per-sample token means, and
    hvp/influence do not depend on how the data is batched). mse: float targets [n, *label_shape]."""
    spec = ZOO[name]
    n = spec.n if n is None else n
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * seed)
    x = spec.inputs(g, n)
    if spec.loss == "mse":
        return x, torch.randn(n, *spec.label_shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, spec.outputs, (n, *spec.label_shape), generator=g)
    if spec.ignored:
        flat = y.reshape(n, -1)
        for i in range(n):
            flat[i, torch.randperm(flat.shape[1], generator=g)[:spec.ignored]] = IGNORE
    return x, y
