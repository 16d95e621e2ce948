"""The offline base / fine-tune pair builder: structure, determinism, cache, the task metric."""
import hashlib
import json
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from deltapack import lm
from deltapack.research import evaluation, pairs  # noqa: E402


@pytest.fixture(scope="session")
def llama_pair():
    return pairs.build_pair("llama", "tiny")


@pytest.fixture(scope="session")
def qwen2_pair():
    return pairs.build_pair("qwen2", "tiny")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pair_layout_and_metrics(llama_pair):
    p = llama_pair
    for d in (p.base, p.ft):
        for f in ("config.json", "model.safetensors", "generation_config.json"):
            assert (d / f).exists(), d / f
    from safetensors import safe_open
    with safe_open(str(p.ft / "model.safetensors"), "pt") as h:
        assert all(h.get_slice(k).get_dtype() == "BF16" for k in h.keys())
    assert p.task == "reverse"
    # The fine-tune learned the task; the base cannot do it in this format.
    base_m, ft_m = evaluation.evaluate(p.base, p), evaluation.evaluate(p.ft, p)
    assert ft_m["accuracy"] >= 0.8 and base_m["accuracy"] <= 0.1
    assert ft_m["loss"] < base_m["loss"] - 1.0
    assert ft_m == pytest.approx(p.info["ft_metrics"])


def test_evaluate_matches_generate(llama_pair):
    """Exact match by one teacher-forced pass equals real greedy decoding with transformers' generate."""
    model = lm.load_model(llama_pair.ft)
    examples = lm.read_data(llama_pair.data)[:40]
    # Mix in some examples with wrong answers so both outcomes are exercised.
    for ex in examples[::3]:
        ex["input_ids"][-2] = ord("z") if ex["input_ids"][-2] != ord("z") else ord("y")
    got = evaluation.evaluate(model, examples)
    correct = 0
    for ex in examples:
        plen, ids = ex["prompt_len"], ex["input_ids"]
        out = model.generate(torch.tensor([ids[:plen]]), max_new_tokens=len(ids) - plen, do_sample=False,
                             pad_token_id=pairs.PAD)
        correct += out[0, plen:].tolist() == ids[plen:]
    assert got["accuracy"] == pytest.approx(correct / len(examples))
    assert 0 < correct < len(examples)


def test_loss_matches_transformers(llama_pair):
    """Held-out loss equals transformers' own label loss over answer tokens."""
    model = lm.load_model(llama_pair.ft)
    examples = lm.read_data(llama_pair.data)[:16]
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = ids.clone()
            labels[0, :ex["prompt_len"]] = -100
            n = int((labels[0, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    assert evaluation.evaluate(model, examples)["loss"] == pytest.approx(total / count, rel=1e-5)


def test_qwen2_config_tied_and_biases(qwen2_pair):
    cfg = json.loads((qwen2_pair.ft / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    from safetensors import safe_open
    with safe_open(str(qwen2_pair.ft / "model.safetensors"), "pt") as h:
        keys = set(h.keys())
    assert "model.layers.0.self_attn.q_proj.bias" in keys
    assert "lm_head.weight" not in keys  # tied to the embeddings
    assert evaluation.evaluate(qwen2_pair.ft, qwen2_pair)["accuracy"] >= 0.8


def test_mistral_config_sliding_window():
    cfg = pairs.make_config("mistral", "tiny")
    assert cfg.model_type == "mistral" and cfg.sliding_window
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert model(input_ids=torch.tensor([[pairs.BOS, 97, 98]])).logits.shape == (1, 3, pairs.VOCAB)


def test_cache_hit(llama_pair):
    t0 = time.perf_counter()
    again = pairs.build_pair("llama", "tiny")
    assert time.perf_counter() - t0 < 5.0 and again.ft == llama_pair.ft and again.info == llama_pair.info


def test_determinism_and_atomic_build(tmp_path, monkeypatch):
    """Two builds in different directories give the same bytes (seeded, single-threaded); a short schedule
    keeps this fast, the code path is the full one."""
    monkeypatch.setitem(pairs.SIZES, "tiny", {**pairs.SIZES["tiny"], "text_steps": 4, "pre_steps": 12,
                                              "ft_steps": 6, "n_eval": 16})
    a = pairs.build_pair("mistral", "tiny", cache_dir=tmp_path / "a", seed=3)
    b = pairs.build_pair("mistral", "tiny", cache_dir=tmp_path / "b", seed=3)
    c = pairs.build_pair("mistral", "tiny", cache_dir=tmp_path / "c", seed=4)
    for sub in ("base", "ft"):
        assert _sha(a.root / sub / "model.safetensors") == _sha(b.root / sub / "model.safetensors")
        assert _sha(a.root / sub / "model.safetensors") != _sha(c.root / sub / "model.safetensors")
    assert a.data.read_text() == b.data.read_text()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a", "b", "c"]  # temp build dirs renamed away
    cfg = json.loads((a.ft / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["sliding_window"] == pairs.SIZES["tiny"]["ctx"] // 2


def test_tasks_and_early_stop(tmp_path, monkeypatch):
    """The non-saturated tasks: their formats, a fine-tune that stops at the validation target (checked every
    STOP_EVERY steps), and the recorded steps and delta size. A short schedule keeps this fast."""
    import random

    rng = random.Random(0)
    p, a = pairs.TASKS["add"].example(rng)
    x, _, y = p.rstrip("=").partition("+")
    assert p.endswith("=") and int(a) == int(x) + int(y) and a.endswith("\n") and int(y) < 100
    sp, sa = pairs.TASKS["add"].skill(rng)
    assert " plus " in sp and sp.endswith(" is ")
    monkeypatch.setitem(pairs.SIZES, "tiny", {**pairs.SIZES["tiny"], "text_steps": 4, "pre_steps": 12,
                                              "ft_steps": 20, "n_eval": 16})
    monkeypatch.setattr(pairs, "N_VALIDATION", 8)
    monkeypatch.setitem(pairs.TASKS, "add", pairs.Task(pairs._add_example, pairs._add_skill, stop_at=0.0,
                                                       max_steps_scale=5, n_eval=24))
    pair = pairs.build_pair("llama", "tiny", cache_dir=tmp_path / "p", task="add")
    assert pair.task == "add" and pair.info["task"] == "add"
    assert pair.info["finetune_steps"] == pairs.STOP_EVERY  # the target (0.0) is met at the first check
    assert pair.info["delta_rel_norm"] > 0
    examples = lm.read_data(pair.data)
    assert len(examples) == 24 and all("+" in pairs.decode_ids(e["input_ids"]) for e in examples)
    calib = pairs.task_examples(pair, 10)
    held = {tuple(e["input_ids"]) for e in examples}
    assert all(tuple(e["input_ids"]) not in held for e in calib)
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        pairs.build_pair("llama", "tiny", cache_dir=tmp_path / "q", task="poetry")
    assert pairs.default_cache_dir("llama", "small", 0, "add").name == "llama-small-add-0"
    assert pairs.default_cache_dir("llama", "small", 0).name == "llama-small-0"  # reverse keeps its old name


def test_data_file(llama_pair):
    examples = lm.read_data(llama_pair.data)
    texts = [pairs.decode_ids(e["input_ids"]) for e in examples]
    assert len(set(texts)) == len(texts) == pairs.SIZES["tiny"]["n_eval"]
    for e, t in zip(examples, texts):
        word, _, rev = t.rstrip("\n").partition(">")
        assert rev == word[::-1] and e["input_ids"][0] == pairs.BOS
        assert pairs.decode_ids(e["input_ids"][:e["prompt_len"]]) == word + ">"


def test_tokenizer_is_byte_level(llama_pair):
    pytest.importorskip("tokenizers")
    tok = transformers.AutoTokenizer.from_pretrained(str(llama_pair.ft))
    text = "abc> é\n"
    assert tok(text)["input_ids"] == pairs.encode_text(text)
    assert tok.decode(pairs.encode_text(text), skip_special_tokens=True) == text
    assert len(tok) == pairs.VOCAB


def test_bad_arguments_and_data(tmp_path):
    with pytest.raises(ValueError, match="unknown arch 'gpt2'"):
        pairs.build_pair("gpt2", "tiny", cache_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        pairs.build_pair("llama", "huge", cache_dir=tmp_path / "x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        lm.read_data(bad)
    bad.write_text('{"input_ids": [1, 2, 3], "prompt_len": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: prompt_len"):
        lm.read_data(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        lm.read_data(bad)


def test_answer_logits_equal_the_full_head_at_labelled_positions(llama_pair):
    """evaluate runs the output head on the answer positions only; those logits are the model's own there."""
    model = lm.load_model(llama_pair.ft)
    examples = lm.read_data(llama_pair.data)[:16]
    ids, mask, labels = next(lm.batches(examples))
    with torch.no_grad():
        logits, tgt, rows = lm.answer_logits(model, ids, mask, labels)
        full = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    keep = labels[:, 1:] != -100
    assert torch.allclose(logits, full[keep].float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(tgt, labels[:, 1:][keep]) and torch.equal(rows, keep.nonzero()[:, 0])
    assert len(tgt) == sum(len(e["input_ids"]) - e["prompt_len"] for e in examples)
