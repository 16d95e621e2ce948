"""Bit budgets: the per-tensor candidates and their error model, the allocation, and `compress --budget`
(data-free and with calibration data) on a real pair."""
import json
import math
import os

import numpy as np
import pytest
from conftest import make_delta

import deltapack as dp
from deltapack.compress import allocate as B
from deltapack import reference as R

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def low_rank_delta(rows, cols, seed=0, decay=1.0):
    rng = np.random.default_rng(seed)
    k = min(rows, cols)
    u = np.linalg.qr(rng.standard_normal((rows, k)))[0]
    v = np.linalg.qr(rng.standard_normal((cols, k)))[0]
    return ((u * (1.0 / (1.0 + np.arange(k)) ** decay)) @ v.T).astype(np.float32)


def werr(w: B.Weights, a, b):
    """Σ r_i c_j (a - b)_ij², computed directly."""
    r = np.ones(a.shape[0]) if w.row is None else B.weight_floor(w.row)
    c = np.ones(a.shape[1]) if w.col is None else B.weight_floor(w.col)
    return float((r[:, None] * (a.astype(np.float64) - b) ** 2 * c[None, :]).sum())


@pytest.mark.parametrize("weighted", [False, True])
def test_predicted_error_matches_the_encoded_tensor(weighted):
    """The planner's error model (energies of dropped directions + ε(b) of kept ones) predicts the weighted
    error the encoder really leaves, for the recipe it picks."""
    d = low_rank_delta(96, 160, seed=1)
    rng = np.random.default_rng(2)
    w = B.Weights(rng.uniform(0.2, 2, 96), rng.uniform(0.2, 2, 160)) if weighted else B.Weights()
    opts = B.tensor_options("t", d, w, elements=())
    for lam in (1e-6, 1e-5, 1e-4):
        bits, err, size = opts.lowrank_choice(lam * opts.energy)
        if size == 0:
            continue
        recipe = B.lowrank_recipe(bits)
        enc = dp.encode(d, recipe, weights=w.floored(96, 160) if weighted else None)
        assert 8 * enc.nbytes == size  # the size model of the components is exact
        actual = werr(w, dp.decode(enc), d)
        assert actual == pytest.approx(err, rel=0.15), (recipe, actual, err)


def test_bits_fall_along_the_spectrum_and_recipes_read_back():
    d = low_rank_delta(128, 128, seed=3, decay=0.7)
    opts = B.tensor_options("t", d, elements=())
    bits, _, _ = opts.lowrank_choice(1e-5 * opts.energy)
    kept = [b for b in bits if b > 0]
    assert kept and all(a >= b for a, b in zip(kept, kept[1:]))
    assert all(b == 0 for b in bits[len(kept):])  # dropped directions are the tail
    recipe = B.lowrank_recipe(bits)
    from deltapack.recipes import parse
    name, params = parse(recipe)
    assert name == "lowrank" and sum(R.parse_list(params["bands"])) == len(kept)


def test_allocation_meets_the_budget_and_improves_with_it():
    rng = np.random.default_rng(4)
    opts = {f"t{i}": B.tensor_options(f"t{i}", low_rank_delta(64 + 16 * i, 96, seed=i) * rng.uniform(0.1, 3),
                                      B.Weights()) for i in range(4)}
    full = sum(o.rows * o.cols for o in opts.values())
    errors = []
    for bpp in (0.25, 0.5, 1, 2, 4):
        a = B.allocate(opts, bpp * full)
        assert a.bits <= bpp * full
        if bpp >= 1:  # small budgets may leave room no tensor's entry fits in (headers ~3 kbit each here)
            assert a.bits >= 0.8 * bpp * full
        errors.append(a.error)
    assert all(x >= y for x, y in zip(errors, errors[1:])) and errors[-1] < errors[0]


def test_allocation_is_optimal_against_brute_force():
    """Two tensors, a few candidates each: the Lagrangian choice is the best pair within the budget among the
    choices on the convex hull (checked by enumerating every pair)."""
    opts = {"a": B.tensor_options("a", low_rank_delta(48, 64, seed=5), B.Weights(), elements=B.ELEMENT_CODECS),
            "b": B.tensor_options("b", 3 * low_rank_delta(64, 48, seed=6, decay=0.3), B.Weights(),
                                  elements=B.ELEMENT_CODECS)}
    cands = {n: {o.best(lam) for lam in np.geomspace(1e-9, 1e3, 400) * o.energy} for n, o in opts.items()}
    for budget in (20_000, 40_000, 80_000):
        a = B.allocate(opts, budget)
        best = min((x[1] + y[1], x, y) for x in cands["a"] for y in cands["b"] if x[2] + y[2] <= budget)
        assert a.error <= best[0] * 1.05 + 1e-12


def test_proxy_weights():
    d = make_delta((40, 30), seed=7)
    w = B.proxy_weights("relative", d)
    assert werr(w, d, np.zeros_like(d)) == pytest.approx(1.0)  # each matrix: its own delta counts 1
    d[3] *= 0.1
    d[5] = 0  # an untouched token: its weight is floored at 1e-3 of the mean row energy, not infinite
    e = B.proxy_weights("relative", d, embedding=True)
    per_row = (d.astype(np.float64) ** 2).sum(1)
    moved = per_row > 0
    np.testing.assert_allclose((e.row * per_row * 40)[moved], 1.0, rtol=1e-6)  # every token row counts alike
    assert e.row[5] == pytest.approx(1 / (40 * 1e-3 * per_row.mean()))
    stats = B.Weights(np.linspace(1, 2, 40), np.linspace(3, 4, 30))
    f = B.proxy_weights("fisher", d, stats)
    np.testing.assert_array_equal(f.row, stats.row)
    assert werr(B.proxy_weights("fisher-relative", d, stats), d, np.zeros_like(d)) == pytest.approx(1.0)
    a = B.proxy_weights("activation-relative", d, stats)
    assert np.ptp(a.row) == 0 and werr(a, d, np.zeros_like(d)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        B.proxy_weights("fisher", d)
    with pytest.raises(ValueError, match="unknown proxy"):
        B.proxy_weights("psychic", d, stats)


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def pair():
    from deltapack.research.pairs import build_pair
    return build_pair("llama", "tiny")


def n_params(pair):
    from deltapack import checkpoint
    return sum(t.numel for t in checkpoint.Checkpoint(pair.ft).tensors.values())


def rebuilt_error(pair, path):
    from deltapack import checkpoint
    rows = checkpoint.verify(pair.base, pair.ft, path)
    return sum(r["delta_rel_error"] for r in rows if r["op"] == "delta") / len(rows)


# The tiny pair has 126k parameters: its kept config/tokenizer files, base fingerprint and header take ~1.8
# bits/param of any file (negligible for real models), so the budgets here start above that.
@pytest.mark.parametrize("bpp", [2.0, 3.0, 6.0])
def test_compress_to_a_budget(pair, tmp_path, bpp):
    from deltapack import checkpoint

    out = tmp_path / "b.dpk"
    s = checkpoint.compress(pair.base, pair.ft, out, budget=bpp)
    size = os.path.getsize(out)
    assert s["file_bytes"] == size and 8 * size <= bpp * n_params(pair)
    assert s["bits_per_param"] == pytest.approx(8 * size / n_params(pair))
    f = dp.open(out)
    rec = f.metadata["budget"]
    assert rec["bits_per_param"] == bpp and rec["proxy"] == "relative" and 0 <= rec["predicted_error"] <= 1
    # Every stored matrix decodes; the rebuilt checkpoint loads and norms stay exact.
    sd = dp.load(pair.base, out)
    from deltapack.lm import load_model
    ft = dict(load_model(pair.ft, dtype=torch.bfloat16).state_dict())
    for n, t in sd.items():
        if t.dim() == 1:
            assert torch.equal(t, ft[n]), n


def test_larger_budgets_rebuild_closer(pair, tmp_path):
    from deltapack import checkpoint

    errs = []
    for bpp in (2.0, 3.0, 6.0):
        checkpoint.compress(pair.base, pair.ft, tmp_path / f"{bpp}.dpk", budget=bpp)
        errs.append(rebuilt_error(pair, tmp_path / f"{bpp}.dpk"))
    assert errs[0] > errs[1] > errs[2]


def test_budget_too_small_is_a_clear_error(pair, tmp_path):
    from deltapack import checkpoint

    with pytest.raises(ValueError, match="too small for this checkpoint"):
        checkpoint.compress(pair.base, pair.ft, tmp_path / "x.dpk", budget=0.01)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="bits per parameter"):
        checkpoint.compress(pair.base, pair.ft, tmp_path / "x.dpk", budget=-1)
    with pytest.raises(ValueError, match="needs calibration data"):
        checkpoint.compress(pair.base, pair.ft, tmp_path / "x.dpk", budget=1, proxy="fisher")


def test_compress_to_a_budget_with_data(pair, tmp_path):
    """--data: every proxy is scored on the calibration data, the scales are refitted, the size holds."""
    from deltapack import checkpoint
    from deltapack.research import pairs

    calib = pairs.task_examples(pair, 64)
    out = tmp_path / "d.dpk"
    s = checkpoint.compress(pair.base, pair.ft, out, budget=3.0, data=calib)
    assert 8 * os.path.getsize(out) <= 3.0 * n_params(pair)
    rec = dp.open(out).metadata["budget"]
    assert set(rec["data"]["scores"]) == set(B.PROXIES) and rec["proxy"] in B.PROXIES
    assert all(0 <= v["agreement"] <= 1 and v["kl"] >= 0 for v in rec["data"]["scores"].values())
    assert rec["data"]["refit"] == "least-squares" and "calibration" not in dp.open(out).metadata


def test_with_data_what_stages_keep_may_go_to_disk(pair, tmp_path, monkeypatch):
    """--data keeps the SVD factors and the input covariances (gathered a group of layers per pass over the
    data) between stages in memory or in a hidden directory next to the output: the same file either way, and
    the directory is gone afterwards."""
    from deltapack import checkpoint
    from deltapack.compress import budget
    from deltapack.research import pairs

    calib = pairs.task_examples(pair, 32)
    monkeypatch.setattr(budget, "_KEPT_IN_MEMORY_WITH_DATA", 1 << 40)
    checkpoint.compress(pair.base, pair.ft, tmp_path / "memory.dpk", budget=1.5, data=calib)
    monkeypatch.setattr(budget, "_KEPT_IN_MEMORY_WITH_DATA", 0)
    monkeypatch.setattr(budget, "_TERMS_GROUP_BYTES", 1)  # one layer's covariances per pass
    passes = []
    real = budget.calibration.input_terms_by_group

    def counted(*a, **k):
        for group in real(*a, **k):
            passes.append(len(group))
            yield group

    monkeypatch.setattr(budget.calibration, "input_terms_by_group", counted)
    checkpoint.compress(pair.base, pair.ft, tmp_path / "disk.dpk", budget=1.5, data=calib)
    assert len(passes) > 3
    assert (tmp_path / "disk.dpk").read_bytes() == (tmp_path / "memory.dpk").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["disk.dpk", "memory.dpk"]


def test_what_is_written_is_what_was_scored(pair, tmp_path, monkeypatch):
    """Each proxy's allocation is fitted to the real file size before it is scored: the file holds exactly the
    recipes scored for the proxy it records, also when the header estimate is 4 KB short (the allocation
    then shrinks before scoring, not after)."""
    from deltapack import checkpoint
    from deltapack.compress import budget
    from deltapack.compress.writer import recipe_params
    from deltapack.recipes import parse
    from deltapack.research import pairs

    scored = []
    rebuilt = budget._rebuilt

    def recording(base, ft, lossy, recipes, *a, **k):
        scored.append(dict(recipes))
        return rebuilt(base, ft, lossy, recipes, *a, **k)

    monkeypatch.setattr(budget, "_rebuilt", recording)
    monkeypatch.setattr(budget, "_choose_proxy", lambda scores, n: "fisher")
    estimate = budget._fixed_bits_estimate
    monkeypatch.setattr(budget, "_fixed_bits_estimate", lambda *a: estimate(*a) - 8 * 4096)
    out = tmp_path / "d.dpk"
    s = checkpoint.compress(pair.base, pair.ft, out, budget=1.5, data=pairs.task_examples(pair, 32))
    assert s["budget"]["proxy"] == "fisher" and 8 * os.path.getsize(out) <= 1.5 * n_params(pair)
    fisher = scored[list(B.PROXIES).index("fisher")]  # scored in PROXIES order
    f = dp.open(out)
    for name, recipe in fisher.items():
        if recipe is None:
            assert name not in f.keys()
            continue
        codec, params = parse(recipe)
        want = {k: v for k, v in recipe_params(codec, params).items() if k != "scale_exp"}  # quant's is measured
        assert f[name].codec == codec and {k: v for k, v in f[name].params.items() if k != "scale_exp"} == want


def test_cli_budget_and_info(pair, tmp_path, capsys):
    from deltapack import cli

    out = tmp_path / "c.dpk"
    assert cli.main(["compress", str(pair.base), str(pair.ft), "-o", str(out), "--budget", "2.5", "-q"]) == 0
    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "budget: 2.5 bits/param" in text and "proxy 'relative'" in text and "predicted" in text
    assert cli.main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["budget"]["bits_per_param"] == 2.5
    assert cli.main(["compress", str(pair.base), str(pair.ft), "-o", str(out), "--budget", "1",
                     "--recipe", "sign"]) == 1
    assert "either --recipe or --budget" in capsys.readouterr().err
    assert cli.main(["compress", str(pair.base), str(pair.ft), "-o", str(out), "--data", str(pair.data)]) == 1
    assert "--data goes with --budget" in capsys.readouterr().err


def test_budget_file_exports_to_peft(pair, tmp_path):
    """Quantized low-rank factors are dequantized on export: the adapter's B @ A is the decoded delta."""
    from deltapack.export import finetune

    out = tmp_path / "b.dpk"
    from deltapack import checkpoint
    checkpoint.compress(pair.base, pair.ft, out, budget=3.0)
    ft = finetune.FineTune(pair.base, out)
    view = finetune.lowrank_factors(ft, rank=4)
    f = dp.open(out)
    checked = 0
    for fac in view.factors:
        enc = f[fac.name]
        if enc.codec == "lowrank":
            assert fac.source == "lowrank" and fac.rank == enc.params["rank"]
            np.testing.assert_allclose(fac.u.astype(np.float64) @ fac.v, dp.decode(enc), rtol=0,
                                       atol=1e-6 * max(1e-30, float(np.abs(dp.decode(enc)).max())))
            checked += 1
    assert checked > 0
    assert math.isfinite(sum(fac.rel_error for fac in view.factors))


def test_the_analysis_svd_is_reused_when_writing(pair, tmp_path, monkeypatch):
    """The factors found while analysing encode the chosen lowrank tensors: the SVD runs once per tensor, and
    the file is the same whether the factors were kept in memory or spilled to disk (removed afterwards)."""
    from deltapack import checkpoint, lowrank
    from deltapack.compress import budget

    calls = []
    real_svd = lowrank.svd
    monkeypatch.setattr(lowrank, "svd", lambda m, *a, **k: calls.append(m.shape) or real_svd(m, *a, **k))
    checkpoint.compress(pair.base, pair.ft, tmp_path / "memory.dpk", budget=3.0)
    stored = dp.open(tmp_path / "memory.dpk")
    n_lowrank = sum(stored[n].codec == "lowrank" for n in stored.keys())
    analysed = len(calls)
    assert n_lowrank > 0
    with monkeypatch.context() as m:  # control: factors not kept, so each lowrank choice runs its SVD again
        m.setattr(budget._Spill, "put", lambda self, key, arrays: None)
        calls.clear()
        checkpoint.compress(pair.base, pair.ft, tmp_path / "control.dpk", budget=3.0)
        assert len(calls) - analysed >= n_lowrank  # once per write attempt (the size check may retry)
    os.unlink(tmp_path / "control.dpk")

    monkeypatch.setattr(budget, "_FACTORS_IN_MEMORY", 0)
    spilled = []
    real_savez = np.savez
    monkeypatch.setattr(np, "savez", lambda path, **kw: spilled.append(path) or real_savez(path, **kw))
    checkpoint.compress(pair.base, pair.ft, tmp_path / "disk.dpk", budget=3.0)
    assert spilled and all(os.path.dirname(p).startswith(str(tmp_path)) for p in spilled)
    assert (tmp_path / "disk.dpk").read_bytes() == (tmp_path / "memory.dpk").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["disk.dpk", "memory.dpk"]  # the spill directory is gone


def test_factors_given_to_the_encoder_are_the_svd_it_would_compute():
    from deltapack import lowrank

    x = low_rank_delta(96, 80, seed=9)
    rng = np.random.default_rng(9)
    rw, cw = rng.uniform(0.5, 2, 96), rng.uniform(0.5, 2, 80)
    u, s, v, _, _ = lowrank.svd(x, 12, rw, cw)
    plain = dp.encode(x, "lowrank:bits=8/4,bands=4/8", weights=(rw, cw))
    reused = dp.encode(x, "lowrank:bits=8/4,bands=4/8", weights=(rw, cw), factors=(u, s, v))
    for c in plain.components:
        np.testing.assert_array_equal(reused.components[c], plain.components[c])
    # more directions than the rank: the first ones are used
    u2, s2, v2, _, _ = lowrank.svd(x, 30, rw, cw)
    wider = dp.decode(dp.encode(x, "lowrank:bits=8/4,bands=4/8", weights=(rw, cw), factors=(u2, s2, v2)))
    assert np.linalg.norm(wider - dp.decode(plain)) < 1e-3 * np.linalg.norm(x)
    with pytest.raises(ValueError, match="3 directions given for rank 12"):
        dp.encode(x, "lowrank:bits=8/4,bands=4/8", factors=(u[:3], s[:3], v[:3]))
    with pytest.raises(ValueError, match="factors apply to the lowrank codec"):
        dp.encode(x, "sign", factors=(u, s, v))


def test_quantization_error_measured_on_sampled_groups_is_the_whole_vectors(monkeypatch):
    """ε(b) of a tall matrix's directions, measured on 64 evenly spaced groups of each vector, is what the
    whole vectors give (groups are quantized independently; the sample only drops terms of the sums)."""
    d = low_rank_delta(9000, 96, seed=11, decay=0.5)
    sampled = B.tensor_options("t", d, elements=()).eps
    monkeypatch.setattr(B, "_EPS_GROUPS", 10 ** 6)
    whole = B.tensor_options("t", d, elements=()).eps
    for b in B.BITS:
        assert sampled[b] == pytest.approx(whole[b], rel=0.1, abs=1e-6), b
    assert sampled[1] > sampled[4] > sampled[8]


def test_fisher_relative_options_are_fishers_scaled():
    """fisher-relative's weights are fisher's times one number per tensor, so --data analyses it once: fisher's
    candidates scaled (TensorOptions.scaled) match a separate analysis under its own weights (energies, errors
    and the allocation they lead to)."""
    rng = np.random.default_rng(4)
    deltas = {f"t{i}": low_rank_delta(64 + 16 * i, 96, seed=20 + i) for i in range(3)}
    stats = {n: B.Weights(rng.uniform(0.1, 3, d.shape[0]), rng.uniform(0.1, 3, d.shape[1])) for n, d in deltas.items()}
    direct, scaled = {}, {}
    for n, d in deltas.items():
        wf, wr = (B.proxy_weights(p, d, stats[n]) for p in ("fisher", "fisher-relative"))
        alpha = B.weight_ratio(wr, wf, *d.shape)
        assert alpha != pytest.approx(1.0)  # else the test could not tell scaled from unscaled
        direct[n] = B.tensor_options(n, d, wr)
        scaled[n] = B.tensor_options(n, d, wf).scaled(alpha)
        np.testing.assert_allclose(scaled[n].s2, direct[n].s2, rtol=1e-4)
        assert scaled[n].energy == pytest.approx(direct[n].energy, rel=1e-6)
        for b in B.BITS:
            assert scaled[n].eps[b] == pytest.approx(direct[n].eps[b], rel=1e-3, abs=1e-6)
        for (r1, b1, e1), (r2, b2, e2) in zip(scaled[n].elements, direct[n].elements):
            assert (r1, b1) == (r2, b2) and e1 == pytest.approx(e2, rel=1e-5)
    for bits in (0.3, 1.0, 2.5):
        target = bits * sum(d.size for d in deltas.values())
        assert B.allocate(scaled, target).recipes == B.allocate(direct, target).recipes


def test_options_under_several_weightings_equal_separate_analyses():
    """options_under encodes the element codecs once and weighs their error per weighting: the same options,
    bit for bit, as one tensor_options call per weighting."""
    rng = np.random.default_rng(7)
    d = low_rank_delta(96, 80, seed=3) + 0.01 * rng.standard_normal((96, 80)).astype(np.float32)
    weightings = {"plain": None, "a": B.Weights(rng.uniform(0.1, 3, 96), rng.uniform(0.1, 3, 80)),
                  "b": B.Weights(None, rng.uniform(0.1, 3, 80))}
    together = B.options_under("t", d, weightings, elements=B.ELEMENT_CODECS)
    assert list(together) == list(weightings)
    for key, w in weightings.items():
        alone = B.tensor_options("t", d, w, elements=B.ELEMENT_CODECS)
        np.testing.assert_array_equal(together[key].s2, alone.s2)
        assert together[key].eps == alone.eps and together[key].energy == alone.energy
        assert together[key].elements == alone.elements and len(alone.elements) == len(B.ELEMENT_CODECS)
    assert together["a"].elements != together["plain"].elements
    # factors handed to a function as each SVD is done, not kept in the options: the same factors
    kept = B.options_under("t", d, weightings, elements=(), keep_factors=True)
    handed = {}
    given = B.options_under("t", d, weightings, elements=(), keep_factors=lambda k, f: handed.setdefault(k, f))
    assert list(handed) == list(weightings) and all(o.factors is None for o in given.values())
    for key in weightings:
        for a, b in zip(handed[key], kept[key].factors):
            np.testing.assert_array_equal(a, b)


def test_a_proxy_allocating_as_the_one_it_scales_is_scored_once(pair, tmp_path, monkeypatch):
    """With fisher-relative's per-tensor factor forced to 1 it allocates exactly as fisher does: the rebuilt model
    is the same one, scored once, and both proxies record that score."""
    from deltapack import checkpoint
    from deltapack.compress import calibration
    from deltapack.research import pairs

    calls = []
    score = calibration.Scorer.score
    monkeypatch.setattr(calibration.Scorer, "score", lambda self, *a, **k: calls.append(1) or score(self, *a, **k))
    monkeypatch.setattr(B, "weight_ratio", lambda *a: 1.0)
    out = tmp_path / "d.dpk"
    checkpoint.compress(pair.base, pair.ft, out, budget=1.5, data=pairs.task_examples(pair, 32))
    scores = dp.open(out).metadata["budget"]["data"]["scores"]
    assert len(calls) == len(B.PROXIES) - 1
    assert scores["fisher-relative"] == scores["fisher"] and len(scores) == len(B.PROXIES)


def test_spilled_terms_read_back_what_was_kept(tmp_path):
    """Input covariances kept on disk group by group (an empty group among them) read back as they were, a
    tied weight's embedding term (no covariance) included; the directory is gone after close."""
    from deltapack.compress import budget, calibration

    rng = np.random.default_rng(0)
    tied = [calibration.Term(rng.uniform(0, 5, 6), None), calibration.Term(np.ones(6), rng.standard_normal((4, 4)))]
    plain = [calibration.Term(np.ones(3), rng.standard_normal((4, 4)))]
    spill = budget._Spill(tmp_path / "out.dpk", "cov", 0)
    terms = budget._SpilledTerms(iter([{"tied": tied}, {}, {"plain": plain}]), spill)
    assert list(terms) == ["tied", "plain"] and "tied" in terms and "other" not in terms
    for name, want in (("tied", tied), ("plain", plain)):
        got = terms[name]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.row, w.row)
            assert (g.cov is None) == (w.cov is None)
            if w.cov is not None:
                np.testing.assert_array_equal(g.cov, w.cov)
    with pytest.raises(KeyError):
        terms["other"]
    spill.close()
    assert os.listdir(tmp_path) == []
