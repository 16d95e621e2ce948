"""llama-server, for real: built from the llama.cpp sources of the pinned llama-cpp-python (bench/llama_server.py),
started on 127.0.0.1 with a base GGUF and two deltapack adapters loaded at scale 0, and asked concurrently over HTTP
(/completion and /v1/chat/completions), each request choosing its adapter. Every answer's greedy tokens must be
llama-cpp-python's with that adapter and the torch model's rebuilt from the same delta. Skipped, with the reason,
where the server cannot be built (no cmake or C++ compiler, or no source distribution to download)."""
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from conftest import perturbed  # noqa: E402

from deltapack import checkpoint  # noqa: E402
from deltapack.lm import examples_of  # noqa: E402
from deltapack.export.gguf import export_gguf_lora, export_gguf_model  # noqa: E402
from test_export_gguf import _torch_model  # noqa: E402

pairs = pytest.importorskip("deltapack.research.pairs")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import llama_server  # noqa: E402

NEW = 8   # tokens generated per request


@pytest.fixture(scope="module")
def server_binary():
    try:
        return llama_server.build()
    except llama_server.Unavailable as ex:
        pytest.skip(f"llama-server cannot be built here: {ex}")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The tiny llama pair's base as GGUF and two adapters on it: A, its fine-tune at `--budget 2.1 --lora-only`;
    B, another fine-tune of the same base (noise on every parameter) stored at rank 8."""
    pair = pairs.build_pair("llama", "tiny")
    tmp = tmp_path_factory.mktemp("server")
    checkpoint.compress(pair.base, pair.ft, tmp / "a.dpk", budget=2.1, lora_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.bfloat16)
    perturbed(model, seed=7, scale=1e-2).save_pretrained(tmp / "ft_b")
    checkpoint.compress(pair.base, tmp / "ft_b", tmp / "b.dpk", recipe="*=lowrank:rank=8,dtype=f32", min_size=1000)
    export_gguf_model(pair.base, None, tmp / "base.gguf", quiet=True)
    for name in ("a", "b"):
        export_gguf_lora(pair.base, tmp / f"{name}.dpk", tmp / f"{name}.gguf", quiet=True)
    prompts = [ex["input_ids"][:ex["prompt_len"]] for ex in examples_of(pair.data)[:3]]
    return pair, tmp, prompts


def _llama(tmp, adapter):
    return llama_cpp.Llama(model_path=str(tmp / "base.gguf"), lora_path=str(tmp / f"{adapter}.gguf") if adapter
                           else None, n_ctx=256, n_batch=64, n_threads=1, type_k=0, type_v=0, verbose=False)


def _greedy(llm, ids):
    llm.reset()
    out = []
    for tok in llm.generate(ids, top_k=1, temp=0.0):
        if tok == llm.token_eos() or len(out) == NEW:
            break
        out.append(tok)
    return out


def _torch_greedy(model, ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


LORA = {None: [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}], "a": [{"id": 0, "scale": 1.0}],
        "b": [{"id": 1, "scale": 1.0}]}


def test_server_answers_each_request_with_its_adapter(server_binary, adapters):
    pair, tmp, prompts = adapters
    want_llama = {}
    for adapter in (None, "a", "b"):
        llm = _llama(tmp, adapter)
        want_llama[adapter] = [_greedy(llm, p) for p in prompts]
        llm.close()
    ref = {None: _torch_model(pair.base), "a": _torch_model(pair.base, tmp / "a.dpk", matrices_only=True),
           "b": _torch_model(pair.base, tmp / "b.dpk", matrices_only=True)}
    want_torch = {k: [_torch_greedy(m, p) for p in prompts] for k, m in ref.items()}
    assert want_llama == want_torch
    assert len({str(v) for v in want_torch.values()}) == 3   # base, A and B answer differently: routing shows

    jobs = [(adapter, i) for _ in range(2) for adapter in (None, "a", "b") for i in range(len(prompts))]
    with llama_server.Server(server_binary, tmp / "base.gguf", [tmp / "a.gguf", tmp / "b.gguf"], parallel=4) as s:
        # This llama.cpp lists adapters loaded with --lora-init-without-apply at scale 1, and a request without a
        # `lora` field runs at those scales: every request names its adapters (docs/serving.md).
        assert not llama_server.port_is_free(s.port)
        loaded = s.get("/lora-adapters")
        assert [(a["id"], a["path"]) for a in loaded] == [(0, str(tmp / "a.gguf")), (1, str(tmp / "b.gguf"))]

        def complete(job):
            adapter, i = job
            r = s.post("/completion", {"prompt": prompts[i], "n_predict": NEW, "temperature": 0.0, "top_k": 1,
                                       "return_tokens": True, "lora": LORA[adapter]})
            return r["tokens"]

        with ThreadPoolExecutor(6) as pool:   # concurrent, the adapters interleaved
            got = list(pool.map(complete, jobs))
        for (adapter, i), tokens in zip(jobs, got):
            assert tokens == want_llama[adapter][i], (adapter, i)

        # The OpenAI-style chat endpoint: the server's own template, the same greedy answer as llama-cpp-python
        # given the templated prompt.
        messages = [{"role": "user", "content": "kqzvm"}]
        prompt = s.post("/apply-template", {"messages": messages})["prompt"]
        for adapter in ("a", "b"):
            r = s.post("/v1/chat/completions", {"messages": messages, "max_tokens": NEW, "temperature": 0.0,
                                                "top_k": 1, "lora": LORA[adapter]})
            llm = _llama(tmp, adapter)
            ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            want = llm.detokenize(_greedy(llm, ids)).decode(errors="replace")
            llm.close()
            assert r["choices"][0]["message"]["content"] == want, adapter
        port, proc = s.port, s.proc
    assert proc.poll() is not None and llama_server.port_is_free(port)


def test_server_is_stopped_when_the_block_fails(server_binary, adapters):
    _, tmp, _ = adapters
    with pytest.raises(KeyError):
        with llama_server.Server(server_binary, tmp / "base.gguf", [tmp / "a.gguf"]) as s:
            port, proc = s.port, s.proc
            raise KeyError("the caller's error")
    assert proc.poll() is not None and llama_server.port_is_free(port)
    # a server that cannot start (an adapter of another model) is stopped too, with llama.cpp's message
    with pytest.raises(RuntimeError, match="llama-server exited"):
        with llama_server.Server(server_binary, tmp / "base.gguf", [tmp / "base.gguf"]):
            pass
