"""atheris targets for deltapack's Python entry points that take text or files from users.

    python fuzz/fuzz_python.py recipes [CORPUS_DIR] -max_total_time=600
    python fuzz/fuzz_python.py peft [CORPUS_DIR] -max_total_time=600

recipes: recipe and edit rule strings (`--recipe`, `--edit`); peft: `import peft` of an adapter directory whose
adapter_config.json and adapter_model.safetensors come from the input (split at the first NUL byte). A
ValueError (deltapack.FormatError included) or FileNotFoundError is the expected refusal; any other exception
is a finding and stops the run.
"""
import json
import os
import sys
import tempfile

import atheris
import numpy as np

import deltapack as dp
from deltapack import edits, export_peft, recipes

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
            export_peft.import_peft(_base(), adapter, os.path.join(tmp, "out.dpk"))
        except EXPECTED:
            pass


def main():
    target = {"recipes": recipes_target, "peft": peft_target}[sys.argv[1]]
    _base()
    atheris.instrument_all()  # the editable install's import hook hides deltapack from instrument_imports
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
