"""The Riemann-sum loss-change estimator on a real tiny base / fine-tune pair, and `deltapack analyze`."""
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from deltapack import lm
from deltapack.research import analysis as A  # noqa: E402
from deltapack.research import evaluation, pairs  # noqa: E402

N = 48  # examples used: enough signal, fast


@pytest.fixture(scope="module")
def pair():
    return pairs.build_pair("llama", "tiny")


@pytest.fixture(scope="module")
def model(pair):
    return lm.load_model(pair.ft)


@pytest.fixture(scope="module")
def examples(pair):
    return lm.read_data(pair.data)[:N]


def _sd(d):
    return safetensors_torch.load_file(str(d / "model.safetensors"))


def _hf_loss(model, examples):
    """Token-weighted mean answer loss computed with transformers' own label loss, one example at a time."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = ids.clone()
        labels[0, :ex["prompt_len"]] = -100
        n = int((labels[0, 1:] != -100).sum())
        total = total + model(input_ids=ids, labels=labels).loss * n
        count += n
    return total / count


def _params_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_c1_is_first_order_term_and_exact_is_independent(pair, model, examples):
    """C=1 equals ⟨∇L(W_post), ΔW̃⟩ computed independently; exact ΔL equals the loss of a rebuilt model."""
    base, ft = _sd(pair.base), _sd(pair.ft)
    r = A.estimate(model, "bitdelta", examples, base=pair.base, C=1)
    # Independent: ΔW̃ by torch for every 2-D weight, gradient by autograd of transformers' label loss.
    ref_model = lm.load_model(pair.ft)
    params = dict(ref_model.named_parameters())
    loss = _hf_loss(ref_model, examples)
    names = [n for n in params if params[n].ndim == 2]
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    first = 0.0
    edited = {}
    for n, g in zip(names, grads):
        d = ft[n].float() - base[n].float()
        dtil = d.abs().double().mean() * torch.sign(d) - d
        first += float((g.double() * dtil.double()).sum())
        edited[n] = (ft[n].float() + dtil.float())
    # Batched vs one-at-a-time float32 forward passes differ by ~1e-7 relative in logits; near-zero loss
    # makes the gradient a difference of nearly equal terms, hence the tolerance.
    assert r.terms[0] == pytest.approx(first, rel=5e-3, abs=1e-7)
    assert r.estimate == r.terms[0]
    assert sum(r.contributions.values()) == pytest.approx(r.estimate, rel=1e-9, abs=1e-12)
    with torch.no_grad():
        loss_post = float(_hf_loss(ref_model, examples))
        for n, w in edited.items():
            params[n].copy_(w)
        loss_edit = float(_hf_loss(ref_model, examples))
    assert r.loss_post == pytest.approx(loss_post, abs=5e-6)
    assert r.exact == pytest.approx(loss_edit - loss_post, rel=1e-3, abs=1e-5) and abs(r.exact) > 1e-3


def test_riemann_sum_converges_for_small_edits(model, pair, examples):
    """Left Riemann sum error shrinks like 1/C; with C=32 it is close to the exact ΔL for a small edit."""
    errs, left = [], {}
    for C in (1, 4, 32):
        r = A.estimate(model, "dare:p=0.1,k=0.5", examples, base=pair.base, C=C)
        errs.append(abs(r.estimate - r.exact))
        left[C] = r.estimate
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] <= 0.05 * abs(r.exact) + 1e-4
    assert len(r.terms) == 32
    # The trapezoid rule (gradient at t = 1 too) removes the left sum's O(1/C) bias.
    t = A.estimate(model, "dare:p=0.1,k=0.5", examples, base=pair.base, C=4, trapezoid=True)
    assert abs(t.estimate_trapezoid - t.exact) < 0.5 * abs(t.estimate - t.exact)
    assert t.estimate == pytest.approx(left[4], rel=1e-9)  # the left sum is unchanged by the option
    with pytest.raises(ValueError, match="trapezoid=True needs exact=True"):
        A.estimate(model, "dare:p=0.1", examples, base=pair.base, trapezoid=True, exact=False)


def test_sign_agreement_and_categories(model, pair, examples):
    before = _params_snapshot(model)
    r = A.estimate(model, "extrapolate:alpha=-1", examples, base=pair.base, C=5)
    # Removing the fine-tune delta makes the task loss rise, estimated and measured.
    assert r.estimate > 0 and r.exact > 1.0
    assert r.category == r.category_exact == "decreased"
    # Over every tensor (norms too), α=-1 rebuilds the base model exactly.
    r_all = A.estimate(model, "extrapolate:alpha=-1", examples, base=pair.base, C=1, select=None)
    assert r_all.exact == pytest.approx(evaluation.evaluate(pair.base, examples)["loss"] - r.loss_post, rel=1e-5)
    assert r_all.n_tensors > r.n_tensors
    r0 = A.estimate(model, "keep", examples, base=pair.base, C=2)
    assert r0.estimate == 0 and r0.exact == 0 and r0.category == "competitive"
    # The model is restored bit for bit after every estimate.
    after = _params_snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(p.grad is not None for p in model.parameters())


def test_categorize():
    assert A.categorize(0.01, 0.05) == "competitive"
    assert A.categorize(0.1, 0.05) == "decreased"
    assert A.categorize(-0.1, 0.05) == "improved"


def test_deltas_argument_and_rules(model, pair, examples):
    base, ft = _sd(pair.base), _sd(pair.ft)
    deltas = {n: ft[n].float() - base[n].float() for n in ft}
    a = A.estimate(model, "*.mlp.*=magnitude:p=0.5", examples, base=pair.base, C=2)
    b = A.estimate(model, "*.mlp.*=magnitude:p=0.5", examples, deltas=deltas, C=2)
    assert a.estimate == pytest.approx(b.estimate, rel=1e-9) and a.exact == pytest.approx(b.exact, rel=1e-9)
    assert set(a.contributions) == {n for n in ft if ".mlp." in n and ft[n].ndim == 2}
    # dare_biased on the product needs ∇L at W_post, which the estimator provides; it must hurt.
    r = A.estimate(model, "dare_biased:p=0.5,k=0.5,on=product", examples, base=pair.base, C=1)
    assert r.estimate > 0 and r.exact > 0


def test_errors_before_heavy_work(model, pair, examples, tmp_path):
    with pytest.raises(ValueError, match="C=0"):
        A.estimate(model, "dare:p=0.9", examples, base=pair.base, C=0)
    with pytest.raises(ValueError, match="C=2.5"):
        A.estimate(model, "dare:p=0.9", examples, base=pair.base, C=2.5)
    with pytest.raises(ValueError, match=r"p=1.5 must be in \[0, 1\)"):
        A.estimate(model, "dare:p=1.5", examples, base=pair.base)
    with pytest.raises(ValueError, match="no examples"):
        A.estimate(model, "dare:p=0.9", [], base=pair.base)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: no examples"):
        A.estimate(model, "dare:p=0.9", empty, base=pair.base)
    with pytest.raises(ValueError, match="exactly one of base"):
        A.estimate(model, "dare:p=0.9", examples)
    other = pairs.build_pair("qwen2", "tiny")
    with pytest.raises(ValueError, match="differ in model_type"):
        A.estimate(pair.ft, "dare:p=0.9", examples, base=other.base)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight'.*missing|shape"):
        A.estimate(model, "dare:p=0.9", examples, base={"model.embed_tokens.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="no parameter of the model"):
        A.estimate(model, "*.nothing.*=dare:p=0.9", examples, base=pair.base)
    with pytest.raises(ValueError, match="token id 999"):
        A.estimate(model, "dare:p=0.5", [[1, 2, 999]], base=pair.base)


def test_cli_analyze(pair, tmp_path, capsys):
    from deltapack import cli

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in lm.read_data(pair.data)[:24]))
    rc = cli.main(["analyze", str(pair.base), str(pair.ft), "--edit", "extrapolate:alpha=-1", "--data", str(data),
                   "-C", "2", "--json", "--top", "3"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["C"] == 2 and out["exact"] > 0 and out["category"] == "decreased"
    assert len(out["top"]) == 3 and len(out["terms"]) == 2
    # A plain text file is tokenized with the model directory's byte-level tokenizer.
    pytest.importorskip("tokenizers")
    text = tmp_path / "d.txt"
    text.write_text("abcde>edcba\nhello>olleh\n")
    rc = cli.main(["analyze", str(pair.base), str(pair.ft), "--edit", "dare:p=0.5", "--data", str(text), "-C", "1"])
    printed = capsys.readouterr().out
    assert rc == 0 and "estimated ΔL (C=1)" in printed and "exact ΔL" in printed and "category:" in printed
    rc = cli.main(["analyze", str(pair.base), str(pair.ft), "--edit", "dare:p=0.5", "--data", str(text), "-C", "0"])
    assert rc == 1 and "-C 0" in capsys.readouterr().err


def test_calibrate_scales(pair, model, examples):
    """BitDelta scale distillation: starts at mean|ΔW| and lowers the held-out loss of the 1-bit model."""
    base, ft = _sd(pair.base), _sd(pair.ft)
    calib = pairs.task_examples(pair, 128)
    held = {tuple(e["input_ids"]) for e in lm.read_data(pair.data)}
    assert not any(tuple(e["input_ids"]) in held for e in calib)
    s0 = A.calibrate_scales(model, pair.base, calib, steps=0)
    for n, a in s0.items():
        assert a == pytest.approx(float((ft[n].float() - base[n].float()).abs().mean()), rel=1e-6)
    s1 = A.calibrate_scales(model, pair.base, calib, steps=60, lr=2e-2)

    def loss_with(scales):
        m = lm.load_model(pair.ft)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in scales:
                    b = base[n].float()
                    p.copy_(b + scales[n] * torch.sign(ft[n].float() - b))
        return evaluation.evaluate(m, examples)["loss"]

    assert all(a > 0 for a in s1.values())
    assert loss_with(s1) < 0.5 * loss_with(s0)


def test_calibrate_cli_writes_fitted_scales_into_the_delta(pair, tmp_path, capsys):
    """`deltapack calibrate` fits the sign scales and saves them back: the rebuilt model's loss on the
    calibration data drops; only the scales change."""
    import numpy as np

    import deltapack as dp
    from deltapack import checkpoint, cli

    plain, fitted = tmp_path / "sign.dpk", tmp_path / "cal.dpk"
    checkpoint.compress(pair.base, pair.ft, plain, recipe="sign")
    assert cli.main(["calibrate", str(pair.base), str(pair.ft), str(plain), "--data", str(pair.data),
                     "--method", "distill", "--steps", "30", "--max-examples", "64", "-o", str(fitted)]) == 0

    def loss_of(delta):
        model = lm.load_model(pair.base)
        model.load_state_dict(dp.load(pair.base, delta), strict=False)
        return evaluation.evaluate(model, lm.read_data(pair.data)[:64])["loss"]

    a, b = dp.open(plain), dp.open(fitted)
    assert a.keys() == b.keys() and a.metadata == b.metadata and a.base == b.base
    changed = [n for n in a.keys() if a[n].codec == "sign"
               and not np.array_equal(a[n].components["scales"], b[n].components["scales"])]
    assert changed
    for n in a.keys():
        np.testing.assert_array_equal(a[n].components.get("signs", 0), b[n].components.get("signs", 0))
    assert loss_of(fitted) < loss_of(plain)
    # A delta without sign tensors: a clear error, nothing written.
    q = tmp_path / "q.dpk"
    checkpoint.compress(pair.base, pair.ft, q, recipe="quant:bits=4")
    assert cli.main(["calibrate", str(pair.base), str(pair.ft), str(q), "--data", str(pair.data),
                     "--method", "distill", "-o", str(tmp_path / "x.dpk")]) == 1
    assert "no sign (scope=tensor) tensors" in capsys.readouterr().err and not (tmp_path / "x.dpk").exists()
