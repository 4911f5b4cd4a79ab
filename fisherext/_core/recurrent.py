r"""Recurrent layers (nn.RNN, nn.LSTM, nn.GRU) as the per-step linear maps they are.

torch runs a recurrent layer as one fused call (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``,
``torch.rnn_relu``) whose gate pre-activations never appear as tensors, so neither their output
gradients can be captured nor a per-sample ``vmap`` run through it (its in-place cell updates write into
unbatched state). While capturing, the engine runs instead these step-by-step equivalents, built from
``F.linear`` calls the layer registry knows: at step t,

.. math:: a_t = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}

(stacked gates; LSTM: :math:`i, f, g, o`, :math:`c_t = \sigma(f) c_{t-1} + \sigma(i)\tanh(g)`,
:math:`h_t = \sigma(o)\tanh(c_t)`, projected by :math:`W_{hr}` when ``proj_size > 0``; GRU: :math:`r, z, n`
with :math:`n = \tanh(W_{in} x_t + b_{in} + r \odot (W_{hn} h_{t-1} + b_{hn}))`,
:math:`h_t = (1 - z) n + z h_{t-1}`), so each weight's per-sample gradient is a linear form over the
time steps. Values agree with torch's kernels to rounding. Packed sequences keep torch's kernel (and
their parameters go to the exact fallback).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _cell(kind):
    def lstm(x, state, w):
        h, c = state
        i, f, g, o = (F.linear(x, w[0], w[2]) + F.linear(h, w[1], w[3])).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w[4] is None else F.linear(h, w[4])), c

    def gru(x, h, w):
        ir, iz, in_ = F.linear(x, w[0], w[2]).chunk(3, -1)
        hr, hz, hn = F.linear(h, w[1], w[3]).chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h

    def elman(act):
        return lambda x, h, w: act(F.linear(x, w[0], w[2]) + F.linear(h, w[1], w[3]))

    return {"lstm": lstm, "gru": gru, "rnn_tanh": elman(torch.tanh), "rnn_relu": elman(torch.relu)}[kind]


def _recurrent(kind, fused):
    cell = _cell(kind)

    def run(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first=False, *rest):
        if not isinstance(has_biases, bool):  # the packed-sequence overload: torch's kernel
            return fused(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, *rest)
        x = input.transpose(0, 1) if batch_first else input                     # [T, B, I]
        directions = 2 if bidirectional else 1
        per = len(params) // (num_layers * directions)
        states = hx if kind == "lstm" else (hx,)
        last = [[] for _ in states]
        for layer in range(num_layers):
            outs = []
            for d in range(directions):
                w = list(params[(layer * directions + d) * per:][:per])
                if not has_biases:
                    w[2:2] = [None, None]
                w += [None] * (5 - len(w))
                state = tuple(s[layer * directions + d] for s in states)
                steps = range(x.shape[0]) if d == 0 else range(x.shape[0] - 1, -1, -1)
                ys = [None] * x.shape[0]
                for t in steps:
                    state = cell(x[t], state if kind == "lstm" else state[0], w)
                    state = state if kind == "lstm" else (state,)
                    ys[t] = state[0]
                outs.append(torch.stack(ys))
                for acc, s in zip(last, state):
                    acc.append(s)
            x = outs[0] if directions == 1 else torch.cat(outs, -1)
        out = x.transpose(0, 1) if batch_first else x
        return (out, *(torch.stack(s) for s in last))

    return run


STEPWISE = {fused: _recurrent(name, fused) for name, fused in
            (("lstm", torch.lstm), ("gru", torch.gru), ("rnn_tanh", torch.rnn_tanh), ("rnn_relu", torch.rnn_relu))}
