"""The bank (issue 12): one base in memory, fine-tunes switched in place. Every state is compared with
deltapack.load of the same delta (the rebuild deltapack apply writes) or with the base as stored."""
import numpy as np
import pytest
from conftest import perturbed, tiny_llama_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import deltapack as dp  # noqa: E402
from deltapack import checkpoint as ck  # noqa: E402


@pytest.fixture(scope="module")
def bank_models(tmp_path_factory):
    """A tiny bf16 Llama base; fine-tunes "a" (every tensor), "b" (the MLPs only) and a resized one."""
    root = tmp_path_factory.mktemp("bank")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    base.save_pretrained(root / "base", max_shard_size="60KB")
    perturbed(transformers.LlamaForCausalLM.from_pretrained(root / "base"), 1).save_pretrained(root / "ft_a")
    perturbed(transformers.LlamaForCausalLM.from_pretrained(root / "base"), 2, only="mlp").save_pretrained(root / "ft_b")
    grown = transformers.LlamaForCausalLM.from_pretrained(root / "ft_a")
    grown.resize_token_embeddings(104, mean_resizing=False)
    grown.save_pretrained(root / "ft_grown")
    ck.compress(root / "base", root / "ft_a", root / "a.dpk", "*.mlp.*=lowrank:rank=8;*=sign", min_size=0)
    ck.compress(root / "base", root / "ft_b", root / "b.dpk", "sign", min_size=0)
    ck.compress(root / "base", root / "ft_grown", root / "grown.dpk", "sign", min_size=0)
    return root


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _same(sd, ref):
    assert sd.keys() == ref.keys()
    bad = [k for k in ref if not torch.equal(_bits(sd[k]), _bits(ref[k]))]
    assert bad == [], bad


def test_switching_gives_each_fine_tune_and_the_base_bit_for_bit(bank_models):
    root = bank_models
    bank = dp.Bank(root / "base")
    base = ck.load(root / "base", root / "a.dpk", alpha=0.0)  # alpha 0: the base, through the same path
    ref_base = {k: v.clone() for k, v in bank.state_dict().items()}
    _same(ref_base, {k: v for k, v in base.items()})
    bank.add("a", root / "a.dpk")
    bank.add("b", root / "b.dpk")
    assert bank.fine_tunes == ["a", "b"]
    for which in ["a", "b", None, "b", "a", None]:
        sd = bank.activate(which)
        _same(sd, ck.load(root / "base", root / f"{which}.dpk") if which else ref_base)
    sd = bank.activate("a", alpha=0.5)
    _same(sd, ck.load(root / "base", root / "a.dpk", alpha=0.5))


def test_only_touched_tensors_are_rewritten(bank_models):
    root = bank_models
    bank = dp.Bank(root / "base")
    bank.add("b", root / "b.dpk")
    bank.add("a", root / "a.dpk")
    record_b = dp.open(root / "b.dpk").metadata["checkpoint"]["tensors"]
    changed_b = sorted(n for n, s in record_b.items() if s["op"] == "delta")
    assert changed_b and all(".mlp." in n for n in changed_b)
    bank.activate("b")
    assert bank.last_rewritten == changed_b
    bank.activate(None)  # back: the same tensors, from the base
    assert bank.last_rewritten == changed_b
    bank.activate(None)
    assert bank.last_rewritten == []


def test_task_arithmetic_is_the_deltas_applied_in_turn(bank_models):
    root = bank_models
    bank = dp.Bank(root / "base")
    bank.add("a", root / "a.dpk")
    bank.add("b", root / "b.dpk")
    sd = bank.activate({"a": 1.0, "b": 0.5})
    fa, fb = dp.open(root / "a.dpk"), dp.open(root / "b.dpk")
    for name, t in ck.load(root / "base", root / "a.dpk", alpha=0.0).items():
        want = t.clone()
        if name in fa:
            want = dp.apply(want, fa[name])
        if name in fb:
            want = dp.apply(want, fb[name], alpha=0.5)
        assert torch.equal(_bits(sd[name]), _bits(want)), name


def test_bind_makes_a_model_follow_the_bank(bank_models):
    root = bank_models
    bank = dp.Bank(root / "base")
    bank.add("a", root / "a.dpk")
    model = transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).eval()
    bank.bind(model)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    ref_a = transformers.LlamaForCausalLM.from_pretrained(root / "base").to(torch.bfloat16).eval()
    ck.load_into(ref_a, root / "a.dpk")
    with torch.no_grad():
        bank.activate("a")
        got_a = model(ids).logits
        bank.activate(None)
        got_base = model(ids).logits
        want_base = transformers.LlamaForCausalLM.from_pretrained(root / "base").to(torch.bfloat16).eval()(ids).logits
        assert torch.equal(got_a, ref_a(ids).logits)
        assert torch.equal(got_base, want_base)


def test_refusals(bank_models):
    root = bank_models
    bank = dp.Bank(root / "base")
    with pytest.raises(ValueError, match="tensor '(lm_head|model.embed_tokens).weight' is resized"):
        bank.add("grown", root / "grown.dpk")
    with pytest.raises(ck.BaseMismatchError, match="this is not the delta's base"):
        dp.Bank(root / "ft_b").add("a", root / "a.dpk")
    bank.add("a", root / "a.dpk")
    with pytest.raises(ValueError, match="already added"):
        bank.add("a", root / "a.dpk")
    with pytest.raises(ValueError, match="no fine-tune named 'nope'"):
        bank.activate("nope")
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab=104)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        bank.bind(model)
    assert np.array_equal(bank.numpy("model.norm.weight"), bank.state_dict()["model.norm.weight"].view(torch.int16).numpy().view(np.uint16))
