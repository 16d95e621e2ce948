"""Several fine-tunes from one base in llama.cpp (issue 12): two GGUF LoRA adapters written by
`deltapack export gguf-lora` are loaded into ONE llama.cpp context over one base GGUF and switched per
request through llama-cpp-python's low-level API. Each state must give the logits of the torch model
rebuilt for that fine-tune (as tests/test_export_gguf.py checks for a single adapter), and the base
logits with no adapter."""
import ctypes

import numpy as np
import pytest
from conftest import perturbed

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
if not hasattr(llama_cpp, "llama_set_adapters_lora"):
    pytest.skip("llama-cpp-python without llama_set_adapters_lora (the one-call adapter API)", allow_module_level=True)

from deltapack import checkpoint  # noqa: E402
from deltapack.export.gguf import export_gguf_lora  # noqa: E402
# `exported` (a fixture: a tiny pair per architecture, its rank-8 delta, base.gguf and adapter.gguf) and the
# helpers that build the reference models and read llama.cpp's logits.
from test_export_gguf import (RANK, _close, _llama, _llama_logits, _torch_logits, _torch_model,  # noqa: E402, F401
                              exported)

TOL = 1e-3   # max |Δlogit| / max |logit|, as the single-adapter tests


def _set_adapters(llm, adapters):
    """Make `adapters` [(adapter, scale), ...] the context's whole adapter set; [] = the base alone.

    llama.cpp replaces the set in one call (llama_set_adapters_lora); the per-adapter set / rm / clear
    functions of older releases are gone (llama-cpp-python keeps llama_set_adapter_lora as a deprecated
    wrapper that also replaces the whole set with that one adapter)."""
    n = len(adapters)
    handles = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*(a for a, _ in adapters))
    scales = (ctypes.c_float * n)(*(s for _, s in adapters))
    assert llama_cpp.llama_set_adapters_lora(llm.ctx, handles, n, scales) == 0
    llm.reset()   # the KV cache holds keys and values computed under the previous adapters


def _blend(base_dir, terms):
    """The torch model base + sum(scale * (model - base)) over terms [(model, scale)]: the weights llama.cpp
    computes with several adapters at those scales."""
    out = _torch_model(base_dir)
    base = out.state_dict()
    sd = {k: v.clone() for k, v in base.items()}
    for model, scale in terms:
        for k, v in model.state_dict().items():
            sd[k] += scale * (v - base[k])
    out.load_state_dict(sd)
    return out


@pytest.fixture(scope="module")
def second_finetune(exported, tmp_path_factory):
    """Fine-tune B: another fine-tune of the same base (N(0, 0.01) added to every parameter, saved bf16),
    stored as a rank-8 lowrank delta and exported as a second adapter."""
    pair, _, tmp, _ = exported
    root = tmp_path_factory.mktemp("ft_b")
    model = transformers.AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.bfloat16)
    perturbed(model, seed=7, scale=1e-2).save_pretrained(root / "ft_b")
    delta = root / "b.dpk"
    checkpoint.compress(pair.base, root / "ft_b", delta, recipe=f"*=lowrank:rank={RANK},dtype=f32", min_size=1000)
    export_gguf_lora(pair.base, delta, root / "b.gguf", quiet=True)
    return delta, root / "b.gguf"


def test_two_adapters_switched_per_request_in_one_context(exported, second_finetune):
    pair, delta_a, tmp, _ = exported
    delta_b, gguf_b = second_finetune
    tied = bool(getattr(transformers.AutoConfig.from_pretrained(pair.base), "tie_word_embeddings", False))
    ref_base = _torch_model(pair.base)
    ref_a = _torch_model(pair.base, delta_a, matrices_only=True, tied=tied)
    ref_b = _torch_model(pair.base, delta_b, matrices_only=True, tied=tied)
    want = {"base": _torch_logits(ref_base), "a": _torch_logits(ref_a), "b": _torch_logits(ref_b),
            "a+0.5b": _torch_logits(_blend(pair.base, [(ref_a, 1.0), (ref_b, 0.5)]))}

    # The fine-tunes genuinely differ, from each other and from the base, far beyond the tolerance.
    for x, y in (("a", "b"), ("a", "base"), ("b", "base")):
        scale = np.abs(want[x]).max()
        assert np.abs(want[x] - want[y]).max() > 10 * TOL * scale, (x, y)

    llm = _llama(tmp / "base.gguf")   # one model, one context; no adapter at load
    adapter = {name: llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
               for name, path in (("a", tmp / "adapter.gguf"), ("b", gguf_b))}
    assert all(adapter.values())
    try:
        _close(_llama_logits(llm), want["base"], TOL)   # loading adapters applies none of them
        for state in ("a", "b", "base", "a", "a+0.5b", "b", "base"):
            active = {"a": [("a", 1.0)], "b": [("b", 1.0)], "base": [],
                      "a+0.5b": [("a", 1.0), ("b", 0.5)]}[state]
            _set_adapters(llm, [(adapter[n], s) for n, s in active])
            got = _llama_logits(llm)
            _close(got, want[state], TOL)
            # and it is not one of the other states
            for other in ("base", "a", "b"):
                if other != state:
                    assert np.abs(got - want[other]).max() > 10 * TOL * np.abs(want[other]).max(), (state, other)
    finally:
        _set_adapters(llm, [])
        for a in adapter.values():
            llama_cpp.llama_adapter_lora_free(a)
        llm.close()
