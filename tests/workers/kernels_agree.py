"""One low-rank compressor built twice, on the compiled loops and on torch operations; every step
the torch one is loaded with the compiled one's state (as a resume would), both aggregate the same
gradients, and each rank dumps how far the torch step's results and projectors are from the
compiled step's, against a bound from the shapes (see the test).

    mpiexec -n N python kernels_agree.py OUT STEPS [config flags...]

OUT/rank-<i>.npz: per step, torch_result (the torch path's aggregated gradients), dense_equal
(the uncompressed tensors bitwise the same on both paths), ranks_equal, projector_gap (max
|P_torch - P_compiled| over each matrix, over the threshold that tells one basis column from
another) and result_ratio (max over the compressed matrices of |R_torch - R_compiled| / bound).
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpitrain import compress
from mpitrain.comm import World
from mpitrain.config import Parser, add_arguments, resolve
from mpitrain.layout import GradLayout

out, steps = Path(sys.argv[1]), int(sys.argv[2])
world = World()
parser = Parser()
add_arguments(parser, compress.names())
cfg = resolve(parser.parse_args(sys.argv[3:] + ["--run-dir", str(out)]), compressors=compress.names())
SHAPES = [(24, 40), (6, 30), (48, 16), (12, 12), (8, 3, 2, 2), (5,)]
U = 2.0 ** -24


def build(kernels: str):
    model = nn.Module()
    for k, shape in enumerate(SHAPES):
        model.register_parameter(f"w{k}", nn.Parameter(torch.zeros(shape)))
    layout = GradLayout(model)
    return layout, compress.build(dataclasses.replace(cfg, kernels=kernels), layout, world)


def gradient(slot, t):
    """A rank-3 signal that turns over time, plus noise of this rank's own."""
    shared = np.random.default_rng([cfg.seed, slot.index])
    own = np.random.default_rng([cfg.seed, t, slot.index, world.rank])
    n, m = (slot.n, slot.m) if slot.is_matrix else (slot.numel, 1)
    a, b = shared.standard_normal((n, 3)), shared.standard_normal((3, m))
    turn = np.pi / 80 * t
    return ((np.cos(turn) * a + np.sin(turn) * np.roll(a, 1, axis=0)) @ b + 0.3 * own.standard_normal((n, m)))


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


def view(comp, x: torch.Tensor) -> np.ndarray:
    """The side the projector acts on: powersgd's P is n x r, greedylore's d x r (oriented)."""
    return (x if comp.name == "powersgd" else comp.oriented(x)).double().numpy()


(lc, compiled), (lt, torched) = build("compiled"), build("torch")
levels = 32767 // world.size
record = {k: [] for k in ("torch_result", "dense_equal", "ranks_equal", "projector_gap", "result_ratio")}
for t in range(steps):
    for layout in (lc, lt):
        for slot in layout.slots:
            layout.view(layout.grads, slot).copy_(torch.from_numpy(gradient(slot, t).reshape(slot.shape) / world.size))
        layout.control.clear()
    torched.load_state_dict(compiled.state_dict())
    xs = [np.ascontiguousarray(view(compiled, compiled.grad(i)) + (0 if e is None else view(compiled, e)))
          for i, e in ((i, compiled.feedback.kept(i)) for i in range(len(compiled.slots)))]
    spread = [world.allreduce_(np.abs(x)) for x in xs]  # sum over ranks of |x_i|, elementwise
    compiled.aggregate(t)
    torched.aggregate(t)
    compressed = {s.index for s in compiled.slots} if compiled.stats.get("compressed_matrices") else set()
    record["dense_equal"].append(all(torch.equal(lc.view(lc.grads, s), lt.view(lt.grads, s))
                                     for s in lc.slots if s.index not in compressed))
    record["ranks_equal"].append(compiled.stats.get("ranks") == torched.stats.get("ranks"))
    record["torch_result"].append(lt.grads.numpy().copy())
    gaps, ratios = [0.0], [0.0]
    if compressed:
        ranks = compiled.stats.get("ranks", compiled.r)
        shapes = [(p.shape[0], r) for p, r in zip(compiled.p.views, ranks)]
        pc, pt = compiled.p.carve(shapes), torched.p.carve(shapes)
        for i, (p, q, x) in enumerate(zip(pc.views, pt.views, spread)):
            p, dp = p.double().numpy(), np.abs(q.double().numpy() - p.double().numpy())
            gaps.append(dp.max() / (0.1 * np.sqrt(2 / p.shape[0])))  # other columns differ by sqrt(2) in norm
            a = np.abs(p)
            # R = P P^T X on each path: what P's gap moves, plus both paths' rounding of the products
            rounding = 2 * gamma(p.shape[0] + p.shape[1] + world.size) * a @ (a.T @ x)  # P^T x, the sum, P Q
            bound = dp @ (a.T @ x) + a @ (dp.T @ x) + dp @ (dp.T @ x) + rounding
            # 16-bit factors: each rank's rounding may differ by one level between the paths
            if getattr(getattr(compiled, "codec", None), "levels", None):
                peaks = world.allreduce_(np.abs(p.T @ xs[i]).max(1) * (1 + gamma(p.shape[0])), op="max")
                bound = bound + 2 * world.size * (a @ (peaks / levels))[:, None]
            got = [view(compiled, c.grad(i)) for c in (compiled, torched)]
            ratios.append(float((np.abs(got[1] - got[0]) / np.maximum(bound, 1e-30)).max()))
    record["projector_gap"].append(max(gaps))
    record["result_ratio"].append(max(ratios))
np.savez(out / f"rank-{world.rank}.npz", **{k: np.array(v) for k, v in record.items()},
         rebroadcasts=np.array(getattr(getattr(torched, "basis", None), "rebroadcasts", 0)))
