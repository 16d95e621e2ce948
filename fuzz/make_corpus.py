"""Writes the fuzzers' seed corpus: one small valid delta file per codec, variant and dtype
(fuzz/corpus/delta_file), every codec's canonical parameters (fuzz/corpus/params), recipe and edit rules
(fuzz/corpus/recipes), a LoRA adapter for fuzz_python.py's tiny base (fuzz/corpus/peft), a two-shard
model directory (fuzz/corpus/checkpoint) and checkpoint deltas over record_models' base (fuzz/corpus/record:
resized, tied, added, removed and kept, for the record fuzzers).

    python fuzz/make_corpus.py
"""
import json
import os

import numpy as np
import torch

import deltapack as dp

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES = ["sign", "sign:scope=row", "sign:scope=group,group=8", "levels:bits=1", "levels:bits=3",
           "quant:bits=2", "quant:bits=4,group=8", "quant:bits=8", "sparse:p=0.7,index=bitmap",
           "sparse:p=0.7,index=gaps", "sparse:p=0.7,values=int8", "sparse:p=0.5,mode=magnitude",
           "lowrank:rank=2", "lowrank:rank=2,dtype=bf16", "lowrank:rank=3,bits=4,group=8",
           "lowrank:bits=8/2,bands=1/2,group=8", "dense", "dense:dtype=bf16"]


def main():
    files, params = os.path.join(HERE, "corpus", "delta_file"), os.path.join(HERE, "corpus", "params")
    os.makedirs(files, exist_ok=True)
    os.makedirs(params, exist_ok=True)
    rng = np.random.default_rng(0)
    for recipe in RECIPES:
        codec = recipe.partition(":")[0]
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.from_numpy(rng.standard_normal((6, 20)).astype(np.float32) * 1e-2).to(dtype)
            enc = dp.encode(x, recipe)
            dtype = enc.dtype
            name = recipe.replace(":", "-").replace(",", "-").replace("=", "").replace("/", "_")
            dp.save(os.path.join(files, f"{name}-{dtype}.dpk"), {"w": enc})
        with open(os.path.join(params, recipe.replace(":", "-").replace(",", "-").replace("=", "")
                               .replace("/", "_")), "wb") as f:
            f.write(codec.encode() + b"\0" + json.dumps(enc.params).encode())

    rules = RECIPES + ["*.mlp.*=lowrank:rank=64;*=sign", "embed*=quant:bits=8;*=sparse:p=0.9,seed=3",
                       "dare:p=0.9", "*.q_proj.*=dare:p=0.5,k=-1+bitdelta;*=magnitude:p=0.8", "extrapolate:alpha=0.5"]
    os.makedirs(os.path.join(HERE, "corpus", "recipes"), exist_ok=True)
    for i, text in enumerate(rules):
        with open(os.path.join(HERE, "corpus", "recipes", f"rule{i:02d}"), "w") as f:
            f.write(text)
    _peft_seed(os.path.join(HERE, "corpus", "peft"), rng)
    _checkpoint_seed(os.path.join(HERE, "corpus", "checkpoint"), rng)
    _record_seed(os.path.join(HERE, "corpus", "record"))


def record_models(out):
    """A tiny base and fine-tune (BASE, FT directories under `out`) whose checkpoint delta uses every op of the
    record: the embedding resized (new rows), lm_head untied from it, a matrix changed, a norm changed, a tensor
    added and one removed, a kept file. Deterministic: fuzz_python.py's record target rebuilds over this base."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(7)
    f32 = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    base = {"model.embed_tokens.weight": f32(16, 8), "model.layers.0.mlp.up_proj.weight": f32(8, 8),
            "model.norm.weight": np.ones(8, np.float32), "model.layers.0.old.weight": f32(4, 8)}
    ft = {"model.embed_tokens.weight": np.concatenate([base["model.embed_tokens.weight"] + f32(16, 8) * 0.01, f32(4, 8)]),
          "lm_head.weight": base["model.embed_tokens.weight"] + f32(16, 8) * 0.01,
          "model.layers.0.mlp.up_proj.weight": base["model.layers.0.mlp.up_proj.weight"] + f32(8, 8) * 0.01,
          "model.norm.weight": np.ones(8, np.float32) + f32(8) * 0.01, "model.layers.0.new.weight": f32(2, 8)}
    dirs = []
    for name, tensors, tie in (("base", base, True), ("ft", ft, False)):
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        save_file(tensors, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": tie,
                       "hidden_size": 8, "num_hidden_layers": 1}, f)
        dirs.append(d)
    with open(os.path.join(dirs[1], "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64}, f)
    return dirs


def _record_seed(out):
    """Checkpoint deltas of record_models' pair: sign everywhere, and low rank for matrices."""
    import tempfile

    from deltapack import checkpoint
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base, ft = record_models(tmp)
        for name, recipe in (("sign", "sign"), ("lowrank", "*.mlp.*=lowrank:rank=2;*=sign")):
            checkpoint.compress(base, ft, os.path.join(out, f"{name}.dpk"), recipe, min_size=1, force=True,
                                overwrite=True)


def _checkpoint_seed(out, rng):
    """index.json, NUL, shard 1, NUL, shard 2, NUL, config.json: a two-shard model for fuzz_python.py."""
    from safetensors.numpy import save
    os.makedirs(out, exist_ok=True)
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    one = {"model.embed_tokens.weight": rng.standard_normal((8, 4)).astype(np.float16)}
    two = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((4, 4)).astype(np.float32),
           "model.norm.weight": np.ones(4, np.float32)}
    index = {"metadata": {"total_size": 96}, "weight_map": {**{k: shards[0] for k in one}, **{k: shards[1] for k in two}}}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}
    with open(os.path.join(out, "two-shards"), "wb") as f:
        f.write(b"\0".join([json.dumps(index).encode(), save(one), save(two), json.dumps(config).encode()]))


def _peft_seed(out, rng):
    """adapter_config.json, NUL, adapter_model.safetensors: LoRA on fuzz_python.py's tiny base."""
    from safetensors.numpy import save
    os.makedirs(out, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "embed_tokens"]}
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    weights = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": f32(2, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": f32(8, 2),
               "base_model.model.model.embed_tokens.lora_embedding_A": f32(2, 16),
               "base_model.model.model.embed_tokens.lora_embedding_B": f32(8, 2)}
    with open(os.path.join(out, "lora"), "wb") as f:
        f.write(json.dumps(config).encode() + b"\0" + save(weights))


if __name__ == "__main__":
    main()
