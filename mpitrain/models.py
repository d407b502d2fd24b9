"""The model zoo, and `package.module:function` for a user's own model.

Every builder takes the dataset's `info` dict (task, input_shape and num_classes for
classifiers; vocab_size and seq_len for a character LM) and returns an nn.Module whose output is
logits: (batch, classes) for classifiers, (batch, seq, vocab) for the LM. A user's function gets
the same dict: `def build(info: dict) -> torch.nn.Module`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import UsageError, user_function


def mlp(info, hidden=(256, 256)):
    """Multilayer perceptron on the flattened input."""
    sizes = (math.prod(info["input_shape"]),) + tuple(hidden)
    layers = [nn.Flatten()]
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], info["num_classes"]))


def wide_mlp(info):
    """The MLP at 1024 wide: 1.1M parameters on digits, 4.5 MB of gradient a step against ~0.2 GFLOP of
    compute, so that on a 1 Gbit/s link its dense exchange is most of its step (`bench network`)."""
    return mlp(info, hidden=(1024, 1024))


def cnn(info, channels=(32, 64), hidden=128):
    """Two conv layers and a hidden linear layer; 1-D or 2-D convolutions by the input's shape."""
    shape = info["input_shape"]
    conv, pool = {2: (nn.Conv1d, nn.MaxPool1d), 3: (nn.Conv2d, nn.MaxPool2d)}[len(shape)]
    c1, c2 = channels
    spatial = [s // 2 for s in shape[1:]]
    return nn.Sequential(
        conv(shape[0], c1, 3, padding=1), nn.ReLU(),
        conv(c1, c2, 3, padding=1), nn.ReLU(), pool(2),
        nn.Flatten(), nn.Linear(c2 * math.prod(spatial), hidden), nn.ReLU(),
        nn.Linear(hidden, info["num_classes"]))


class _Residual(nn.Module):
    def __init__(self, conv, channels):
        super().__init__()
        self.a = conv(channels, channels, 3, padding=1)
        self.b = conv(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.b(F.relu(self.a(x))))


def resnet(info, width=64, blocks=2):
    """A small residual conv net (no batch norm, so every rank's forward is independent)."""
    shape = info["input_shape"]
    conv = {2: nn.Conv1d, 3: nn.Conv2d}[len(shape)]
    pool = {2: nn.AdaptiveAvgPool1d, 3: nn.AdaptiveAvgPool2d}[len(shape)]
    return nn.Sequential(conv(shape[0], width, 3, padding=1), nn.ReLU(),
                         *[_Residual(conv, width) for _ in range(blocks)],
                         pool(1), nn.Flatten(), nn.Linear(width, info["num_classes"]))


class _Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nn.Module):
    """A small decoder-only transformer for character language modelling."""

    def __init__(self, vocab_size, seq_len, d=128, layers=2, heads=4, ffn=512):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(_Block(d, heads, ffn) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size)

    def forward(self, idx):
        x = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def transformer(info):
    if info["task"] != "lm":
        raise UsageError("the transformer model is a character LM: use it with --dataset shakespeare")
    return TransformerLM(info["vocab_size"], info["seq_len"])


ZOO = {"mlp": mlp, "wide-mlp": wide_mlp, "cnn": cnn, "resnet": resnet, "transformer": transformer}


def build(name: str, info: dict) -> nn.Module:
    """A zoo model by name, or a user's `package.module:function`, for this dataset."""
    if ":" in name:
        fn = user_function(name, "model")
        model = fn(info)
        if not isinstance(model, nn.Module):
            raise UsageError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if name not in ZOO:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(ZOO)} or give package.module:function")
    if name != "transformer" and info["task"] != "classify":
        raise UsageError(f"model {name!r} is a classifier; dataset {info['name']!r} is a language-model corpus")
    return ZOO[name](info)


def loss_and_metric(logits, y, task: str):
    """Mean loss, and the per-batch sum of the eval metric's numerator (correct count or nats)."""
    if task == "lm":
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return loss, loss.detach() * y.numel()
    loss = F.cross_entropy(logits, y)
    return loss, (logits.argmax(-1) == y).sum()
