"""Writes the fuzzers' seed corpus: one small valid delta file per codec, variant and dtype
(fuzz/corpus/delta_file), every codec's canonical parameters (fuzz/corpus/params), recipe and edit rules
(fuzz/corpus/recipes) and a LoRA adapter for fuzz_python.py's tiny base (fuzz/corpus/peft).

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
