"""atheris targets for deltapack's Python entry points that take text or files from users.

    python fuzz/fuzz_python.py recipes [CORPUS_DIR] -max_total_time=600
    python fuzz/fuzz_python.py peft [CORPUS_DIR] -max_total_time=600
    python fuzz/fuzz_python.py checkpoint [CORPUS_DIR] -max_total_time=600
    python fuzz/fuzz_python.py record [CORPUS_DIR] -max_total_time=600

recipes: recipe and edit rule strings (`--recipe`, `--edit`); peft: `import peft` of an adapter directory whose
adapter_config.json and adapter_model.safetensors come from the input (split at the first NUL byte);
checkpoint: a sharded model directory (model.safetensors.index.json, two shards and config.json from the
input, split at NUL bytes) opened with `checkpoint.Checkpoint`, every tensor read; record: a checkpoint delta
over make_corpus.record_models' base whose manifest a custom mutator changes structurally (a node replaced by
a value of another type or an edge value, a member dropped or added, a subtree copied elsewhere; byte-level
mutation one time in four), read by `deltapack info --json` and `deltapack apply` (the CLI's own error handling:
an exception escaping main() is a finding), checkpoint.describe and checkpoint.load_into. A ValueError
(deltapack.FormatError included) or an OSError is the expected refusal; any other exception is a finding and
stops the run.
"""
import json
import os
import struct
import sys
import tempfile

import atheris
import numpy as np

import deltapack as dp
from deltapack import checkpoint, recipes
from deltapack.export import import_peft
from deltapack.export import peft as export_peft
from deltapack.research import edits

EXPECTED = (ValueError, FileNotFoundError)
_base_dir = None
_record = None


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


# ----------------------------------------------------------------------------- record

_EDGE = [None, True, 0, -1, 7, 1 << 48, (1 << 62) + 1, 1.5, 1e300, "", "x", "same", "delta", "new", "resized", "F32",
         "BF16", "I8", "config.json", "model.safetensors", "../up", ".hidden", "a\x00b", "zzzzzzzz", "QUJ", [], [1 << 20],
         ["x"], {}, {"text": 5}]
_KEYS = ["op", "dtype", "shape", "source", "base_shape", "new_rows", "version", "tensors", "removed", "ft_bytes",
         "files", "text", "base64", "crc32c", "checkpoint", "budget", "peft", "calibration", "config", "modules"]


def _nodes(v, out):
    """(container, key) of every node under v, parents first."""
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else []
    for k, child in list(items):
        out.append((v, k))
        _nodes(child, out)
    return out


def record_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """A structural change of the manifest of a delta file (see the module docstring)."""
    import random
    rng = random.Random(seed)
    try:
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        man = json.loads(header["__metadata__"]["deltapack"])
        if rng.random() < 0.25 or not isinstance(man, dict):
            raise ValueError
    except (ValueError, KeyError, TypeError, struct.error, RecursionError):
        return atheris.Mutate(data, max_size)
    for _ in range(rng.randint(1, 3)):
        nodes = _nodes(man, [])
        if not nodes:
            break
        parent, key = rng.choice(nodes)
        kind = rng.randrange(4)
        if kind == 0:
            parent[key] = rng.choice(_EDGE)
        elif kind == 1 and isinstance(parent, dict):
            del parent[key]
        elif kind == 2 and isinstance(parent[key], dict):
            parent[key][rng.choice(_KEYS)] = rng.choice(_EDGE)
        else:
            other, k2 = rng.choice(nodes)
            parent[key] = json.loads(json.dumps(other[k2]))
    header["__metadata__"]["deltapack"] = json.dumps(man)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    out = struct.pack("<Q", len(text)) + text + data[8 + n:]
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


def _record_models():
    global _record
    if _record is None:
        from make_corpus import record_models
        _record = record_models(tempfile.mkdtemp(prefix="fuzz-record-"))
    return _record


def record_target(data: bytes) -> None:
    import contextlib
    import io

    import torch

    from deltapack import cli
    base, _ = _record_models()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.dpk")
        with open(path, "wb") as f:
            f.write(data)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli.main(["info", path, "--json"])  # refusals are printed by main; anything else escapes it
            cli.main(["apply", base, path, "-o", os.path.join(tmp, "out"), "-q"])
        try:
            checkpoint.describe(path)
        except EXPECTED:
            pass
        module = torch.nn.Module()
        for name, shape in (("model.embed_tokens.weight", (20, 8)), ("lm_head.weight", (16, 8)),
                            ("model.layers.0.mlp.up_proj.weight", (8, 8)), ("model.norm.weight", (8,))):
            *path_, leaf = name.split(".")
            parent = module
            for part in path_:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape), requires_grad=False))
        try:
            checkpoint.load_into(module, path, strict=False, force=True)
        except EXPECTED:
            pass


def main():
    target = {"recipes": recipes_target, "peft": peft_target, "checkpoint": checkpoint_target,
              "record": record_target}[sys.argv[1]]
    _base()
    atheris.instrument_all()  # the editable install's import hook hides deltapack from instrument_imports
    if target is record_target:
        _record_models()
        atheris.Setup([sys.argv[0]] + sys.argv[2:], target, custom_mutator=record_mutator)
    else:
        atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
