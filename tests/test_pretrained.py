"""Pretrained bases from GGUF files and their fine-tunes (deltapack.research.pretrained), on a tiny model with a real BPE
tokenizer and chat template: the 135 M and 270 M models themselves are too slow for CI (bench/ uses them)."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("gguf")
from conftest import tiny_llama_config  # noqa: E402
from safetensors import safe_open  # noqa: E402

from deltapack import lm
from deltapack.research import evaluation, pretrained  # noqa: E402

CHAT = ("{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny bf16 Llama directory with a byte-level BPE tokenizer (merges, special tokens, a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("pretrained")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>", "<|turn|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 1234 + 5678? Reverse the letters of abcdef."] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", bos_token="<|end|>")
    fast.chat_template = CHAT
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab=tok.get_vocab_size())).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    fast.save_pretrained(root / "base")
    return root / "base"


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_model_dir_from_gguf_round_trips_weights_config_and_tokenizer(tiny_base, tmp_path):
    """deltapack's GGUF export of a model, turned back into a directory by model_dir_from_gguf (transformers'
    GGUF reader), holds the same bf16 weights bit for bit, the same shape config, a working tokenizer and gives
    the same logits."""
    gguf = tmp_path / "g" / "model.gguf"
    gguf.parent.mkdir()
    r = subprocess.run([sys.executable, "-m", "deltapack", "export", "gguf", str(tiny_base), "-o", str(gguf),
                        "--outtype", "f32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = pretrained.model_dir_from_gguf(gguf, tmp_path / "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "g"]  # built aside, renamed into place
    want, got = _tensors(tiny_base), _tensors(out)
    got = {k: v for k, v in got.items() if k in want or k != "lm_head.weight"}
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k].view(torch.int16), want[k].view(torch.int16)), k
    a, b = (json.loads((d / "config.json").read_text()) for d in (tiny_base, out))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size"):
        assert a[key] == b[key], key
    assert float(np.float32(a["rms_norm_eps"])) == float(np.float32(b["rms_norm_eps"]))  # GGUF keeps f32
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "What is 1234 + 5678?"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = torch.tensor([tok(text)["input_ids"]])
    logits = [transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits
              for d in (tiny_base, out)]
    assert torch.equal(*logits)


def test_prompter_formats_chat_and_plain(tiny_base):
    chat = pretrained.Prompter(tiny_base)  # the tokenizer has a chat template
    assert chat.chat
    ids, plen = chat.ids("What is 2 + 3?", "5")
    assert chat.tok.decode(ids[:plen]).endswith("<|turn|>user\nWhat is 2 + 3?<|end|>\n<|turn|>assistant\n")
    assert chat.tok.decode(ids[plen:-1]) == "5" and ids[-1] == chat.tok.eos_token_id
    plain = pretrained.Prompter(tiny_base, chat=False)
    ids, plen = plain.ids("What is 2 + 3?", "5")
    assert plain.tok.decode(ids[:plen]).endswith("Question: What is 2 + 3?\nAnswer:")
    assert plain.tok.decode(ids[plen:-1]) == " 5" and ids[-1] == plain.tok.eos_token_id


def test_tasks_are_exact_and_deterministic():
    import random

    for name, task in pretrained.TASKS.items():
        a = [task.problem(random.Random(3)) for _ in range(5)]
        assert a == [task.problem(random.Random(3)) for _ in range(5)], name
    q, a = pretrained.TASKS["add"].problem(random.Random(1))
    x, y = (int(v) for v in q.removeprefix("What is ").removesuffix("?").split(" + "))
    assert int(a) == x + y
    q, a = pretrained.TASKS["reverse"].problem(random.Random(1))
    assert q == f"Reverse the order of these words: {' '.join(reversed(a.split()))}" and len(set(a.split())) == 5


def test_build_pair_from_a_directory(tiny_base, tmp_path):
    """A fine-tune of a model directory: a Pair like the toy builder's (bf16 safetensors, the base's tokenizer,
    400 distinct held-out problems whose answers end with the end-of-turn token), deterministic, cached."""
    pair = pretrained.build_pretrained_pair(str(tiny_base), "add", steps=3, cache_dir=tmp_path)
    assert pair.base == tiny_base and pair.ft.parent == pair.root and pair.task == "add"
    assert pair.info["finetune_steps"] == 3 and pair.info["delta_rel_norm"] > 0
    with safe_open(str(pair.ft / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    assert (pair.ft / "tokenizer.json").read_bytes() == (tiny_base / "tokenizer.json").read_bytes()
    examples = lm.read_data(pair.data)
    assert len(examples) == pretrained.N_EVAL
    assert len({tuple(e["input_ids"]) for e in examples}) == len(examples)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_base)
    assert all(e["input_ids"][-1] == tok.eos_token_id for e in examples)
    assert pair.info["ft_metrics"] == pytest.approx(evaluation.evaluate(pair.ft, examples))
    sha = hashlib.sha256((pair.ft / "model.safetensors").read_bytes()).hexdigest()
    again = pretrained.build_pretrained_pair(str(tiny_base), "add", steps=3, cache_dir=tmp_path, rebuild=True)
    assert hashlib.sha256((again.ft / "model.safetensors").read_bytes()).hexdigest() == sha
    with pytest.raises(ValueError, match="unknown pretrained base"):
        pretrained.build_pretrained_pair(str(tmp_path / "missing"), "add")
