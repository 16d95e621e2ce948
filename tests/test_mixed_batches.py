"""Mixed batches (issue 12): the delta's part of a linear layer from the packed delta (dp.delta_product,
Bank.product), and a patched transformers model whose batch rows use different fine-tunes, against float64
numpy products and against each rebuilt fine-tune run alone."""
import numpy as np
import pytest
from conftest import make_delta, perturbed, tiny_llama_config
from test_exact import CONFIGS, id_of

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import deltapack as dp  # noqa: E402
from deltapack import reference  # noqa: E402
from deltapack import checkpoint as ck  # noqa: E402


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("shape", [(37, 301), (9, 16), (45,)], ids=str)
@pytest.mark.parametrize("codec,params", CONFIGS, ids=[id_of(c) for c in CONFIGS])
def test_delta_product_is_x_times_the_decoded_delta(codec, params, shape, dtype):
    if codec == "lowrank" and (len(shape) == 1 or min(shape) < 5):
        pytest.skip("rank above the matrix's")
    enc = dp.encode(make_delta(shape, dtype, seed=3), codec, **params)
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    decoded = dp.decode(enc).reshape(rows, cols).astype(np.float64)
    rng = np.random.default_rng(1)
    for batch in (0, 1, 5, 9):
        x = rng.standard_normal((batch, cols)).astype(np.float32)
        start = rng.standard_normal((batch, rows)).astype(np.float32)
        want = start + 0.75 * (x.astype(np.float64) @ decoded.T)
        got = {}
        for path in dp.simd_available():
            dp.set_simd(path)
            try:
                got[path] = dp.delta_product(enc, x, alpha=0.75, out=start.copy())
            finally:
                dp.set_simd("auto")
        # f32 sums of `cols` products: within a few ulps of the magnitudes summed
        scale = np.abs(start) + 0.75 * (np.abs(x.astype(np.float64)) @ np.abs(decoded).T)
        for path, y in got.items():
            assert np.all(np.abs(y - want) <= 4 * cols * 2.0**-24 * scale + 1e-30), (path, batch)
            assert np.array_equal(y.view(np.uint32), got["scalar"].view(np.uint32)), path  # every path, same bits


@pytest.mark.parametrize("shape", [(70, 301), (130, 1100), (17, 9)], ids=str)
@pytest.mark.parametrize("params", [{}, {"scope": "row"}, {"scope": "group", "group": 64}, {"scope": "group", "group": 8}],
                         ids=["tensor", "row", "group64", "group8"])
def test_sign_product_has_the_reference_bits(params, shape):
    """The sign kernels (tables of x, one lookup per 4 columns) against reference.sign_product, numpy's f32
    arithmetic in the documented order: the same bits on every path, batch sizes around the kernels' blocks and
    past the 128 batch rows whose tables delta_products holds at once."""
    enc = dp.encode(make_delta(shape, "f32", seed=5), "sign", **params)
    rng = np.random.default_rng(2)
    for batch in (1, 3, 4, 6, 16, 300):
        x = rng.standard_normal((batch, shape[1])).astype(np.float32)
        x[0, ::7] = -0.0  # a -0 in x never makes a sum -0
        start = rng.standard_normal((batch, shape[0])).astype(np.float32)
        want = reference.sign_product(enc.components, shape, x, 0.75, start, **enc.params)
        for path in dp.simd_available():
            dp.set_simd(path)
            try:
                got = dp.delta_product(enc, x, alpha=0.75, out=start.copy())
            finally:
                dp.set_simd("auto")
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (path, batch)


def test_delta_product_refuses_wrong_shapes():
    enc = dp.encode(make_delta((8, 16), "f32"), "sign")
    with pytest.raises(ValueError, match=r"x must be \(batch, 16\)"):
        dp.delta_product(enc, np.zeros((2, 15), np.float32))
    with pytest.raises(ValueError, match="needs f32 x of batch x 16 and f32 y of batch x 8"):
        dp.delta_product(enc, np.zeros((2, 16), np.float32), out=np.zeros((2, 7), np.float32))


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory):
    """A tiny f32 Llama with tied embeddings and three fine-tunes: "a" (everything; lowrank MLPs, sign
    elsewhere), "b" (MLPs only, sign), "c" (sparse attention, dense rest: the decoded-tile path)."""
    root = tmp_path_factory.mktemp("mixed")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_llama_config(tie=True)).eval()
    base.save_pretrained(root / "base")
    for name, seed, only in (("a", 1, None), ("b", 2, "mlp"), ("c", 3, None)):
        ft = perturbed(transformers.LlamaForCausalLM.from_pretrained(root / "base"), seed, scale=2e-2, only=only)
        ft.save_pretrained(root / f"ft_{name}")
    ck.compress(root / "base", root / "ft_a", root / "a.dpk", "*.mlp.*=lowrank:rank=8;*=sign", min_size=0)
    ck.compress(root / "base", root / "ft_b", root / "b.dpk", "sign", min_size=0)
    ck.compress(root / "base", root / "ft_c", root / "c.dpk", "*.self_attn.*=sparse:p=0.5;*=dense", min_size=0)
    return root


def _rebuilt(root, which):
    model = transformers.LlamaForCausalLM.from_pretrained(root / "base").eval()
    if which is not None:
        ck.load_into(model, root / f"{which}.dpk")
    return model


def _patched(root):
    bank = dp.Bank(root / "base")
    for name in "abc":
        bank.add(name, root / f"{name}.dpk")
    model = bank.patch(transformers.LlamaForCausalLM(tiny_llama_config(tie=True)).eval())
    return bank, model


ROWS = ["a", "b", None, "c", "a", "b"]


def test_mixed_batch_logits_equal_each_rebuilt_fine_tune(f32_models):
    root = f32_models
    bank, model = _patched(root)
    ids = torch.randint(0, 96, (len(ROWS), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with bank.rows(ROWS):
            got = model(ids).logits
        plain = model(ids).logits  # outside rows(): the base
        refs = {w: _rebuilt(root, w)(ids).logits for w in set(ROWS)}
    assert torch.equal(plain, refs[None])
    spread = max((refs[w] - refs[None]).abs().max().item() for w in "abc")
    assert spread > 1e-2  # the fine-tunes differ from the base far beyond the tolerance below
    for i, w in enumerate(ROWS):
        err = (got[i] - refs[w][i]).abs().max().item()
        assert err <= 1e-4 * refs[w][i].abs().max().item(), (i, w, err)


def test_mixed_batch_generate_with_kv_cache_gives_each_fine_tunes_tokens(f32_models):
    root = f32_models
    bank, model = _patched(root)
    prompts = [[5, 9, 33, 2], [7, 7, 1], [4, 40, 8, 80, 3], [11, 12], [5, 9, 33, 2], [60, 61, 62]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with bank.rows(ROWS):
            got = model.generate(ids, **kw)
        for w in set(ROWS):
            want = _rebuilt(root, w).generate(ids, **kw)
            for i in [i for i, r in enumerate(ROWS) if r == w]:
                assert torch.equal(got[i], want[i]), (i, w)
        base = _rebuilt(root, None).generate(ids, **kw)
    assert sum(not torch.equal(got[i], base[i]) for i, w in enumerate(ROWS) if w) >= 3  # the fine-tunes do differ


@pytest.mark.parametrize("tensor", ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                                    "model.layers.0.mlp.down_proj.weight"])
def test_large_mixed_batch_equals_each_fine_tunes_product(f32_models, tensor):
    """400 batch rows for three fine-tunes and the base: delta_products runs them in waves of 128 batch rows,
    each fine-tune's rows in slices; every row gets the bits of its fine-tune's own product."""
    bank = dp.Bank(f32_models / "base")
    for name in "abc":
        bank.add(name, f32_models / f"{name}.dpk")
    rows, cols = np.asarray(bank._b.tensor(tensor)).shape
    rng = np.random.default_rng(4)
    which = rng.integers(-1, 3, 400).astype(np.int32)
    x = rng.standard_normal((400, cols)).astype(np.float32)
    start = rng.standard_normal((400, rows)).astype(np.float32)
    got, want = start.copy(), start.copy()
    bank._b.mixed_product(tensor, ["a", "b", "c"], which, x, got, 0.75)
    for t, name in enumerate("abc"):
        own = np.flatnonzero(which == t)
        part = want[own].copy()
        bank._b.product(name, tensor, np.ascontiguousarray(x[own]), part, 0.75)
        want[own] = part
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(got[which == -1], start[which == -1])  # the base's rows are left as they were
    for t, name in enumerate("abc"):  # a fine-tune that changes the tensor changes its rows ("b" is MLPs only)
        assert ((got[which == t] != start[which == t]).mean() > 0.5) == bank._b.touches(name, tensor), name


def test_rows_alpha_and_refusals(f32_models):
    root = f32_models
    bank, model = _patched(root)
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with bank.rows(["a", "a"], alpha=0.5):
            got = model(ids).logits
        half = transformers.LlamaForCausalLM.from_pretrained(root / "base").eval()
        ck.load_into(half, root / "a.dpk", alpha=0.5)
        want = half(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with pytest.raises(ValueError, match="no fine-tune named 'zzz'"):
        with bank.rows(["a", "zzz"]):
            pass
    with pytest.raises(ValueError, match="names 3 rows but .* got a batch of 2"):
        with bank.rows(["a", "b", None]), torch.no_grad():
            model(ids)
    with bank.rows(["a", None]):
        with pytest.raises(RuntimeError, match="inside bank.rows"):
            bank.activate("a")
    bank.activate("b")
    with pytest.raises(RuntimeError, match="activate\\(None\\) first"):
        with bank.rows(["a", None]):
            pass


def test_mixed_batch_with_biases_qwen2(tmp_path):
    """Qwen2's q/k/v projections have biases: a changed bias adds its delta per row too."""
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(tmp_path / "base")
    for name, seed in (("a", 1), ("b", 2)):
        ft = perturbed(transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "base"), seed, scale=2e-2)
        assert ft.model.layers[0].self_attn.q_proj.bias is not None
        ft.save_pretrained(tmp_path / f"ft_{name}")
        ck.compress(tmp_path / "base", tmp_path / f"ft_{name}", tmp_path / f"{name}.dpk", "sign", min_size=0)
    bank = dp.Bank(tmp_path / "base")
    bank.add("a", tmp_path / "a.dpk")
    bank.add("b", tmp_path / "b.dpk")
    assert bank._b.touches("a", "model.layers.0.self_attn.q_proj.bias")
    model = bank.patch(transformers.Qwen2ForCausalLM(cfg).eval())
    rows = ["b", None, "a"]
    ids = torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), bank.rows(rows):
        got = model(ids).logits
    for i, w in enumerate(rows):
        ref = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "base").eval()
        if w:
            ck.load_into(ref, tmp_path / f"{w}.dpk")
        with torch.no_grad():
            want = ref(ids).logits[i]
        assert (got[i] - want).abs().max() <= 1e-4 * want.abs().max(), (i, w)
