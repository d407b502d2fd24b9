"""Greedylore's parts, each on its own, in this process: the selectors, the bases, the factor codecs.

Their exchanges run on a world of one rank, whose sums are the values themselves: what is under
test here is each part's arithmetic; how the parts sum across real ranks is test_lowrank's."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpitrain.compress.buffer import Buffer
from mpitrain.compress.feedback import ErrorFeedback
from mpitrain.compress.lowrank import FixedBasis, Products, TrackingBasis
from mpitrain.compress.lowrank.codec import (CompiledRounding, Fp32Factors, Fp32Sketch, Int16Factors, Int16Sketch,
                                            TorchRounding)
from mpitrain.compress.lowrank.selector import Global, Lazy, PerMatrix, Random, selector_class
from mpitrain.config import Config
from mpitrain.device import Wire


class OneRank:
    """A world of one rank: every sum, maximum and broadcast leaves the values as they are."""
    rank, size = 0, 1

    def allreduce_(self, arr, op="sum"):
        return arr

    def bcast_(self, arr, root=0):
        return arr

    def allgatherv(self, payload):
        return [payload]


def energies(*values):
    return [torch.tensor(v, dtype=torch.float32) for v in values]


def test_per_matrix_takes_each_matrixs_r_largest_energies():
    s = PerMatrix(r=[2, 1], d=[4, 3], cap=[2, 1], cost=[8, 8], budget=24, seed=0, indices=[0, 1])
    ranks, chosen = s.choose(5, energies([1.0, 9.0, 3.0, 9.0], [0.5, 0.1, 2.0]))
    assert ranks == [2, 1]
    assert [c.tolist() for c in chosen] == [[1, 3], [2]]  # ties keep the basis' order
    assert s.contraction_bound() == pytest.approx(max(1 - 2 / 4, 1 - 1 / 3))


def test_global_allocation_buys_the_most_energy_per_byte_within_the_budget_and_the_caps():
    # matrix 0's directions cost 10 bytes, matrix 1's 40: a direction of matrix 1 must hold 4x the
    # energy to be worth as much
    s = Global(r=[1, 1], d=[4, 4], cap=[3, 4], cost=[10, 40], budget=110, seed=0, indices=[0, 1])
    ranks, chosen = s.choose(0, energies([5.0, 4.0, 3.0, 2.0], [100.0, 30.0, 1.0, 0.0]))
    # energy per byte, densest first: m1's 2.5 and 0.75, m0's 0.5, 0.4, 0.3 (its 4th is past its cap),
    # then m1's 0.025: the densest prefix that fits spends 40 + 40 + 10 + 10 + 10 = 110
    assert ranks == [3, 2] and [c.tolist() for c in chosen] == [[0, 1, 2], [0, 1]]
    assert sum(r * c for r, c in zip(ranks, s.cost)) <= s.budget
    assert all(r <= c for r, c in zip(ranks, s.cap))
    assert 0 < s.contraction_bound() < 1


def test_random_is_the_same_draw_on_every_rank_and_a_new_one_each_step():
    s = Random(r=[3], d=[10], cap=[3], cost=[4], budget=12, seed=7, indices=[2])
    (ranks, (a,)), (_, (b,)), (_, (c,)) = s.choose(4, None), s.choose(4, None), s.choose(5, None)
    assert ranks == [3] and torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.tolist())) == 3 and all(0 <= i < 10 for i in a.tolist())


def test_lazy_keeps_the_first_r_directions_and_needs_no_energies():
    s = Lazy(r=[2, 3], d=[4, 5], cap=[2, 3], cost=[4, 4], budget=20, seed=0, indices=[0, 1])
    assert not s.needs_energies and s.choose(9, None)[1][1].tolist() == [0, 1, 2]
    assert selector_class("greedy", "global") is Global and selector_class("lazy", "per-matrix") is Lazy


def test_shared_normal_draws_are_randns_values_in_place_or_copied():
    """Probes and powersgd's starting Q are drawn in place where they can be: the values must stay
    torch.randn's from the same stream (contiguous or not, any shape), or every rank's and every
    resumed run's directions move."""
    from mpitrain.compress.streams import draw_normal
    for shape in [(8, 256), (3, 5), (1, 10), (16, 1), (0, 4), (7, 33)]:
        expected = torch.randn(shape, generator=torch.Generator().manual_seed(11))
        rows = torch.zeros(shape[0] + 2, shape[1])
        draw_normal(rows[2:], torch.Generator().manual_seed(11))  # a contiguous view: in place
        columns = torch.zeros(shape[1], shape[0]).t()  # not contiguous: drawn, then copied
        draw_normal(columns, torch.Generator().manual_seed(11))
        assert torch.equal(rows[2:], expected) and torch.equal(columns, expected), shape
        assert not rows[:2].any()


def basis(kind, d=(6, 4), D=(9, 7), every=-1, **cfg):
    cfg = dataclasses.replace(Config(), refresh_every=every, start_compress_step=10, **cfg)
    dims = [(a, b, 2) for a, b in zip(d, D)]
    sums = []
    b = kind(dims, [2] * len(d), list(range(len(d))), cfg, Products(), Wire(OneRank(), "cpu"), sums.append, 0)
    return b, sums


def orthonormal(b: torch.Tensor) -> bool:
    return torch.allclose(b.t() @ b, torch.eye(b.shape[0]), atol=1e-5)


def test_a_refresh_makes_each_basis_the_left_singular_vectors_of_its_matrix():
    b, _ = basis(FixedBasis)
    xs = [torch.randn(6, 9, generator=torch.Generator().manual_seed(1)), torch.randn(4, 7)]
    b.refresh(xs, [2, 2], step=10)
    for x, base in zip(xs, b.bases.views):
        assert orthonormal(base)
        u = torch.linalg.svd(x, full_matrices=False).U
        assert torch.allclose((base.t() @ u).abs().diagonal(), torch.ones(base.shape[0]), atol=1e-4)
    assert b.refreshed_at == 10 and b.rebroadcasts == 0 and not b.verify()


def test_refresh_schedules_fixed_every_n_steps_tracking_never_by_default():
    fixed, _ = basis(FixedBasis, every=3)
    assert [s for s in range(10, 20) if fixed.is_refresh(s)] == [10, 13, 16, 19]
    tracking, _ = basis(TrackingBasis)
    assert tracking.every == 0 and not any(tracking.is_refresh(s) for s in range(10, 400))
    assert (fixed.lead, tracking.lead) == (0, 1)
    assert (FixedBasis.sketches, TrackingBasis.sketches) == (False, True)  # only tracking pays a column a direction


def test_a_rotation_puts_u_first_and_keeps_the_basis_orthonormal():
    b, _ = basis(TrackingBasis)
    b.refresh([torch.randn(6, 9), torch.randn(4, 7)], [2, 2], step=9)
    us = [torch.linalg.qr(torch.randn(6, 2)).Q, torch.linalg.qr(torch.randn(4, 1)).Q]
    ys = [torch.randn(6, 3), torch.randn(4, 3)]
    products, _ = b.rotate_and_check(us, [y.t() for y in ys])
    for base, u, y, product in zip(b.bases.views, us, ys, products):
        assert orthonormal(base)
        assert torch.allclose(base[:, :u.shape[1]], u, atol=1e-5)
        assert np.allclose(product, (y.t() @ base).numpy(), atol=1e-5)


def test_tracking_energies_are_exact_inside_the_tracked_span():
    b, sums = basis(TrackingBasis, probes=3)
    xs = [torch.randn(6, 9), torch.randn(4, 7)]
    b.refresh(xs, [2, 2], step=9)
    b.remember([2, 2], [b.warm.views[0][:2].clone(), b.warm.views[1][:2].clone()])
    found = b.energies(10, xs, sketched=False)
    assert len(sums) == 1  # one round: every matrix's sketch
    for x, e, base in zip(xs, found, b.bases.views):
        exact = (base.t() @ x).square().sum(1)
        # the refresh's own W spans x's top 2 right singular directions, so the first 2 are exact
        assert torch.allclose(e[:2], exact[:2], rtol=1e-3)


@pytest.mark.parametrize("rounding", [TorchRounding, CompiledRounding])
def test_int16_factors_send_integers_on_shared_scales_and_keep_the_rounding_in_the_payload(rounding):
    codec = Int16Factors(cap=[3, 2], D=[5, 4], wire=Wire(OneRank(), "cpu"), rounding=rounding())
    payload = Buffer([(3, 5), (2, 4)])
    torch.manual_seed(0)
    for v in payload.views:
        v.copy_(torch.randn(v.shape))
    v[1].zero_()  # a zero row keeps scale 0 and sends zeros
    before = payload.flat.clone()
    codec.round(payload, rows=5)
    ints = codec.carved.flat
    assert ints.dtype == torch.int16 and int(ints.abs().max()) == codec.levels == 32767
    assert (payload.flat - before).abs().max() <= codec.scales.max() / 2 + 1e-7  # rounding, to half a level
    rounded = payload.flat.clone()
    codec.exchange(payload, allreduce_with_dense=None)
    assert torch.equal(payload.flat, rounded)  # one rank: the sum is what it sent, exactly
    assert payload.views[1][1].abs().sum() == 0
    assert (Int16Factors.row_bytes(100), Fp32Factors.row_bytes(100)) == (204, 400)


def test_the_compiled_16_bit_rounds_are_the_torch_operations_bit_for_bit():
    """Lines with a zero scale, a NaN one, a tiny one (every value clamps), exact half levels (ties
    go to even), scales from 1e-30 to 1e30 and values from 0.1 to 10^4 levels: every output's
    bits, both ways, equal."""
    torch.manual_seed(3)
    lines, n, bound = 6, 400, 1000
    scales = torch.rand(lines) * 10.0 ** torch.randint(-30, 31, (lines,))
    scales[1], scales[2], scales[3], scales[4] = 0.0, 1.0, float("nan"), 1e-35
    line = torch.randint(0, lines, (n,))
    x = torch.randn(n) * 10.0 ** (5 * torch.rand(n) - 1) * torch.nan_to_num(scales, nan=1.0)[line]
    x[line == 1] = 0.0
    x[(line == 2).nonzero()[:3, 0]] = torch.tensor([2.5, -3.5, 0.5])
    fines = scales / 2000
    results = {}
    for rounding in (TorchRounding(), CompiledRounding()):
        got = results[type(rounding)] = {"peaks": torch.zeros(lines), "ints": torch.zeros(n, dtype=torch.int16),
                                       "sent": torch.zeros(n), "decoded": torch.zeros(n), "hi": torch.zeros(n, dtype=torch.int16),
                                       "lo": torch.zeros(n, dtype=torch.int16), "pairs": torch.zeros(n)}
        with_nan = x.clone()
        with_nan[(line == 3).nonzero()[0, 0]] = float("nan")
        rounding.peaks(with_nan, line, got["peaks"])
        rounding.encode(x, line, scales, bound, got["ints"], sent=got["sent"])
        rounding.decode(got["ints"], line, scales, got["decoded"])
        rounding.encode_pairs(x, line, scales, fines, bound, got["hi"], got["lo"])
        rounding.decode_pairs(got["hi"], got["lo"], line, scales, fines, got["pairs"])
    torch_ops, compiled = results.values()
    assert torch.isnan(compiled["peaks"][3]) and compiled["ints"].abs().max() == bound
    assert compiled["ints"][(line == 2).nonzero()[:3, 0]].tolist() == [2, -4, 0]
    for key in torch_ops:
        a, b = torch_ops[key], compiled[key]
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.int16 else a.view(torch.int32),
                           b.view(torch.int16) if b.dtype == torch.int16 else b.view(torch.int32)), key


def test_fp32_factors_travel_as_they_are_with_the_uncompressed_tensors():
    codec, payload, calls = Fp32Factors([2], [3], Wire(OneRank(), "cpu")), Buffer([(2, 3)]), []
    payload.views[0].copy_(torch.arange(6.0).view(2, 3))
    codec.round(payload, rows=2)
    codec.exchange(payload, calls.append)
    assert calls == [payload] and torch.equal(payload.views[0], torch.arange(6.0).view(2, 3))
    assert Fp32Factors.linear and not Int16Factors.linear


@pytest.mark.parametrize("rounding", [TorchRounding, CompiledRounding])
def test_an_int16_sketch_sends_columns_on_shared_scales_and_the_tail_as_fixed_point_pairs(rounding):
    """A column rounds to half a level of its peak / 32767; a tail value, as hi on its tensor's
    scale s and lo on s / 2L, to a quarter of the finer level: about 2^-32 of its tensor's peak (L = 32767)."""
    buf = Buffer([(4, 3), (5, 2)], extra=7)
    torch.manual_seed(0)
    buf.flat.copy_(torch.randn(buf.flat.numel()))
    buf.views[1][:, 1].zero_()  # a zero column keeps scale 0 and sends zeros
    buf.tail[4:] = torch.tensor([0.6, 1.0, 0.0])  # the control words: a loss share and two flags
    codec, before = Int16Sketch(buf, [4, 3], Wire(OneRank(), "cpu"), rounding()), buf.flat.clone()
    codec.sum(buf)
    L = codec.levels
    assert L == 32767 and codec.ints.dtype == torch.int16 and int(codec.ints.abs().max()) == L
    for v, w in zip(buf.views, Buffer([(4, 3), (5, 2)], flat=before).views):
        level = w.abs().amax(0) / L
        assert ((v - w).abs() <= level / 2 + 1e-7).all()
    assert buf.views[1][:, 1].abs().sum() == 0
    tail = before[-7:]
    for part, got in ((tail[:4], buf.tail[:4]), (tail[4:], buf.tail[4:])):
        peak = part.abs().max()
        assert (got - part).abs().max() <= peak / (4 * L * L) + 2.0 ** -23 * peak
    assert buf.tail[5] > 0 and buf.tail[6] == 0  # a raised flag stays raised, a clear one clear
    assert (Int16Sketch.column_bytes(100), Fp32Sketch.column_bytes(100)) == (204, 400)
    assert Fp32Sketch.overlaps and not Int16Sketch.overlaps  # its scales are agreed before the round


def test_error_feedback_adds_keeps_swaps_and_stores_its_residual():
    on, off, none = ErrorFeedback([(2, 3)], True), ErrorFeedback([(2, 3)], False), ErrorFeedback(None, False)
    on.buffer.views[0].copy_(torch.ones(2, 3))
    x = torch.zeros(2, 3)
    on.add_to(0, x)
    off.add_to(0, x)
    assert torch.equal(x, torch.ones(2, 3)) and off.kept(0) is None and on.kept(0) is not None
    spare = on.spare()
    spare[...] = 5.0
    on.swap()
    assert float(on.array(copy=False).sum()) == 30.0 and float(on.spare().sum()) == 6.0
    assert set(on.state_dict()) == {"residual"} and none.state_dict() == {} and none.array() is None
    on.load(None)
    assert float(on.array().sum()) == 0.0


@pytest.mark.parametrize("name,kernels,compiled", [("dense", "compiled", False), ("greedylore", "compiled", True),
                                                   ("greedylore", "torch", False), ("sparse-dither", "compiled", True),
                                                   ("powersgd", "compiled", True), ("qsgd", "compiled", True)])
def test_a_compressor_that_runs_compiled_loops_loads_them_when_built_not_in_its_first_steps(name, kernels, compiled):
    # numba's import and its first kernel load cost ~0.7 s, and each kernel's load from the cache
    # 2-10 ms, which the first training steps paid (the job's training time) before they were moved
    # into building the compressor; dense never loads numba, nor does a low-rank compressor on torch
    # operations (--kernels torch). A compressed step after the build loads no kernel of its own
    # (on one rank a quantizer decodes no payload: its encoding side is what this checks)
    script = ("import gc, sys, dataclasses, torch\n"
              "from mpitrain import compress\n"
              "from mpitrain.bench.common import layout_of\n"
              "from mpitrain.config import Config\n"
              "from tests.test_parts import OneRank\n"
              f"cfg = dataclasses.replace(Config(), compressor={name!r}, kernels={kernels!r})\n"
              "world = OneRank()\n"
              "world.cores_per_rank = lambda: 1\n"
              "layout = layout_of('mlp', 'digits')\n"
              "compressor = compress.build(cfg, layout, world)\n"
              "loaded = 'numba' in sys.modules\n"
              "def overloads():\n"
              "    from numba.core.registry import CPUDispatcher\n"
              "    return {d.py_func.__name__: len(d.signatures) for d in gc.get_objects()\n"
              "            if isinstance(d, CPUDispatcher)}\n"
              "built = overloads() if loaded else {}\n"
              "g = torch.Generator().manual_seed(0)\n"
              "for step in range(cfg.start_compress_step + 3):\n"
              "    layout.grads.copy_(torch.randn(layout.grads.shape, generator=g))\n"
              "    compressor.aggregate(step)\n"
              "if compressor.name == 'greedylore':\n"
              "    assert compressor.stats['compressed_matrices'] > 0 and not compressor.stats.get('refresh')\n"
              "from numba.core.registry import cpu_target\n"
              "print(loaded, len(cpu_target.target_context._registries) > 0, built == overloads())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(compiled), str(compiled), "True"]
