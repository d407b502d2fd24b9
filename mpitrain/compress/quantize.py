"""The quantizers and sparsifiers as compressors: payloads that cannot be summed are exchanged
whole or in shares and every rank decodes and sums them (`Exchanged`); rand-k's can be summed
(`RandK`). The codecs themselves are in `codecs` and `spherical`.

A payload: one version byte, three control words (fp32), then per piece (a tensor, or the part
of one in a share) a uint32 byte length and its bitstream, then a CRC32 of all of it.
"""
from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

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
_NOTHING = np.zeros(0, dtype=np.uint8)  # a rank's part of the Alltoallv for itself: its share stays here
CODECS = {"sparse-dither": SparseDither, "qsgd": QSGD, "natural": Natural, "topk": TopK, "spherical": Spherical}


class Piece(NamedTuple):
    """A run of one tensor's values, [lo, hi) in the flat gradient, that one bitstream carries: a
    whole tensor in the gather exchange; in the sharded one, the part of a tensor in share `share`."""
    index: int
    slot: Any
    lo: int
    hi: int
    share: int


def share_pieces(slots, bounds: list[int] | None) -> list[list[Piece]]:
    """The pieces of each share: one share of whole tensors (bounds None), or share j the values
    [bounds[j], bounds[j+1]) of the flat gradient, cut where tensors begin and end."""
    if bounds is None:
        return [[Piece(s.index, s, s.offset, s.offset + s.numel, 0) for s in slots]]
    shares, index = [[] for _ in bounds[1:]], 0
    for j, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        for s in slots:
            a, b = max(lo, s.offset), min(hi, s.offset + s.numel)
            if a < b:
                shares[j].append(Piece(index, s, a, b, j))
                index += 1
    return shares


class Payloads:
    """The exchanged bytes: framing a rank's encoded pieces, and checking and decoding another
    rank's, with the rounding key each piece was encoded under. Counts the values it decodes."""

    def __init__(self, codec, seed: int):
        self.codec, self.seed, self.decoded = codec, seed, 0

    def key(self, rank: int, step: int, piece: Piece, phase: int = 0) -> int:
        """Phase 0: a whole tensor (gather); 1: a rank's piece of share j; 2: share j's encoded sum."""
        return rounding_key(self.seed, rank, step, piece.slot.index, *((phase, piece.share) if phase else ()))

    def frame(self, segments: dict, pieces: list[Piece], control: np.ndarray, phase: int) -> np.ndarray:
        """A payload: version, control words, each piece's length and bitstream, CRC."""
        parts = [np.array([PAYLOAD_VERSION], dtype=np.uint8), np.asarray(control, dtype=np.float32).view(np.uint8)]
        for piece in pieces:
            segment = segments[phase, piece.index][0]
            parts += [np.array([segment.size], dtype="<u4").view(np.uint8), segment]
        body = np.concatenate(parts)
        crc = np.array([zlib.crc32(body.tobytes())], dtype="<u4").view(np.uint8)
        return np.concatenate([body, crc])

    def decode(self, payload: np.ndarray, rank: int, step: int, total: np.ndarray, pieces: list[Piece],
               phase: int = 0) -> np.ndarray:
        """Add what one rank's payload carries of `pieces` into `total` (float64) and return its
        control words; PayloadError if the payload is not exact."""
        where = f"payload from rank {rank}"
        if payload.size < 1 + 12 + 4 or zlib.crc32(payload[:-4].tobytes()) != int(payload[-4:].view("<u4")[0]):
            raise PayloadError(f"{where}: checksum mismatch (truncated, extended or corrupted)")
        if payload[0] != PAYLOAD_VERSION:
            raise PayloadError(f"{where}: unknown payload version {payload[0]}")
        control = payload[1:13].view(np.float32)
        at = 13
        for piece in pieces:
            if at + 4 > payload.size - 4:
                raise PayloadError(f"{where}: truncated")
            n = int(payload[at:at + 4].view("<u4")[0])
            segment = payload[at + 4:at + 4 + n]
            if segment.size != n:
                raise PayloadError(f"{where}: truncated")
            reader, d = BitReader(segment), piece.hi - piece.lo
            try:
                values = self.codec.decode(reader, d, self.key(rank, step, piece, phase),
                                           out=self.codec.kept("decoded", d, np.float32))
                reader.finish()
            except PayloadError as e:
                raise PayloadError(f"{where}, tensor {piece.slot.name}: {e}") from None
            kernels().accumulate(total[piece.lo:piece.hi], values)
            self.decoded += d
            at += 4 + n
        if at != payload.size - 4:
            raise PayloadError(f"{where}: extended past its last tensor")
        return control


class Exchanged(Compressor):
    """Compress every tensor with a codec, exchange the byte payloads, decode and sum.

    Gather (--quantizer-exchange gather): every rank Allgathervs its payload and decodes the other
    N - 1: decode work (N-1)*d a rank. Sharded (the default from 4 ranks on): the flat gradient is cut in N
    shares of d/N values; each rank encodes share j for rank j (one Alltoallv), rank j decodes and
    sums the N payloads of its share, encodes the sum again with the same codec, and the encoded
    sums are Allgathervd and decoded by every rank: under 2d values decoded a rank whatever N, as
    in DeepSpeed's compressed allreduce. Each encoding draws its own rounding, so an unbiased codec
    stays unbiased; the second encoding's error joins rank j's residual on its share, so one
    residual a rank still holds everything left out, and the sum over ranks telescopes.

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
        self.sharded = cfg.quantizer_exchange == "sharded" or (cfg.quantizer_exchange == "auto" and world.size >= 4)
        n = world.size
        self.bounds = [j * layout.numel // n for j in range(n + 1)] if self.sharded else None
        self.shares = share_pieces(layout.slots, self.bounds)
        self.pieces_of = {s.index: [p for share in self.shares for p in share if p.slot is s] for s in layout.slots}
        # where torch's threads already fill the rank's cores, a worker only slows backward (measured)
        spare = cfg.overlap_encoding == "on" or (cfg.overlap_encoding == "auto"
                                                 and world.cores_per_rank() > torch.get_num_threads())
        self.buckets = Buckets(layout, world, int(cfg.bucket_mb * 2**20) if spare else 0, self.start_bucket)
        self.next_step, self.worker, self.jobs = None, None, []
        self.payloads = Payloads(self.codec, cfg.seed)
        self.segments: dict = {}   # (phase, piece index) -> (bitstream, bits), this step's
        # what this rank's encodings decode to (C(p); on its share in the sharded exchange, then C(sum))
        self.sent = np.zeros(layout.numel, dtype=np.float32)
        self.total = None          # the ranks' shares summed in float64, in rank order
        self.preload()

    def preload(self) -> None:
        """The compiled loops a step calls, loaded from numba's cache now rather than in the first
        step (as `Products.preload`): a small vector encoded, framed, checked, decoded and summed
        as a step does (a step whose values take another branch of the codec loads that branch's
        loops then)."""
        x = np.linspace(-1.0, 1.0, 64, dtype=np.float32)
        piece = Piece(0, self.layout.slots[0], 0, x.size, 0)
        w = BitWriter()
        self.codec.encode(x, w, self.payloads.key(0, 0, piece), out=np.empty_like(x))
        payload = self.payloads.frame({(0, 0): (w.bytes(), w.nbits)}, [piece], np.zeros(3, np.float32), 0)
        total = np.zeros(x.size, dtype=np.float64)
        self.payloads.decode(payload, 0, 0, total, [piece])  # its count restarts every step
        kernels().narrow(total, x)

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

    def encode_slot(self, slot, step: int, residual) -> None:
        """One tensor of p into `segments`, and p - C(p) into `residual` (if kept)."""
        for piece in self.pieces_of[slot.index]:
            self.encode_piece(piece, step, residual, 1 if self.sharded else 0)

    def encode_piece(self, piece: Piece, step: int, residual, phase: int) -> None:
        """The values of the flat buffer under `piece` into `segments`, and what the encoding left
        out into `residual` (if kept): written there in phases 0 and 1 (p - C(p)), added in phase 2
        (the share's sum s - C(s))."""
        p, sent = self.grads[piece.lo:piece.hi], self.sent[piece.lo:piece.hi]
        w = BitWriter()
        self.codec.encode(p, w, self.payloads.key(self.world.rank, step, piece, phase), out=sent)
        if residual is not None and phase == 2:
            residual[piece.lo:piece.hi] += np.subtract(p, sent, out=self.codec.kept("left", p.size, np.float32))
        elif residual is not None:
            np.subtract(p, sent, out=residual[piece.lo:piece.hi])
        self.segments[phase, piece.index] = (w.bytes(), w.nbits)

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
        first = 1 if self.sharded else 0
        self.segment_bits = [self.segments[first, p.index][1] for share in self.shares for p in share]
        if self.total is None:  # kept: a fresh gradient-sized float64 array cost 0.26 s a step on 125M values
            self.total = np.zeros(self.grads.size, dtype=np.float64)
        self.total.fill(0.0)
        self.payloads.decoded, control = 0, self.layout.control.words.numpy()
        if self.sharded:
            summed = self.exchange_shares(step, control)
        else:
            payloads = self.world.allgatherv(self.payloads.frame(self.segments, self.shares[0], control, 0))
            summed = self.receive(payloads, step, self.shares * self.world.size, 0, control)
        kernels().narrow(self.total, self.grads)
        self.layout.control.words.copy_(torch.from_numpy(summed.astype(np.float32)))
        own = sum(self.segment_bits)  # what this rank encoded: its p, and in the sharded exchange its share's sum
        self.stats = {"payload_bits": own, "bits_per_value": own / self.grads.size, "decoded_values": self.payloads.decoded,
                      "encoded_in_backward": len(self.layout.matrices) if overlapped else 0}

    def receive(self, payloads: list[np.ndarray], step: int, pieces: list[list[Piece]], phase: int,
                own: np.ndarray) -> np.ndarray:
        """Sum into `total` what each rank's payload carries of its `pieces[rank]`, in rank order (the
        same on every rank), and return their control words summed in float64. This rank's own is
        not decoded: `sent` holds what it stands for, bit for bit, and `own` its control words."""
        summed = np.zeros(3, dtype=np.float64)
        for sender, payload in enumerate(payloads):
            if sender == self.world.rank:
                for piece in pieces[sender]:
                    kernels().accumulate(self.total[piece.lo:piece.hi], self.sent[piece.lo:piece.hi])
                summed += own
            else:
                summed += self.payloads.decode(payload, sender, step, self.total, pieces[sender], phase)
        return summed

    def exchange_shares(self, step: int, control: np.ndarray) -> np.ndarray:
        """The sharded exchange, after this rank encoded every share of its p, into `total`; returns
        the control words summed (every rank's reach every share's owner, so every rank has them)."""
        rank, mine, n = self.world.rank, self.shares[self.world.rank], self.world.size
        lo, hi = self.bounds[rank], self.bounds[rank + 1]
        parts = [self.payloads.frame(self.segments, share, control, 1) if j != rank else _NOTHING for j, share in enumerate(self.shares)]
        summed = self.receive(self.world.alltoallv(parts), step, [mine] * n, 1, control)
        kernels().narrow(self.total[lo:hi], self.grads[lo:hi])  # this share's sum, to encode again
        residual = self.feedback.target()
        for piece in mine:
            self.encode_piece(piece, step, residual, 2)
        self.segment_bits += [self.segments[2, p.index][1] for p in mine]
        self.total[lo:hi] = 0.0
        self.receive(self.world.allgatherv(self.payloads.frame(self.segments, mine, summed, 2)), step, self.shares, 2, summed)
        return summed

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
