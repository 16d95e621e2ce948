"""PEFT LoRA export / import, checked by peft itself (PeftModel, merge_and_unload) and by torch math."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import deltapack as dp  # noqa: E402
from deltapack import checkpoint, cli, reference  # noqa: E402
from deltapack.export.peft import export_peft  # noqa: E402
from deltapack.export.import_peft import import_peft  # noqa: E402

pairs = pytest.importorskip("deltapack.research.pairs")
RANK = 8


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The tiny llama pair, compressed with every matrix at rank 8 and with row signs."""
    pair = pairs.build_pair("llama", "tiny")
    tmp = tmp_path_factory.mktemp("peft_llama")
    checkpoint.compress(pair.base, pair.ft, tmp / "lr.dpk", recipe=f"*=lowrank:rank={RANK},dtype=f32", min_size=1000)
    checkpoint.compress(pair.base, pair.ft, tmp / "sign.dpk", recipe="*=sign:scope=row", min_size=1000)
    return pair, tmp


def _model(model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _reference_state(base_dir, delta_path):
    """base (f32) + delta, computed with torch from the decoded delta (lowrank: u @ v in float64)."""
    f = dp.open(delta_path)
    rec = f.metadata["checkpoint"]["tensors"]
    sd = {k: v.float() for k, v in _model(base_dir).state_dict().items()}
    for name, spec in rec.items():
        if spec["op"] != "delta":
            continue
        enc = f[name]
        if enc.codec == "lowrank":
            dt = enc.params["dtype"]
            u = torch.from_numpy(reference.widen(enc.components["u"], dt)).double()
            v = torch.from_numpy(reference.widen(enc.components["v"], dt)).double()
            d = (u @ v).float()
        else:
            d = torch.from_numpy(dp.decode(enc))
        sd[name] = sd[name] + d
    return sd


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


PROMPT = [256] + list(b"hello>ol")


def test_peft_adapter_matches_rebuilt_model(llama, tmp_path):
    pair, tmp = llama
    rep = export_peft(pair.base, tmp / "lr.dpk", tmp_path / "ad")
    assert all(t["source"] == "lowrank" and t["rank"] == RANK for t in rep["tensors"])
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == RANK and cfg["lora_alpha"] == RANK
    assert "model.layers.0.self_attn.q_proj" in cfg["target_modules"]
    assert "model.norm" in cfg["modules_to_save"]   # the fine-tune changed the norms too

    ref = _model(pair.base)
    ref.load_state_dict(_reference_state(pair.base, tmp / "lr.dpk"))
    want = _logits(ref, PROMPT)

    pm = peft.PeftModel.from_pretrained(_model(pair.base), tmp_path / "ad").eval()
    got = _logits(pm, PROMPT)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-4 * scale

    merged = pm.merge_and_unload()
    ref_sd = ref.state_dict()
    for name, w in merged.state_dict().items():
        r = ref_sd[name]
        # f32 rounding of B @ A against the float64 product, relative to the weight's scale
        assert torch.allclose(w, r, rtol=0, atol=4e-7 * max(r.abs().max().item(), 1.0)), name


def test_svd_approximation_reports_error(llama, tmp_path):
    pair, tmp = llama
    rep = export_peft(pair.base, tmp / "sign.dpk", tmp_path / "ad", rank=4)
    svd = [t for t in rep["tensors"] if t["source"] == "svd"]
    assert svd and all(t["rank"] == 4 and 0.0 < t["rel_error"] < 1.0 for t in svd)
    # The error reported is that of the adapter's own product against the decoded delta.
    with safetensors_torch.safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as fh:
        a = fh.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight").double()
        b = fh.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight").double()
    d = torch.from_numpy(dp.decode(dp.open(tmp / "sign.dpk")["model.layers.1.mlp.down_proj.weight"])).double()
    err = ((b @ a - d).norm() / d.norm()).item()
    t = next(t for t in svd if t["name"] == "model.layers.1.mlp.down_proj.weight")
    assert abs(err - t["rel_error"]) < 1e-4
    # Truncated SVD is the best rank-4 approximation (Eckart-Young): compare with torch's own.
    s = torch.linalg.svdvals(d)
    assert abs(err - (s[4:].square().sum().sqrt() / s.square().sum().sqrt()).item()) < 1e-4


def _peft_adapter(base_dir, out, r=4, alpha=8, bias="none", modules_to_save=None, seed=0, use_rslora=False):
    """A real PEFT adapter with random (non-zero) factors, saved by peft itself."""
    model = _model(base_dir)
    targets = ["q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"]
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                          rank_pattern={"model.layers.1.mlp.down_proj": 2}, bias=bias,
                          modules_to_save=modules_to_save, use_rslora=use_rslora)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name or (bias != "none" and name.endswith(".bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in name else 0.0))
    pm.save_pretrained(out)
    return pm.eval()


def test_import_peft_then_apply_matches_peft(llama, tmp_path):
    pair, _ = llama
    pm = _peft_adapter(pair.base, tmp_path / "ad", modules_to_save=["model.norm"])
    rep = import_peft(pair.base, tmp_path / "ad", tmp_path / "imp.dpk")
    names = {t["name"] for t in rep["tensors"]}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.norm.weight" in names
    f = dp.open(tmp_path / "imp.dpk")
    enc = f["model.layers.1.mlp.down_proj.weight"]
    assert enc.codec == "lowrank" and enc.params["rank"] == 2
    # The delta file is a complete checkpoint delta: checkpoint.load rebuilds the merged fine-tune.
    sd = checkpoint.load(pair.base, tmp_path / "imp.dpk", dtype="f32")
    merged = pm.merge_and_unload().state_dict()
    for name, w in merged.items():
        assert torch.allclose(sd[name].float(), w, rtol=0, atol=1e-6 * max(w.abs().max().item(), 1.0)), name


@pytest.mark.parametrize("dtype,rslora", [("f32", False), ("bf16", False), ("f32", True)])
def test_round_trip_import_export_same_tensors(llama, tmp_path, dtype, rslora):
    pair, _ = llama
    pm = _peft_adapter(pair.base, tmp_path / "ad", r=4, alpha=16, seed=1, use_rslora=rslora)
    path = str(tmp_path / "ad" / "adapter_model.safetensors")
    if dtype == "bf16":   # a bf16 adapter (peft casts factors to the module dtype when loading)
        safetensors_torch.save_file({k: v.to(torch.bfloat16) for k, v in safetensors_torch.load_file(path).items()},
                                    path)
    import_peft(pair.base, tmp_path / "ad", tmp_path / "imp.dpk")
    assert dp.open(tmp_path / "imp.dpk")["model.layers.0.self_attn.q_proj.weight"].params["dtype"] == dtype
    export_peft(pair.base, tmp_path / "imp.dpk", tmp_path / "back")
    a = safetensors_torch.load_file(path)
    b = safetensors_torch.load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    # peft also saves the untouched base weight of an lm_head/embedding LoRA; that is the base, not the adapter.
    a = {k: v for k, v in a.items() if not k.endswith(".base_layer.weight")}
    assert set(b) == set(a)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if not rslora:   # scaling 16/4 and 16/2 are powers of two: factors come back bit for bit
            assert torch.equal(a[k], b[k]), k
        else:            # 16/sqrt(2) is not: B * s / s is within one f32 rounding of B
            assert torch.allclose(a[k], b[k], rtol=2e-7, atol=0), k
    if rslora:   # and the imported delta is scaled by alpha / sqrt(r), as peft merges it
        sd = checkpoint.load(pair.base, tmp_path / "imp.dpk", dtype="f32")
        for name, w in pm.merge_and_unload().state_dict().items():
            assert torch.allclose(sd[name].float(), w, rtol=0, atol=1e-6 * max(w.abs().max().item(), 1.0)), name
    ca = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert (cb["r"], cb["lora_alpha"]) == (ca["r"], ca["lora_alpha"])
    assert cb["rank_pattern"] == {"model.layers.1.mlp.down_proj": 2}


def test_qwen2_biases_and_tied_embedding(tmp_path):
    pair = pairs.build_pair("qwen2", "tiny")
    checkpoint.compress(pair.base, pair.ft, tmp_path / "lr.dpk", recipe=f"*=lowrank:rank={RANK},dtype=f32",
                        min_size=1000)
    rep = export_peft(pair.base, tmp_path / "lr.dpk", tmp_path / "ad")
    skipped = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert "tied" in skipped["model.embed_tokens.weight"]
    assert rep["bias"] == "lora_only"
    pm = peft.PeftModel.from_pretrained(_model(pair.base), tmp_path / "ad").eval()
    ref = _model(pair.base)
    sd = _reference_state(pair.base, tmp_path / "lr.dpk")
    # The tied embedding delta has no LoRA form: the reference keeps the base embedding.
    sd["model.embed_tokens.weight"] = ref.state_dict()["model.embed_tokens.weight"]
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    ref.load_state_dict(sd, strict=False)
    want, got = _logits(ref, PROMPT), _logits(pm, PROMPT)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_cli_export_and_import(llama, tmp_path, capsys):
    pair, tmp = llama
    assert cli.main(["export", "peft", str(pair.base), str(tmp / "lr.dpk"), "-o", str(tmp_path / "ad")]) == 0
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
    assert cli.main(["import", "peft", str(pair.base), str(tmp_path / "ad"), "-o", str(tmp_path / "x.dpk")]) == 0
    assert dp.open(tmp_path / "x.dpk")["model.layers.0.mlp.up_proj.weight"].codec == "lowrank"


def test_bad_adapter_errors(llama, tmp_path):
    pair, _ = llama
    (tmp_path / "ad").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(pair.base, tmp_path / "ad", tmp_path / "x.dpk")
    _peft_adapter(pair.base, tmp_path / "ad2")
    cfg = json.loads((tmp_path / "ad2" / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "ad2" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        import_peft(pair.base, tmp_path / "ad2", tmp_path / "x.dpk")
    # An adapter for another model: the LoRA product does not fit the base weight.
    cfg["use_dora"] = False
    (tmp_path / "ad2" / "adapter_config.json").write_text(json.dumps(cfg))
    sd = safetensors_torch.load_file(str(tmp_path / "ad2" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    sd[key] = torch.zeros(32, sd[key].shape[1])
    safetensors_torch.save_file(sd, str(tmp_path / "ad2" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="q_proj"):
        import_peft(pair.base, tmp_path / "ad2", tmp_path / "x.dpk")


def test_adapter_config_of_wrong_types_is_refused(llama, tmp_path):
    # Found by fuzz/fuzz_python.py peft: a config that is valid JSON of the wrong shape or types raised
    # AttributeError / TypeError instead of naming the file and the problem.
    pair, _ = llama
    _peft_adapter(pair.base, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    good = json.loads(path.read_text())
    cases = [("[1, 2]", "not a JSON object"),
             ({"lora_alpha": "x"}, "alpha of module .* is 'x', not a finite number"),
             ({"lora_alpha": None}, "not a finite number"),
             ({"alpha_pattern": 5}, "alpha_pattern is not a JSON object"),
             ({"alpha_pattern": {"(": 2}}, r"alpha_pattern key '\(' is not a valid pattern"),
             ({"lora_alpha": 1e308}, "does not fit in float32")]
    for change, msg in cases:
        path.write_text(change if isinstance(change, str) else json.dumps({**good, **change}))
        with pytest.raises(dp.FormatError, match="adapter_config.json: .*" + msg):
            import_peft(pair.base, tmp_path / "ad", tmp_path / "x.dpk")
        assert not (tmp_path / "x.dpk").exists()


def test_mixed_ranks_plain_delta_file(tmp_path):
    """Per-tensor ranks go to rank_pattern/alpha_pattern (scaling 1 everywhere); a plain delta file works."""
    pair = pairs.build_pair("llama", "tiny")
    rng = np.random.default_rng(1)
    model = _model(pair.base)
    sd = model.state_dict()
    encs = {}
    for name, rank in (("model.layers.0.self_attn.q_proj.weight", 4), ("model.layers.1.self_attn.k_proj.weight", 4),
                       ("model.layers.1.mlp.up_proj.weight", 2), ("lm_head.weight", 6)):
        rows, cols = sd[name].shape
        d = (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) * 0.02).astype(np.float32)
        encs[name] = dp.encode(d, "lowrank", rank=rank, dtype="f16")
        sd[name] = sd[name] + torch.from_numpy(dp.decode(encs[name]))
    dp.save(tmp_path / "plain.dpk", encs)
    model.load_state_dict(sd)
    rep = export_peft(pair.base, tmp_path / "plain.dpk", tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {"lm_head": 6, "model.layers.1.mlp.up_proj": 2}
    assert cfg["alpha_pattern"] == cfg["rank_pattern"] and rep["modules_to_save"] == []
    pm = peft.PeftModel.from_pretrained(_model(pair.base), tmp_path / "ad").eval()
    want, got = _logits(model, PROMPT), _logits(pm, PROMPT)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_randomized_svd_is_near_optimal():
    """Large matrices take the randomized range finder: its error must stay within 1% of Eckart-Young's."""
    from deltapack.export.finetune import svd_factors

    rng = np.random.default_rng(0)
    rows, cols, rank = 600, 3600, 32   # 2.16M elements: past the exact-SVD size
    d = (rng.standard_normal((rows, 48)) @ rng.standard_normal((48, cols)) * 1e-3
         + rng.standard_t(3, size=(rows, cols)) * 2e-4).astype(np.float32)
    u, v = svd_factors(d, rank)
    assert u.shape == (rows, rank) and v.shape == (rank, cols) and u.dtype == np.float32
    err = np.linalg.norm(d - u @ v) / np.linalg.norm(d)
    s2 = np.sort(np.linalg.eigvalsh(d.astype(np.float64) @ d.T.astype(np.float64)))[::-1]   # singular values^2
    optimal = np.sqrt(s2[rank:].sum() / s2.sum())
    assert optimal * (1 - 1e-5) <= err <= 1.01 * optimal
