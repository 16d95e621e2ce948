"""The paper's delta edits against independent torch/numpy formulations and deltapack's codecs."""
import numpy as np
import pytest

import deltapack as dp
from deltapack.research import edits as E

torch = pytest.importorskip("torch")


def delta(shape=(48, 80), seed=0, scale=1e-3):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(df=4, size=shape) * scale).astype(np.float32)


def test_dare_formula_and_codec():
    d = delta()
    p = 0.7
    m = E.dare_mask(d.shape, p, seed=3)
    assert abs(m.mean() - p) < 0.03
    for k in (0.0, 0.5, -1.0):
        got = E.dare(d, p, k=k, seed=3)
        t = torch.from_numpy(d).double()
        mt = torch.from_numpy(m).double()
        ref = k * mt * t + (1 - k * p) / (1 - p) * (1 - mt) * t
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, atol=1e-12)
        # ΔW̃ = ((k-1)(M-p)/(1-p))⊙ΔW (PAPER.md)
        np.testing.assert_allclose(got - d, ((k - 1) * (m - p) / (1 - p)) * d, rtol=1e-5, atol=1e-10)
    # k = 0 drops exactly what the sparse codec (DARE mode) drops, with the same rescale.
    enc = dp.decode(dp.encode(d, "sparse", p=p, seed=3, values="f32"))
    np.testing.assert_array_equal(E.dare(d, p, seed=3), enc)


def test_dare_unbiased_in_expectation():
    d = delta((16, 16))
    for k in (0.0, 0.5, -0.5):
        mean = np.mean([E.dare(d, 0.9, k=k, seed=s) for s in range(3000)], axis=0)
        # E[ΔW_edit] = ΔW; check within 5 standard errors elementwise (var per draw: p(1-k)^2/(1-p) ΔW^2)
        se = np.sqrt(0.9 * (1 - k) ** 2 / 0.1 * d ** 2 / 3000)
        assert np.all(np.abs(mean - d) <= 5 * se + 1e-12)


def test_dare_biased():
    d = delta()
    g = delta(seed=1)
    p, k = 0.5, 0.3
    s = (1 - k * p) / (1 - p)
    np.testing.assert_allclose(E.dare_biased(d, p, k, on="delta"), np.where(d < 0, k * d, s * d), rtol=1e-6)
    got = E.dare_biased(d, p, k, on="product", grad=g)
    np.testing.assert_allclose(got, np.where(d * g < 0, k * d, s * d), rtol=1e-6)
    # First-order effect of the product rule is always harmful for k < 1: ⟨g, ΔW̃⟩ > 0.
    assert float(np.sum(g * (got - d))) > 0
    with pytest.raises(ValueError, match="needs grad"):
        E.dare_biased(d, p, k, on="product")
    with pytest.raises(ValueError, match="grad shape"):
        E.dare_biased(d, p, k, on="product", grad=g[:2])


def test_magnitude_matches_codec_and_topk():
    d = delta()
    for p in (0.0, 0.5, 0.9, 0.99):
        got = E.magnitude(d, p)
        enc = dp.decode(dp.encode(d, "sparse", p=p, mode="magnitude", values="f32"))
        np.testing.assert_array_equal(got, enc)
        n_keep = d.size - int(round(p * d.size))
        vals, idx = torch.topk(torch.from_numpy(np.abs(d)).reshape(-1), n_keep)
        ref = np.zeros(d.size, np.float32)
        ref[idx.numpy()] = d.reshape(-1)[idx.numpy()]
        np.testing.assert_array_equal(got, ref.reshape(d.shape))
    row = E.magnitude(d, 0.75, scope="row")
    assert ((row != 0).sum(axis=1) == 20).all()


def test_magnitude_global():
    a, b = delta((8, 8)), delta((4, 32), seed=2) * 10  # b's entries dominate
    out = E.magnitude_global({"a": a, "b": b}, 0.5)
    allv = np.abs(np.concatenate([a.ravel(), b.ravel()]))
    thr = np.sort(allv)[::-1][allv.size // 2 - 1]
    kept = np.concatenate([out["a"].ravel(), out["b"].ravel()]) != 0
    assert kept.sum() == allv.size // 2 and np.all(allv[kept] >= thr)
    assert (out["b"] != 0).sum() > (out["a"] != 0).sum()


def test_bitdelta_sign_levels_codecs():
    d = delta()
    avg = np.abs(d).astype(np.float64).mean()
    np.testing.assert_allclose(E.bitdelta(d), avg * np.sign(d), rtol=1e-6)
    np.testing.assert_allclose(E.bitdelta(d, scale=2.5), 2.5 * avg * np.sign(d), rtol=1e-6)
    np.testing.assert_array_equal(E.bitdelta(d), dp.decode(dp.encode(d, "sign")))
    for bits in (2, 3, 4, 6):
        np.testing.assert_array_equal(E.bitdelta(d, levels=2 ** (bits - 1)),
                                      dp.decode(dp.encode(d, "levels", bits=bits)))
    # levels not a power of two: independent formulation with torch sort.
    t = torch.from_numpy(d).double().reshape(-1)
    order = torch.argsort(t.abs(), stable=True)
    ref = torch.empty_like(t)
    for chunk in torch.tensor_split(order, 5):  # equal counts (sizes differ by at most 1)
        ref[chunk] = t.abs()[chunk].mean()
    got = E.bitdelta(d, levels=5)
    np.testing.assert_allclose(got, (ref * torch.sign(t)).reshape(d.shape).numpy(), rtol=1e-6)
    # More levels: closer to ΔW.
    errs = [np.linalg.norm(E.bitdelta(d, levels=L) - d) for L in (1, 2, 4, 16, 64)]
    assert all(x > y for x, y in zip(errs, errs[1:]))


def test_bitdelta_random():
    d = delta((128, 128))
    avg = np.abs(d).mean()
    for kind in ("normal", "uniform"):
        r = E.bitdelta(d, random=kind, seed=1)
        assert abs((r * np.sign(d)).mean() - avg) / avg < 0.02  # mean magnitude AVG
        assert np.array_equal(r, E.bitdelta(d, random=kind, seed=1))
    uni = E.bitdelta(d, random="uniform", seed=1)
    assert np.all(np.sign(uni) * np.sign(d) >= 0) and np.abs(uni).max() <= 2 * avg * 1.0001
    with pytest.raises(ValueError, match="random"):
        E.bitdelta(d, random="cauchy")


def test_lowrank():
    d = delta((40, 30))
    u, s, vt = torch.linalg.svd(torch.from_numpy(d).double(), full_matrices=False)
    for r in (1, 5, 30):
        ref = (u[:, :r] * s[:r]) @ vt[:r]
        np.testing.assert_allclose(E.lowrank(d, rank=r), ref.numpy(), rtol=1e-4, atol=1e-9)
    # Energy: the smallest r keeping the fraction.
    e = (s ** 2).cumsum(0) / (s ** 2).sum()
    r_expected = int((e < 0.8).sum()) + 1
    got = E.lowrank(d, energy=0.8)
    assert np.linalg.matrix_rank(got.astype(np.float64), tol=1e-7) == r_expected
    # Agrees with the lowrank codec (f32 factors).
    np.testing.assert_allclose(E.lowrank(d, rank=8), dp.decode(dp.encode(d, "lowrank", rank=8, dtype="f32")),
                               rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="exactly one"):
        E.lowrank(d)
    with pytest.raises(ValueError, match="needs a matrix"):
        E.lowrank(d[0], rank=1)


def test_extrapolate_and_types():
    d = delta()
    np.testing.assert_allclose(E.extrapolate(d, 0.3), 1.3 * d, rtol=1e-6)
    assert not E.extrapolate(d, -1.0).any()
    # Same type and dtype out as in: torch bf16, numpy f16, numpy uint16 (bf16 bits).
    tb = torch.from_numpy(d).to(torch.bfloat16)
    out = E.dare(tb, 0.5)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.shape == tb.shape
    ref = E.dare(tb.float().numpy(), 0.5)
    assert torch.equal(out, torch.from_numpy(ref).to(torch.bfloat16))
    h = E.magnitude(d.astype(np.float16), 0.5)
    assert h.dtype == np.float16
    bits = tb.view(torch.int16).numpy().view(np.uint16)
    ob = E.bitdelta(bits)
    assert ob.dtype == np.uint16
    assert np.array_equal(ob, E.bitdelta(tb).view(torch.int16).numpy().view(np.uint16))


def test_parse_compose_rules():
    e = E.parse_edit("dare:p=0.9,k=0.5")
    assert e.op == "dare" and e.params == {"p": 0.9, "k": 0.5}
    assert str(E.parse_edit("lowrank:rank=16")) == "lowrank:rank=16"
    d = delta()
    c = E.compose("dare:p=0.5,seed=2+extrapolate:alpha=0.2")
    np.testing.assert_allclose(c(d), 1.2 * E.dare(d, 0.5, seed=2), rtol=1e-6)
    assert np.array_equal(E.compose(["magnitude:p=0.5", "bitdelta"])(d),
                          E.bitdelta(E.magnitude(d, 0.5)))
    for bad, msg in [("dare:p=1.0", r"p=1.0 must be in \[0, 1\)"), ("dare:q=1", "unknown parameter 'q'"),
                     ("prune:p=0.5", "unknown edit 'prune'"), ("dare:p", "expected key=value")]:
        with pytest.raises(ValueError, match=msg):
            E.parse_edit(bad)
    rules = E.EditRules("*.mlp.*=dare:p=0.9;*.self_attn.*=bitdelta:levels=4+extrapolate:alpha=0.1")
    assert rules.edit_for("model.layers.0.mlp.up_proj.weight").edits[0].op == "dare"
    assert len(rules.edit_for("model.layers.0.self_attn.q_proj.weight").edits) == 2
    assert rules.edit_for("model.norm.weight") is None


def test_edit_model():
    rng = np.random.default_rng(0)
    base = {"l.0.mlp.w": torch.from_numpy(rng.standard_normal((32, 16)).astype(np.float32)).bfloat16(),
            "l.1.mlp.w": torch.from_numpy(rng.standard_normal((32, 16)).astype(np.float32)).bfloat16(),
            "l.0.attn.w": torch.from_numpy(rng.standard_normal((16, 16)).astype(np.float32)).bfloat16(),
            "norm.w": torch.ones(16, dtype=torch.bfloat16)}
    ft = {k: (v.float() + 0.05 * torch.randn(v.shape)).bfloat16() for k, v in base.items()}
    out = E.edit_model(base, ft, "*.mlp.*=dare:p=0.5;*=bitdelta")
    assert torch.equal(out["norm.w"], ft["norm.w"])  # 1-D: not edited by default
    assert all(out[k].dtype == torch.bfloat16 for k in out)
    da = ft["l.0.attn.w"].float() - base["l.0.attn.w"].float()
    ref = (base["l.0.attn.w"].float() + torch.from_numpy(E.bitdelta(da.numpy()))).bfloat16()
    assert torch.equal(out["l.0.attn.w"], ref)
    # Per-tensor seeds: two equal-shaped tensors do not share one mask.
    m0 = (out["l.0.mlp.w"] == base["l.0.mlp.w"])
    m1 = (out["l.1.mlp.w"] == base["l.1.mlp.w"])
    assert not torch.equal(m0, m1)
    # Deterministic for a seed.
    assert all(torch.equal(out[k], E.edit_model(base, ft, "*.mlp.*=dare:p=0.5;*=bitdelta")[k]) for k in out)
    with pytest.raises(ValueError, match="'l.0.attn.w': base shape"):
        E.edit_model({**base, "l.0.attn.w": torch.zeros(3, 3)}, ft, "dare:p=0.5")
    with pytest.raises(ValueError, match="missing from the base: norm.w"):
        E.edit_model({k: v for k, v in base.items() if k != "norm.w"}, ft, "dare:p=0.5")
