"""Flat buffers: gradients land in them, matrices are viewed as n x m."""
import math

import numpy as np
import pytest
import torch

from mpitrain import models
from mpitrain.layout import CONTROL, GradLayout, all_finite


def test_backward_accumulates_into_the_flat_buffer_and_matrices_come_first():
    torch.manual_seed(0)
    model = models.cnn({"task": "classify", "input_shape": (1, 8, 8), "num_classes": 10})
    layout = GradLayout(model)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    layout.check_bound()
    assert layout.grads.abs().sum() > 0
    for slot, (name, p) in zip(layout.slots, sorted(model.named_parameters(), key=lambda x: x[1].dim() < 2)):
        assert slot.name == name
        assert torch.equal(layout.view(layout.grads, slot), p.grad)
    kinds = [s.is_matrix for s in layout.slots]
    assert kinds == sorted(kinds, reverse=True)
    conv = layout.matrices[1]  # second conv: 64 x (32*3*3)
    assert (conv.n, conv.m) == (64, 288)
    assert layout.flat.numel() == layout.numel + len(CONTROL)
    assert layout.dense_bytes == 4 * sum(p.numel() for p in model.parameters())


def test_zeroing_keeps_the_views():
    model = torch.nn.Linear(3, 2)
    layout = GradLayout(model)
    model(torch.ones(1, 3)).sum().backward()
    layout.zero_grad()
    assert model.weight.grad.abs().sum() == 0
    model(torch.ones(1, 3)).sum().backward()
    assert layout.grads.abs().sum() > 0
    layout.check_bound()


@pytest.mark.parametrize("size", [1, 7, 64, 1000, 2**20 + 3])
def test_all_finite_finds_a_nonfinite_value_wherever_it_is(size):
    huge = torch.full((size,), 3e38)  # finite; a float32 sum of two or more of them overflows
    assert all_finite(huge)
    for at in sorted({0, size // 2, size - 1}):
        for bad in (math.nan, math.inf, -math.inf):
            t = huge.clone()
            t[at] = bad
            assert not all_finite(t), (at, bad)
    assert all_finite(torch.empty(0))
    m = torch.zeros(37, 53)
    m[36, 0] = math.nan
    assert not all_finite(m.t()) and all_finite(m[:36])  # views: transposed, and a slice before the NaN


def test_global_norm_is_exact_and_the_same_bits_at_any_thread_count():
    from mpitrain.layout import NORM_BLOCK, global_norm
    x = torch.randn(3 * NORM_BLOCK + 123, generator=torch.Generator().manual_seed(0)) * 1e3
    threads = torch.get_num_threads()
    try:
        norms = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            norms.append(global_norm(x))
    finally:
        torch.set_num_threads(threads)
    assert norms[0] == norms[1] == norms[2]  # every rank clips alike, whatever its thread count
    exact = float(np.sqrt(np.sum(x.numpy().astype(np.float64) ** 2)))
    assert abs(norms[0] - exact) <= 1e-12 * exact
    assert global_norm(torch.zeros(0)) == 0.0
