"""GGUF export (LoRA adapter and complete model), checked by llama.cpp itself (llama-cpp-python)
against the torch model rebuilt with the same delta, and by gguf-py's reader."""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import deltapack as dp  # noqa: E402
from deltapack import checkpoint, cli, reference  # noqa: E402
from deltapack.export.gguf import export_gguf_lora, export_gguf_model  # noqa: E402

pairs = pytest.importorskip("deltapack.research.pairs")
RANK = 8
PROMPT = [256] + list(b"kqzvm>")   # BOS + a task prompt of the tiny pairs (byte tokens)


def _llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def exported(request, tmp_path_factory):
    """A tiny pair, its delta at rank 8 (lowrank codec), and the three GGUF files made from them."""
    pair = pairs.build_pair(request.param, "tiny")
    tmp = tmp_path_factory.mktemp(f"gguf_{request.param}")
    delta = tmp / "lr.dpk"
    checkpoint.compress(pair.base, pair.ft, delta, recipe=f"*=lowrank:rank={RANK},dtype=f32", min_size=1000)
    export_gguf_model(pair.base, None, tmp / "base.gguf", quiet=True)
    export_gguf_model(pair.base, delta, tmp / "model.gguf", quiet=True)
    rep = export_gguf_lora(pair.base, delta, tmp / "adapter.gguf", quiet=True)
    return pair, delta, tmp, rep


def _torch_model(base_dir, delta=None, matrices_only=False, tied=False):
    """The fine-tune rebuilt with torch: base (f32) + decoded delta; lowrank deltas as u @ v in float64.

    matrices_only: only the changes a LoRA adapter can carry (2-d, and not a tied input embedding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if delta is None:
        return model
    f = dp.open(delta)
    sd = model.state_dict()
    for name, spec in f.metadata["checkpoint"]["tensors"].items():
        if spec["op"] != "delta":
            continue
        if matrices_only and (len(spec["shape"]) != 2 or (tied and name == "model.embed_tokens.weight")):
            continue
        enc = f[name]
        if enc.codec == "lowrank" and "u" in enc.components:   # float factors: their product in float64
            u = torch.from_numpy(reference.widen(enc.components["u"], enc.params["dtype"])).double()
            v = torch.from_numpy(reference.widen(enc.components["v"], enc.params["dtype"])).double()
            d = (u @ v).float()
        else:
            d = torch.from_numpy(dp.decode(enc))
        sd[name] = sd[name] + d
    model.load_state_dict(sd, strict=False)
    if tied:
        model.tie_weights()
    return model


def _torch_logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _llama(path, lora=None):
    llama_cpp = _llama_cpp()
    # f32 KV cache: llama.cpp's default f16 cache would round attention inputs
    return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=64, n_batch=64,
                           n_threads=1, logits_all=True, type_k=0, type_v=0, verbose=False)


def _llama_logits(llm, ids=PROMPT):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def _close(got, want, rel):
    scale = np.abs(want).max()
    diff = np.abs(got - want).max()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} x logit scale {scale:.3g}"


def test_adapter_metadata_and_shapes(exported):
    pair, _, tmp, rep = exported
    r = gguf.GGUFReader(tmp / "adapter.gguf")
    kv = {f.name: f for f in r.fields.values()}

    def text(key):
        f = kv[key]
        return bytes(f.parts[f.data[0]]).decode()

    cfg = json.loads((pair.base / "config.json").read_text())
    assert text("general.type") == "adapter" and text("adapter.type") == "lora"
    assert text("general.architecture") == {"qwen2": "qwen2"}.get(cfg["model_type"], "llama")
    assert float(kv["adapter.lora.alpha"].parts[-1][0]) == RANK
    t = {x.name: x for x in r.tensors}
    # ggml dims are numpy's reversed: lora_a is (in, r), lora_b is (r, out) in ggml order
    assert list(t["blk.0.ffn_down.weight.lora_a"].shape) == [cfg["intermediate_size"], RANK]
    assert list(t["blk.0.ffn_down.weight.lora_b"].shape) == [RANK, cfg["hidden_size"]]
    if cfg.get("tie_word_embeddings"):
        assert "token_embd.weight.lora_a" not in t
        assert any(s["name"] == "model.embed_tokens.weight" for s in rep["skipped"])
    else:   # token embedding: A is looked up by token id (vocab rows), B is (dim x r)
        assert list(t["token_embd.weight.lora_a"].shape) == [RANK, cfg["vocab_size"]]
        assert list(t["token_embd.weight.lora_b"].shape) == [RANK, cfg["hidden_size"]]


def test_base_gguf_matches_transformers(exported):
    pair, _, tmp, _ = exported
    llm = _llama(tmp / "base.gguf")
    _close(_llama_logits(llm), _torch_logits(_torch_model(pair.base)), 1e-4)
    if (pair.base / "tokenizer.json").exists():   # the pair's merge-free byte tokenizer, BOS added
        from transformers import AutoTokenizer

        text = "kqzvm>mvzqk\n  x = 'é'"
        assert llm.tokenize(text.encode()) == AutoTokenizer.from_pretrained(pair.base)(text).input_ids


def test_lora_adapter_matches_rebuilt_model(exported):
    pair, delta, tmp, _ = exported
    tied = json.loads((pair.base / "config.json").read_text()).get("tie_word_embeddings", False)
    want = _torch_logits(_torch_model(pair.base, delta, matrices_only=True, tied=tied))
    got = _llama_logits(_llama(tmp / "base.gguf", tmp / "adapter.gguf"))
    _close(got, want, 1e-3)
    # and the adapter does something: the base alone is far from it
    assert np.abs(_llama_logits(_llama(tmp / "base.gguf")) - want).max() > 1e-2 * np.abs(want).max()


def test_merged_model_matches_and_generates_same_tokens(exported):
    pair, delta, tmp, _ = exported
    tied = json.loads((pair.base / "config.json").read_text()).get("tie_word_embeddings", False)
    ref = _torch_model(pair.base, delta, tied=tied)
    llm = _llama(tmp / "model.gguf")
    _close(_llama_logits(llm), _torch_logits(ref), 1e-3)
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False)[0, len(PROMPT):].tolist()
    llm.reset()
    got = []
    for tok in llm.generate(PROMPT, top_k=1, temp=0.0):
        got.append(tok)
        if len(got) == 6:
            break
    assert got == want


def test_svd_adapter_and_q8_0_fallback(tmp_path):
    llama_cpp = _llama_cpp()  # noqa: F841
    pair = pairs.build_pair("llama", "tiny")
    delta = tmp_path / "sign.dpk"
    checkpoint.compress(pair.base, pair.ft, delta, recipe="*=sign:scope=row", min_size=1000)
    rep = export_gguf_lora(pair.base, delta, tmp_path / "a.gguf", rank=32, outtype="q8_0", quiet=True)
    assert all(t["source"] == "svd" and 0 < t["rel_error"] < 1 for t in rep["tensors"])
    # hidden 64 and rank 32 fill q8_0 blocks; the MLP's 176-wide rows do not and fall back to f16
    assert any("ffn_down.weight.lora_a" in n and "f16" in n for n in rep["notes"])
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0" and types["blk.0.ffn_down.weight.lora_a"] == "F16"
    base_gguf = tmp_path / "base.gguf"
    export_gguf_model(pair.base, None, base_gguf, quiet=True)
    # Reference: base + the rank-32 SVD of each decoded matrix delta (torch's SVD, independent of numpy's).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).eval()
    sd, f = model.state_dict(), dp.open(delta)
    for name, spec in f.metadata["checkpoint"]["tensors"].items():
        if spec["op"] == "delta" and len(spec["shape"]) == 2:
            d = torch.from_numpy(dp.decode(f[name])).double()
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)
            sd[name] = sd[name] + ((U[:, :32] * S[:32]) @ Vh[:32]).float()
    model.load_state_dict(sd)
    want = _torch_logits(model)
    got = _llama_logits(_llama(base_gguf, tmp_path / "a.gguf"))
    _close(got, want, 2e-2)   # q8_0 factors: about 1/256 relative rounding per value


def test_outtypes_and_placeholder_vocab(tmp_path, capsys):
    pair = pairs.build_pair("llama", "tiny")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(pair.base / name, bare / name)
    export_gguf_model(bare, None, tmp_path / "b16.gguf", outtype="bf16")
    assert "placeholder vocabulary of 260 tokens" in capsys.readouterr().err
    r = gguf.GGUFReader(tmp_path / "b16.gguf")
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"
    tokens = r.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 260
    want = _torch_logits(_torch_model(pair.base))
    _close(_llama_logits(_llama(tmp_path / "b16.gguf")), want, 2e-2)
    export_gguf_model(bare, None, tmp_path / "f16.gguf", outtype="f16", quiet=True)
    _close(_llama_logits(_llama(tmp_path / "f16.gguf")), want, 5e-3)


def test_unsupported_architecture_fails_before_work(tmp_path):
    pair = pairs.build_pair("llama", "tiny")
    odd = tmp_path / "odd"
    shutil.copytree(pair.base, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM, "
                                         r"Qwen2ForCausalLM"):
        export_gguf_model(odd, None, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert cli.main(["export", "gguf", str(odd), "-o", str(tmp_path / "x.gguf")]) == 1


def test_cli_gguf_lora(exported, tmp_path, capsys):
    pair, delta, _, _ = exported
    assert cli.main(["export", "gguf-lora", str(pair.base), str(delta), "-o", str(tmp_path / "a.gguf"),
                     "--outtype", "f16"]) == 0
    out = capsys.readouterr().out
    assert "LoRA pairs" in out and (tmp_path / "a.gguf").exists()
    assert cli.main(["export", "gguf", str(pair.base), str(delta), "-o", str(tmp_path / "m.gguf"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] > 0


def test_mixed_ranks_and_plain_delta_file(tmp_path):
    """Per-tensor ranks (llama.cpp has one alpha per adapter: r/alpha is folded into B) and a plain
    delta file (dp.save of a few tensors by their Hugging Face names, no checkpoint record)."""
    pair = pairs.build_pair("llama", "tiny")
    rng = np.random.default_rng(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).eval()
    sd = model.state_dict()
    encs = {}
    for name, rank in (("model.layers.0.self_attn.q_proj.weight", 4), ("model.layers.1.self_attn.k_proj.weight", 8),
                       ("model.layers.1.mlp.up_proj.weight", 2)):
        rows, cols = sd[name].shape
        d = (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) * 0.02).astype(np.float32)
        encs[name] = dp.encode(d, "lowrank", rank=rank, dtype="f32")
        sd[name] = sd[name] + torch.from_numpy(d)
    dp.save(tmp_path / "plain.dpk", encs)
    model.load_state_dict(sd)
    rep = export_gguf_lora(pair.base, tmp_path / "plain.dpk", tmp_path / "a.gguf", quiet=True)
    assert sorted(t["rank"] for t in rep["tensors"]) == [2, 4, 8] and rep["alpha"] in (2, 4, 8)
    export_gguf_model(pair.base, None, tmp_path / "base.gguf", quiet=True)
    _close(_llama_logits(_llama(tmp_path / "base.gguf", tmp_path / "a.gguf")), _torch_logits(model), 1e-3)
    export_gguf_model(pair.base, tmp_path / "plain.dpk", tmp_path / "m.gguf", quiet=True)
    _close(_llama_logits(_llama(tmp_path / "m.gguf")), _torch_logits(model), 1e-3)


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
SAMPLE = "Hello world, it's 12345 apples!\n\n  def f(x): return x*2  # ünïcode 'LL\n"


@pytest.mark.parametrize("style", ["gpt2", "qwen2"])
def test_bpe_tokenizer_with_merges_tokenizes_like_transformers(tmp_path, style):
    """A byte-level BPE trained here (GPT-2 regex, or Qwen2's Split regex): llama.cpp must split and merge
    text exactly as the Hugging Face tokenizer does."""
    tokenizers = pytest.importorskip("tokenizers")
    _llama_cpp()
    import json as _json
    import transformers
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    text = open(_json.__file__, encoding="utf-8").read() + open(shutil.__file__, encoding="utf-8").read()[:20000]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model_dir = tmp_path / "m"
    n_vocab = tok.get_vocab_size()
    common = dict(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.token_to_id("<|endoftext|>"))
    cfg = (transformers.LlamaConfig(**common) if style == "gpt2"
           else transformers.Qwen2Config(**common, tie_word_embeddings=True))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(_json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
    export_gguf_model(model_dir, None, tmp_path / "m.gguf", quiet=True)
    pre = gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == {"gpt2": "gpt-2", "qwen2": "qwen2"}[style]
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    want = hf(SAMPLE, add_special_tokens=False).input_ids
    assert len(want) < len(SAMPLE.encode()) * 0.8   # merges do apply
    llm = _llama(tmp_path / "m.gguf")
    assert llm.tokenize(SAMPLE.encode(), add_bos=False) == want
    assert llm.detokenize(want).decode() == SAMPLE


def test_sentencepiece_style_bpe_tokenizes_like_transformers(tmp_path):
    """A Llama-2/Mistral style tokenizer.json (BPE with byte fallback, '▁' for spaces), trained here:
    llama.cpp's 'llama' tokenizer must give the Hugging Face token ids, byte-fallback tokens included."""
    tokenizers = pytest.importorskip("tokenizers")
    _llama_cpp()
    import json as _json
    import transformers
    from tokenizers import decoders, models, normalizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    text = open(_json.__file__, encoding="utf-8").read()
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    model_dir = tmp_path / "m"
    cfg = transformers.MistralConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(_json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    export_gguf_model(model_dir, None, tmp_path / "m.gguf", quiet=True)
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    want = hf(SAMPLE, add_special_tokens=False).input_ids
    assert any(hf.convert_ids_to_tokens(i).startswith("<0x") for i in want)   # byte fallback happens
    llm = _llama(tmp_path / "m.gguf")
    assert llm.tokenize(SAMPLE.encode(), add_bos=False) == want
