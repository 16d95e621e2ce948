"""Adapter-exact budgets (`compress --budget B --lora-only`) and what an adapter carries: the delta's matrices reach
PEFT and llama.cpp as stored, the adapters' block types stay close to the exact f32 adapter, and the energy an
adapter drops is reported as numpy computes it from the decoded deltas."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import deltapack as dp  # noqa: E402
from deltapack import checkpoint, cli  # noqa: E402
from deltapack.export.gguf import export_gguf_lora, export_gguf_model  # noqa: E402
# llama.cpp and torch logits on the tiny pairs' prompt, as tests/test_export_gguf.py reads them
from test_export_gguf import PROMPT, _llama, _llama_logits, _torch_logits, _torch_model  # noqa: E402

pairs = pytest.importorskip("deltapack.research.pairs")


@pytest.fixture(scope="module", params=["llama", "qwen2"])   # untied and tied embeddings
def lora_only(request, tmp_path_factory):
    pair = pairs.build_pair(request.param, "tiny")
    tmp = tmp_path_factory.mktemp(f"lora_only_{request.param}")
    s = checkpoint.compress(pair.base, pair.ft, tmp / "lo.dpk", budget=1.1, lora_only=True)
    return pair, tmp, s


def _tied(pair):
    return json.loads((pair.base / "config.json").read_text()).get("tie_word_embeddings", False)


def test_every_stored_matrix_is_low_rank_within_the_budget(lora_only):
    pair, tmp, s = lora_only
    f = dp.open(tmp / "lo.dpk")
    rec = f.metadata["checkpoint"]["tensors"]
    params = sum(int(np.prod(t["shape"])) for t in rec.values())
    assert 8 * f.nbytes <= 1.1 * params
    codecs = {n: f[n].codec for n in f.keys()}
    matrices = [n for n in codecs if len(rec[n]["shape"]) == 2]
    assert matrices and all(codecs[n] == "lowrank" for n in matrices)
    assert all(codecs[n] == "dense" for n in codecs if len(rec[n]["shape"]) == 1)  # norms and biases as usual
    assert f.metadata["budget"]["lora_only"] is True
    # and an unrestricted budget on the same pair does choose other codecs, so the restriction is real
    free = checkpoint.compress(pair.base, pair.ft, tmp / "free.dpk", budget=1.1)
    g = dp.open(tmp / "free.dpk")
    assert "lora_only" not in g.metadata["budget"] and free["file_bytes"] <= 1.1 * params / 8
    assert {g[n].codec for n in g.keys() if len(rec[n]["shape"]) == 2} != {"lowrank"} or \
        g.nbytes != f.nbytes   # the unrestricted choice differs


def test_info_says_the_adapter_carries_the_matrices_as_stored(lora_only, capsys):
    pair, tmp, _ = lora_only
    assert cli.main(["info", str(tmp / "lo.dpk")]) == 0
    out = capsys.readouterr().out
    assert "matrices low rank, exactly as stored" in out and "--lora-only" in out
    assert ("model.embed_tokens.weight: input embedding tied" in out) == (
        _tied(pair) and "model.embed_tokens.weight" in dp.open(tmp / "lo.dpk").keys())
    checkpoint.compress(pair.base, pair.ft, tmp / "sign.dpk", recipe="*.mlp.*=sign;*=lowrank:rank=4", min_size=1000)
    assert cli.main(["info", str(tmp / "sign.dpk")]) == 0
    out = capsys.readouterr().out
    assert "the others (6) cut to --rank by SVD on export" in out  # 2 layers x 3 MLP matrices
    assert ("model.embed_tokens.weight: input embedding tied to the output projection" in out) == _tied(pair)


def test_peft_and_gguf_adapters_carry_the_stored_factors(lora_only):
    """Every factor pair in both adapters multiplies out to the stored delta (as deltapack decodes it); a tied
    embedding, when the budget stored it, only in the GGUF adapter with --untied-output."""
    pair, tmp, _ = lora_only
    from safetensors.torch import load_file

    from deltapack.export.peft import export_peft
    f = dp.open(tmp / "lo.dpk")
    want = {n: dp.decode(f[n]) for n in f.keys() if f[n].codec == "lowrank"}
    tied = {"model.embed_tokens.weight"} & set(want) if _tied(pair) else set()
    rep = export_peft(pair.base, tmp / "lo.dpk", tmp / "peft")
    assert {t["source"] for t in rep["tensors"]} == {"lowrank"}
    assert {t["name"] for t in rep["tensors"]} == set(want) - tied
    st = {k: v.double().numpy() for k, v in load_file(tmp / "peft" / "adapter_model.safetensors").items()}
    for name, d in want.items():
        if name in tied:
            continue
        mod = "base_model.model." + name.removesuffix(".weight")
        if f"{mod}.lora_A.weight" in st:
            got = st[f"{mod}.lora_B.weight"] @ st[f"{mod}.lora_A.weight"]
        else:   # an untied embedding: lora_embedding_A (r x vocab), lora_embedding_B (dim x r)
            got = (st[f"{mod}.lora_embedding_B"] @ st[f"{mod}.lora_embedding_A"]).T
        np.testing.assert_allclose(got, d, rtol=0, atol=1e-6 * np.abs(d).max())
    rep = export_gguf_lora(pair.base, tmp / "lo.dpk", tmp / "a.gguf", quiet=True)
    assert {t["source"] for t in rep["tensors"]} == {"lowrank"}
    assert {t["name"] for t in rep["tensors"]} == set(want) - tied
    rep = export_gguf_lora(pair.base, tmp / "lo.dpk", tmp / "u.gguf", quiet=True, untied_output=True)
    assert {t["name"] for t in rep["tensors"]} == set(want)
    names = {t.name for t in gguf.GGUFReader(tmp / "u.gguf").tensors}
    if tied:   # the embedding on both its uses
        assert {"token_embd.weight.lora_a", "output.weight.lora_a"} <= names


def test_energy_not_carried_is_reported(lora_only):
    pair, tmp, _ = lora_only
    f = dp.open(tmp / "lo.dpk")
    energy = {n: float(np.square(dp.decode(f[n]), dtype=np.float64).sum()) for n in f.keys()}
    total = sum(energy.values())
    vectors = sum(e for n, e in energy.items() if len(f[n].shape) == 1)
    rep = export_gguf_lora(pair.base, tmp / "lo.dpk", tmp / "b.gguf", quiet=True)
    assert rep["energy"]["vectors"] == pytest.approx(vectors / total, rel=1e-5) and vectors > 0
    tied = energy.get("model.embed_tokens.weight", 0.0) if _tied(pair) else 0.0
    assert rep["energy"]["svd_error"] == 0 and rep["energy"]["skipped"] == pytest.approx(tied / total, rel=1e-5)
    rep = export_gguf_lora(pair.base, tmp / "lo.dpk", tmp / "c.gguf", quiet=True, untied_output=True)
    assert rep["energy"]["skipped"] == 0


# max |Δlogit| / max |logit| from the f32 adapter, per type
OUTTYPES = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 0.01, "q5_1": 0.03, "q5_0": 0.04, "q4_1": 0.05, "q4_0": 0.05,
            "q5_0/q4_0": 0.05}


def test_adapter_types_load_in_llama_cpp_close_to_f32(lora_only, tmp_path):
    """Each adapter type loads and runs in llama.cpp; its logits stay within a bound (of the largest logit) of the
    f32 adapter's, which equals the torch model rebuilt from the stored matrices; block types' ranks are padded to
    whole blocks."""
    pytest.importorskip("llama_cpp")
    pair, tmp, _ = lora_only
    base = tmp_path / "base.gguf"
    export_gguf_model(pair.base, None, base, quiet=True)

    def logits(adapter=None):
        return _llama_logits(_llama(base, adapter))

    export_gguf_lora(pair.base, tmp / "lo.dpk", tmp_path / "f32.gguf", quiet=True)
    exact = logits(tmp_path / "f32.gguf")
    want = _torch_logits(_torch_model(pair.base, tmp / "lo.dpk", matrices_only=True, tied=_tied(pair)), PROMPT)
    assert np.abs(exact - want).max() <= 1e-3 * np.abs(want).max()
    effect = np.abs(exact - logits()).max()
    assert effect > 0.05 * np.abs(exact).max()   # the adapter matters, so the bounds below mean something
    sizes = {}
    for outtype, bound in OUTTYPES.items():
        path = tmp_path / f"{outtype.replace('/', '-')}.gguf"
        rep = export_gguf_lora(pair.base, tmp / "lo.dpk", path, outtype=outtype, quiet=True)
        sizes[outtype] = rep["bytes"]
        diff = np.abs(logits(path) - exact).max()
        assert diff <= bound * np.abs(exact).max(), (outtype, diff)
        tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
        for t in rep["tensors"]:
            assert t["rank_in_file"] >= t["rank"]
        for name, t in tensors.items():
            want = outtype.split("/")[name.endswith(".lora_b")].upper() if "/" in outtype else outtype.upper()
            if want.startswith("Q"):   # a block type, or f16 where rows are not whole blocks
                assert t.tensor_type.name in (want, "F16") and (t.tensor_type.name == "F16") == (t.shape[0] % 32 > 0)
            else:
                assert t.tensor_type.name == want
    assert sizes["q4_0"] < sizes["q5_0"] < sizes["q8_0"] < (tmp_path / "f32.gguf").stat().st_size


def test_rank_multiple_fills_adapter_blocks_without_padding(tmp_path, capsys):
    """--rank-multiple 32: every stored rank is a multiple of 32 (or every direction of the matrix), so a block-type
    adapter holds the stored ranks as they are; the file stays within the budget."""
    pair = pairs.build_pair("llama", "tiny")
    out = tmp_path / "m.dpk"
    assert cli.main(["compress", str(pair.base), str(pair.ft), "-o", str(out), "--budget", "2.1", "--lora-only",
                     "--rank-multiple", "32", "-q"]) == 0
    f = dp.open(out)
    rec = f.metadata["checkpoint"]["tensors"]
    assert 8 * f.nbytes <= 2.1 * sum(int(np.prod(t["shape"])) for t in rec.values())
    ranks = {n: f[n].params["rank"] for n in f.keys() if f[n].codec == "lowrank"}
    assert ranks and all(r % 32 == 0 or r == min(f[n].shape) for n, r in ranks.items())
    rep = export_gguf_lora(pair.base, out, tmp_path / "a.gguf", outtype="q5_0/q4_0", quiet=True)
    assert all(t["rank_in_file"] == t["rank"] for t in rep["tensors"])
    for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors:   # f16 only where rows are not whole blocks (176)
        want = "Q5_0" if t.name.endswith("lora_a") else "Q4_0"
        assert t.tensor_type.name == (want if t.shape[0] % 32 == 0 else "F16"), t.name
        assert t.shape[0] % 32 == 0 or ".ffn_down.weight.lora_a" in t.name
    # a recipe names its codecs itself: --lora-only and --rank-multiple need --budget
    assert cli.main(["compress", str(pair.base), str(pair.ft), "-o", str(tmp_path / "r.dpk"), "--rank-multiple",
                     "32"]) == 1
    assert "go with --budget" in capsys.readouterr().err
    with pytest.raises(ValueError, match="outtype must be one of .*A_TYPE/B_TYPE"):
        export_gguf_lora(pair.base, out, tmp_path / "b.gguf", outtype="q4_k")


def test_whole_multiples_round_to_the_cheaper_side():
    """The allocator's rounding of a kept rank, against a brute force over every kept count and width."""
    from deltapack.compress.allocate import BITS, TensorOptions
    rng = np.random.default_rng(0)
    s2 = np.sort(rng.exponential(size=40))[::-1] * 100
    eps = {b: 0.5 ** (2 * b) for b in BITS}
    opts = TensorOptions("w", (64, 40), 64, 40, float(s2.sum()), s2, eps, {b: 104 * b + 64 for b in BITS},
                         rank_multiple=16)
    for lam in (1e-3, 1e-2, 0.05, 0.2, 1.0):
        bits, err, size = opts.lowrank_choice(lam)
        k = int((bits > 0).sum())
        assert k in (0, 16, 32, 40)
        best = min(((s2[:n] * [eps[b] for b in w]).sum() + s2[n:].sum() + lam * sum(104 * b + 64 for b in w))
                   for n in (0, 16, 32, 40)
                   for w in [[min(BITS, key=lambda b: s2[i] * eps[b] + lam * (104 * b + 64)) for i in range(n)]])
        assert err + lam * size == pytest.approx(best, rel=1e-9), lam


def test_lora_only_with_calibration_data(tmp_path):
    """With --data every proxy chooses among low-rank candidates, and the refit keeps the matrices low rank."""
    pair = pairs.build_pair("qwen2", "tiny")
    s = checkpoint.compress(pair.base, pair.ft, tmp_path / "d.dpk", budget=1.1, lora_only=True,
                            data=pairs.task_examples(pair, 64))
    f = dp.open(tmp_path / "d.dpk")
    assert {f[n].codec for n in f.keys() if len(f[n].shape) == 2} == {"lowrank"}
    assert s["budget"]["lora_only"] is True and set(s["budget"]["data"]["scores"]) == {
        "relative", "fisher", "fisher-relative", "activation-relative"}


def test_untied_output_carries_a_tied_embedding_in_llama_cpp(tmp_path):
    """qwen2's tied embedding: with a base GGUF that holds the output projection as its own tensor and an adapter
    carrying the embedding's delta on both uses, llama.cpp gives the logits of the torch model whose tied weight
    (input and output at once) took the delta."""
    pytest.importorskip("llama_cpp")
    pair = pairs.build_pair("qwen2", "tiny")
    delta = tmp_path / "lr.dpk"
    checkpoint.compress(pair.base, pair.ft, delta, recipe="*=lowrank:rank=8", min_size=1000)
    assert "model.embed_tokens.weight" in dp.open(delta).keys()
    assert cli.main(["export", "gguf", str(pair.base), "-o", str(tmp_path / "base.gguf"), "--untied-output"]) == 0
    assert cli.main(["export", "gguf-lora", str(pair.base), str(delta), "-o", str(tmp_path / "a.gguf"),
                     "--untied-output"]) == 0
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).eval()
    f = dp.open(delta)
    with torch.no_grad():
        params = dict(model.named_parameters())   # one parameter for the tied pair
        for name in f.keys():
            if len(f[name].shape) == 2:
                params[name] += torch.from_numpy(dp.decode(f[name]))
    want = _torch_logits(model, PROMPT)
    got = _llama_logits(_llama(tmp_path / "base.gguf", tmp_path / "a.gguf"))
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    # the adapter without its output pair, on the tied base, misses the output side by far more
    export_gguf_model(pair.base, None, tmp_path / "tied.gguf", quiet=True)
    export_gguf_lora(pair.base, delta, tmp_path / "b.gguf", quiet=True)
    got = _llama_logits(_llama(tmp_path / "tied.gguf", tmp_path / "b.gguf"))
    assert np.abs(got - want).max() > 1e-2 * np.abs(want).max()
