"""Calibration statistics (input covariances, Fisher factors) and the least-squares refit of scales, checked
against independent numpy / torch computations."""
import numpy as np
import pytest
from conftest import make_delta

import deltapack as dp
from deltapack import lm
from deltapack.compress import calibration as C
from deltapack import reference as R

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def spd(n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 3 * n))
    return a @ a.T / (3 * n) + np.diag(rng.uniform(0.1, 2, n))


def objective(d, dhat, terms):
    e = (np.asarray(d, np.float64) - dhat).reshape(d.shape[0], -1)
    return sum(float((t.row[:, None] * (e if t.cov is None else e @ t.cov) * e).sum()) for t in terms)


def lstsq_rows(design_rows, targets, cov):
    """Per row: argmin_a |(target - a @ design) L|² with C = L Lᵀ (independent of deltapack's normal equations)."""
    L = np.linalg.cholesky(cov)
    return np.array([np.linalg.lstsq((b @ L).T, t @ L, rcond=None)[0] for b, t in zip(design_rows, targets)])


def test_sign_row_and_group_scales_are_the_least_squares_solution():
    d = make_delta((12, 64), seed=1).astype(np.float64)
    cov = spd(64, 1)
    terms = [C.Term(np.ones(12), cov)]
    s = np.where(d > 0, 1.0, -1.0)
    enc = dp.encode(d.astype(np.float32), "sign:scope=row")
    got = C.refit(enc, d, terms).components["scales"]
    want = lstsq_rows(s[:, None, :], d, cov)[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    enc = dp.encode(d.astype(np.float32), "sign:scope=group,group=16")
    got = C.refit(enc, d, terms).components["scales"]
    basis = np.stack([np.where((np.arange(64) // 16) == g, s, 0.0) for g in range(4)], axis=1)  # (12, 4, 64)
    np.testing.assert_allclose(got, lstsq_rows(basis, d, cov), rtol=1e-5)


def test_identity_covariance_gives_back_bitdelta_row_scales():
    """With C = identity the least-squares row scale of sign(d) is mean |d|: BitDelta's own scale."""
    d = make_delta((9, 40), seed=2)
    enc = dp.encode(d, "sign:scope=row")
    got = C.refit(enc, d, [C.Term(np.ones(9), None)]).components["scales"]
    np.testing.assert_allclose(got, np.abs(d.astype(np.float64)).mean(1), rtol=1e-6)


def test_levels_magnitudes_are_the_least_squares_solution():
    d = make_delta((10, 48), seed=3).astype(np.float64)
    cov = spd(48, 3)
    enc = dp.encode(d.astype(np.float32), "levels:bits=3")
    got = C.refit(enc, d, [C.Term(np.ones(10), cov)]).components["levels"]
    idx = R.unpack_bits(enc.components["codes"], 2, 48)
    sgn = np.where(R.sign_plus_minus(enc.components["signs"], 48), 1.0, -1.0)
    L = np.linalg.cholesky(cov)
    design = np.stack([(np.where(idx == k, sgn, 0.0) @ L).ravel() for k in range(4)], axis=1)
    want = np.linalg.lstsq(design, (d @ L).ravel(), rcond=None)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("recipe", ["quant:bits=3,group=16", "lowrank:bits=6/3,bands=3/5,group=16"])
def test_refit_lowers_the_layer_output_error(recipe):
    """quant group scales and lowrank u scales: the weighted output error drops, the codes stay, and no
    perturbation of the fitted scales does better (a least-squares optimum, up to f16 storage)."""
    rng = np.random.default_rng(4)
    d = (rng.standard_normal((40, 12)) @ rng.standard_normal((12, 32)) * 1e-3).astype(np.float32)
    d += make_delta((40, 32), seed=4) * 0.1
    cov = spd(32, 4)
    terms = [C.Term(rng.uniform(0.5, 2, 40), cov)]
    enc = dp.encode(d, recipe)
    new = C.refit(enc, d, terms)
    before, after = objective(d, dp.decode(enc), terms), objective(d, dp.decode(new), terms)
    assert after < before * (0.95 if recipe.startswith("quant") else 0.999)
    np.testing.assert_array_equal(new.components["codes"], enc.components["codes"])
    for trial in range(5):
        comps = dict(new.components)
        sc = comps["scales"].astype(np.float32)
        comps["scales"] = (sc * rng.uniform(0.97, 1.03, sc.shape)).astype(np.float16)
        moved = dp.Encoded(new.codec, new.params, new.shape, new.dtype, comps)
        assert objective(d, dp.decode(moved), terms) >= after * (1 - 1e-3)


@pytest.mark.parametrize("recipe", ["sign:scope=row", "sign:scope=tensor", "sign:scope=group,group=16",
                                    "levels:bits=2", "quant:bits=4,group=16", "lowrank:bits=6/3,bands=3/5,group=16"])
def test_refit_in_row_blocks_equals_one_block(recipe, monkeypatch):
    """The refit works a block of rows at a time: blocks of a few rows give the scales one block gives."""
    rng = np.random.default_rng(6)
    d = make_delta((70, 48), seed=6)
    terms = [C.Term(rng.uniform(0.5, 2, 70), spd(48, 6)), C.Term(rng.uniform(0.5, 2, 70), None)]
    enc = dp.encode(d, recipe)
    whole = C.refit(enc, d, terms)
    monkeypatch.setattr(C, "_BLOCK_ELEMENTS", 48 * 3)
    blocked = C.refit(enc, d, terms)
    changed = False
    for key, value in whole.components.items():
        np.testing.assert_array_equal(blocked.components[key], value)
        changed |= not np.array_equal(value, enc.components[key])
    assert changed


def test_codecs_without_free_scales_are_unchanged():
    d = make_delta((8, 32), seed=5)
    terms = [C.Term(np.ones(8), spd(32))]
    for recipe in ("dense", "sparse:p=0.5", "lowrank:rank=2"):
        enc = dp.encode(d, recipe)
        assert C.refit(enc, d, terms) is enc


@pytest.fixture(scope="module")
def pair():
    from deltapack.research.pairs import build_pair
    return build_pair("llama", "tiny")


def test_input_terms_match_the_layers_inputs(pair):
    """C of layer 0's q_proj = Σ x xᵀ over the real (unpadded) tokens of its input, the input norm of the
    embeddings; the embedding's row weights are token counts; padding does not count."""
    from deltapack.research import pairs

    model = lm.load_model(pair.ft)
    examples = pairs.task_examples(pair, 20)
    examples[0] = {"input_ids": examples[0]["input_ids"][:4], "prompt_len": 2}  # a short one: padding
    names = ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight",
             "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight", "lm_head.weight"]
    terms = C.input_terms(model, examples, names)
    ids, mask, _ = next(lm.batches(examples, 64))
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))[mask.bool()].double()
        # the output head's input, taken from the whole model's forward (input_terms runs the body alone)
        seen = {}
        hook = model.lm_head.register_forward_hook(lambda m, inp, out: seen.setdefault("h", inp[0]))
        try:
            model(input_ids=ids, attention_mask=mask)
        finally:
            hook.remove()
        h = seen["h"][mask.bool()].double()
    (head,) = terms["lm_head.weight"]
    np.testing.assert_allclose(head.cov, (h.T @ h).numpy(), rtol=1e-4, atol=1e-5 * float((h.T @ h).abs().max()))
    want = (x.T @ x).numpy()
    for name in names[0], names[2], names[3]:  # k and v read q's input
        (term,) = terms[name]
        np.testing.assert_allclose(term.cov, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        assert np.array_equal(term.row, np.ones(model.get_parameter(name).shape[0]))
    counts = np.bincount(ids[mask.bool()].numpy(), minlength=model.config.vocab_size)
    (emb,) = terms[names[1]]
    assert emb.cov is None and np.array_equal(emb.row, counts)
    # The Fisher factors' input side is the diagonal of the same covariance.
    fw = C.fisher_weights(model, examples)
    np.testing.assert_allclose(fw[names[0]].col, np.diag(want), rtol=1e-4)
    assert (fw[names[0]].row > 0).all() and fw[names[0]].row.shape == (model.config.hidden_size,)


def test_a_model_stored_in_bf16_is_calibrated_in_bf16(pair, tmp_path):
    """calibration_model keeps a bf16 checkpoint's weights bit for bit in a bf16 model (half the memory of
    f32, and every rebuilt weight is bf16 too); an f32 checkpoint stays f32."""
    from safetensors.torch import load_file

    model = lm.load_model(pair.ft)  # float32
    model.save_pretrained(tmp_path / "f32")
    assert C.calibration_model(tmp_path / "f32").dtype == torch.float32
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded = C.calibration_model(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    params = dict(loaded.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in stored.items() if n in params) and len(stored) > 10


def test_fisher_output_side_is_the_squared_output_gradient(pair):
    """The Fisher factors' output side is Σ (dL/dy)² over real tokens, as torch's autograd gives it on the same
    batch; fisher_weights leaves the model's parameters trainable as it found them (it freezes them meanwhile)."""
    from deltapack.research import pairs

    model = lm.load_model(pair.ft)
    examples = pairs.task_examples(pair, 20)
    fw = C.fisher_weights(model, examples, batch_size=64)  # one batch
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    ids, mask, labels = next(lm.batches(examples, 64))
    outs = {}

    def keep(m, inp, out):
        out.retain_grad()
        outs["y"] = out

    hook = model.model.layers[1].mlp.up_proj.register_forward_hook(keep)
    try:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    finally:
        hook.remove()
    g = outs["y"].grad.double().reshape(-1, outs["y"].shape[-1])[mask.reshape(-1).bool()]
    np.testing.assert_allclose(fw["model.layers.1.mlp.up_proj.weight"].row, (g ** 2).sum(0).numpy(), rtol=1e-5)


def test_calibrate_file_and_cli(pair, tmp_path, capsys):
    """A sign:scope=row delta refitted on calibration data: same size and signs, lower loss on the data."""
    from deltapack import checkpoint, cli
    from deltapack.research import evaluation, pairs

    plain, fitted = tmp_path / "s.dpk", tmp_path / "c.dpk"
    checkpoint.compress(pair.base, pair.ft, plain, recipe="sign:scope=row")
    calib = tmp_path / "calib.jsonl"
    import json
    calib.write_text("".join(json.dumps(e) + "\n" for e in pairs.task_examples(pair, 96)))
    assert cli.main(["calibrate", str(pair.base), str(pair.ft), str(plain), "--data", str(calib),
                     "-o", str(fitted)]) == 0
    assert "refitted on 96 examples" in capsys.readouterr().out
    a, b = dp.open(plain), dp.open(fitted)
    assert a.keys() == b.keys() and b.metadata["calibration"]["method"] == "least-squares"
    assert sum(a[n].nbytes for n in a.keys()) == sum(b[n].nbytes for n in b.keys())
    changed = 0
    for n in a.keys():
        if a[n].codec == "sign":
            np.testing.assert_array_equal(a[n].components["signs"], b[n].components["signs"])
            changed += not np.array_equal(a[n].components["scales"], b[n].components["scales"])
    assert changed

    def loss_of(delta):
        model = lm.load_model(pair.base)
        model.load_state_dict(dp.load(pair.base, delta), strict=False)
        return evaluation.evaluate(model, str(calib))["loss"]

    assert loss_of(fitted) < loss_of(plain)


@pytest.mark.parametrize("top", [5, 1 << 20])
def test_scorer_agrees_with_the_full_head_and_restores_the_model(pair, monkeypatch, top):
    """agreement and KL from the labelled positions only equal what the full output head gives (torch,
    computed here), the KL over the fine-tune's `top` likeliest tokens with the rest pooled (all of them when
    top exceeds the vocabulary); a replaced parameter is the model's own again after scoring, or stays
    replaced when asked."""
    from deltapack.research import pairs

    monkeypatch.setattr(C.Scorer, "TOP_TOKENS", top)
    model = lm.load_model(pair.ft)
    examples = pairs.task_examples(pair, 40)
    scorer = C.Scorer(model, examples, batch_size=16)
    name = "model.layers.0.mlp.down_proj.weight"
    before = model.state_dict()[name].clone()
    # seeded: an argmax within rounding of a tie could fall either way between the two computations
    noisy = (before + 0.05 * torch.randn(before.shape, generator=torch.Generator().manual_seed(0))).numpy()

    def reference(weight):
        m = lm.load_model(pair.ft)
        with torch.no_grad():
            m.state_dict()[name].copy_(torch.from_numpy(weight))
            total, full, count, agree = 0.0, 0.0, 0, 0
            for ids, mask, labels in lm.batches(examples, 16):
                keep = labels[:, 1:] != -100
                p = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
                q = torch.log_softmax(m(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
                agree += int(((q.argmax(-1) == p.argmax(-1)) | ~keep).all(dim=1).sum())
                p, q = p[keep], q[keep]
                # the top tokens of p as they are, every other token in one bucket
                k = min(top, p.shape[-1])
                inside = torch.zeros_like(p, dtype=torch.bool).scatter(-1, p.topk(k, -1).indices, True)
                pp, qq = p.exp(), q.exp()
                total += float((torch.where(inside, pp * (p - q), 0)).sum())
                if k < p.shape[-1]:
                    p_out, q_out = torch.where(inside, 0, pp).sum(-1), torch.where(inside, 0, qq).sum(-1)
                    total += float((p_out * (p_out.log() - q_out.log())).sum())
                full += float((pp * (p - q)).sum())
                count += int(keep.sum())
        return {"agreement": agree / len(examples), "kl": total / count, "full": full / count}

    got = scorer.score([(name, tuple(before.shape), noisy)])
    want = reference(noisy)
    assert got["agreement"] == want["agreement"] and got["agreement"] < 1
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-4)
    assert got["kl"] <= want["full"] * (1 + 1e-4) and (top < 100) == (got["kl"] < 0.999 * want["full"])
    assert torch.equal(model.state_dict()[name], before)
    same = scorer.score([(name, tuple(before.shape), before.numpy())])
    assert same["agreement"] == 1 and same["kl"] == pytest.approx(0, abs=1e-6)
    scorer.score([(name, tuple(before.shape), noisy)], restore=False)
    assert torch.equal(model.state_dict()[name], torch.from_numpy(noisy))
