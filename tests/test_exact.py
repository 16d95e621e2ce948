"""The C++ codecs against the numpy reference (python/deltapack/reference.py), bit for bit, on
every SIMD path, for f32/f16/bf16 deltas and bases."""
import numpy as np
import pytest
import torch
from conftest import bits, exact_f32, make_delta

import deltapack as dp
from deltapack import reference as R

CONFIGS = [
    ("sign", {}),
    ("sign", {"scope": "row"}),
    ("sign", {"scope": "group", "group": 64}),
    ("levels", {"bits": 1}),
    ("levels", {"bits": 2}),
    ("levels", {"bits": 4}),
    ("levels", {"bits": 3}),
    ("levels", {"bits": 6}),
    ("levels", {"bits": 8}),
    ("quant", {"bits": 2, "group": 32}),
    ("quant", {"bits": 3}),
    ("quant", {"bits": 4, "group": 64}),
    ("quant", {"bits": 8, "group": 100}),
    ("sparse", {"p": 0.9, "seed": 7}),
    ("sparse", {"p": 0.99, "index": "gaps", "values": "bf16"}),
    ("sparse", {"p": 0.5, "mode": "magnitude", "values": "int8"}),
    ("sparse", {"p": 0.7, "mode": "magnitude", "values": "f32", "index": "bitmap"}),
    ("lowrank", {"rank": 5}),
    ("lowrank", {"rank": 3, "dtype": "bf16"}),
    ("lowrank", {"bits": "8/4/2", "bands": "1/2/2"}),
    ("lowrank", {"rank": 4, "bits": 3, "group": 8}),
    ("lowrank", {"bits": "1/5", "bands": "2/1", "group": 16}),
    ("dense", {}),
    ("dense", {"dtype": "bf16"}),
    ("dense", {"dtype": "f16"}),
]
SHAPES = [(37, 300), (4, 3, 45), (129,)]


def reference_encode(codec, x, params):
    """(components, encoder-chosen params) from the reference."""
    out = R.ENCODERS[codec](x, **params)
    return out if isinstance(out, tuple) else (out, {})


def id_of(c):
    return f"{c[0]}-" + "-".join(f"{k}{v}" for k, v in c[1].items())


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("codec,params", CONFIGS, ids=[id_of(c) for c in CONFIGS])
def test_encode_decode_match_reference(codec, params, shape, dtype, simd_path):
    if codec == "lowrank" and len(shape) == 1 and (params.get("rank", 2) > 1 or "bands" in params):
        pytest.skip("a 1-D tensor has rank <= 1")
    delta = make_delta(shape, dtype, seed=len(shape))
    x = exact_f32(delta)
    enc = dp.encode(delta, codec, **params)
    assert enc.shape == shape and enc.codec == codec
    if codec != "lowrank":  # lowrank's encoder *is* the numpy reference (LAPACK SVD)
        ref_comps, ref_extra = reference_encode(codec, x, params)
        for k, v in ref_extra.items():
            assert enc.params[k] == v, k
        assert sorted(enc.components) == sorted(ref_comps)
        for name, ref in ref_comps.items():
            got = enc.components[name]
            ref = np.asarray(ref).reshape(got.shape)
            np.testing.assert_array_equal(got.view(np.uint8), ref.astype(got.dtype).view(np.uint8),
                                          err_msg=f"component {name}")
    ref_decoded = R.DECODERS[codec](enc.components, shape, **enc.params)
    got = dp.decode(enc)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_array_equal(bits(got).reshape(-1), bits(ref_decoded.astype(np.float32)).reshape(-1))


APPLY_CONFIGS = [CONFIGS[i] for i in (1, 5, 11, 13, 17, 19, 23)]


def reference_rule(rounding: str, codec: str) -> str:
    """The rule `rounding` stands for on a tensor of `codec` (auto: dithered unless the codec is exact)."""
    return rounding if rounding != "auto" else "nearest" if codec == "dense" else "dithered"


@pytest.mark.parametrize("rounding", ["auto", "nearest", "dithered"])
@pytest.mark.parametrize("out_dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("base_dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("alpha", [1.0, 0.37, -1.0])
@pytest.mark.parametrize("codec,params", APPLY_CONFIGS, ids=[id_of(c) for c in APPLY_CONFIGS])
def test_apply_matches_reference(codec, params, base_dtype, out_dtype, alpha, rounding, simd_path):
    """Every codec, dtype pair and rounding against the executable spec, bit for bit."""
    shape = (19, 333)
    enc = dp.encode(make_delta(shape, "f32", seed=3), codec, **params)
    base = make_delta(shape, base_dtype, seed=4, scale=0.05)
    out = make_delta(shape, out_dtype, seed=5)
    out = out.copy() if isinstance(out, np.ndarray) else out.clone()
    dp.apply(base, enc, alpha=alpha, out=out, rounding=rounding)
    d = R.DECODERS[codec](enc.components, shape, **enc.params)
    ref = R.apply(exact_f32(base), d, alpha, out_dtype, reference_rule(rounding, codec))
    np.testing.assert_array_equal(bits(out), bits(ref))


@pytest.mark.parametrize("out_dtype", ["f16", "bf16"])
def test_dithered_rounding_edges_match_reference(out_dtype, simd_path):
    """Dithered rounding where the formats are special: f16 subnormals and values below them, the largest finite
    values and past them, infinities, NaN, signed zeros and f32 subnormals; engine and spec bit for bit."""
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 1e-45, -1e-40, 2.0 ** -63, 2.0 ** -62, 3e-8, -5.9e-8, 6.0e-5, -6.1e-5, 2.0 ** -14,
                        65504.0, 65519.0, -65520.0, 65535.9, 65536.0, 1e5, 3.38e38, -3.4e38, np.inf, -np.inf, np.nan,
                        1.0, -1.0 - 2.0 ** -20], np.float32)
    mags = (10.0 ** rng.uniform(-12, 5, 4000)).astype(np.float32) * rng.choice([-1, 1], 4000).astype(np.float32)
    s = np.concatenate([special, mags]).reshape(-1, 8)
    zero = np.zeros(s.shape, np.float32)
    enc = dp.encode(zero, "dense")  # the sums are the f32 base itself
    got = dp.apply(s, enc, out=R.round_to(zero, out_dtype), rounding="dithered")
    np.testing.assert_array_equal(bits(got), bits(R.apply(s, zero, 1.0, out_dtype, "dithered")))


@pytest.mark.parametrize("out_dtype", ["f16", "bf16"])
def test_dithered_rounding_is_unbiased(out_dtype, simd_path):
    """What dithering is for: a delta far below half an output ulp vanishes when rounded to nearest, and
    survives on average when dithered (the mean change equals the delta within sampling noise)."""
    shape = (256, 1024)
    base = np.full(shape, 1.0, np.float32)  # ulp 2^-7 (bf16) / 2^-10 (f16) just above 1
    ulp = 2.0 ** (-7 if out_dtype == "bf16" else -10)
    d = np.full(shape, 0.1 * ulp, np.float32)
    enc = dp.encode(d, "sign")  # lossy codec: auto dithers
    base_o = R.round_to(base, out_dtype)
    out = R.widen(dp.apply(base_o, enc), out_dtype).astype(np.float64)
    near = R.widen(dp.apply(base_o, enc, rounding="nearest"), out_dtype)
    assert np.all(near == 1.0)  # erased
    change = out.mean() - 1.0
    assert abs(change - 0.1 * ulp) < 5 * ulp * np.sqrt(0.09 / d.size), (change, 0.1 * ulp)
    assert set(np.unique(out)) == {1.0, 1.0 + ulp}


def test_apply_in_place_and_torch_roundtrip(simd_path):
    shape = (64, 256)
    enc = dp.encode(make_delta(shape, "bf16"), "sign", scope="row")
    base = make_delta(shape, "bf16", seed=9, scale=0.05)
    expected = dp.apply(base, enc, rounding="nearest")
    assert isinstance(expected, torch.Tensor) and expected.dtype == torch.bfloat16
    ptr = base.data_ptr()
    got = dp.apply(base, enc, out=base, rounding="nearest")
    assert got.data_ptr() == ptr
    assert torch.equal(base.view(torch.int16), expected.view(torch.int16))
    # Independent check of the bf16 rounding: torch's own f32 -> bf16 conversion.
    torch_ref = (make_delta(shape, "bf16", seed=9, scale=0.05).float() + torch.from_numpy(dp.decode(enc))).to(torch.bfloat16)
    assert torch.equal(expected.view(torch.int16), torch_ref.view(torch.int16))


def test_numpy_uint16_is_bf16_bits():
    shape = (8, 40)
    enc = dp.encode(make_delta(shape), "quant", bits=4)
    base_t = make_delta(shape, "bf16", seed=2, scale=0.1)
    base_np = base_t.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits(dp.apply(base_np, enc)), bits(dp.apply(base_t, enc)))


def test_conversions_against_numpy_and_torch(simd_path):
    """f32 -> f16/bf16 rounding of the engine (dense delta of zeros) on hard values."""
    rng = np.random.default_rng(1)
    special = np.array([0.0, -0.0, 1e-8, 5.96e-8, 2.98e-8, 6.1e-5, 6.09e-5, 65504, 65519, 65520, 1e6, -1e-40,
                        1.0000001, 3.4e38, np.inf, -np.inf], np.float32)
    vals = np.concatenate([special, rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 1000)])
    vals = vals.astype(np.float32).reshape(1, -1)
    enc = dp.encode(np.zeros_like(vals), "dense")
    out16 = dp.apply(vals, enc, out=np.empty(vals.shape, np.float16))
    summed = vals + np.float32(0.0)  # IEEE: -0 + 0 = +0, as in the engine
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(bits(out16), bits(summed.astype(np.float16)))
    outbf = dp.apply(vals, enc, out=torch.empty(vals.shape, dtype=torch.bfloat16))
    np.testing.assert_array_equal(bits(outbf), bits(torch.from_numpy(summed).to(torch.bfloat16)))


def test_level_one_equals_sign_tensor():
    x = make_delta((33, 77), "f32", seed=11)
    a, b = dp.encode(x, "levels", bits=1), dp.encode(x, "sign")
    np.testing.assert_array_equal(dp.decode(a), dp.decode(b))


def test_sign_matches_bitdelta_math():
    """Independent torch formulation of BitDelta: mean|d| * sign(d)."""
    x = make_delta((50, 64), "f32", seed=12)
    t = torch.from_numpy(x).double()
    want = (t.abs().mean() * torch.where(t > 0, 1.0, -1.0)).float().numpy()
    np.testing.assert_allclose(dp.decode(dp.encode(x, "sign")), want, rtol=1e-6)
    want_row = (t.abs().mean(dim=1, keepdim=True) * torch.where(t > 0, 1.0, -1.0)).float().numpy()
    np.testing.assert_allclose(dp.decode(dp.encode(x, "sign", scope="row")), want_row, rtol=1e-6)


def test_dare_statistics_and_rescale():
    x = make_delta((200, 500), "f32", seed=13)
    enc = dp.encode(x, "sparse", p=0.9, values="f32", seed=3)
    d = dp.decode(enc)
    kept = d != 0
    assert abs(kept.mean() - 0.1) < 0.005
    np.testing.assert_array_equal(d[kept], (x * np.float32(1 / (1 - 0.9)))[kept])
    other = dp.decode(dp.encode(x, "sparse", p=0.9, values="f32", seed=4))
    assert (other != 0).sum() > 0 and not np.array_equal(other != 0, kept)


def test_magnitude_keeps_top_k():
    x = make_delta((40, 50), "f32", seed=14)
    d = dp.decode(dp.encode(x, "sparse", p=0.75, mode="magnitude", values="f32"))
    k = x.size - round(0.75 * x.size)
    top = np.sort(np.abs(x).ravel())[::-1][:k]
    np.testing.assert_array_equal(np.sort(np.abs(d[d != 0]))[::-1], top)


def test_lowrank_matches_torch_svd():
    rng = np.random.default_rng(15)
    x = (rng.standard_normal((60, 6)) @ rng.standard_normal((6, 80))).astype(np.float32)
    d = dp.decode(dp.encode(x, "lowrank", rank=6, dtype="f32"))
    np.testing.assert_allclose(d, x, atol=1e-4 * np.abs(x).max())
    U, S, Vh = torch.linalg.svd(torch.from_numpy(x).double())
    best2 = (U[:, :2] * S[:2]) @ Vh[:2]
    d2 = dp.decode(dp.encode(x, "lowrank", rank=2, dtype="f32"))
    np.testing.assert_allclose(d2, best2.numpy(), atol=1e-4 * np.abs(x).max())


def test_quant_error_bound():
    x = make_delta((30, 256), "f32", seed=16)
    for b in (2, 3, 4, 8):
        d = dp.decode(dp.encode(x, "quant", bits=b, group=128))
        qmax = 2 ** (b - 1) - 1
        g = np.abs(x.reshape(30, 2, 128)).max(axis=-1, keepdims=True)
        err = np.abs((d - x).reshape(30, 2, 128))
        assert (err <= g / qmax * 0.5 * 1.01 + 1e-12).all(), b


def test_threads_do_not_change_bits():
    x = make_delta((300, 1000), "f32", seed=17)
    a = dp.encode(x, "sign", threads=1)
    b = dp.encode(x, "sign", threads=2)
    np.testing.assert_array_equal(a.components["scales"], b.components["scales"])
    base = make_delta((300, 1000), "f32", seed=18)
    np.testing.assert_array_equal(dp.apply(base, a, threads=1), dp.apply(base, a, threads=2))


@pytest.mark.parametrize("out_dtype", ["f32", "bf16"])
def test_large_out_of_place_apply_streams_exactly(out_dtype, simd_path):
    """Outputs >= 8 MiB use streaming stores; an odd start address exercises the aligned head."""
    shape = (1030, 4099)
    enc = dp.encode(make_delta(shape, "f32", seed=21), "levels", bits=3)
    base = make_delta(shape, "bf16", seed=22, scale=0.05)
    n = shape[0] * shape[1]
    buf = torch.empty(n + 1, dtype=torch.float32 if out_dtype == "f32" else torch.bfloat16)
    out = buf[1:].view(shape)
    dp.apply(base, enc, out=out, alpha=0.5, rounding="nearest")
    ref = R.apply(exact_f32(base), R.DECODERS["levels"](enc.components, shape, bits=3), 0.5, out_dtype)
    np.testing.assert_array_equal(bits(out), bits(ref))
