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


def _snapshot(bank, names):
    return {n: _bits(bank.state_dict()[n]).clone() for n in names}


def _bank_and_states(root):
    """A bank with fine-tunes a and b, its tensor names, and the bits of every tensor in each state."""
    bank = dp.Bank(root / "base")
    bank.add("a", root / "a.dpk")
    bank.add("b", root / "b.dpk")
    names = list(bank.state_dict())
    want = {}
    for w in [None, "a", "b"]:
        bank.activate(w)
        want[w] = _snapshot(bank, names)
    return bank, names, want


def test_cache_keeps_recent_mixes_within_its_budget(bank_models):
    root = bank_models
    plain, names, want = _bank_and_states(root)
    size = {w: sum(plain.state_dict()[n].nbytes for n in names if not torch.equal(want[w][n], want[None][n]))
            for w in "ab"}
    bank = dp.Bank(root / "base", cache_bytes=10 << 20)
    bank.add("a", root / "a.dpk")
    bank.add("b", root / "b.dpk")
    assert bank.cache_bytes == 0
    for w in ["a", "b", "a", None, "b", "a"]:  # the later "a" and "b" are copied from the cache
        bank.activate(w)
        now = _snapshot(bank, names)
        assert all(torch.equal(now[n], want[w][n]) for n in names), w
    assert bank.cache_bytes >= size["a"] + size["b"]  # both mixes held (every tensor they touch)
    bank.set_cache_budget(bank.cache_bytes - 1)  # no room for both: the least recently used ("b") goes
    held = bank.cache_bytes
    assert size["a"] <= held < size["a"] + size["b"]
    bank.activate("b")
    assert all(torch.equal(_snapshot(bank, names)[n], want["b"][n]) for n in names)
    bank.set_cache_budget(0)
    assert bank.cache_bytes == 0


def test_a_failed_switch_keeps_the_last_good_state(tmp_path):
    """The switch from "a" (the MLPs only) to "big" at alpha 1000 rewrites every tensor up to
    model.norm.weight (sorted last), whose delta of ~100 then overflows float16: the bank must put back the
    tensors it already wrote, those only "big" touches included."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.float16)
    base.save_pretrained(tmp_path / "base")
    only_mlp = perturbed(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), 1, only="mlp")
    only_mlp.save_pretrained(tmp_path / "ft")  # "a" leaves the attention as it is; "big" changes it too
    big = perturbed(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), 2)
    with torch.no_grad():
        big.model.norm.weight += 100
    big.save_pretrained(tmp_path / "big")
    ck.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "a.dpk", "sign", min_size=0)
    ck.compress(tmp_path / "base", tmp_path / "big", tmp_path / "big.dpk", "sign", min_size=0)
    bank = dp.Bank(tmp_path / "base")
    bank.add("a", tmp_path / "a.dpk")
    bank.add("big", tmp_path / "big.dpk")
    names = list(bank.state_dict())
    assert names[-1] == "model.norm.weight"
    bank.activate("a")
    before = _snapshot(bank, names)
    with pytest.raises(ValueError, match="tensor 'model.norm.weight'.*overflows float16"):
        bank.activate("big", alpha=1000.0)
    assert bank.active == {"a": 1.0}
    after = _snapshot(bank, names)
    assert all(torch.equal(before[n], after[n]) for n in names)
    bank.activate("big", alpha=1.0)  # and the bank still switches
    _same(bank.state_dict(), ck.load(tmp_path / "base", tmp_path / "big.dpk"))


def test_the_bank_holds_its_deltas_so_changed_files_do_not_matter(bank_models, tmp_path):
    root = bank_models
    copy = tmp_path / "a.dpk"
    copy.write_bytes((root / "a.dpk").read_bytes())
    bank = dp.Bank(root / "base")
    bank.add("a", copy)
    copy.write_bytes(b"\0" * 64)  # overwritten (a mapping would now read zeros, or fault on a shorter file)
    _same(bank.activate("a"), ck.load(root / "base", root / "a.dpk"))
    copy.unlink()
    _same(bank.activate("a", alpha=0.5), ck.load(root / "base", root / "a.dpk", alpha=0.5))


def test_remove_and_rebuild_into_new_memory(bank_models):
    root = bank_models
    bank = dp.Bank(root / "base")
    bank.add("a", root / "a.dpk")
    bank.add("b", root / "b.dpk")
    want = ck.load(root / "base", root / "b.dpk")
    name = "model.layers.0.mlp.down_proj.weight"
    got = bank.rebuild("b", name)
    assert torch.equal(_bits(got), _bits(want[name]))
    assert got.data_ptr() != bank.state_dict()[name].data_ptr()
    assert torch.equal(_bits(bank.state_dict()[name]), _bits(ck.load(root / "base", root / "a.dpk", alpha=0.0)[name]))
    bank.activate("a")
    with pytest.raises(ValueError, match="'a' is active"):
        bank.remove("a")
    bank.remove("b")
    assert bank.fine_tunes == ["a"]
    with pytest.raises(ValueError, match="no fine-tune named 'b'"):
        bank.activate("b")
    bank.add("b", root / "b.dpk")  # again, under the same name
    _same(bank.activate("b"), want)


def test_threads_hammering_activate_and_reads_see_whole_states(bank_models):
    """One thread switches between a, b and the base; readers, inside bank.reading(), must always find the
    buffers equal to one whole state, the one bank.active names."""
    import threading

    bank, names, want = _bank_and_states(bank_models)
    errors, stop = [], threading.Event()

    def switch():
        try:
            for i in range(150):
                bank.activate([None, "a", "b"][i % 3])
        except Exception as ex:  # noqa: BLE001
            errors.append(ex)
        finally:
            stop.set()

    def read():
        try:
            while not stop.is_set():
                with bank.reading():
                    active = bank.active
                    w = next(iter(active)) if active else None
                    now = _snapshot(bank, names)
                bad = [n for n in names if not torch.equal(now[n], want[w][n])]
                if bad:
                    errors.append(f"{w}: {bad[:3]}")
                    return
        except Exception as ex:  # noqa: BLE001
            errors.append(ex)

    threads = [threading.Thread(target=switch)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with bank.reading(), pytest.raises(RuntimeError, match="wait for itself"):
        bank.activate("a")
