"""Checkpoint compress / apply / load against real clients: transformers, safetensors, the Python reference."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import perturbed, tiny_llama_config

import deltapack as dp
from deltapack import checkpoint as ck
from deltapack import reference

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402


def _save(model, path, shard="60KB"):
    model.save_pretrained(path, max_shard_size=shard)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny bf16 Llama pairs: sharded base/ft, a resized vocabulary, tied <-> untied embeddings."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    _save(base, root / "base")
    _save(perturbed(base, 1), root / "ft")
    base = transformers.LlamaForCausalLM.from_pretrained(root / "ft")
    base.resize_token_embeddings(104, mean_resizing=False)
    _save(base, root / "ft_resized", shard="10MB")
    torch.manual_seed(1)
    tied = transformers.LlamaForCausalLM(tiny_llama_config(tie=True)).to(torch.bfloat16)
    _save(tied, root / "base_tied")
    untied = transformers.LlamaForCausalLM(tiny_llama_config(tie=False)).to(torch.bfloat16)
    untied.load_state_dict({**tied.state_dict(), "lm_head.weight": tied.model.embed_tokens.weight.clone()})
    _save(perturbed(untied, 2), root / "ft_untied")
    return root


@pytest.fixture(scope="module")
def pair():
    """A real trained tiny Llama pair (deltapack.research.pairs, cached), else None."""
    try:
        from deltapack.research.pairs import build_pair
    except ImportError:
        return None
    return build_pair("llama", "tiny")


def _logits(model_dir_or_model, ids=None):
    m = model_dir_or_model
    if not isinstance(m, torch.nn.Module):
        m = transformers.AutoModelForCausalLM.from_pretrained(m)
    m.eval()
    ids = torch.arange(2, 30).reshape(2, 14) if ids is None else ids
    with torch.no_grad():
        return m(ids).logits


def _fresh(model_dir):
    """A randomly initialised bf16 model of that directory's config (built as from_pretrained builds it)."""
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def _state(model_dir):
    """All tensors of a HF directory, read with safetensors (an independent reader)."""
    out = {}
    for f in os.listdir(model_dir):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, f), framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _reference_rebuild(base_dir, delta_path, alpha):
    """The fine-tune rebuilt by the executable spec: reference decoders + reference.apply, bf16 out."""
    base = _state(base_dir)
    rec = dp.open(delta_path).metadata["checkpoint"]
    comps = {}
    with safe_open(str(delta_path), framework="pt") as st:  # the delta file is a safetensors file
        for key in st.keys():
            t = st.get_tensor(key)
            name, _, comp = key.rpartition(":")
            arr = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
            comps.setdefault(name, {})[comp] = arr
    entries = dp.open(delta_path).manifest["tensors"]

    def decode(name):
        e = entries[name]
        return reference.DECODERS[e["codec"]](comps[name], e["shape"], **e["params"]).reshape(e["shape"])

    out = {}
    for name, spec in rec["tensors"].items():
        src = base.get(spec.get("source", name))
        if spec["op"] == "same":
            out[name] = src
            continue
        if spec["op"] == "new":
            got = reference.round_to(decode(name), "bf16")
        else:
            b = src.float().numpy()
            d = decode(name)
            k = d.shape[0]
            got = np.empty(spec["shape"], np.uint16)
            # apply's default rounding (auto): dithered where the codec is lossy
            lossy = entries[name]["codec"] != "dense"
            got[:k] = reference.apply(b[:k], d, alpha, "bf16", "dithered" if lossy else "nearest")
            if spec["op"] == "resized" and spec["shape"][0] > k:
                got[k:] = reference.round_to(decode(spec["new_rows"]), "bf16")
        out[name] = torch.from_numpy(got.view(np.int16)).view(torch.bfloat16)
    return out


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def test_writer_is_byte_identical_to_save(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 70)) * 1e-3).astype(np.float32)
    encs = {"a": dp.encode(x, "sign:scope=row"), "b": dp.encode(x, "sparse:p=0.9,values=int8"),
            "c": dp.encode(x, "lowrank:rank=4,dtype=bf16"), "d": dp.encode(x, "quant:bits=3"),
            "e": dp.encode(x[0], "dense"), "f": dp.encode(x, "levels:bits=3")}
    meta, base = {"k": "é✓", "n": [1, 2.5, None, True]}, {"m": "x"}
    dp.save(tmp_path / "ref.dpk", encs, metadata=meta, base=base)
    w = dp.DeltaWriter(tmp_path / "mine.dpk")
    for k, e in encs.items():
        w.add(k, e)
    w.close(metadata=meta, base=base)
    assert (tmp_path / "mine.dpk").read_bytes() == (tmp_path / "ref.dpk").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["mine.dpk", "ref.dpk"]  # no spill or temp files left


def test_dense_rebuild_is_bit_exact_and_loads(models, tmp_path):
    s = ck.compress(models / "base", models / "ft", tmp_path / "d.dpk", "dense", min_size=0)
    assert s["delta"] + s["same"] == len(_state(models / "ft")) and s["new"] == 0
    ck.apply_checkpoint(models / "base", tmp_path / "d.dpk", tmp_path / "out")
    ft = _state(models / "ft")
    got = _state(tmp_path / "out")
    assert got.keys() == ft.keys()
    for k in ft:
        assert torch.equal(_bits(got[k]), _bits(ft[k])), k
    # sharded like the base, index included, config and generation files kept
    base_files = sorted(f for f in os.listdir(models / "base") if f.endswith(".safetensors"))
    assert len(base_files) > 1
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")) == base_files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ft)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ft.values())
    assert (tmp_path / "out" / "generation_config.json").exists()
    assert torch.equal(_logits(tmp_path / "out"), _logits(models / "ft"))
    rows = ck.verify(models / "base", models / "ft", tmp_path / "d.dpk")
    assert all(r["exact"] and r["rel_error"] == 0 for r in rows)


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_lossy_rebuild_matches_reference(models, pair, tmp_path, alpha):
    base, ft = (pair.base, pair.ft) if pair else (models / "base", models / "ft")
    recipe = "*.mlp.*=lowrank:rank=8;*.k_proj.*=quant:bits=4;*.v_proj.*=sparse:p=0.5;*=sign:scope=row"
    ck.compress(base, ft, tmp_path / "d.dpk", recipe, min_size=0)
    codecs = {dp.open(tmp_path / "d.dpk")[k].codec for k in dp.open(tmp_path / "d.dpk").keys()}
    assert codecs == {"lowrank", "quant", "sparse", "sign", "dense"}
    ck.apply_checkpoint(base, tmp_path / "d.dpk", tmp_path / "out", alpha=alpha)
    want = _reference_rebuild(base, tmp_path / "d.dpk", alpha)
    got = _state(tmp_path / "out")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(_bits(got[k]), _bits(want[k])), k
    ref_model = _fresh(ft)
    ref_model.load_state_dict(want)
    assert torch.equal(_logits(tmp_path / "out"), _logits(ref_model))
    if alpha == 1.0 and pair:  # a trained delta: close to the fine-tune within the codecs' error
        lf, lb, lr = _logits(ft).float(), _logits(base).float(), _logits(ref_model).float()
        assert (lr - lf).norm() < 0.8 * (lb - lf).norm()
        assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(ft))  # tokenizer files kept
        if (ft / "tokenizer.json").exists():
            assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (ft / "tokenizer.json").read_bytes()


def test_resized_vocabulary(models, tmp_path):
    ck.compress(models / "base", models / "ft_resized", tmp_path / "d.dpk", "sign", min_size=0)
    info = ck.describe(tmp_path / "d.dpk")
    assert info["resized"] == {n: {"base_shape": [96, 64], "shape": [104, 64]}
                               for n in ("lm_head.weight", "model.embed_tokens.weight")}
    ck.apply_checkpoint(models / "base", tmp_path / "d.dpk", tmp_path / "out")
    got, ft, base = _state(tmp_path / "out"), _state(models / "ft_resized"), _state(models / "base")
    for n in ("lm_head.weight", "model.embed_tokens.weight"):
        assert got[n].shape == (104, 64)
        assert torch.equal(_bits(got[n][96:]), _bits(ft[n][96:]))  # new rows exact
        d_true = (ft[n][:96].float() - base[n].float()).flatten()
        d_got = (got[n][:96].float() - base[n].float()).flatten()
        assert torch.nn.functional.cosine_similarity(d_true, d_got, dim=0) > 0.6
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert m.config.vocab_size == 104 and _logits(m).shape[-1] == 104
    # dense: exact through the resize
    ck.compress(models / "base", models / "ft_resized", tmp_path / "e.dpk", "dense", min_size=0)
    ck.apply_checkpoint(models / "base", tmp_path / "e.dpk", tmp_path / "out2")
    got = _state(tmp_path / "out2")
    assert all(torch.equal(_bits(got[k]), _bits(ft[k])) for k in ft)


def test_tied_base_untied_finetune_and_back(models, tmp_path):
    # base ties lm_head to the embeddings (no lm_head stored): the fine-tune's lm_head is a delta vs them
    ck.compress(models / "base_tied", models / "ft_untied", tmp_path / "d.dpk", "dense", min_size=0)
    rec = dp.open(tmp_path / "d.dpk").metadata["checkpoint"]
    assert rec["tensors"]["lm_head.weight"] == {"dtype": "BF16", "shape": [96, 64], "source":
                                                "model.embed_tokens.weight", "op": "delta"}
    assert dp.open(tmp_path / "d.dpk")["lm_head.weight"].nbytes < 96 * 64 * 4 + 1  # a delta, not a copy
    ck.apply_checkpoint(models / "base_tied", tmp_path / "d.dpk", tmp_path / "out")
    assert torch.equal(_logits(tmp_path / "out"), _logits(models / "ft_untied"))
    # and back: untied base, tied fine-tune -> lm_head removed, the loader ties it again
    ck.compress(models / "ft_untied", models / "base_tied", tmp_path / "e.dpk", "dense", min_size=0)
    assert ck.describe(tmp_path / "e.dpk")["removed"] == ["lm_head.weight"]
    ck.apply_checkpoint(models / "ft_untied", tmp_path / "e.dpk", tmp_path / "out2")
    assert "lm_head.weight" not in _state(tmp_path / "out2")
    assert torch.equal(_logits(tmp_path / "out2"), _logits(models / "base_tied"))


def test_single_files_added_removed_and_unchanged_tensors(tmp_path):
    rng = np.random.default_rng(0)
    t = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32) * 0.02)  # noqa: E731
    base = {"a.weight": t(32, 48).bfloat16(), "b.weight": t(16, 48).half(), "gone": t(8), "same": t(4, 4),
            "ids": torch.arange(6)}
    ft = {"a.weight": base["a.weight"] + t(32, 48).bfloat16() * 0.01, "b.weight": base["b.weight"],
          "same": base["same"].clone(), "ids": torch.arange(6), "added.weight": t(3, 5).bfloat16()}
    ft["added.weight"][0, 0] = -0.0  # stored as is: a -0 survives
    safetensors_torch.save_file(base, str(tmp_path / "base.safetensors"), metadata={"format": "pt"})
    safetensors_torch.save_file(ft, str(tmp_path / "ft.safetensors"), metadata={"format": "pt"})
    s = ck.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "d.dpk", "dense",
                    min_size=0)
    assert (s["delta"], s["new"], s["same"], s["removed"]) == (1, 1, 3, 1)
    assert set(dp.open(tmp_path / "d.dpk").keys()) == {"a.weight", "added.weight"}
    ck.apply_checkpoint(tmp_path / "base.safetensors", tmp_path / "d.dpk", tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(ft)
        for k in ft:
            assert f.get_tensor(k).dtype == ft[k].dtype and torch.equal(_bits(f.get_tensor(k)), _bits(ft[k])), k
    sd = ck.load(tmp_path / "base.safetensors", tmp_path / "d.dpk", dtype="f32")
    assert sd["a.weight"].dtype == torch.float32 and sd["ids"].dtype == torch.int64
    assert torch.equal(sd["a.weight"], ft["a.weight"].float())


def test_wrong_base_is_refused_unless_forced(models, tmp_path):
    ck.compress(models / "base", models / "ft", tmp_path / "d.dpk", "sign", min_size=0)
    with pytest.raises(ck.BaseMismatchError, match="model.embed_tokens.weight.*different contents"):
        ck.apply_checkpoint(models / "ft", tmp_path / "d.dpk", tmp_path / "out")
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["d.dpk"]
    with pytest.raises(ck.BaseMismatchError, match="lm_head.weight"):  # tied base: lm_head missing
        ck.apply_checkpoint(models / "base_tied", tmp_path / "d.dpk", tmp_path / "out")
    ck.apply_checkpoint(models / "ft", tmp_path / "d.dpk", tmp_path / "out", force=True)
    assert (tmp_path / "out" / "config.json").exists()


def test_unrelated_finetune_is_refused_before_any_work(models, tmp_path):
    from deltapack.cli import main
    torch.manual_seed(5)  # the same architecture and sizes, independent weights
    transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp_path / "other")
    config = tiny_llama_config()
    config.hidden_size, config.intermediate_size = 32, 48
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "smaller")
    rng = np.random.default_rng(0)
    renamed = {f"x{i}.weight": torch.from_numpy(rng.standard_normal((8, 8)).astype(np.float32)) for i in range(3)}
    safetensors_torch.save_file({**renamed, "a.weight": torch.zeros(8, 8)}, str(tmp_path / "renamed.safetensors"))
    safetensors_torch.save_file({"a.weight": torch.zeros(8, 8)}, str(tmp_path / "a.safetensors"))
    cases = [(models / "base", tmp_path / "other", r"differ from the base's by as much as the weights.*‖ΔW‖/‖W‖ = 1\.[3-5]"),
             (models / "base", tmp_path / "smaller", "config.json hidden_size is 32, the base's is 64"),
             (tmp_path / "a.safetensors", tmp_path / "renamed.safetensors", "3 of its 4 tensors are new or reshaped")]
    for base, ft, msg in cases:
        with pytest.raises(ck.BaseMismatchError, match="does not look like a fine-tune of .*" + msg):
            ck.compress(base, ft, tmp_path / "d.dpk", "sign")
        assert not (tmp_path / "d.dpk").exists()
        with pytest.raises(ck.BaseMismatchError, match=msg):
            ck.compress(base, ft, tmp_path / "d.dpk", budget=4)
        assert main(["compress", str(base), str(ft), "-o", str(tmp_path / "d.dpk"), "-q"]) != 0
        assert not (tmp_path / "d.dpk").exists()
    assert main(["compress", str(models / "base"), str(tmp_path / "other"), "-o", str(tmp_path / "d.dpk"), "-q",
                 "--force"]) == 0
    ck.apply_checkpoint(models / "base", tmp_path / "d.dpk", tmp_path / "out")  # stored anyway, and it rebuilds
    ck.check_related(models / "base", models / "ft")  # a real (small) fine-tune passes, and the resized one
    ck.check_related(models / "ft", models / "ft_resized")


def test_load_and_load_into(models, pair, tmp_path):
    base, ft = (pair.base, pair.ft) if pair else (models / "base", models / "ft")
    ck.compress(base, ft, tmp_path / "d.dpk", "*.mlp.*=lowrank:rank=4;*=sign", min_size=0)
    ck.apply_checkpoint(base, tmp_path / "d.dpk", tmp_path / "out")
    want = _state(tmp_path / "out")
    sd = ck.load(base, tmp_path / "d.dpk")
    assert sd.keys() == want.keys() and all(torch.equal(_bits(sd[k]), _bits(want[k])) for k in want)
    # in place on a model holding the base weights: same storage, rebuilt values
    m = transformers.AutoModelForCausalLM.from_pretrained(base)
    ptr = m.model.layers[0].mlp.up_proj.weight.data_ptr()
    ck.load_into(m, tmp_path / "d.dpk")
    assert m.model.layers[0].mlp.up_proj.weight.data_ptr() == ptr
    assert all(torch.equal(_bits(m.state_dict()[k]), _bits(want[k])) for k in want)
    # base read straight into a freshly initialised model built from the fine-tune's config
    m2 = _fresh(ft)
    ck.load_into(m2, tmp_path / "d.dpk", base=base)
    assert torch.equal(_logits(m2), _logits(tmp_path / "out"))
    # a module holding another base is refused; a tied module cannot hold untied weights
    m3 = transformers.AutoModelForCausalLM.from_pretrained(ft)
    with pytest.raises(ck.BaseMismatchError):
        ck.load_into(m3, tmp_path / "d.dpk")
    ck.compress(models / "base_tied", models / "ft_untied", tmp_path / "t.dpk", "sign", min_size=0)
    m4 = transformers.AutoModelForCausalLM.from_pretrained(models / "base_tied")
    with pytest.raises(ValueError, match="ties"):
        ck.load_into(m4, tmp_path / "t.dpk")


def _shutil_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_give_clear_errors(models, tmp_path):
    bad = _shutil_copy(models / "base", tmp_path / "bad")
    shards = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    # index points at a missing shard
    (bad / shards[-1]).rename(bad / "moved")
    with pytest.raises(FileNotFoundError, match=f"{shards[-1]}, which does not exist"):
        ck.compress(bad, models / "ft", tmp_path / "d.dpk")
    # a shard that is not a readable file
    (bad / shards[-1]).mkdir()
    with pytest.raises(OSError, match=f"{shards[-1]}: cannot read shard"):
        ck.compress(bad, models / "ft", tmp_path / "d.dpk")
    (bad / shards[-1]).rmdir()
    # truncated shard
    data = (bad / "moved").read_bytes()
    (bad / shards[-1]).write_bytes(data[:len(data) // 2])
    with pytest.raises(dp.FormatError, match="truncated: tensor .* ends at byte"):
        ck.compress(bad, models / "ft", tmp_path / "d.dpk")
    (bad / shards[-1]).write_bytes(data)
    # a tensor listed twice in the index JSON, and a tensor stored in two shards
    text = (bad / "model.safetensors.index.json").read_text()
    name = next(iter(index["weight_map"]))
    (bad / "model.safetensors.index.json").write_text(text.replace('"weight_map": {', '"weight_map": {"%s": "%s", '
                                                                   % (name, shards[0]), 1))
    with pytest.raises(dp.FormatError, match=f'index.json: not valid JSON .*duplicate key "{name}"'):
        ck.compress(bad, models / "ft", tmp_path / "d.dpk")
    (bad / "model.safetensors.index.json").write_text(text)
    with safe_open(str(bad / shards[0]), framework="pt") as f:
        first = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(bad / shards[-1]), framework="pt") as f:
        last = {k: f.get_tensor(k) for k in f.keys()}
    dup = next(iter(first))
    safetensors_torch.save_file({**last, dup: first[dup]}, str(bad / shards[-1]), metadata={"format": "pt"})
    with pytest.raises(dp.FormatError, match=f"'{dup}' is stored twice"):
        ck.compress(bad, models / "ft", tmp_path / "d.dpk")
    # config.json that is JSON but not an object, or not UTF-8 (found by fuzz/fuzz_python.py checkpoint)
    cfg = _shutil_copy(models / "base", tmp_path / "cfg")
    for text, msg in ((b"8", "config.json: not a JSON object"), (b'{"a": "\xff"}', "config.json: not valid JSON")):
        (cfg / "config.json").write_bytes(text)
        with pytest.raises(dp.FormatError, match=msg):
            ck.Checkpoint(cfg)
    shutil.rmtree(cfg)
    assert not (tmp_path / "d.dpk").exists()
    assert sorted(os.listdir(tmp_path)) == ["bad"]


def _fails_with_file_size_limit(limit, call):
    """Run `call` (Python source using ck) in a child whose files cannot grow past `limit` bytes: RLIMIT_FSIZE
    makes write() fail with EFBIG as a full disk fails it (the writers are C++, out of reach of a Python patch).
    Returns the child's error message."""
    def limit_files():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = f"import deltapack.checkpoint as ck\ntry:\n    {call}\nexcept OSError as ex:\n    print(ex)\n"
    r = subprocess.run([sys.executable, "-c", code], preexec_fn=limit_files, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_disk_full_leaves_nothing(models, tmp_path):
    out = tmp_path / "d.dpk"
    msg = _fails_with_file_size_limit(20000, f"ck.compress({str(models / 'base')!r}, {str(models / 'ft')!r}, "
                                             f"{str(out)!r}, 'dense', min_size=0)")
    assert "disk full" in msg and str(out) in msg, msg
    assert os.listdir(tmp_path) == []
    ck.compress(models / "base", models / "ft", out, "sign", min_size=0)
    msg = _fails_with_file_size_limit(50000, f"ck.apply_checkpoint({str(models / 'base')!r}, {str(out)!r}, "
                                             f"{str(tmp_path / 'out')!r})")
    assert "disk full" in msg and str(tmp_path / "out") in msg, msg
    assert os.listdir(tmp_path) == ["d.dpk"]


def test_identical_models_store_nothing(models, tmp_path):
    s = ck.compress(models / "base", models / "base", tmp_path / "d.dpk", "sign")
    assert s["stored"] == 0 and s["same"] == len(_state(models / "base"))
    assert dp.open(tmp_path / "d.dpk").keys() == []
    ck.apply_checkpoint(models / "base", tmp_path / "d.dpk", tmp_path / "out", alpha=3.0)
    base, got = _state(models / "base"), _state(tmp_path / "out")
    assert got.keys() == base.keys() and all(torch.equal(_bits(got[k]), _bits(base[k])) for k in base)


APPLY_BIN = os.path.join(os.path.dirname(dp._core.__file__), "bin", "deltapack-apply")
MIXED = "*.mlp.*=lowrank:rank=8,bits=4;*self_attn.q_proj*=sparse:p=0.9;*embed*=quant:bits=4;*=sign"


def _files(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))} if d.is_dir() else {d.name: d.read_bytes()}


@pytest.mark.skipif(not os.path.exists(APPLY_BIN), reason="deltapack-apply is not built into this install")
@pytest.mark.parametrize("base,ft,recipe,opts", [
    ("base", "ft", MIXED, []),
    ("base", "ft", MIXED, ["--alpha", "0.5", "--dtype", "f32"]),
    ("base", "ft", MIXED, ["--rounding", "nearest"]),
    ("base", "ft", MIXED, ["--rounding", "dithered", "--dtype", "f16"]),
    ("base", "ft_resized", "*embed*=lowrank:rank=4;*=sign", []),  # new rows of a resized vocabulary
    ("base_tied", "ft_untied", "sign", []),                        # lm_head untied from the embeddings
    ("ft_untied", "base_tied", "dense", ["--dtype", "f16"]),       # lm_head dropped: tied again
    ("base.safetensors", "ft.safetensors", MIXED, []),  # one file in, one file out
])
def test_cpp_apply_writes_what_deltapack_apply_writes(models, tmp_path, base, ft, recipe, opts):
    """deltapack-apply (C++, no Python) rebuilds every delta `deltapack compress` writes into the same bytes
    as `deltapack apply`: shards, index, config and tokenizer files; transformers loads the result."""
    out = "out.safetensors" if base.endswith(".safetensors") else "out"
    if out != "out":  # the sharded pair, each as one file
        for name in (base, ft):
            safetensors_torch.save_file(_state(models / name.removesuffix(".safetensors")), str(tmp_path / name))
        models = tmp_path
    ck.compress(models / base, models / ft, tmp_path / "d.dpk", recipe, min_size=0)
    alpha = float(opts[opts.index("--alpha") + 1]) if "--alpha" in opts else 1.0
    dtype = opts[opts.index("--dtype") + 1] if "--dtype" in opts else None
    rounding = opts[opts.index("--rounding") + 1] if "--rounding" in opts else "auto"
    (tmp_path / "py").mkdir()
    (tmp_path / "cpp").mkdir()
    ck.apply_checkpoint(models / base, tmp_path / "d.dpk", tmp_path / "py" / out, alpha=alpha, dtype=dtype,
                        rounding=rounding)
    r = subprocess.run([APPLY_BIN, str(models / base), str(tmp_path / "d.dpk"), str(tmp_path / "cpp" / out), *opts],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got, want = _files(tmp_path / "cpp" / out), _files(tmp_path / "py" / out)
    assert got.keys() == want.keys()
    assert [f for f in got if got[f] != want[f]] == []
    if out == "out":
        ref = _state(models / ft)
        state = _state(tmp_path / "cpp" / out)
        assert state.keys() <= ref.keys() and all(state[k].shape == ref[k].shape for k in state)
        if recipe == "dense":  # exact: transformers gets the fine-tune's logits (in f16 here)
            assert torch.allclose(_logits(tmp_path / "cpp" / out).float(), _logits(models / ft).float(), atol=2e-2)
        else:
            assert torch.isfinite(_logits(tmp_path / "cpp" / out)).all()


def test_cpp_apply_refuses_another_base(models, tmp_path):
    ck.compress(models / "base", models / "ft", tmp_path / "d.dpk", "sign", min_size=0)
    if not os.path.exists(APPLY_BIN):
        pytest.skip("deltapack-apply is not built into this install")
    r = subprocess.run([APPLY_BIN, str(models / "base_tied"), str(tmp_path / "d.dpk"), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "this is not the delta's base" in r.stderr and "--force" in r.stderr
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["d.dpk"]


def _block_pair(tmp_path):
    """A one-file pair whose matrices span several of the core's read/rebuild blocks (4 MiB of output,
    2^18 elements when compressing): a bf16 delta over 2.6 M elements, an f32 one, an unchanged bf16 matrix."""
    rng = np.random.default_rng(3)
    t = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32) * 0.02)  # noqa: E731
    base = {"a.weight": t(2600, 1024).bfloat16(), "b.weight": t(1500, 1000), "u.weight": t(2300, 1024).bfloat16(),
            "norm.weight": t(1024).bfloat16()}
    ft = {"a.weight": (base["a.weight"].float() + t(2600, 1024) * 0.05).bfloat16(),
          "b.weight": base["b.weight"] + t(1500, 1000) * 0.05, "u.weight": base["u.weight"].clone(),
          "norm.weight": (base["norm.weight"].float() + 0.01).bfloat16()}
    safetensors_torch.save_file(base, str(tmp_path / "base.safetensors"), metadata={"format": "pt"})
    safetensors_torch.save_file(ft, str(tmp_path / "ft.safetensors"), metadata={"format": "pt"})
    return base, ft


@pytest.mark.parametrize("dtype", [None, "f32", "f16"])
def test_rebuild_in_blocks_matches_whole_tensors(tmp_path, dtype):
    base, ft = _block_pair(tmp_path)
    s = ck.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "d.dpk",
                    "a.weight=sign:scope=row;*=quant:bits=4", threads=2)
    assert (s["delta"], s["same"]) == (3, 1)
    ck.apply_checkpoint(tmp_path / "base.safetensors", tmp_path / "d.dpk", tmp_path / "out.safetensors", dtype=dtype,
                        threads=2)
    # Whole tensors, one at a time, by the other path of the core (CheckpointDelta.rebuild) ...
    c = dp._core.CheckpointDelta(str(tmp_path / "base.safetensors"), str(tmp_path / "d.dpk"))
    # ... and by the executable spec: reference decoders, reference.apply.
    entries = dp.open(tmp_path / "d.dpk")
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(ft)
        for name in ft:
            got = f.get_tensor(name)
            want_dtype = {None: ft[name].dtype, "f32": torch.float32, "f16": torch.float16}[dtype]
            assert got.dtype == want_dtype, name
            whole = torch.empty_like(got)
            c.rebuild(name, _bits(whole).numpy(), dtype or {torch.bfloat16: "bf16", torch.float32: "f32"}[ft[name].dtype])
            assert torch.equal(_bits(got), _bits(whole)), name
            if name in entries.keys():
                b = base[name].float().numpy()
                e = entries[name]
                d = reference.DECODERS[e.codec](e.components, e.shape, **e.params).reshape(e.shape)
                out_name = dtype or {torch.bfloat16: "bf16", torch.float32: "f32"}[ft[name].dtype]
                ref = reference.apply(b, d, 1.0, out_name, "dithered")  # lossy: auto dithers
                assert np.array_equal(_bits(got).numpy().view(ref.dtype), ref), name
            else:
                assert torch.equal(got, ft[name].to(want_dtype)), name


def test_base_changed_in_a_late_block_is_refused(tmp_path):
    base, ft = _block_pair(tmp_path)
    ck.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "d.dpk", "sign")
    for name in ("a.weight", "u.weight"):  # a delta and an unchanged tensor, each read in several blocks
        other = dict(base)
        other[name] = base[name].clone()
        other[name][-1, -1] += 1  # the last block only
        safetensors_torch.save_file(other, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ck.BaseMismatchError, match=f"'{name}' has different contents"):
            ck.apply_checkpoint(tmp_path / "other.safetensors", tmp_path / "d.dpk", tmp_path / "out.safetensors")
        assert not (tmp_path / "out.safetensors").exists()


def test_read_delta_matches_numpy(tmp_path):
    """The one-pass read of compress: ft - base in f32, the base's CRC-32C (checked against the crc32c
    package), identical only for the same bytes; over a prefix (a vocabulary the fine-tune shrank)."""
    import crc32c
    rng = np.random.default_rng(4)
    base = {"w": torch.from_numpy(rng.standard_normal((700, 1000)).astype(np.float32)).bfloat16(),
            "same": torch.from_numpy(rng.standard_normal((600, 1000)).astype(np.float32))}
    ft = {"w": torch.from_numpy(rng.standard_normal((700, 1000)).astype(np.float32)).half(),
          "same": base["same"].clone()}
    safetensors_torch.save_file(base, str(tmp_path / "b.safetensors"))
    safetensors_torch.save_file(ft, str(tmp_path / "f.safetensors"))
    mb, mf = (dp._core.ModelFiles.open(str(tmp_path / x)) for x in ("b.safetensors", "f.safetensors"))
    for name, n in (("w", 700 * 1000), ("w", 555 * 1000), ("same", 600 * 1000), ("same", 0)):
        out = np.full(n, np.nan, np.float32)
        crc, identical = dp._core.read_delta(mf, name, mb, name, out, 2)
        want = ft[name].float().reshape(-1)[:n].numpy() - base[name].float().reshape(-1)[:n].numpy()
        assert np.array_equal(out, want), name
        assert crc == crc32c.crc32c(_bits(base[name]).numpy().tobytes()), name
        assert identical == (name == "same"), name
    with pytest.raises(ValueError, match="hold"):
        dp._core.read_delta(mf, "w", mb, "w", np.empty(701 * 1000, np.float32), 2)
    with pytest.raises(ValueError, match="not whole rows of 1000"):
        dp._core.read_delta(mf, "w", mb, "w", np.empty(555 * 1000 + 17, np.float32), 2)


@pytest.mark.parametrize("recipe", ["sign", "sign:scope=row", "sign:scope=group,group=64", "levels:bits=2",
                                    "quant:bits=3", "sparse:p=0.9,mode=magnitude", "sparse:p=0.5,mode=random,seed=7",
                                    "dense:dtype=f16"])
def test_encode_delta_is_encode_of_the_delta(tmp_path, recipe):
    """compress encodes recipe codecs from rows formed as the codec reads them (never the whole f32 delta):
    the same components as encoding the materialised delta, over several blocks and threads, for a prefix of
    rows too (a resized vocabulary), whatever the dtypes."""
    rng = np.random.default_rng(5)
    r = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32) * 0.02)  # noqa: E731
    base = {"w": r(1300, 520).bfloat16(), "h": r(700, 96).half(), "f": r(600, 300)}
    ft = {"w": (base["w"].float() + r(1300, 520) * 0.1).bfloat16(), "h": base["h"].float() + r(700, 96) * 0.1,
          "f": (base["f"] + r(600, 300) * 0.1).bfloat16()}
    safetensors_torch.save_file(base, str(tmp_path / "b.safetensors"))
    safetensors_torch.save_file(ft, str(tmp_path / "f.safetensors"))
    mb, mf = (dp._core.ModelFiles.open(str(tmp_path / x)) for x in ("b.safetensors", "f.safetensors"))
    kind, params = dp.recipes.parse(recipe)
    for name, rows in (("w", 1300), ("w", 1000), ("h", 700), ("f", 600)):
        shape = [rows, ft[name].shape[1]]
        delta = np.empty(rows * shape[1], np.float32)
        crc, identical = dp._core.read_delta(mf, name, mb, name, delta, 2)
        want_params, want = dp._core.encode(kind, json.dumps(params), delta.reshape(shape), 2)
        got_params, got, got_crc, got_identical = dp._core.encode_delta(kind, json.dumps(params), mf, name, mb, name,
                                                                        shape, 2)
        assert (got_params, got_crc, got_identical) == (want_params, crc, identical)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), (name, rows)


def test_sha256_matches_hashlib():
    """The C++ SHA-256 that checks kept files taken from the base, against hashlib at every padding boundary."""
    import hashlib

    rng = np.random.default_rng(7)
    for n in list(range(0, 130)) + [1000, 65536, 100_003]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert dp._core.sha256_hex(data) == hashlib.sha256(data).hexdigest(), n


def test_kept_files_bytes_are_bounded_in_all():
    """Kept files' ranges may overlap in a crafted file: what apply would write is bounded (64 MiB in all)."""
    from deltapack import _core
    mib = 1 << 20
    files = {f"f{i}.txt": {"bytes": [0, 32 * mib], "sha256": "ab" * 32} for i in range(3)}
    man = json.dumps({"metadata": {"checkpoint": {"version": 1, "tensors": {}, "files": files}}})
    with pytest.raises(dp.FormatError, match=r'files\["f2.txt"\].bytes brings the kept files past 64 MiB in all'):
        _core.check_manifest_fields(man, "x.dpk")
    files["f0.txt"]["bytes"] = [0, 32 * mib + 1]
    with pytest.raises(dp.FormatError, match=r'files\["f0.txt"\].bytes spans 33554433 bytes, over the limit'):
        _core.check_manifest_fields(json.dumps({"metadata": {"checkpoint": {"version": 1, "tensors": {},
                                                                            "files": files}}}), "x.dpk")


def test_kept_files_equal_to_the_base_are_taken_from_it(models, tmp_path):
    """A kept file the fine-tune shares with its base is named by its SHA-256, not stored; apply takes it from
    BASE, byte for byte, and refuses a BASE whose file changed (before writing anything)."""
    import hashlib

    base, ft = tmp_path / "base", tmp_path / "ft"
    shutil.copytree(models / "base", base)
    shutil.copytree(models / "ft", ft)
    tokenizer = json.dumps({"model": {"vocab": {f"tok{i}": i for i in range(20_000)}}}).encode()
    for d in (base, ft):
        (d / "tokenizer.json").write_bytes(tokenizer)
    (ft / "notes.txt").write_text("only in the fine-tune\n")
    (base / "generation_config.json").write_text('{"do_sample": false}\n')  # differs from ft's
    ck.compress(base, ft, tmp_path / "d.dpk", "sign", min_size=0)
    files = ck.checkpoint_record(tmp_path / "d.dpk")["files"]
    for name in ("tokenizer.json", "config.json"):
        assert files[name] == {"sha256": hashlib.sha256((ft / name).read_bytes()).hexdigest()}, name
    # Files of its own are stored as bytes after the tensors (the safetensors array "__files__"), named by their
    # place there and SHA-256: read back here with the safetensors library, not deltapack.
    from safetensors.numpy import load_file
    stored = load_file(tmp_path / "d.dpk")["__files__"].tobytes()
    for name in ("notes.txt", "generation_config.json"):
        data = (ft / name).read_bytes()
        begin, end = files[name]["bytes"]
        assert stored[begin:end] == data and files[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
    assert os.path.getsize(tmp_path / "d.dpk") < len(tokenizer) // 4  # the tokenizer is not in the file

    ck.apply_checkpoint(base, tmp_path / "d.dpk", tmp_path / "out")
    for name in os.listdir(ft):
        if not name.endswith((".safetensors", ".index.json")):
            assert (tmp_path / "out" / name).read_bytes() == (ft / name).read_bytes(), name

    # The kept files' array is one 1-d U8 array: any other dtype or shape is refused when the file is opened.
    from test_files import read_raw, write_raw
    header, data = read_raw(tmp_path / "d.dpk")
    n = header["__files__"]["shape"][0]
    header["__files__"].update(dtype="I16", shape=[n // 2]) if n % 2 == 0 else header["__files__"].update(shape=[1, n])
    write_raw(tmp_path / "bad.dpk", header, data)
    with pytest.raises(dp.FormatError, match="stored array '__files__' .* must be a 1-d U8 array"):
        dp.open(tmp_path / "bad.dpk")

    # A stored file whose bytes changed is refused at apply, naming it; nothing is written.
    damaged = tmp_path / "damaged.dpk"
    data = bytearray((tmp_path / "d.dpk").read_bytes())
    data[-1] ^= 0x20  # the last stored file's last byte
    damaged.write_bytes(bytes(data))
    last = max((f for f in files.values() if "bytes" in f), key=lambda f: f["bytes"][1])
    name = next(n for n, f in files.items() if f is last)
    with pytest.raises(dp.FormatError, match=f"kept file '{name}': its stored bytes do not match their SHA-256"):
        ck.apply_checkpoint(base, damaged, tmp_path / "out3")
    assert not (tmp_path / "out3").exists()

    (base / "tokenizer.json").write_bytes(tokenizer + b" ")
    with pytest.raises(dp.FormatError, match=r"kept file 'tokenizer.json' is the base's own \(sha256 [0-9a-f]{64}\), "
                                             r"but .*base/tokenizer.json differs from it"):
        ck.apply_checkpoint(base, tmp_path / "d.dpk", tmp_path / "out2")
    (base / "tokenizer.json").unlink()
    with pytest.raises(dp.FormatError, match="base/tokenizer.json is missing"):
        ck.apply_checkpoint(base, tmp_path / "d.dpk", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
