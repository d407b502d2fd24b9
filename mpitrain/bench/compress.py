"""Bytes and time per compressor on the default models and a 125M transformer's shapes."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from .. import compress, models
from ..compress.bitcodec import BitReader, BitWriter
from ..compress.quantize import CODECS
from ..config import Config
from ..data import Dataset, locate
from ..layout import GradLayout
from .common import DEFAULT_MODELS, timed

NAME = "compress"
ABOUT = ("bytes per step and compressor time against forward+backward, default models and 125M shapes; "
         "quantizer codec rates")


LARGE_STEPS = 5  # compressed steps timed per arm on the 125M shapes (median): two spread 25% between runs
LM_125M = {"vocab_size": 32000, "seq_len": 128, "d": 768, "layers": 12, "heads": 12, "ffn": 3072}
ARMS = [("dense", {}), *[(f"{name}-r{r}", {"compressor": c, "select": sel, "rank": r})
                          for r in (4, 8, 32)
                          for name, c, sel in (("greedylore", "greedylore", "greedy"),
                                               ("greedylore-paper", "greedylore-paper", "greedy"),
                                               ("powersgd", "powersgd", "greedy"),
                                               ("random", "greedylore-paper", "random"),
                                               ("lazy", "greedylore-paper", "lazy"))]]


def _fwd_bwd_case(name: str):
    """A model and one forward+backward closure at the default per-rank batch."""
    torch.manual_seed(0)
    if name == "transformer-125m":
        model = models.TransformerLM(**LM_125M)
        x = torch.randint(0, LM_125M["vocab_size"], (4, LM_125M["seq_len"]))
        y, task = torch.roll(x, -1, 1), "lm"
    else:
        ds = Dataset(locate(dict(DEFAULT_MODELS)[name]))
        model = models.build(name, ds.info)
        xs, ys = ds.rows("train", np.arange(32))
        x, y, task = torch.from_numpy(xs), torch.from_numpy(ys), ds.info["task"]
    layout = GradLayout(model)

    def fwd_bwd():
        layout.zero_grad()
        models.loss_and_metric(model(x), y, task)[0].backward()
    return layout, fwd_bwd


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second this machine moves in a large memory copy (read + write counted) on this
    rank's torch threads, the threads the compressors' loops run on (one thread's copy moved 0.55
    to 0.87 of two threads' here, depending on the load on the shared host)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), repeats)


def least_traffic(layout, comp) -> int:
    """The bytes a step must read and write at least: every gradient read and its result written
    in place, for compressors with error feedback every residual value read and written, and
    for greedylore's tracking basis (rotated every step) every basis value read and written."""
    state = comp.state_dict(copy=False)
    residual = state.get("local", {}).get("residual")
    basis = getattr(comp, "basis", None)
    bases = state["shared"]["bases"] if basis is not None and basis.sketches else None
    return 2 * layout.dense_bytes + sum(2 * 4 * int(np.size(a)) for a in (residual, bases) if a is not None)


def bench_compress(world, repeats: int) -> list[dict]:
    rows = []
    for case in [m for m, _ in DEFAULT_MODELS] + ["transformer-125m"]:
        layout, fwd_bwd = _fwd_bwd_case(case)
        fwd_bwd_s = timed(fwd_bwd, 2 if case.endswith("125m") else repeats)
        grads = layout.grads.clone()
        for arm, overrides in ARMS:
            cfg = dataclasses.replace(Config(), start_compress_step=0, **overrides)
            comp = compress.build(cfg, layout, world)
            refresh_every = comp.basis.every if hasattr(comp, "basis") else 0
            world.take_sent_bytes()

            def step(i):
                layout.grads.copy_(grads)
                t0 = time.perf_counter()
                comp.aggregate(i)
                return time.perf_counter() - t0
            first_s, first_bytes = step(0), world.take_sent_bytes()
            bandwidth = copy_bandwidth()  # just before the timed steps: the shared host's varies by minutes
            n = LARGE_STEPS if case.endswith("125m") else repeats
            step_s = float(np.median([step(1 + k) for k in range(n)]))
            step_bytes = world.take_sent_bytes() // n
            refreshes = refresh_every > 0  # a dense step + SVD every refresh_every steps
            amortised_bytes = (first_bytes + (refresh_every - 1) * step_bytes) / refresh_every if refreshes else step_bytes
            amortised_s = (first_s + (refresh_every - 1) * step_s) / refresh_every if refreshes else step_s
            rows.append({"model": case, "arm": arm, "params": layout.numel,
                         "compressed_matrices": len(getattr(comp, "slots", [])),
                         "directions": sum(getattr(comp, "r", [])),
                         "bytes_refresh_step": first_bytes if refreshes else None, "bytes_step": step_bytes,
                         "bytes_amortised": amortised_bytes, "dense_over_wire": layout.dense_bytes / amortised_bytes,
                         "compress_s_step": step_s, "refresh_s": first_s if refreshes else None,
                         "fwd_bwd_s": fwd_bwd_s, "compress_over_fwd_bwd": amortised_s / fwd_bwd_s,
                         "copy_gb_per_s": bandwidth / 1e9, "copy_threads": torch.get_num_threads(),
                         "compress_over_memory_limit": step_s / (least_traffic(layout, comp) / bandwidth)})
    return rows


def bench_scores(world, repeats: int) -> list[dict]:
    """Probe-estimated energies, O(d D k + d^2 k), against the full projection U^T X, O(d^2 D)."""
    rows = []
    for case in [m for m, _ in DEFAULT_MODELS] + ["transformer-125m"]:
        layout, _ = _fwd_bwd_case(case)
        layout.grads.normal_()
        for r in (4, 32):
            timing = {}
            for scores in ("probe", "exact"):
                cfg = dataclasses.replace(Config(), compressor="greedylore-paper", rank=r, scores=scores,
                                          start_compress_step=0)
                comp = compress.build(cfg, layout, world)
                comp.aggregate(0)  # the refresh that makes the bases
                timing[scores] = timed(lambda: comp.select(1), 2 if case.endswith("125m") else repeats)
            rows.append({"model": case, "rank": r, "probes": Config.probes, "probe_scores_s": timing["probe"],
                         "full_projection_s": timing["exact"], "speedup": timing["exact"] / timing["probe"]})
    return rows


CODEC_VALUES = {"spherical": 2 ** 14}  # its encoder draws ~alpha^(-m/2) candidates per block


def bench_codecs(world, repeats: int, d: int = 2 ** 20) -> list[dict]:
    """Each quantizer's encode and decode of one Gaussian tensor of d values (bits included)."""
    rows = []
    for name, cls in CODECS.items():
        n = CODEC_VALUES.get(name, d)
        x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        codec, written = cls(Config()), {}

        def encode():
            w = BitWriter()
            codec.encode(x, w, 7)
            written["bytes"] = w.bytes()

        def decode():
            r = BitReader(written["bytes"])
            codec.decode(r, n, 7)
            r.finish()
        encode()
        decode()  # compiled kernels are built and cached on first use
        enc_s, dec_s = timed(encode, max(3, repeats // 10)), timed(decode, max(3, repeats // 10))
        rows.append({"codec": name, "values": n, "bits_per_value": 8 * written["bytes"].size / n,
                     "encode_s": enc_s, "decode_s": dec_s, "mvalues_per_s": n / (enc_s + dec_s) / 1e6})
    return rows


def run(world, args) -> dict:
    return {"compress": bench_compress(world, args.repeats), "scores": bench_scores(world, args.repeats),
            "codecs": bench_codecs(world, args.repeats)}
