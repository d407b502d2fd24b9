"""The quantizers and sparsifiers as compressors: payloads that cannot be summed travel by
Allgatherv and every rank decodes and sums them (`Exchanged`); rand-k's can be summed (`RandK`).
The codecs themselves are in `codecs` and `spherical`.

A rank's payload: one version byte, its three control words (fp32), then per tensor a uint32
byte length and the tensor's bitstream, then a CRC32 of all of it.
"""
from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..layout import all_finite
from .base import Buckets, Compressor, kernels, register
from .bitcodec import BitReader, BitWriter, PayloadError
from .feedback import ErrorFeedback
from .codecs import QSGD, Natural, SparseDither, TopK
from .spherical import Spherical
from .streams import Purpose, numpy_stream, rounding_key

PAYLOAD_VERSION = 1
CODECS = {"sparse-dither": SparseDither, "qsgd": QSGD, "natural": Natural, "topk": TopK, "spherical": Spherical}


class Exchanged(Compressor):
    """Compress every tensor with a codec, Allgatherv the byte payloads, decode every rank's and sum.

    With error feedback each rank keeps e = p - C(p), p = g + e, where C(p) is exactly what its
    payload decodes to: sum over steps of what was sent = sum of gradients - the last residual.

    With --bucket-mb and a core to spare (--overlap-encoding), each bucket's tensors are encoded on a worker
    thread as backward finishes them (the compiled codecs run without the interpreter lock); the
    payload is framed and exchanged after backward, byte for byte the one a step without overlap
    sends. New residuals go to a second buffer until the step's gradients are known to be finite.
    """

    compiled = True

    linear = False
    reshardable = False

    def __init__(self, layout, world, cfg):
        self.codec = CODECS[self.name](cfg)
        self.biased = self.codec.biased
        super().__init__(layout, world, cfg)
        self.grads = layout.flat_np[: layout.numel]
        self.feedback = ErrorFeedback([(1, layout.numel)] if self.error_feedback else None, self.error_feedback)
        # where torch's threads already fill the rank's cores, a worker only slows backward (measured)
        spare = cfg.overlap_encoding == "on" or (cfg.overlap_encoding == "auto"
                                                 and world.cores_per_rank() > torch.get_num_threads())
        self.buckets = Buckets(layout, world, int(cfg.bucket_mb * 2**20) if spare else 0, self.start_bucket)
        self.next_step, self.worker, self.jobs = None, None, []
        self.segments: dict = {}   # slot index -> (bitstream, bits), this step's
        self.total = None          # the ranks' shares summed in float64, in rank order

    @property
    def overlaps(self) -> bool:
        return len(self.buckets) > 0

    def begin(self):
        if self.next_step is not None:
            self.buckets.begin(self.next_step)

    def start_bucket(self, bucket) -> list:
        if self.worker is None:
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="mpitrain-encode")
        self.jobs.append(self.worker.submit(self.encode_finite, bucket[2], self.buckets.step))
        return []

    def encode_finite(self, slots, step: int) -> bool:
        """Encode these tensors unless one is not finite (then the step is encoded again from zero)."""
        lo, hi = min(s.offset for s in slots), max(s.offset + s.numel for s in slots)
        self.feedback.add_range(self.grads, lo, hi)
        if not all_finite(torch.from_numpy(self.grads[lo:hi])):
            return False
        for slot in slots:
            self.encode_slot(slot, step, self.feedback.spare())
        return True

    def key(self, rank: int, step: int, slot) -> int:
        return rounding_key(self.cfg.seed, rank, step, slot.index)

    def encode_slot(self, slot, step: int, residual) -> None:
        """One tensor of p into `segments`, and p - C(p) into `residual` (if kept)."""
        p = self.grads[slot.offset:slot.offset + slot.numel]
        w = BitWriter()
        sent = self.codec.kept("sent", slot.numel, np.float32) if residual is None else \
            residual[slot.offset:slot.offset + slot.numel]  # C(p) first, then p - C(p) in its place
        self.codec.encode(p, w, self.key(self.world.rank, step, slot), out=sent)
        if residual is not None:
            np.subtract(p, sent, out=sent)
        self.segments[slot.index] = (w.bytes(), w.nbits)

    def frame(self) -> np.ndarray:
        """This rank's payload: version, control words, each tensor's length and bitstream, CRC."""
        parts = [np.array([PAYLOAD_VERSION], dtype=np.uint8), self.layout.control.words.numpy().view(np.uint8)]
        for slot in self.layout.slots:
            segment = self.segments[slot.index][0]
            parts += [np.array([segment.size], dtype="<u4").view(np.uint8), segment]
        body = np.concatenate(parts)
        crc = np.array([zlib.crc32(body.tobytes())], dtype="<u4").view(np.uint8)
        self.segment_bits = [self.segments[slot.index][1] for slot in self.layout.slots]  # for tests, diagnostics
        bits = sum(self.segment_bits)
        self.stats = {"payload_bits": bits, "bits_per_value": bits / self.grads.size}
        return np.concatenate([body, crc])

    def decode(self, payload: np.ndarray, rank: int, step: int, total: np.ndarray) -> np.ndarray:
        """Add one rank's gradient share into `total` (float64) and return its control words;
        PayloadError if the payload is not exact."""
        where = f"payload from rank {rank}"
        if payload.size < 1 + 12 + 4 or zlib.crc32(payload[:-4].tobytes()) != int(payload[-4:].view("<u4")[0]):
            raise PayloadError(f"{where}: checksum mismatch (truncated, extended or corrupted)")
        if payload[0] != PAYLOAD_VERSION:
            raise PayloadError(f"{where}: unknown payload version {payload[0]}")
        control = payload[1:13].view(np.float32)
        at = 13
        for slot in self.layout.slots:
            if at + 4 > payload.size - 4:
                raise PayloadError(f"{where}: truncated")
            n = int(payload[at:at + 4].view("<u4")[0])
            segment = payload[at + 4:at + 4 + n]
            if segment.size != n:
                raise PayloadError(f"{where}: truncated")
            reader = BitReader(segment)
            try:
                values = self.codec.decode(reader, slot.numel, self.key(rank, step, slot),
                                           out=self.codec.kept("decoded", slot.numel, np.float32))
                reader.finish()
            except PayloadError as e:
                raise PayloadError(f"{where}, tensor {slot.name}: {e}") from None
            kernels().accumulate(total[slot.offset:slot.offset + slot.numel], values)
            at += 4 + n
        if at != payload.size - 4:
            raise PayloadError(f"{where}: extended past its last tensor")
        return control

    def encoded_in_backward(self, step: int) -> bool:
        """Wait for backward's encodings and finish this rank's share; False (nothing kept) when a
        gradient was not finite, as the exchange after backward would have found: then the share
        is zero, the non-finite flag raised, and the step is encoded again from the residual alone."""
        self.buckets.finish(step=step)
        finite = all([job.result() for job in self.jobs])  # every job waited for (and its error raised)
        self.jobs = []
        if finite and not self.layout.control.nonfinite:  # the caller checked the tail
            tail = self.layout.dense_offset  # the tensors in no bucket, after the matrices
            self.feedback.add_range(self.grads, tail)
            for slot in self.layout.dense:
                self.encode_slot(slot, step, self.feedback.spare())
            self.feedback.swap()
            return True
        self.grads[...] = 0.0
        self.layout.control.drop_share()
        return False

    def aggregate(self, step: int) -> None:
        self.next_step = step + 1
        overlapped = self.buckets.in_flight and self.encoded_in_backward(step)
        if not overlapped:
            self.feedback.add_range(self.grads)
            for slot in self.layout.slots:
                self.encode_slot(slot, step, self.feedback.target())
        payload = self.frame()
        self.stats["encoded_in_backward"] = len(self.layout.matrices) if overlapped else 0
        if self.total is None:  # kept: a fresh gradient-sized float64 array cost 0.26 s a step on 125M values
            self.total = np.zeros(self.grads.size, dtype=np.float64)
        self.total.fill(0.0)
        control = np.zeros(3, dtype=np.float64)
        for rank, part in enumerate(self.world.allgatherv(payload)):  # same order on every rank
            control += self.decode(part, rank, step, self.total)
        kernels().narrow(self.total, self.grads)
        self.layout.control.words.copy_(torch.from_numpy(np.asarray(control, dtype=np.float32)))

    def state_dict(self, copy: bool = True) -> dict:
        return {"local": self.feedback.state_dict(copy), "shared": {}}

    def load_state_dict(self, state: dict) -> None:
        self.feedback.load(state["local"].get("residual"))  # absent after --ef-resume reset

    def state_layout(self) -> dict:
        kept = self.feedback.array(copy=False) is not None
        return {"residual": [(s.name, tuple(s.shape)) for s in self.layout.slots]} if kept else {}


for _name in CODECS:  # one registered compressor per codec, e.g. --compressor sparse-dither
    register(type(f"Exchanged_{_name.replace('-', '_')}", (Exchanged,), {"name": _name}))


@register
class RandK(Compressor):
    """k = ceil(ratio * d) coordinates per tensor, the same on every rank (shared seed by step and
    tensor), scaled by d/k: unbiased, and summable, so one Allreduce carries every tensor's k values."""

    name = "randk"
    biased = False

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        self.k = [min(s.numel, max(1, math.ceil(cfg.ratio * s.numel))) for s in layout.slots]
        self.buffer = np.zeros(sum(self.k) + layout.control.words.numel(), dtype=np.float32)
        self.grads = layout.flat_np[: layout.numel]
        self.feedback = ErrorFeedback([(1, layout.numel)] if self.error_feedback else None, self.error_feedback)

    def indices(self, step: int) -> list[np.ndarray]:
        return [np.sort(numpy_stream(self.cfg.seed, step, s.index, Purpose.RANDK).choice(s.numel, k, replace=False))
                for s, k in zip(self.layout.slots, self.k)]

    def aggregate(self, step: int) -> None:
        chosen, at = self.indices(step), 0
        self.feedback.add_range(self.grads)
        residual = self.feedback.target()
        if residual is not None:
            residual[...] = self.grads
        for s, idx in zip(self.layout.slots, chosen):
            self.buffer[at:at + idx.size] = self.grads[s.offset + idx] * (s.numel / idx.size)
            if residual is not None:  # e = p - C(p), with C(p) this rank's own scaled values
                residual[s.offset + idx] -= self.buffer[at:at + idx.size]
            at += idx.size
        self.buffer[at:] = self.layout.control.words.numpy()
        self.world.allreduce_(self.buffer)
        self.grads[...] = 0.0
        at = 0
        for s, idx in zip(self.layout.slots, chosen):
            self.grads[s.offset + idx] = self.buffer[at:at + idx.size]
            at += idx.size
        self.layout.control.words.copy_(torch.from_numpy(self.buffer[at:]))

    state_dict, load_state_dict, state_layout = Exchanged.state_dict, Exchanged.load_state_dict, Exchanged.state_layout
