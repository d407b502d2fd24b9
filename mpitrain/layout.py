"""Flat contiguous buffers for parameters and gradients, and the views into them.

Every trainable parameter becomes a view into one fp32 buffer (`params`) and its `.grad` a view
into another (`grads`), so a dense aggregate is one Allreduce and a parameter broadcast is one
Bcast, with no packing copies. Autograd accumulates into an existing `.grad` in place, which keeps
the views valid as long as gradients are zeroed with `zero_grad()` (never set to None).

Matrices (every tensor of two or more dimensions, viewed as n x m with conv kernels as
out x in*kh*kw) come first in the buffers, then the dense tensors (biases, norms), then a few
control words (the step's loss, a non-finite flag, a stop request) that ride along with whichever Allreduce
carries the dense tensors, so agreeing on them costs no extra message.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

CONTROL = ("loss", "nonfinite", "stop")


def all_finite(t: torch.Tensor) -> bool:
    """Whether t holds no NaN or Inf: one pass at memory speed that allocates nothing, because a NaN
    anywhere makes both ends of aminmax NaN and an infinity is one of its ends. (A float64 sum is
    several passes' worth of work; isfinite().all() writes a mask as large as t.)"""
    return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


NORM_BLOCK = 4096


def global_norm(t: torch.Tensor) -> float:
    """The 2-norm of t in float64, the same bits at any thread count (ranks must agree on it to clip
    alike): a norm per block of NORM_BLOCK values, then their squares summed in order by numpy.
    (torch's fp32 norm of 10M normal values was off by 5e-4.)"""
    whole = t.numel() - t.numel() % NORM_BLOCK
    blocks = torch.linalg.vector_norm(t[:whole].view(-1, NORM_BLOCK), dim=1, dtype=torch.float64)
    rest = torch.linalg.vector_norm(t[whole:], dtype=torch.float64).reshape(1)
    return math.sqrt(float(np.sum(np.square(torch.cat([blocks, rest]).cpu().numpy()))))


class Control:
    """The control words by name (layout.CONTROL): this rank's share of the step's loss, a
    non-finite flag, a stop request. They ride on the exchange and are summed like gradients, so
    afterwards the loss is the global mean and a flag is non-zero when any rank raised it. `words`
    is the fp32 view itself, for the compressors that carry it."""

    def __init__(self, words: torch.Tensor):
        assert words.numel() == len(CONTROL)
        self.words = words

    def set(self, loss: float, nonfinite: bool, stop: bool) -> None:
        self.words.copy_(torch.tensor([loss, float(nonfinite), float(stop)]))

    def values(self) -> tuple[float, bool, bool]:
        loss, nonfinite, stop = self.words.tolist()
        return loss, bool(nonfinite), bool(stop)

    @property
    def nonfinite(self) -> bool:
        return bool(self.words[1])

    def raise_nonfinite(self) -> None:
        """Some rank's share was not finite: every rank skips the step (the loss as it was)."""
        self.words[1] = 1.0

    def drop_share(self) -> None:
        """This rank's share was not finite and is not sent: no loss of its own, the flag raised,
        its stop request kept."""
        self.words[0], self.words[1] = 0.0, 1.0

    def clear(self) -> None:
        self.words.zero_()


@dataclass(frozen=True)
class Slot:
    """One parameter's place in the flat buffers."""
    index: int          # position in `GradLayout.slots`
    name: str
    offset: int
    numel: int
    shape: tuple

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2

    @property
    def n(self) -> int:
        return self.shape[0]

    @property
    def m(self) -> int:
        return math.prod(self.shape[1:])


class GradLayout:
    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.device = named[0][1].device
        bad = [n for n, p in named if p.dtype != torch.float32 or p.device != self.device]
        if bad:
            raise ValueError(f"parameters must be float32 on one device ({self.device}); not so: {', '.join(bad[:3])}")
        ordered = [x for x in named if x[1].dim() >= 2] + [x for x in named if x[1].dim() < 2]
        self.numel = sum(p.numel() for _, p in ordered)
        self.params = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self.flat = torch.zeros(self.numel + len(CONTROL), dtype=torch.float32, device=self.device)
        self.grads = self.flat[: self.numel]
        self.control = Control(self.flat[self.numel:])
        # numpy views for collectives and the compiled loops (None on a device: its tensors go through a `Wire`)
        on_cpu = self.device.type == "cpu"
        self.flat_np, self.params_np = (self.flat.numpy(), self.params.numpy()) if on_cpu else (None, None)
        self.slots: list[Slot] = []
        self.tensors = []
        offset = 0
        for i, (name, p) in enumerate(ordered):
            slot = Slot(i, name, offset, p.numel(), tuple(p.shape))
            self.slots.append(slot)
            view = self.view(self.params, slot)
            view.copy_(p.detach())
            p.data = view
            p.grad = self.view(self.grads, slot)
            self.tensors.append(p)
            offset += slot.numel
        self.matrices = [s for s in self.slots if s.is_matrix]
        self.dense = [s for s in self.slots if not s.is_matrix]
        self.dense_offset = self.dense[0].offset if self.dense else self.numel

    @staticmethod
    def view(buf: torch.Tensor, slot: Slot) -> torch.Tensor:
        return buf[slot.offset: slot.offset + slot.numel].view(slot.shape)

    @staticmethod
    def matrix(buf: torch.Tensor, slot: Slot) -> torch.Tensor:
        """The n x m matrix view of a slot (conv kernels as out x in*kh*kw)."""
        return buf[slot.offset: slot.offset + slot.numel].view(slot.n, slot.m)

    def buckets(self, bucket_bytes: int) -> list[tuple[int, int, list[Slot]]]:
        """The matrices grouped in the order backward finishes them (the last layers' first) into
        buckets of at least `bucket_bytes` (the last may be smaller): (lo, hi, slots), each a
        contiguous slice [lo, hi) of the flat buffers. The dense tensors and control words after
        the matrices are not in any bucket: they go last, with the control words."""
        found, current = [], []
        for slot in reversed(self.matrices):
            current.append(slot)
            if 4 * sum(s.numel for s in current) >= bucket_bytes:
                found.append(current)
                current = []
        if current:
            found.append(current)
        return [(b[-1].offset, b[0].offset + b[0].numel, b) for b in found]

    def zero_grad(self):
        self.flat.zero_()

    def host_twin(self) -> "GradLayout":
        """The same slots over a flat gradient buffer in host memory (pinned when this layout lives on
        a GPU), for a compressor that runs on the CPU while the model trains on a device: its
        parameters stay this layout's."""
        twin = copy.copy(self)
        twin.device = torch.device("cpu")
        return twin._over(torch.zeros(self.flat.numel(), dtype=torch.float32, pin_memory=self.device.type == "cuda"))

    def part(self, first: int, last: int) -> "GradLayout":
        """Slots [first, last) as a layout of their own over a new flat buffer (with control words of
        its own), for a compressor that serves those slots alone (`compress/hierarchy.py`). The
        slots keep their index, which keys their shared random draws; their offsets start at 0."""
        part, base = copy.copy(self), self.slots[first].offset
        part.slots = [dataclasses.replace(s, offset=s.offset - base) for s in self.slots[first:last]]
        part.matrices, part.dense = [s for s in part.slots if s.is_matrix], [s for s in part.slots if not s.is_matrix]
        part.numel, part.tensors, part.params = sum(s.numel for s in part.slots), [], None
        part.dense_offset = part.dense[0].offset if part.dense else part.numel
        return part._over(torch.zeros(part.numel + len(CONTROL), dtype=torch.float32, device=self.device))

    def _over(self, flat: torch.Tensor) -> "GradLayout":
        self.flat, self.grads, self.control = flat, flat[:self.numel], Control(flat[self.numel:])
        self.flat_np, self.params_np = flat.numpy() if flat.device.type == "cpu" else None, None
        return self

    def check_bound(self):
        """Raise if anything replaced a parameter or gradient tensor behind the layout's back."""
        for slot, p in zip(self.slots, self.tensors):
            if p.grad is None or p.grad.data_ptr() != self.grads.data_ptr() + 4 * slot.offset:
                raise RuntimeError(f"gradient of {slot.name} no longer lives in the flat buffer "
                                   "(was it set to None or replaced?)")
            if p.data_ptr() != self.params.data_ptr() + 4 * slot.offset:
                raise RuntimeError(f"parameter {slot.name} no longer lives in the flat buffer")

    @property
    def dense_bytes(self) -> int:
        """What one dense fp32 Allreduce of every gradient hands to the network."""
        return 4 * self.numel
