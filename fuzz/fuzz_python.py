"""atheris targets for deltapack's Python entry points that take text or files from users.

    python fuzz/fuzz_python.py recipes [CORPUS_DIR] -max_total_time=600
    python fuzz/fuzz_python.py peft [CORPUS_DIR] -max_total_time=600
    python fuzz/fuzz_python.py checkpoint [CORPUS_DIR] -max_total_time=600

recipes: recipe and edit rule strings (`--recipe`, `--edit`); peft: `import peft` of an adapter directory whose
adapter_config.json and adapter_model.safetensors come from the input (split at the first NUL byte);
checkpoint: a sharded model directory (model.safetensors.index.json, two shards and config.json from the
input, split at NUL bytes) opened with `checkpoint.Checkpoint`, every tensor read. A ValueError
(deltapack.FormatError included) or FileNotFoundError is the expected refusal; any other exception is a
finding and stops the run.
"""
import json
import os
import sys
import tempfile

import atheris
import numpy as np

import deltapack as dp
from deltapack import checkpoint, edits, export_peft, import_peft, recipes

EXPECTED = (ValueError, FileNotFoundError)
_base_dir = None


def recipes_target(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    try:
        rules = recipes.Rules(text)
        for _, (codec, params) in rules.rules:
            dp._core.canonical_params(codec, json.dumps(params))
    except EXPECTED:
        pass
    try:
        edits.EditRules(text)
    except EXPECTED:
        pass


def _base() -> str:
    """A tiny base model file, made once: two linear weights the adapter can target."""
    global _base_dir
    if _base_dir is None:
        from safetensors.numpy import save_file
        _base_dir = tempfile.mkdtemp(prefix="fuzz-peft-")
        rng = np.random.default_rng(0)
        save_file({"model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 8)).astype(np.float32),
                   "model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32)},
                  os.path.join(_base_dir, "model.safetensors"))
    return _base_dir


def peft_target(data: bytes) -> None:
    config, _, weights = data.partition(b"\0")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = os.path.join(tmp, "adapter")
        os.mkdir(adapter)
        with open(os.path.join(adapter, export_peft.ADAPTER_CONFIG), "wb") as f:
            f.write(config)
        with open(os.path.join(adapter, export_peft.ADAPTER_WEIGHTS), "wb") as f:
            f.write(weights)
        try:
            import_peft.import_peft(_base(), adapter, os.path.join(tmp, "out.dpk"))
        except EXPECTED:
            pass


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def checkpoint_target(data: bytes) -> None:
    index, shard1, shard2, config = (data.split(b"\0", 3) + [b"", b"", b""])[:4]
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in (("model.safetensors.index.json", index), (SHARDS[0], shard1), (SHARDS[1], shard2),
                              ("config.json", config)):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content)
        try:
            ck = checkpoint.Checkpoint(tmp)
            for name in ck.keys():
                if ck[name].numel <= 1 << 20:  # what a small input can describe
                    ck.read_tensor(name)
            ck.tied_source("lm_head.weight")
        except EXPECTED:
            pass


def main():
    target = {"recipes": recipes_target, "peft": peft_target, "checkpoint": checkpoint_target}[sys.argv[1]]
    _base()
    atheris.instrument_all()  # the editable install's import hook hides deltapack from instrument_imports
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
