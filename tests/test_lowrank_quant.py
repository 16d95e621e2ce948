"""lowrank with quantized factors (mixed precision along the spectrum): parameters, quality against an
independent torch SVD, the singular-value refit, weighted encoding, and component checks."""
import numpy as np
import pytest
import torch
from conftest import make_delta

import deltapack as dp
from deltapack import lowrank, reference as R


def spectrum_matrix(rows=120, cols=90, seed=0):
    """A delta with a decaying spectrum (like a fine-tune's), float32."""
    rng = np.random.default_rng(seed)
    k = min(rows, cols)
    u = np.linalg.qr(rng.standard_normal((rows, k)))[0]
    v = np.linalg.qr(rng.standard_normal((cols, k)))[0]
    s = 1.0 / (1.0 + np.arange(k)) ** 1.2
    return ((u * s) @ v.T).astype(np.float32)


def torch_truncation(x, r):
    U, S, Vh = torch.linalg.svd(torch.from_numpy(x).double())
    return ((U[:, :r] * S[:r]) @ Vh[:r]).numpy()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_canonical_params_and_spelling():
    x = spectrum_matrix()
    assert dp.encode(x, "lowrank:bits=8/4/2,bands=4/28/32").params == \
        {"rank": 64, "bits": "8/4/2", "bands": "4/28/32", "group": 64}
    assert dp.encode(x, "lowrank:rank=12,bits=6").params == {"rank": 12, "bits": "6", "bands": "12", "group": 64}
    assert dp.encode(x, "lowrank", rank=7, bits=3, group=16).params["group"] == 16
    assert dp.encode(x, "lowrank:rank=8").params == {"rank": 8, "dtype": "f16"}  # the float layout is unchanged


@pytest.mark.parametrize("recipe,msg", [
    ("lowrank:bits=0,rank=4", r"bits=0 is out of range \[1, 8\]"),
    ("lowrank:bits=9,rank=4", r"bits=9 is out of range"),
    ("lowrank:bits=8/4,bands=4", "bits has 2 entries and bands 1"),
    ("lowrank:bits=8/4", "needs bands="),
    ("lowrank:bits=8/4,bands=4/4,rank=9", "rank=9 is not the sum of bands=4/4"),
    ("lowrank:bits=8/x,bands=4/4", "bits must be an integer or a list"),
    ("lowrank:bits=8,bands=0", "every band needs rank >= 1"),
    ("lowrank:bits=4,rank=4,group=12", "group=12 must be a multiple of 8"),
    ("lowrank:bits=4,rank=4,dtype=f16", "unknown parameter 'dtype'"),
    ("lowrank:bits=4,rank=95", "exceeds min"),
])
def test_invalid_parameters(recipe, msg):
    with pytest.raises(ValueError, match=msg):
        dp.encode(spectrum_matrix(), recipe)


def test_eight_bit_factors_match_the_truncated_svd():
    """At 8 bits the stored factors are within a fraction of a percent of torch's rank-r truncation."""
    x = spectrum_matrix()
    for r in (1, 5, 20):
        d = dp.decode(dp.encode(x, "lowrank", rank=r, bits=8))
        best = torch_truncation(x, r)
        assert rel(d, best) < 5e-3 * np.linalg.norm(x) / np.linalg.norm(best) + 5e-3, r
        # ... and the error against x is the optimal one (Eckart-Young) up to that quantization.
        assert rel(d, x) <= rel(best, x) * 1.01 + 1e-4


def test_error_falls_with_bits_and_bands():
    x = spectrum_matrix(seed=1)
    errs = [rel(dp.decode(dp.encode(x, "lowrank", rank=16, bits=b)), x) for b in (1, 2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    lo = rel(dp.decode(dp.encode(x, "lowrank:bits=8/3,bands=4/28")), x)
    assert lo < rel(dp.decode(dp.encode(x, "lowrank:bits=8,bands=4")), x)


def test_size_is_what_the_components_hold():
    x = spectrum_matrix(100, 200)
    enc = dp.encode(x, "lowrank:bits=8/4/2,bands=2/3/5,group=64")
    rows, cols = 100, 200
    codes = sum(n * (-(-rows * b // 8) + -(-cols * b // 8)) for b, n in ((8, 2), (4, 3), (2, 5)))
    scales = 10 * 2 * (-(-rows // 64) + -(-cols // 64))
    assert enc.nbytes == codes + scales + 10 * 4
    assert sorted(enc.components) == ["codes", "s", "scales"]
    assert enc.components["codes"].shape == (codes,) and enc.components["scales"].shape == (10, 2 + 4)


def test_vector_quantizer_levels_and_bound():
    """Codes stand for (code - (2^b - 1)/2) * scale; unclipped elements are within half a step."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 200)).astype(np.float32)
    for b in (1, 2, 3, 5, 8):
        packed, scales = R.quantize_vectors(x, b, 64)
        xh = R.dequantize_vectors(packed, scales, b, 64, 200)
        step = np.repeat(scales.astype(np.float32), 64, axis=1)[:, :200]
        levels = xh / np.where(step > 0, step, 1) + ((1 << b) - 1) / 2
        np.testing.assert_allclose(levels, np.rint(levels), atol=1e-3)  # integral codes
        assert ((levels >= -1e-3) & (levels <= (1 << b) - 1 + 1e-3)).all()
        inside = np.abs(x) <= step * ((1 << b) - 1) / 2
        assert (np.abs(xh - x)[inside] <= step[inside] / 2 * (1 + 1e-5)).all(), b


def test_singular_value_refit_does_not_increase_the_error():
    x = spectrum_matrix(seed=3)
    for bits in (2, 3):
        enc = dp.encode(x, "lowrank", rank=10, bits=bits)
        refit = dp.decode(enc)
        u, s, v, _, _ = lowrank.svd(x, 10)
        comps = dict(enc.components)
        comps["s"] = s.astype(np.float32)
        plain = R.decode_lowrank(comps, x.shape, **enc.params)
        assert rel(refit, x) <= rel(plain, x) + 1e-7


def test_weighted_encoding_lowers_the_weighted_error():
    x = make_delta((80, 120), "f32", seed=4)
    rng = np.random.default_rng(4)
    rw, cw = rng.uniform(0.01, 1, 80) ** 3, rng.uniform(0.01, 1, 120) ** 3
    werr = lambda d: float(np.einsum("i,ij,j->", rw, (d - x).astype(np.float64) ** 2, cw))  # noqa: E731
    plain = dp.decode(dp.encode(x, "lowrank", rank=12, bits=6))
    weighted = dp.decode(dp.encode(x, "lowrank", rank=12, bits=6, weights=(rw, cw)))
    assert werr(weighted) < 0.9 * werr(plain)
    with pytest.raises(ValueError, match="weights apply"):
        dp.encode(x, "sign", weights=(rw, cw))


def test_factors_for_export_multiply_to_the_decode():
    x = spectrum_matrix(seed=5)
    enc = dp.encode(x, "lowrank:bits=8/3,bands=3/9")
    u, v = R.lowrank_factors(enc.components, enc.shape, **enc.params)
    assert u.shape == (120, 12) and v.shape == (12, 90)
    np.testing.assert_allclose(u.astype(np.float64) @ v, dp.decode(enc), atol=1e-6 * np.abs(x).max())


@pytest.mark.parametrize("component,bad,msg", [
    ("codes", lambda a: a[:-1], r"component 'codes' has shape"),
    ("scales", lambda a: a.astype(np.float32), r"component 'scales' has dtype f32, expected f16"),
    ("scales", lambda a: a[:, :-1], r"component 'scales' has shape"),
    ("s", lambda a: a[:-1], r"component 's' has shape"),
    ("codes", None, r"missing component 'codes'"),
])
def test_component_checks(tmp_path, component, bad, msg):
    enc = dp.encode(spectrum_matrix(), "lowrank:bits=8/2,bands=2/3")
    comps = dict(enc.components)
    if bad is None:
        del comps[component]
    else:
        comps[component] = np.ascontiguousarray(bad(comps[component]))
    broken = dp.Encoded("lowrank", enc.params, enc.shape, enc.dtype, comps, "w")
    with pytest.raises(dp.FormatError, match=msg):
        dp.decode(broken)
    with pytest.raises(dp.FormatError, match=msg):
        dp.save(tmp_path / "x.dpk", {"w": broken})


def test_roundtrip_through_a_file(tmp_path):
    x = spectrum_matrix()
    enc = dp.encode(x, "lowrank:bits=6/3,bands=4/8")
    dp.save(tmp_path / "q.dpk", {"w": enc})
    back = dp.open(tmp_path / "q.dpk")["w"]
    assert back.params == enc.params
    np.testing.assert_array_equal(dp.decode(back), dp.decode(enc))


# The production encoders (deltapack.lowrank) against the readable spec (deltapack.reference).

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_production_vector_quantizer_is_the_spec_bit_for_bit(bits):
    rng = np.random.default_rng(bits)
    for n, length in ((3, 200), (5, 64), (2, 1), (4, 130)):  # whole groups, a short last group, one element
        x = rng.standard_normal((n, length)).astype(np.float32)
        x[0, :5] = 0
        x[-1] = 0  # an all-zero row: zero scales
        want_codes, want_scales = R.quantize_vectors(x, bits, 64)
        got_codes, got_scales = lowrank.quantize_vectors(x, bits, 64)
        np.testing.assert_array_equal(got_codes, want_codes)
        np.testing.assert_array_equal(got_scales.view(np.uint16), want_scales.view(np.uint16))


@pytest.mark.parametrize("bits,bands,weighted", [("8/4", "3/5", True), ("6", "8", False), ("2", "40", False)])
def test_production_mixed_precision_encoder_is_the_spec(bits, bands, weighted):
    """Where both take LAPACK's full SVD (a small matrix) the codes and scales are the same bits; the
    singular values, a least-squares refit whose arithmetic the format does not fix, agree to float32."""
    rng = np.random.default_rng(7)
    m = rng.standard_normal((60, 90)).astype(np.float32)
    w = (rng.random(60) + 0.5, rng.random(90) + 0.5) if weighted else (None, None)
    want = R.encode_lowrank_quant(m, bits, bands, 64, *w)
    got = lowrank.encode_lowrank_quant(m, bits, bands, 64, *w)
    np.testing.assert_array_equal(got["codes"], want["codes"])
    np.testing.assert_array_equal(got["scales"].view(np.uint16), want["scales"].view(np.uint16))
    np.testing.assert_allclose(got["s"], want["s"], rtol=1e-5)


def test_production_randomized_svd_finds_the_spec_truncation_on_a_large_matrix():
    """Above 512 rows and columns the production encoder's SVD is randomized: the product of its factors is
    the truncated SVD's (torch's, independent) to the accuracy of the power iterations."""
    x = spectrum_matrix(rows=700, cols=600, seed=8)
    enc = lowrank.encode_lowrank(x, rank=16, dtype="f32")
    got = enc["u"].astype(np.float64) @ enc["v"].astype(np.float64)
    want = torch_truncation(x, 16)
    assert rel(got, want) < 1e-3
    spec = R.encode_lowrank(x, rank=16, dtype="f32")
    assert rel(got, spec["u"].astype(np.float64) @ spec["v"].astype(np.float64)) < 1e-3


@pytest.mark.parametrize("rows,cols", [(300, 4000), (4000, 300)])
def test_full_svd_of_a_large_short_matrix_from_its_gram_matrix(rows, cols, monkeypatch):
    """A rank of half the short side on a matrix of >= 2^20 elements takes the Gram matrix's eigenvectors
    (float64), not LAPACK's SVD: its singular values and vectors are torch's (independent) to float32
    accuracy over a 10^4 decay, and a rank-deficient matrix (zero rows) gives zero directions, not NaN."""
    def no_lapack_svd(*a, **k):
        raise AssertionError("LAPACK's SVD was called")

    x = spectrum_matrix(rows, cols, seed=3)
    monkeypatch.setattr(lowrank.np.linalg, "svd", no_lapack_svd)
    u, s, v, _, _ = lowrank.svd(x, 150)
    monkeypatch.undo()
    U, S, Vh = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(x).double(), full_matrices=False))
    np.testing.assert_allclose(s, S[:150], rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(u * U[:, :150].T, axis=1)), 1, atol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(v * Vh[:150], axis=1)), 1, atol=1e-5)
    if rows < cols:
        x[: rows // 2] = 0
    else:
        x[:, : cols // 2] = 0
    u, s, v, _, _ = lowrank.svd(x, 150)
    assert np.isfinite(u).all() and np.isfinite(v).all() and np.isfinite(s).all()
    assert rel((u.T * s) @ v, torch_truncation(x, 150)) < 1e-5
