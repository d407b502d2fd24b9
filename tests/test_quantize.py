"""Quantizers and sparsifiers: the brief's section 7, with bounds from the math and fixed seeds."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import WORKERS, mpi, one_launch_per_world_size
from mpitrain.compress import codecs, quantize, spherical
from mpitrain.compress.bitcodec import BitReader, BitWriter, PayloadError, rice_bits
from mpitrain.layout import CONTROL


def cfg(**kw):
    base = dict(nu=0.1, dither="det", alpha=0.2, block=8, levels=16, ratio=0.1, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


def roundtrip(codec, x, key=7):
    w = BitWriter()
    y = codec.encode(x.astype(np.float32), w, key)
    r = BitReader(w.bytes())
    z = codec.decode(r, x.size, key)
    r.finish()
    assert np.array_equal(y.view(np.uint32), z.view(np.uint32)), "decode(encode(x)) must equal C(x) bit for bit"
    return y, w.nbits


def vectors(d, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(d)
    third = np.where(np.arange(d) % 3 == 0, g, 0)
    mixed = g * 10.0 ** rng.uniform(-30, 30, d)
    out = {"gaussian": g, "heavy": g ** 3, "ones": np.ones(d), "onehot": np.eye(1, d)[0], "third": third,
           "mixed": mixed}
    return {k: v.astype(np.float32) for k, v in out.items()}


# -- sparse dithering ------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [0, 1, 3, 4, 5, 1001])
def test_the_stochastic_roundings_draws_are_numpys_philox_doubles(d):
    """The compiled loop draws what numpy's Generator(Philox(key)).random(d) does, bit for bit: the
    codecs' bitstreams depend on it (tests/data/codec_digests.json)."""
    for key in (0, 7, 2**40 + 3, 2**63 + 11):
        expected = np.random.Generator(np.random.Philox(key)).random(d)
        assert np.array_equal(codecs._draws(key, d), expected)
        kept = np.full(d + 3, 2.0)
        assert np.array_equal(codecs._draws(key, d, kept[:d]), expected) and (kept[d:] == 2.0).all()


def test_rounding_keys_are_numpys_seed_sequence_words():
    """The compiled SeedSequence gives numpy's words for any non-negative ints (split into 32-bit
    words as numpy splits them, 0 included, more words than its pool of four): a resume, and the
    digests, depend on every rank's rounding key being what it always was."""
    from mpitrain.compress.streams import seed_state
    rng = np.random.default_rng(0)
    cases = [[0], [0] * 5, [2**64 - 1], [2**100 + 5, 3], list(range(1, 10))]
    cases += [[int(x) for x in rng.integers(0, 2**63, n) >> rng.integers(0, 63, n)] for n in rng.integers(1, 9, 300)]
    for ints in cases:
        for words in (1, 2, 3):
            assert np.array_equal(seed_state(*ints, words=words),
                                  np.random.SeedSequence(ints).generate_state(words, np.uint64)), (ints, words)
    with pytest.raises(ValueError):
        seed_state(3, -1)
    from mpitrain.compress.streams import Purpose, torch_stream  # the shared streams' seeds, both ways
    for key in ([0, 0, 0, Purpose.PROBE], [7, 123456, 3, Purpose.RANDOM_SELECT], [2**40, 10**9, 11, Purpose.RANDK]):
        assert torch_stream(*key, compiled=True).initial_seed() == torch_stream(*key).initial_seed()


def test_sparse_dither_worked_example():
    codec = codecs.SparseDither(cfg(nu=0.25))
    x = np.array([3, -4, 0, 0.1], dtype=np.float32)
    gamma, k = codec.levels(x, 0)
    assert list(k) == [1, 2, 0, 0]
    assert gamma == pytest.approx(2.50049995, rel=1e-7)
    y, bits = roundtrip(codec, x)
    np.testing.assert_allclose(y, [2.50050, -5.00100, 0, 0], atol=1e-5)
    assert np.sum((y - x) ** 2) / np.sum(x ** 2) == pytest.approx(0.05044, abs=1e-5)
    # 31 scale + 3 zero count + 1 flag + 2 gap bits (nonzeros at 0, 1: Rice k=0 "0", "0")
    # + 2 signs + 3 level bits ("0" and "10"): 42, the brief's integer layout
    assert bits == 31 + 3 + 1 + 2 + 2 + 3 == 42 == codec.bits(x)
    w = BitWriter()
    codec.encode(x, w, 0)
    stream = np.unpackbits(w.bytes())[:bits]
    assert "".join(map(str, stream[-3:])) == "010"


def test_sparse_dither_one_coordinate():
    y, _ = roundtrip(codecs.SparseDither(cfg(nu=0.1)), np.array([1.5], dtype=np.float32))
    h = math.sqrt(0.1)
    assert y[0] == pytest.approx(2 * 2 * h * 1.5, rel=1e-6)  # k = 2
    assert (y[0] - 1.5) ** 2 / 1.5 ** 2 == pytest.approx(0.0701, abs=1e-4)


@pytest.mark.parametrize("d", [1, 2, 3, 7, 64, 1000])
def test_deterministic_sparse_dither_is_in_C_nu_with_exact_bit_counts(d):
    nu = 0.1
    codec = codecs.SparseDither(cfg(nu=nu))
    for name, x in vectors(d).items():
        y, bits = roundtrip(codec, x)
        x64 = x.astype(np.float64)
        assert np.sum((y - x64) ** 2) <= nu * np.sum(x64 ** 2) * (1 + 1e-6) + 1e-30, name
        gamma, k = codec.levels(x, 0)
        assert np.array_equal(np.abs(y), gamma * k.astype(np.float32)) and np.all(np.sign(y[k > 0]) == np.sign(x[k > 0]))
        assert bits == codec.bits(x)
        # levels: sum k <= sqrt(1 - tau) d / (2 sqrt nu) + (1 - tau) d / 2 (nearest rounding + Cauchy-Schwarz)
        tau = np.mean(k == 0)
        assert k.sum() <= math.sqrt(1 - tau) * d / (2 * math.sqrt(nu)) + (1 - tau) * d / 2 + 1e-9


def test_sparse_dither_support_code_is_close_to_the_combinatorial_bound_and_total_to_the_paper():
    d, nu = 100_000, 0.1
    codec = codecs.SparseDither(cfg(nu=nu))
    x = vectors(d)["gaussian"]
    _, k = codec.levels(x, 0)
    n0 = int(np.sum(k == 0))
    zeros_marked, marked, param, bits, _, _ = codec.support(k)
    assert np.array_equal(marked, np.flatnonzero((k == 0) == zeros_marked))
    gaps = np.diff(marked, prepend=-1) - 1
    assert bits == int(rice_bits(gaps, param).sum())
    support = 1 + bits
    log_binom = (math.lgamma(d + 1) - math.lgamma(n0 + 1) - math.lgamma(d - n0 + 1)) / math.log(2)
    assert log_binom <= support <= 1.03 * log_binom + 64
    # the poster's worst-case total at nu = 0.1 is 3.35 d + log d + O(1)
    _, bits = roundtrip(codec, x)
    assert bits <= 3.35 * d + math.log2(d) + 31


def test_randomized_sparse_dither_is_unbiased_with_variance_at_most_nu():
    d, nu, n = 1000, 0.25, 2000
    codec = codecs.SparseDither(cfg(nu=nu, dither="rand"))
    x = vectors(d)["gaussian"]
    x64 = x.astype(np.float64)
    ys, bits = [], []
    for key in range(n):
        y, b = roundtrip(codec, x, key) if key < 20 else (codec.encode(x, BitWriter(), key), None)
        ys.append(y)
        if b:
            bits.append(b)
    ys = np.array(ys, dtype=np.float64)
    omega = np.mean(np.sum((ys - x64) ** 2, axis=1)) / np.sum(x64 ** 2)
    assert omega <= nu * (1 + 5 / math.sqrt(n))
    assert np.sum((ys.mean(0) - x64) ** 2) <= 4 * omega * np.sum(x64 ** 2) / n
    assert np.mean(bits) <= (math.log2(3) + 1 / (2 * math.sqrt(nu))) * d + math.log2(d) + 31
    _, k = codec.levels(x, 3)
    r = np.abs(x64) / (np.linalg.norm(x64) * 2 * math.sqrt(nu / d))
    assert np.all((k == np.floor(r)) | (k == np.floor(r) + 1))


# -- spherical -----------------------------------------------------------------------------------------

def test_cap_fraction_matches_the_incomplete_beta():
    assert spherical.cap_fraction(0.2, 10) == pytest.approx(1.0125e-4, rel=1e-3)
    assert spherical.cap_fraction(0.3, 1) == 0.5
    assert spherical.cap_fraction(0.5, 2) == pytest.approx(0.25, rel=1e-6)  # arccos(sqrt(.5))/pi


@pytest.mark.parametrize("m", [1, 3, 4, 8])
def test_spherical_is_in_C_alpha_on_every_draw(m):
    alpha = 0.3
    codec = spherical.Spherical(cfg(alpha=alpha, block=m))
    x = vectors(21, seed=m)["gaussian"]
    for key in range(5):
        y, _ = roundtrip(codec, x, key)
        for s in range(0, x.size, m):
            xb, yb = x[s:s + m].astype(np.float64), y[s:s + m].astype(np.float64)
            assert np.linalg.norm(yb) == pytest.approx(math.sqrt(1 - alpha) * np.linalg.norm(xb), rel=1e-6)
            assert np.sum((yb - xb) ** 2) <= alpha * np.sum(xb ** 2)
    if m == 1:
        assert np.allclose(np.abs(y), math.sqrt(1 - alpha) * np.abs(x), rtol=1e-6)


def reference_search(codec, xb, key, block):
    """The definition, one candidate at a time in numpy: the first t whose candidate passes the
    cosine prefilter and the bound in float arithmetic, 0 past the cap."""
    nrm = np.float32(np.linalg.norm(xb.astype(np.float64)))
    u = xb.astype(np.float64) / float(np.linalg.norm(xb.astype(np.float64)))
    limit = codec.alpha * float(np.sum(xb.astype(np.float64) ** 2))
    _, cap = codec.params(xb.size)
    z = spherical.candidates(key, block, np.arange(1, cap + 1), xb.size)
    for i in np.flatnonzero(z @ u >= math.sqrt(1 - codec.alpha) * (1 - 1e-12)):
        if np.sum((codec.value(nrm, z[i]).astype(np.float64) - xb) ** 2) <= limit:
            return i + 1
    return 0


@pytest.mark.parametrize("m", [3, 4])
def test_spherical_T_is_geometric_with_mean_one_over_P_and_the_compiled_scan_finds_the_first_hit(m):
    alpha, n = 0.5, 2000
    codec = spherical.Spherical(cfg(alpha=alpha, block=m))
    x = vectors(m * n, seed=1)["gaussian"]
    rows = x.reshape(n, m)
    norms = np.array([np.linalg.norm(r.astype(np.float64)) for r in rows], dtype=np.float32)
    ts = codec.search(rows, norms, 3, np.arange(n))
    p = spherical.cap_fraction(alpha, m)
    sigma = math.sqrt((1 - p) / p ** 2 / n)
    assert min(ts) >= 1 and abs(np.mean(ts) - 1 / p) <= 5 * sigma
    for b in range(0, n, 50):
        assert ts[b] == reference_search(codec, rows[b], 3, b), b
    w = BitWriter()
    codec.encode(x[:64], w, 3)
    # Rice length per coded block: ((T-1) >> k) + 1 + k, plus the 2-bit kind and the 32-bit norm
    k, _ = codec.params(m)
    blocks = 64 // m
    tail = 64 - blocks * m
    tail_bits = 0
    if tail:  # a short last block, with its own Rice parameter
        last = codec.search(x[blocks * m:64][None], np.float32([np.linalg.norm(x[blocks * m:64].astype(np.float64))]),
                            3, np.array([blocks]))[0]
        kt, _ = codec.params(tail)
        tail_bits = 2 + (32 + ((last - 1) >> kt) + 1 + kt if last else 32 * tail)
    assert w.nbits == sum(((t - 1) >> k) + 1 + k + 2 + 32 for t in ts[:blocks]) + tail_bits


def test_spherical_zero_blocks_and_the_raw_fallback():
    codec = spherical.Spherical(cfg(alpha=0.2, block=8))
    x = np.concatenate([np.zeros(8), np.arange(1, 17)]).astype(np.float32)
    y, _ = roundtrip(codec, x)
    assert not y[:8].any() and y[8:].all()
    codec._params = {8: (0, 1)}  # T capped at 1: candidate 1 hits with P(0.2, 8) ~ 6e-4, else raw
    y, bits = roundtrip(codec, x)
    assert np.array_equal(y[8:], x[8:]) and bits == 3 * 2 + 16 * 32


# -- baselines ---------------------------------------------------------------------------------------

def unbiased_stats(codec, x, n):
    ys = np.array([codec.encode(x, BitWriter(), key) for key in range(n)], dtype=np.float64)
    x64 = x.astype(np.float64)
    omega = np.mean(np.sum((ys - x64) ** 2, axis=1)) / np.sum(x64 ** 2)
    return ys, omega, np.sum((ys.mean(0) - x64) ** 2) <= 4 * omega * np.sum(x64 ** 2) / n


def test_qsgd_unbiased_variance_levels_and_bits():
    d, s, n = 1000, 16, 2000
    codec = codecs.QSGD(cfg(levels=s))
    x = vectors(d)["gaussian"]
    ys, omega, unbiased = unbiased_stats(codec, x, n)
    assert unbiased and omega <= min(d / (4 * s * s), math.sqrt(d) / s) * (1 + 5 / math.sqrt(n))
    _, k = codec.levels(x, 1)
    assert k.min() >= 0 and k.max() <= s
    for name, v in vectors(64).items():
        _, bits = roundtrip(codec, v)
        assert bits == codec.bits(v, 7), name  # the same key: the same random levels


def test_natural_compression_powers_of_two_unbiased_nine_bits_no_clamping():
    codec = codecs.Natural(cfg())
    x = np.array([1.0, 0.75, -3.0, 1e30, -1e-30, 2.0 ** -126, 1e-44, 0.0, 2.0 ** 17 * 1.3], dtype=np.float32)
    y, bits = roundtrip(codec, x)
    assert bits == 9 * x.size
    nz = y[y != 0].astype(np.float64)
    assert np.all(np.log2(np.abs(nz)) == np.round(np.log2(np.abs(nz))))
    assert y[0] == 1.0 and y[5] == 2.0 ** -126 and y[7] == 0  # exact powers map to themselves
    ys, omega, unbiased = unbiased_stats(codec, np.full(400, 4 / 3 * 2 ** 20, dtype=np.float32), 300)
    assert unbiased and omega <= 1 / 8 * (1 + 5 / math.sqrt(300))
    big = np.full(2000, 1.3e30, dtype=np.float32)  # GRACE clamps exponents above 2^17: we must not
    assert abs(codec.encode(big, BitWriter(), 5).astype(np.float64).mean() / 1.3e30 - 1) < 0.02
    with pytest.raises(ValueError, match="2\\^127"):
        codec.encode(np.array([3e38], dtype=np.float32), BitWriter(), 0)


def test_topk_exact_support_ties_and_contraction():
    codec = codecs.TopK(cfg(ratio=0.3))
    x = np.array([1, -3, 3, 0, 2, -2, 0.5, 3, 0, 1], dtype=np.float32)
    y, bits = roundtrip(codec, x)
    assert list(np.flatnonzero(y)) == [1, 2, 7]  # the three 3s; ties go to the lower index
    assert bits == 3 * (32 + 4)
    k = 300  # ratio 0.3 of 1000
    for v in vectors(1000).values():
        y, _ = roundtrip(codec, v)
        v64 = v.astype(np.float64)
        assert np.count_nonzero(y) <= k and np.sum((y - v64) ** 2) <= (1 - k / 1000) * np.sum(v64 ** 2)


@pytest.mark.parametrize("seed", range(20))
def test_topk_selection_is_what_a_stable_descending_sort_picks(seed):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 3000))
    a = np.abs(rng.integers(-4, 5, d).astype(np.float32) * rng.choice([1.0, 0.5]))  # many ties, zeros
    if seed % 2:
        a = np.abs(rng.standard_normal(d).astype(np.float32))
    for k in (1, max(1, d // 7), d - 1 or 1, d):
        expected = np.sort(np.argsort(-a, kind="stable")[:k])
        assert np.array_equal(codecs.top_k_indices(a, k), expected), (d, k)


@pytest.mark.parametrize("name", ["sparse-dither", "qsgd", "natural", "topk", "spherical"])
def test_edge_cases(name):
    codec = quantize.CODECS[name](cfg(block=4))
    zeros = np.zeros(13, dtype=np.float32)
    y, bits = roundtrip(codec, zeros)
    assert not y.any()
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN or Inf"):
            codec.encode(np.array([1, bad, 2], dtype=np.float32), BitWriter(), 0)
    roundtrip(codec, np.full(16, 1e30, dtype=np.float32))  # ||x||^2 overflows float32: computed in float64
    roundtrip(codec, np.full(16, 1e-45, dtype=np.float32))  # denormals
    roundtrip(codec, np.array([2.5], dtype=np.float32))


@pytest.mark.parametrize("name,extra", [("sparse-dither", {}), ("sparse-dither", {"dither": "rand"}), ("qsgd", {}),
                                        ("natural", {}), ("topk", {}), ("spherical", {"block": 4})])
def test_one_codec_reusing_its_buffers_codes_like_a_fresh_one_per_tensor(name, extra):
    """The work buffers a codec keeps between tensors (grown, shrunk, left dirty) and the caller's
    `out` (holding garbage) change no bit of any stream or value: a zero tensor after a nonzero one,
    a long one after a short one, every nonzero pattern."""
    kept = quantize.CODECS[name](cfg(**extra))
    sequence = [vectors(301)["gaussian"], np.zeros(301, np.float32), vectors(40, 1)["heavy"],
                vectors(1000, 2)["third"], np.zeros(7, np.float32), vectors(1000, 3)["mixed"], vectors(5)["onehot"]]
    for key, x in enumerate(sequence):
        fresh = quantize.CODECS[name](cfg(**extra))
        w_fresh, w_kept = BitWriter(), BitWriter()
        y = fresh.encode(x, w_fresh, key)
        out = np.full(x.size, 7.0, dtype=np.float32)
        assert kept.encode(x, w_kept, key, out=out) is out
        assert w_kept.bytes().tobytes() == w_fresh.bytes().tobytes() and w_kept.nbits == w_fresh.nbits, key
        assert np.array_equal(out.view(np.uint32), y.view(np.uint32)), key
        out = np.full(x.size, -3.0, dtype=np.float32)
        r = BitReader(w_kept.bytes())
        assert kept.decode(r, x.size, key, out=out) is out
        r.finish()
        assert np.array_equal(out.view(np.uint32), y.view(np.uint32)), key

def test_a_reader_refuses_truncated_or_extended_streams():
    codec = codecs.SparseDither(cfg())
    w = BitWriter()
    codec.encode(vectors(50)["gaussian"], w, 0)
    data = w.bytes()
    with pytest.raises(PayloadError):
        codec.decode(BitReader(data[:-3]), 50, 0)
    r = BitReader(np.concatenate([data, [0]]).astype(np.uint8))
    codec.decode(r, 50, 0)
    with pytest.raises(PayloadError, match="left over"):
        r.finish()


# -- transport under mpiexec ----------------------------------------------------------------------------

EXCHANGED = [("sparse-dither", []), ("sparse-dither", ["--dither", "rand"]), ("qsgd", []), ("natural", []),
             ("topk", ["--ratio", "0.2"]), ("spherical", ["--alpha", "0.5", "--block", "4"])]


SHAPES = [(24, 40), (6, 30), (48, 16), (12, 12), (8, 3, 2, 2), (5,)]  # compress_stream.py's tensors
FRAME = 1 + 4 * len(CONTROL) + 4  # version, control words, CRC; and 4 bytes of length a piece


@pytest.mark.parametrize("name,extra", EXCHANGED)
def test_every_rank_decodes_the_same_sum_of_what_each_sent(request, tmp_path_factory, name, extra):
    n, steps = 3, 4
    ranks = stream(request, tmp_path_factory, n, steps)
    d = sum(math.prod(s) for s in SHAPES)
    for t in range(steps):
        stats = [eval_stats(rr["stats"][t]) for rr in ranks]
        for rr, st in zip(ranks, stats):  # each rank's wire bytes: its payload + the size exchange
            payload = sum(math.ceil(b / 8) for b in st["segment_bits"]) + FRAME + 4 * len(SHAPES)
            assert rr["wire"][t] == payload + 8 * n
            assert st["decoded_values"] == (n - 1) * d  # every other rank's payload, whole


@pytest.mark.parametrize("name,extra", [EXCHANGED[i] for i in (0, 2, 4, 5)])
def test_the_sharded_exchange_decodes_two_gradients_a_rank_and_keeps_every_residual(request, tmp_path_factory, name,
                                                                                     extra):
    """At 4 ranks (auto: sharded) every rank decodes the ~d/4 values of its share from each other
    rank's pieces, and the other shares' encoded sums: under 2d, where the gather exchange decodes
    3d. The second
    encoding's error joins the residual of the rank that encoded the sum, so what every rank
    gets is still the sum of what each rank's residual says it sent."""
    n, steps = 4, 4
    ranks = stream(request, tmp_path_factory, n, steps)
    d = sum(math.prod(s) for s in SHAPES)
    ends = np.cumsum([0] + [math.prod(s) for s in SHAPES])
    bounds = [j * d // n for j in range(n + 1)]
    pieces = [sum(1 for a, b in zip(ends, ends[1:]) if max(a, lo) < min(b, hi)) for lo, hi in zip(bounds, bounds[1:])]
    for t in range(steps):
        for rank, rr in enumerate(ranks):
            st = eval_stats(rr["stats"][t])
            share = bounds[rank + 1] - bounds[rank]  # d / n, give or take a value
            assert st["decoded_values"] == (n - 1) * share + d - share < 2 * d
            bits = st["segment_bits"]  # its pieces of every share in share order, then its share's sum
            assert len(bits) == sum(pieces) + pieces[rank]
            sizes, at = [], 0
            for count in pieces + [pieces[rank]]:
                sizes.append(sum(math.ceil(b / 8) for b in bits[at:at + count]) + FRAME + 4 * count)
                at += count
            # the size exchange and the pieces for the other ranks; the size exchange and the sum
            assert rr["wire"][t] == 8 * n + sum(sizes[:n]) - sizes[rank] + 8 * n + sizes[n]


def test_the_sharded_exchange_of_an_unbiased_codec_stays_unbiased(tmp_path):
    """qsgd without error feedback, sharded over 4 ranks: each share's sum is rounded twice, each
    time without bias, so what every rank gets regresses on the true sum with slope 1, within five
    standard errors of the slope (its errors are independent roundings given the true values)."""
    n, steps = 4, 30
    r = mpi(n, [WORKERS / "compress_stream.py", tmp_path, "noise", steps, "--compressor", "qsgd", "--levels", 2,
                "--start-compress-step", 0, "--quantizer-exchange", "sharded"])
    assert r.returncode == 0, r.stderr
    ranks = [dict(np.load(tmp_path / f"rank-{k}.npz")) for k in range(n)]
    true = sum(rr["g"].astype(np.float64) for rr in ranks)
    error = ranks[0]["result"].astype(np.float64) - true
    assert np.abs(error).max() > 0.1 * np.abs(true).max()  # two levels: coarse, and not vacuous
    slope_error = np.sum(error * true) / np.sum(true ** 2)
    standard_error = np.sqrt(np.sum(error ** 2 * true ** 2)) / np.sum(true ** 2)
    assert abs(slope_error) < 5 * standard_error


def stream(request, tmp_path_factory, n: int, steps: int) -> list[dict]:
    """Each rank's record of `steps` exchanges of Gaussian noise with error feedback, by the compressor
    this test instance names (its siblings' runs in the same launch), checked for what every exchange
    must hold: the same bits on every rank, and their sum what the ranks' residuals say each sent,
    step by step and over all steps."""
    def case(name, extra):
        return n, WORKERS / "compress_stream.py", ["noise", steps, "--compressor", name, "--error-feedback", "on", *extra]
    folder = one_launch_per_world_size(request, tmp_path_factory, case)
    ranks = [dict(np.load(folder / f"rank-{k}.npz")) for k in range(n)]
    for t in range(steps):
        sent = [rr["g"][t].astype(np.float64) + rr["e_old"][t] - rr["e_new"][t] for rr in ranks]
        for rr in ranks:
            assert np.array_equal(rr["result"][t], ranks[0]["result"][t])  # bitwise, on every rank
        np.testing.assert_allclose(ranks[0]["result"][t], np.sum(sent, axis=0), rtol=1e-5, atol=1e-6)
    # error feedback telescopes: sum of what was sent = sum of gradients - the last residual
    for rr in ranks:
        sent_total = sum(rr["g"][t].astype(np.float64) + rr["e_old"][t] - rr["e_new"][t] for t in range(steps))
        np.testing.assert_allclose(sent_total, rr["g"].astype(np.float64).sum(0) - rr["e_new"][-1], atol=1e-5)
    return ranks


def eval_stats(text):
    import json
    return json.loads(str(text))


def test_randk_error_feedback_telescopes(tmp_path):
    r = mpi(2, [WORKERS / "compress_stream.py", tmp_path, "noise", 4, "--compressor", "randk", "--ratio", "0.25",
                "--error-feedback", "on"])
    assert r.returncode == 0, r.stderr
    ranks = [dict(np.load(tmp_path / f"rank-{k}.npz")) for k in range(2)]
    for t in range(4):
        sent = [rr["g"][t].astype(np.float64) + rr["e_old"][t] - rr["e_new"][t] for rr in ranks]
        # recomputing p = g + e in float64 differs from the float32 p by up to half an ulp per rank
        ulp = max(np.spacing(np.abs(rr["g"][t] + rr["e_old"][t]).max()) for rr in ranks)
        np.testing.assert_allclose(ranks[0]["result"][t], sent[0] + sent[1], rtol=1e-5, atol=2 * ulp)
        # only the k chosen coordinates of each tensor travel (elsewhere only float32 rounding remains)
        assert np.count_nonzero(np.abs(sent[0]) > 2 * ulp) == sum(math.ceil(0.25 * d) for d in (960, 180, 768, 144, 96, 5))


def test_randk_shares_its_coordinates_and_is_unbiased(tmp_path):
    n = 2
    r = mpi(n, [WORKERS / "compress_stream.py", tmp_path, "noise", 3, "--compressor", "randk", "--ratio", "0.25"])
    assert r.returncode == 0, r.stderr
    ranks = [dict(np.load(tmp_path / f"rank-{k}.npz")) for k in range(n)]
    numels = [24 * 40, 6 * 30, 48 * 16, 12 * 12, 8 * 12, 5]
    ks = [math.ceil(0.25 * d) for d in numels]
    for t in range(3):
        res = ranks[0]["result"][t]
        assert np.array_equal(res, ranks[1]["result"][t])
        at = 0
        total = ranks[0]["g"][t] + ranks[1]["g"][t]
        for d, k in zip(numels, ks):
            chosen = np.flatnonzero(res[at:at + d])
            assert chosen.size == k
            np.testing.assert_allclose(res[at:at + d][chosen], total[at:at + d][chosen] * d / k, rtol=1e-5)
            at += d
        assert ranks[0]["wire"][t] == 4 * (sum(ks) + len(CONTROL))
    d, k = 1000, 100  # unbiased with variance d/k - 1, from the same shared draws the compressor uses
    x = np.random.default_rng(0).standard_normal(d)
    ys = []
    for step in range(3000):
        idx = np.random.default_rng([0, step, 0, 4]).choice(d, k, replace=False)
        y = np.zeros(d)
        y[idx] = x[idx] * d / k
        ys.append(y)
    ys = np.array(ys)
    omega = np.mean(np.sum((ys - x) ** 2, axis=1)) / np.sum(x ** 2)
    assert omega == pytest.approx(d / k - 1, rel=5 / math.sqrt(3000))
    assert np.sum((ys.mean(0) - x) ** 2) <= 4 * omega * np.sum(x ** 2) / 3000


def test_every_field_keeps_the_bit_layout_of_the_per_bit_codec():
    """The compiled writer and reader against per-bit references of each field's layout, every
    field starting at every bit offset."""
    def bits(values, width):
        shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
        return ((np.asarray(values, dtype=np.uint64)[:, None] >> shifts[None, :]) & np.uint64(1)).astype(bool).ravel()

    def unary(values):
        return np.concatenate([np.r_[np.ones(v, dtype=bool), False] for v in values])

    def gamma(values):
        n = np.array([int(v).bit_length() - 1 for v in values])
        return np.concatenate([unary(n)] + [bits([v], w) for v, w in zip(values, n)])

    def rice(values, k):
        return np.concatenate([unary(np.asarray(values) >> k), bits(np.asarray(values) & ((1 << k) - 1), k)])
    rng = np.random.default_rng(5)
    for width in range(0, 64):
        fixed = rng.integers(0, 2 ** 63, 257, dtype=np.int64) >> max(0, 63 - width) if width else np.zeros(9, np.int64)
        fixed[:3] = [0, (1 << width) - 1, 1 if width else 0]
        runs = rng.geometric(1 / (1 + width), 50) - 1
        positive = np.maximum(1, fixed[:50])
        rice_values, k = fixed[:50] >> max(0, width - 24), min(width, 20)  # quotients below 2^4
        for offset in (0, 3, 7):
            writer = BitWriter()
            writer.fixed(np.ones(offset, np.int64), 1)
            writer.fixed(fixed, width)
            writer.unary(runs)
            writer.gamma(positive)
            writer.rice(rice_values, k)
            want = np.concatenate([np.ones(offset, bool), bits(fixed, width), unary(runs), gamma(positive),
                                   rice(rice_values, k)])
            got = np.unpackbits(writer.bytes()).astype(bool)
            assert writer.nbits == want.size and np.array_equal(got[:want.size], want) and not got[want.size:].any()
            reader = BitReader(writer.bytes())
            assert np.array_equal(reader.fixed(offset, 1), np.ones(offset))
            assert np.array_equal(reader.fixed(fixed.size, width), fixed), (width, offset)
            assert np.array_equal(reader.unary(runs.size, int(runs.max())), runs)
            assert np.array_equal(reader.gamma(positive.size), positive)
            assert np.array_equal(reader.rice(rice_values.size, k, cap=2 ** 30), rice_values)
            reader.finish()


def test_codecs_write_the_bitstreams_of_the_numpy_implementation():
    """Digests of every codec's payload and decoded values, recorded from the array (numpy)
    implementation before the compiled kernels replaced it: fixed seeds, several settings, sizes
    and value distributions (tests/data/codec_digests.json)."""
    import hashlib
    import json
    from pathlib import Path
    recorded = json.loads((Path(__file__).parent / "data" / "codec_digests.json").read_text())
    settings = {"sparse-dither": [{}, {"dither": "rand"}, {"nu": 2.0}], "qsgd": [{}, {"levels": 1}, {"levels": 255}],
                "natural": [{}], "topk": [{}, {"ratio": 0.5}], "spherical": [{}, {"alpha": 0.5, "block": 4}]}
    checked = 0
    for name, variants in settings.items():
        for variant in variants:
            codec = quantize.CODECS[name](cfg(**variant))
            for d in ([1, 2, 13, 200] if name == "spherical" else [1, 2, 13, 1000, 70001]):
                for kind, x in vectors(d, seed=d).items():
                    x = np.clip(x, -1e37, 1e37) if name == "natural" else x
                    for key in (0, 12345):
                        w = BitWriter()
                        y = codec.encode(x, w, key)
                        digest = (hashlib.sha256(w.bytes().tobytes()).hexdigest()[:24] + " "
                                  + hashlib.sha256(y.view(np.uint32).tobytes()).hexdigest()[:24])
                        label = f"{name} {json.dumps(variant, sort_keys=True)} d={d} {kind} key={key}"
                        assert recorded[label] == digest, label
                        r = BitReader(w.bytes())
                        assert np.array_equal(codec.decode(r, d, key).view(np.uint32), y.view(np.uint32)), label
                        r.finish()
                        checked += 1
    assert checked == len(recorded) == 636


def test_natural_codes_from_float32_bits_are_the_log2_rounding_they_replaced():
    """Codes and values built from the float32 bits against the float64 log2/exp2 formulas (same Philox draws)."""
    natural = codecs.Natural(SimpleNamespace())

    def reference(x, key):
        t = np.abs(x.astype(np.float64))
        u = np.random.Generator(np.random.Philox(key)).random(x.size)
        tiny = t < 2.0 ** -126
        e = np.floor(np.log2(np.where(tiny, 1.0, t)))
        code = (e + (u < (t - np.exp2(e)) / np.exp2(e)) + 127).astype(np.int64)
        code[tiny] = (u[tiny] < t[tiny] / 2.0 ** -126).astype(np.int64)
        mag = np.where(code > 0, np.ldexp(np.float32(1), (code - 127).astype(np.int32)), np.float32(0))
        return code, np.where(np.signbit(x), -mag, mag).astype(np.float32)
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.standard_normal(20000), rng.standard_normal(2000) * 1e-40,  # subnormals
                        [0.0, -0.0, 1.0, -2.0 ** -149, 2.0 ** -126, 1.9 * 2.0 ** 126]]).astype(np.float32)
    for key in range(4):
        code, value = reference(x, key)
        assert np.array_equal(natural.codes(x, key), code)
        assert np.array_equal(natural.values(code, np.signbit(x)).view(np.uint32), value.view(np.uint32))


@pytest.mark.parametrize("name", sorted(quantize.CODECS))
def test_damaged_streams_raise_payload_errors_and_never_read_past_the_buffer(name):
    """Bit flips, truncations and random tails: the compiled readers either decode or refuse with
    PayloadError (a read past the buffer would crash the interpreter, failing the run)."""
    codec = quantize.CODECS[name](cfg())
    rng = np.random.default_rng(11)
    d = 40 if name == "spherical" else 3000
    w = BitWriter()
    codec.encode(vectors(d)["heavy"], w, 3)
    clean = w.bytes()
    outcomes = {"decoded": 0, "refused": 0}
    for trial in range(300):
        data = clean.copy()
        if trial % 3 == 0:
            flips = rng.integers(0, 8 * data.size, 1 + trial % 7)
            np.bitwise_xor.at(data, flips // 8, (0x80 >> (flips % 8)).astype(np.uint8))
        elif trial % 3 == 1:
            data = data[: rng.integers(0, data.size)]
        else:
            data = np.concatenate([data[: rng.integers(0, data.size)], rng.integers(0, 256, 64, dtype=np.uint8)])
        try:
            r = BitReader(data)
            y = codec.decode(r, d, 3)
            r.finish()
            assert y.shape == (d,) and y.dtype == np.float32
            outcomes["decoded"] += 1
        except PayloadError:
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 100, outcomes  # truncations of a tight stream cannot all decode
