"""Compress and rebuild Hugging Face checkpoints (safetensors), one tensor at a time.

    summary = compress("base_dir", "ft_dir", "ft.dpk", recipe="*.mlp.*=lowrank:rank=64;*=sign")
    apply_checkpoint("base_dir", "ft.dpk", "out_dir", alpha=1.0, dtype=None)   # a loadable HF dir
    sd = load("base_dir", "ft.dpk")                  # state dict of torch tensors
    load_into(model, "ft.dpk", base="base_dir")      # rebuild a torch module's parameters in place

Memory: tensors are read with pread() into one buffer per tensor (not through a long-lived mmap,
whose touched pages would stay resident for the whole run), so peak memory follows the largest
tensor, not the model. The delta file is written by a streaming writer that produces exactly the
bytes `deltapack.save` would (docs/FORMAT.md): components are spilled to unnamed temporary files
by element size, then header + spills are assembled and renamed into place.

How a fine-tune is recorded (docs/checkpoints.md): the manifest's `metadata["checkpoint"]` lists
every tensor of the fine-tune with its dtype, shape and how to rebuild it (`op`):
  same     copy the base tensor `source` (unchanged; nothing stored)
  delta    base[source] + alpha * delta[name]
  new      the stored values, as is (added tensors, or changed shape / exactness fallback)
  resized  rows [:k] = base[source][:k] + alpha * delta[name], rows [k:] = delta[name#new_rows]
plus `removed` (base tensors the fine-tune lacks) and `files` (config.json, tokenizer, ...).
The manifest's `base` holds the base fingerprint: per tensor dtype, shape, CRC-32C of its bytes.
"""
from __future__ import annotations

import base64
import json
import math
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np

from . import _api, _core, reference
from .recipes import Rules

CHECKPOINT_VERSION = 1
NEW_ROWS = "#new_rows"
# safetensors dtype -> (deltapack float name or None, numpy dtype used to hold the bytes, size)
_ST_DTYPES = {
    "F64": (None, np.float64, 8), "F32": ("f32", np.float32, 4), "F16": ("f16", np.float16, 2),
    "BF16": ("bf16", np.uint16, 2), "I64": (None, np.int64, 8), "I32": (None, np.int32, 4),
    "I16": (None, np.int16, 2), "I8": (None, np.int8, 1), "U64": (None, np.uint64, 8),
    "U32": (None, np.uint32, 4), "U16": (None, np.uint16, 2), "U8": (None, np.uint8, 1),
    "BOOL": (None, np.bool_, 1), "F8_E4M3": (None, np.uint8, 1), "F8_E5M2": (None, np.uint8, 1),
}
_FLOAT_ST = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_CHUNK = 16 << 20  # elements per streaming chunk (64 MiB of f32)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_MAX_KEPT_FILE = 32 << 20
_OUTPUT_EMBEDDINGS = ("lm_head.weight",)
_INPUT_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight",
                     "transformer.word_embeddings.weight", "embed_tokens.weight")


BaseMismatchError = _core.BaseMismatchError  # the base given is not the one the delta was made from (ValueError)


# ----------------------------------------------------------------------------- reading

def _no_duplicates(where):
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise _api.FormatError(f"{where}: key '{k}' is listed twice")
            seen[k] = v
        return seen
    return hook


def read_json(path, object_pairs_hook=None):
    """A JSON file from a model or adapter directory; FormatError naming it if it is not UTF-8 JSON."""
    with open(path, "rb") as fh:
        try:
            return json.loads(fh.read().decode("utf-8"), object_pairs_hook=object_pairs_hook)
        except (UnicodeDecodeError, json.JSONDecodeError) as ex:
            raise _api.FormatError(f"{path}: not valid JSON ({ex})") from None


def read_json_object(path) -> dict:
    """read_json of a file that must hold a JSON object (config.json, adapter_config.json)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise _api.FormatError(f"{path}: not a JSON object")
    return value


@dataclass
class TensorInfo:
    """Where one tensor lives: its shard file, safetensors dtype, shape and absolute byte range."""

    name: str
    path: str
    dtype: str
    shape: tuple
    start: int
    end: int

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def float_name(self):
        return _ST_DTYPES[self.dtype][0]

    @property
    def np_dtype(self):
        return np.dtype(_ST_DTYPES[self.dtype][1])


class Checkpoint:
    """A model: a directory (model.safetensors, or shards + model.safetensors.index.json) or one
    .safetensors file. Lists tensors (in shard and data order) and reads them one at a time."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._files = _core.ModelFiles.open(self.path)  # headers, index and config.json, checked in C++
        self.dir = self.path if self._files.is_directory else None
        self.shards = list(self._files.shards)
        index_meta = json.loads(self._files.index_metadata)
        self.weight_map = {} if self._files.has_index else None
        self.index_metadata = index_meta if self._files.has_index else None
        self.tensors: dict[str, TensorInfo] = {}
        self.shard_of: dict[str, str] = {}
        for name, st, shape, start, nbytes, shard in self._files.tensors():
            self.tensors[name] = TensorInfo(name, self._files.shard_path(shard), st, tuple(shape), start,
                                            start + nbytes)
            self.shard_of[name] = shard
            if self.weight_map is not None:
                self.weight_map[name] = shard
        self.shard_metadata = {s: dict(self._files.shard_metadata(s)) for s in self.shards}
        self.config = json.loads(self._files.config) if self._files.config else None

    def keys(self):
        return list(self.tensors)

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name) -> TensorInfo:
        return self.tensors[name]

    def read(self, name, out=None, start=0, stop=None) -> np.ndarray:
        """Elements [start, stop) of tensor `name` (flat), into `out` if given (numpy, bytes-compatible)."""
        info = self.tensors[name]
        size = info.np_dtype.itemsize
        stop = info.numel if stop is None else stop
        if out is None:
            out = np.empty(stop - start, info.np_dtype)
        if out.nbytes != (stop - start) * size:
            raise ValueError(f"tensor '{name}': read buffer holds {out.nbytes} bytes, need {(stop - start) * size}")
        self._files.read(name, out, start * size)
        return out

    def read_tensor(self, name) -> np.ndarray:
        """The whole tensor as a numpy array of its shape (bf16 as uint16 bits)."""
        return self.read(name).reshape(self.tensors[name].shape)

    def tied_source(self, name):
        """For an output embedding missing here (tied to the input embedding), the input embedding's name."""
        if name not in _OUTPUT_EMBEDDINGS or name in self.tensors:
            return None
        if self.config is not None and self.config.get("tie_word_embeddings") is False:
            return None
        return next((n for n in _INPUT_EMBEDDINGS if n in self.tensors), None)


def _crc32c(arr, crc=0) -> int:
    """CRC-32C (the container's checksum) of an array's bytes."""
    return _core.crc32c(np.ascontiguousarray(arr).reshape(-1).view(np.uint8), crc)




def _as_checkpoint(x):
    return x if isinstance(x, Checkpoint) else Checkpoint(x)


def _as_delta(x):
    return x if isinstance(x, _api.DeltaFile) else _api.open(x)


# ----------------------------------------------------------------------------- atomic files

def write_torch_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file of torch tensors (any dtype, CPU), written by the C++ core's SafetensorsWriter
    (atomic; errors name the path and say "disk full" where that is the cause)."""
    import torch

    st = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
    items = [(name, t.detach().cpu().contiguous()) for name, t in tensors.items()]
    w = _core.SafetensorsWriter(os.fspath(path), [(n, st[t.dtype], list(t.shape)) for n, t in items],
                                metadata or {})
    try:
        for name, t in items:
            w.write(name, t.reshape(-1).view(torch.uint8).numpy())
        w.finish()
    except BaseException:
        w.abort()
        raise


# ----------------------------------------------------------------------------- helpers

def _progress(total, desc, quiet):
    """A tqdm bar over bytes if tqdm is installed and not quiet; else a no-op object."""
    if not quiet:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                        file=sys.stderr)
        except ImportError:
            pass

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()


def _dense_enc(values: np.ndarray, float_name: str) -> _api.Encoded:
    """An in-memory dense encoding that holds `values` as they are (no copy)."""
    return _api.Encoded("dense", {"dtype": float_name}, tuple(values.shape), float_name, {"values": values})


def _widen_into(x, float_name, out):
    """Exact float32 values of f32/f16/bf16 storage, into `out` (float32)."""
    if float_name == "bf16":  # bf16 bits are the high half of the f32 bits
        bits = out.view(np.uint32)
        bits[...] = x
        bits <<= 16
    else:
        out[...] = x


def _delta_into(ft_chunk, ft_name, base_chunk, base_name, out, block=1 << 20):
    """out = f32(ft) - f32(base), one IEEE f32 subtraction per element, in cache-sized blocks."""
    tmp = np.empty(min(block, out.size), np.float32)
    for s in range(0, out.size, block):
        e = min(out.size, s + block)
        _widen_into(ft_chunk[s:e], ft_name, out[s:e])
        _widen_into(base_chunk[s:e], base_name, tmp[:e - s])
        np.subtract(out[s:e], tmp[:e - s], out=out[s:e])


def _round_to(values_f32, float_name):
    return reference.round_to(values_f32, float_name)


def _keep_files(ft: Checkpoint) -> dict:
    """The fine-tune's non-weight files (config, tokenizer, generation config ...) to store in the manifest."""
    files = {}
    if not ft.dir:
        return files
    for entry in sorted(os.listdir(ft.dir)):
        full = os.path.join(ft.dir, entry)
        if (entry.startswith(".") or not os.path.isfile(full) or entry.endswith(_WEIGHT_SUFFIXES)
                or entry.endswith(".index.json")):
            continue
        if os.path.getsize(full) > _MAX_KEPT_FILE:
            print(f"deltapack: not keeping {full} ({os.path.getsize(full)} bytes, over "
                  f"{_MAX_KEPT_FILE >> 20} MiB)", file=sys.stderr)
            continue
        with open(full, "rb") as fh:
            data = fh.read()
        try:
            files[entry] = {"text": data.decode("utf-8")}
        except UnicodeDecodeError:
            files[entry] = {"base64": base64.b64encode(data).decode("ascii")}
    return files


def _fingerprint(base: Checkpoint, crcs: dict) -> dict:
    tensors = {}
    for name, info in base.tensors.items():
        entry = {"dtype": info.dtype, "shape": list(info.shape)}
        if name in crcs:
            entry["crc32c"] = f"{crcs[name]:08x}"
        tensors[name] = entry
    return {"fingerprint": "crc32c", "tensors": tensors,
            "config": {k: base.config[k] for k in ("model_type", "_name_or_path") if k in base.config}
            if base.config else None}


# ----------------------------------------------------------------------------- compress

def _plan(base: Checkpoint, ft: Checkpoint) -> dict:
    """How each fine-tune tensor relates to the base: {name: {op, dtype, shape, source?, base_shape?}}."""
    plan = {}
    for name, fi in ft.tensors.items():
        src = name if name in base else base.tied_source(name)
        spec = {"dtype": fi.dtype, "shape": list(fi.shape)}
        bi = base[src] if src else None
        if bi is not None and src != name:
            spec["source"] = src
        if fi.float_name is None or (bi is not None and bi.float_name is None):
            if bi is None or bi.dtype != fi.dtype or bi.shape != fi.shape:
                raise ValueError(f"{ft.path}: tensor '{name}' ({fi.dtype}) is not a float tensor and differs "
                                 "from the base; deltapack stores only f32/f16/bf16 changes")
            spec["op"] = "same"  # checked byte for byte while compressing
        elif bi is None:
            spec["op"] = "new"
        elif bi.shape == fi.shape:
            spec["op"] = "delta"
        elif len(bi.shape) == len(fi.shape) >= 1 and bi.shape[1:] == fi.shape[1:]:
            spec["op"] = "resized"
            spec["base_shape"] = list(bi.shape)
        else:
            spec["op"] = "new"
            spec["base_shape"] = list(bi.shape)
        plan[name] = spec
    return plan


# A fine-tune keeps its base's architecture, most of its tensors' names and shapes, and changes each
# matrix by much less than the matrix itself (the project's pairs: at most 0.5 ‖W‖; instruction tunes of
# 7B models ~0.01). Two independent weight matrices of equal norm differ by about √2 ‖W‖.
_CONFIG_IDENTITY = ("model_type", "architectures", "hidden_size", "num_hidden_layers")
MAX_RESHAPED_SHARE = 0.5     # tensors of the fine-tune added or reshaped, over all its tensors
MAX_RELATIVE_CHANGE = 1.0    # ‖ft − base‖ / ‖base‖ on the probed matrices (median)
_PROBES, _PROBE_ROWS = 4, 64


def check_related(base, ft, plan: dict | None = None) -> None:
    """Refuses, before any work, a fine-tune that is not of this base: config.json names another
    architecture or size, most tensors have no same-shape counterpart in the base, or a few probed matrices
    (their first rows) changed by as much as the weights themselves. Raises BaseMismatchError saying why;
    callers offer `force` to store or analyse the pair anyway."""
    base, ft = _as_checkpoint(base), _as_checkpoint(ft)
    why = f"{ft.path} does not look like a fine-tune of {base.path}"
    hint = " (use --force / force=True to go on anyway)"
    if base.config and ft.config:
        for key in _CONFIG_IDENTITY:
            if key in base.config and key in ft.config and base.config[key] != ft.config[key]:
                raise BaseMismatchError(f"{why}: config.json {key} is {ft.config[key]!r}, the base's is "
                                        f"{base.config[key]!r}{hint}")
    plan = plan or _plan(base, ft)
    reshaped = [n for n, s in plan.items() if s["op"] in ("new", "resized")]
    if plan and len(reshaped) > MAX_RESHAPED_SHARE * len(plan):
        first = reshaped[0]
        there = plan[first].get("base_shape")
        detail = (f"'{first}' is {plan[first]['shape']}, the base's {there}" if there else
                  f"'{first}' is not in the base")
        raise BaseMismatchError(f"{why}: {len(reshaped)} of its {len(plan)} tensors are new or reshaped "
                                f"({detail}){hint}")
    matrices = sorted(n for n, s in plan.items() if s["op"] == "delta" and len(s["shape"]) >= 2
                      and ft[n].float_name and base[s.get("source", n)].float_name)
    changes = []
    for name in matrices[::max(1, len(matrices) // _PROBES)][:_PROBES]:
        fi, bi = ft[name], base[plan[name].get("source", name)]
        n = min(fi.numel, _PROBE_ROWS * fi.shape[-1])
        d, w = np.empty(n, np.float32), np.empty(n, np.float32)
        fraw, braw = ft.read(name, stop=n), base.read(bi.name, stop=n)
        _delta_into(fraw, fi.float_name, braw, bi.float_name, d)
        _widen_into(braw, bi.float_name, w)
        norm = float(np.linalg.norm(w.astype(np.float64)))
        if norm > 0 and np.isfinite(norm):
            changes.append((float(np.linalg.norm(d.astype(np.float64))) / norm, name))
    if changes:
        changes.sort()
        median, name = changes[len(changes) // 2]
        if median > MAX_RELATIVE_CHANGE:
            raise BaseMismatchError(f"{why}: its matrices differ from the base's by as much as the weights "
                                    f"themselves (‖ΔW‖/‖W‖ = {median:.2f} on '{name}', probed on "
                                    f"{len(changes)} matrices; fine-tunes change far less){hint}")


def _choose(rules: Rules, name: str, shape, min_size: int):
    """Codec for a tensor's delta: the recipe for 2-D+ tensors of at least min_size elements, else dense f32."""
    if _lossy(shape, min_size):
        found = rules.recipe_for(name)
        if found is not None:
            return found
    return "dense", {"dtype": "f32"}


def _lossy(shape, min_size: int) -> bool:
    """Tensors a recipe or budget may encode lossily: 2-D and larger, at least min_size elements."""
    return len(shape) >= 2 and math.prod(shape) >= min_size


class _Compressor:
    """Reads base and fine-tune tensors and encodes deltas. choose(name, shape) -> (codec, params), or None
    for a delta not stored; weights(name, matrix) -> the lowrank encoder's error weights, or None."""

    def __init__(self, base, ft, choose, threads, bar, weights=None):
        self.base, self.ft, self.choose, self.weights = base, ft, choose, weights
        self.threads, self.bar = threads, bar
        self.crcs = {}
        self._scratch = np.empty(0, np.float32)

    def _base_crc(self, name, crc):
        self.crcs.setdefault(name, crc)

    def delta_of(self, name, src, n, check_exact):
        """Delta of the first n elements of ft[name] vs base[src]; None when identical.
        Returns (delta f32 flat, exact) where exact says base + delta rounds back to ft exactly.
        (A read-ahead thread was tried: with numpy and pread sharing the GIL and 2 cores it cost more CPU.)"""
        fi, bi = self.ft[name], self.base[src]
        if self._scratch.size < n:  # one buffer reused for every tensor: no page faults per tensor
            self._scratch = None
            self._scratch = np.empty(n, np.float32)
        delta = self._scratch[:n]
        bbuf = np.empty(min(n, _CHUNK), bi.np_dtype)
        fbuf = np.empty(min(n, _CHUNK), fi.np_dtype)
        identical = bi.dtype == fi.dtype
        exact = True
        crc = 0
        for s in range(0, n, _CHUNK):
            e = min(n, s + _CHUNK)
            b, f = bbuf[:e - s], fbuf[:e - s]
            self.base.read(src, b, s, e)
            self.ft.read(name, f, s, e)
            crc = _crc32c(b, crc)
            if identical:
                identical = np.array_equal(b.view(np.uint8), f.view(np.uint8))
            _delta_into(f, fi.float_name, b, bi.float_name, delta[s:e])
            if check_exact:
                back = np.empty(e - s, fi.np_dtype)
                _api.apply(b, _dense_enc(delta[s:e], "f32"), out=back, threads=self.threads)
                exact = exact and np.array_equal(back.view(np.uint8), f.view(np.uint8))
            self.bar.update(b.nbytes + f.nbytes)
        if n < bi.numel:  # rows the fine-tune dropped: read only for the fingerprint
            rest = np.empty(min(bi.numel - n, _CHUNK), bi.np_dtype)
            for s in range(n, bi.numel, _CHUNK):
                e = min(bi.numel, s + _CHUNK)
                crc = _crc32c(self.base.read(src, rest[:e - s], s, e), crc)
                self.bar.update((e - s) * bi.np_dtype.itemsize)
        self._base_crc(src, crc)
        return (None if identical else delta), exact

    def encode(self, name, values_f32, shape):
        codec, params = self.choose(name, shape)
        matrix = values_f32.reshape(shape)
        weights = self.weights(name, reference.as_matrix(matrix)) if self.weights and codec == "lowrank" \
            and "bits" in _recipe_params(codec, params) else None
        try:
            return _api.encode(matrix, codec, threads=self.threads, weights=weights, **params)
        except ValueError as ex:
            raise ValueError(f"tensor '{name}' {list(shape)}: {codec}: {ex}") from None

    def raw(self, name, start_row=0):
        """Fine-tune rows [start_row:] stored exactly (dense in the fine-tune's own dtype)."""
        fi = self.ft[name]
        shape = (fi.shape[0] - start_row,) + fi.shape[1:] if start_row else fi.shape
        vals = self.ft.read(name, start=start_row * math.prod(fi.shape[1:])).reshape(shape)
        self.bar.update(vals.nbytes)
        try:
            return _api.encode(vals, "dense", dtype=fi.float_name)
        except ValueError as ex:
            raise ValueError(f"{self.ft.path}: tensor '{name}': {ex}") from None


def _recipe_params(codec, params) -> dict:
    return json.loads(_core.canonical_params(codec, json.dumps(params)))


def compress(base, ft, out, recipe: str = "sign", *, budget: float | None = None, data=None, proxy=None,
             min_size: int | None = None, metadata: dict | None = None, threads: int | None = None, quiet: bool = True,
             keep_files: bool = True, force: bool = False) -> dict:
    """Store fine-tune `ft` as a delta against `base` in the delta file `out` (written atomically).

    recipe: per-tensor rules `pattern=recipe;...` applied to tensors with >= 2 dims and >= min_size
    elements (default 4096); the others are stored `dense` (f32) where they changed. Unchanged tensors are
    not stored.
    budget: bits per parameter of the whole file (over all the fine-tune's parameters, header included)
    instead of a recipe: each matrix (>= 2 dims, >= min_size elements, default 1) gets the codec and
    parameters, exact `dense` among them, that minimise a loss proxy within it
    (deltapack.budget); data: calibration examples (a JSONL path or a list, see evaluation.read_data) for the
    data-aware proxies, the choice among them and the refit of scales (deltapack.calibration); proxy: one of
    budget.PROXIES instead of the choice.
    force: store a pair that does not look like base + fine-tune (check_related) anyway.
    Returns a summary dict (counts, bytes, ratio; with a budget also the choice and the proxy's prediction).
    """
    base, ft = _as_checkpoint(base), _as_checkpoint(ft)
    plan = _plan(base, ft)
    if not force:
        check_related(base, ft, plan)
    if budget is not None:
        from .compress_budget import compress_to_budget
        return compress_to_budget(base, ft, out, plan, budget, data=data, proxy=proxy, min_size=min_size or 1,
                                  metadata=metadata, threads=threads, quiet=quiet, keep_files=keep_files)
    if data is not None:
        raise ValueError("data (calibration examples) is used with a budget; for a recipe use `deltapack calibrate`")
    rules = Rules(recipe)
    min_size = 4096 if min_size is None else min_size
    bar = _progress(_total_bytes(base, ft, plan), "compress", quiet)
    try:
        c = _Compressor(base, ft, lambda name, shape: _choose(rules, name, shape, min_size), threads, bar)
        writer, meta, fp = _write_deltas(c, plan, out, metadata, keep_files)
        try:
            size = writer.close(metadata=meta, base=fp)
        except BaseException:
            writer.abort()
            raise
    finally:
        bar.close()
    return _summary(out, size, meta["checkpoint"], writer)


def _total_bytes(base, ft, plan) -> int:
    return sum(ft[n].nbytes + (base[s.get("source", n)].nbytes if s["op"] in ("delta", "resized") else 0)
               for n, s in plan.items())


def _summary(out, size, record, writer) -> dict:
    ops = [s["op"] for s in record["tensors"].values()]
    return {"file": os.fspath(out), "file_bytes": size, "ft_bytes": record["ft_bytes"],
            "ratio": record["ft_bytes"] / max(size, 1), "stored": len(writer),
            **{op: ops.count(op) for op in ("same", "delta", "new", "resized")}, "removed": len(record["removed"])}


def _write_deltas(c: _Compressor, plan: dict, out, metadata, keep_files):
    """Encode every tensor of `plan` into a DeltaWriter for `out`; returns (writer, manifest metadata, base
    fingerprint) with the writer not yet closed (the caller closes or aborts it). `plan` is not modified."""
    base, ft = c.base, c.ft
    plan = {n: dict(s) for n, s in plan.items()}
    writer = _api.DeltaWriter(out)
    try:
        for name, spec in plan.items():
            fi = ft[name]
            src = spec.get("source", name)
            if spec["op"] == "same":  # a non-float tensor: must be byte-identical
                a, b = ft.read(name), base.read(src)
                if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                    raise ValueError(f"{ft.path}: tensor '{name}' ({fi.dtype}) differs from the base; "
                                     "deltapack stores only f32/f16/bf16 changes")
                c._base_crc(src, _crc32c(b))
                c.bar.update(a.nbytes + b.nbytes)
            elif spec["op"] == "new":
                writer.add(name, c.raw(name))
            elif spec["op"] == "delta":
                choice = c.choose(name, fi.shape)
                check = choice is not None and choice[0] == "dense" and choice[1].get("dtype", "f32") == "f32"
                delta, exact = c.delta_of(name, src, fi.numel, check)
                if delta is None or choice is None:  # unchanged, or a delta the budget does not store
                    spec["op"] = "same"
                elif check and not exact:  # f32 rounding would not give the fine-tune's bits back
                    spec["op"] = "new"
                    writer.add(name, c.raw(name))
                else:
                    writer.add(name, c.encode(name, delta, fi.shape))
            else:  # resized along dim 0: delta on the shared rows, new rows as they are
                k = min(fi.shape[0], base[src].shape[0])
                inner = math.prod(fi.shape[1:])
                shared = (k,) + fi.shape[1:]
                codec, params = c.choose(name, shared)
                check = codec == "dense" and params.get("dtype", "f32") == "f32"
                delta, exact = c.delta_of(name, src, k * inner, check)
                if delta is not None and check and not exact:
                    spec["op"] = "new"
                    writer.add(name, c.raw(name))
                    continue
                if delta is None:
                    delta = np.zeros(k * inner, np.float32)
                writer.add(name, c.encode(name, delta, shared))
                if fi.shape[0] > k:
                    spec["new_rows"] = name + NEW_ROWS
                    writer.add(name + NEW_ROWS, c.raw(name, start_row=k))
        for name, spec in plan.items():  # op is final now
            if spec.get("source") in (None, name):
                spec.pop("source", None)
        record = {"version": CHECKPOINT_VERSION, "tensors": plan,
                  "removed": [n for n in base.tensors if n not in ft.tensors],
                  "ft_bytes": sum(i.nbytes for i in ft.tensors.values()),
                  "files": _keep_files(ft) if keep_files else {}}
        meta = dict(metadata or {})
        meta["checkpoint"] = record
        return writer, meta, _fingerprint(base, c.crcs)
    except BaseException:
        writer.abort()
        raise


# ----------------------------------------------------------------------------- rebuild

def checkpoint_record(delta) -> dict:
    """The fine-tune layout stored in a delta file made by compress()."""
    d = _as_delta(delta)
    rec = d.metadata.get("checkpoint") if isinstance(d.metadata, dict) else None
    if not isinstance(rec, dict) or not isinstance(rec.get("tensors"), dict):
        raise _api.FormatError(f"{d.path}: not a checkpoint delta (no metadata['checkpoint'] record; "
                               "it was not made by `deltapack compress`)")
    if rec.get("version") != CHECKPOINT_VERSION:
        raise _api.FormatError(f"{d.path}: checkpoint record version {rec.get('version')!r} is not supported")
    return rec


class _Rebuilder:
    """Rebuilds fine-tune tensors one at a time from a base checkpoint and a delta file (the C++ core's
    CheckpointDelta: record and base checked on open, each base tensor's CRC-32C as it is read)."""

    def __init__(self, base, delta, alpha=1.0, force=False, threads=None):
        self.base, self.delta = _as_checkpoint(base), _as_delta(delta)
        self.record = checkpoint_record(self.delta)
        self.alpha, self.force, self.threads = float(alpha), force, threads
        self._c = _core.CheckpointDelta(self.base.path, self.delta.path, force)

    def specs(self):
        return self.record["tensors"]

    def out_float(self, name, dtype=None):
        spec = self.specs()[name]
        native = _ST_DTYPES[spec["dtype"]][0]
        return native if (dtype is None or native is None) else dtype

    def rebuild(self, name, dtype=None, out=None) -> np.ndarray:
        """Tensor `name` of the fine-tune as a numpy array (bf16 as uint16), in `dtype` (default: its own).

        `out` (optional): a C-contiguous numpy array of the right shape and dtype to fill."""
        spec = self.specs()[name]
        shape = tuple(spec["shape"])
        st = _FLOAT_ST.get(self.out_float(name, dtype), spec["dtype"])
        np_dst = np.dtype(_ST_DTYPES[st][1])
        if out is not None and (tuple(out.shape) != shape or out.dtype != np_dst):
            raise ValueError(f"tensor '{name}': destination is {out.dtype} {list(out.shape)}, "
                             f"need {np_dst} {list(shape)}")
        res = out if out is not None else np.empty(shape, np_dst)
        self._c.rebuild(name, res, st, self.alpha, 0 if self.threads is None else int(self.threads))
        return res


def apply_checkpoint(base, delta, out, alpha: float = 1.0, dtype: str | None = None, *, force: bool = False,
                     overwrite: bool = False, threads: int | None = None, quiet: bool = True,
                     fsync: bool = True) -> dict:
    """Rebuild the fine-tune as a Hugging Face directory `out` (sharded like the base, with the kept
    config/tokenizer files), or as one .safetensors file when `base` is a file. Written atomically.

    alpha: base + alpha*delta (1 = the fine-tune; the paper's extrapolation > 1, interpolation < 1);
    added tensors and new rows are written as stored. dtype: 'bf16' | 'f16' | 'f32' (default: the fine-tune's).
    fsync=False skips flushing to disk before the rename: still atomic if the process is killed, not
    if the machine loses power; faster on slow disks.
    """
    if dtype not in (None, "bf16", "f16", "f32"):
        raise ValueError(f"dtype {dtype!r}: use bf16, f16 or f32")
    base_path = base.path if isinstance(base, Checkpoint) else os.fspath(base)
    delta_path = delta.path if isinstance(delta, _api.DeltaFile) else os.fspath(delta)
    specs = checkpoint_record(_as_delta(delta))["tensors"]
    total = sum(math.prod(s["shape"]) * _ST_DTYPES[_FLOAT_ST.get(dtype, s["dtype"]) if _ST_DTYPES[s["dtype"]][0]
                                                   else s["dtype"]][2] for s in specs.values())
    bar = _progress(total, "apply", quiet)
    try:  # the C++ core: the same code as deltapack-apply, so both write the same bytes
        path, n, size = _core.apply_checkpoint(base_path, delta_path, os.fspath(out), alpha, dtype or "", force,
                                               overwrite, fsync, 0 if threads is None else int(threads), bar.update)
    finally:
        bar.close()
    return {"out": path, "tensors": n, "bytes": size}


def _to_torch(arr, float_name):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16) if float_name == "bf16" else t


def load(base, delta, alpha: float = 1.0, dtype: str | None = None, force: bool = False,
         threads: int | None = None) -> dict:
    """The fine-tune's state dict (torch tensors), rebuilt from `base` (dir or file) and a delta file."""
    rb = _Rebuilder(base, delta, alpha, force, threads)
    out = {}
    for name in rb.specs():
        arr = rb.rebuild(name, dtype)
        out[name] = _to_torch(arr, rb.out_float(name, dtype))
    return out


def _numpy_view(t):
    """A numpy view of a CPU torch tensor's memory (bf16 as uint16 bits) and its float name."""
    import torch

    names = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
    if t.dtype not in names:
        return None, None
    data = t.detach()
    if data.device.type != "cpu" or not data.is_contiguous():
        raise ValueError("load_into needs CPU, contiguous parameters")
    if t.dtype == torch.bfloat16:
        return data.view(torch.int16).numpy().view(np.uint16), "bf16"
    return data.numpy(), names[t.dtype]


def load_into(module, delta, base=None, alpha: float = 1.0, force: bool = False, strict: bool = True,
              threads: int | None = None):
    """Rebuild a torch module's parameters/buffers in place (no second copy of the model).

    base=None: the module already holds the base weights (e.g. from_pretrained(base)); each changed
    tensor gets base + alpha*delta in place, after its bytes are checked against the delta's base
    fingerprint. base=path: every tensor is read from the base checkpoint straight into the module's
    memory first (the module may then be built from the fine-tune's config with any init).
    Resized tensors must already have the fine-tune's shape (e.g. model.resize_token_embeddings(n)).
    Returns the module.
    """
    d = _as_delta(delta)
    record = checkpoint_record(d)
    targets = dict(module.named_parameters(remove_duplicate=False))
    targets.update(dict(module.named_buffers(remove_duplicate=False)))
    specs = record["tensors"]
    missing = [n for n in specs if n not in targets]
    if missing and strict:
        raise KeyError(f"load_into: the module has no tensor '{missing[0]}' (of {len(missing)} missing)")
    # Two names sharing one storage (tied embeddings) can hold only one value.
    seen = {}
    for name in specs:
        if name in targets:
            ptr = targets[name].data_ptr()
            if ptr in seen and (specs[name]["op"] != "same" or specs[seen[ptr]]["op"] != "same"):
                raise ValueError(f"load_into: the module ties '{seen[ptr]}' and '{name}', but the fine-tune "
                                 "stores them separately; build the module from the fine-tune's config")
            seen[ptr] = name
    rb = _Rebuilder(base, d, alpha, force, threads) if base is not None else None
    fp = (d.base or {}).get("tensors") or {}
    done = set()
    for name, spec in specs.items():
        if name not in targets:
            continue
        t = targets[name]
        if list(t.shape) != spec["shape"]:
            raise ValueError(f"load_into: tensor '{name}' is {list(t.shape)} in the module, the fine-tune has "
                             f"{spec['shape']}" + (" (resize the embeddings first)" if spec["op"] == "resized" else ""))
        view, fname = _numpy_view(t)
        if view is None:
            if spec["op"] != "same":
                raise ValueError(f"load_into: tensor '{name}' is {t.dtype}; only float tensors can change")
            continue
        if t.data_ptr() in done:
            continue
        done.add(t.data_ptr())
        if rb is not None:
            rb.rebuild(name, fname, out=view)
            continue
        op, src = spec["op"], spec.get("source", name)
        if op == "same":
            continue
        if (op == "delta" and not force and src == name and "crc32c" in fp.get(src, {})
                and _FLOAT_ST[fname] == fp[src]["dtype"] and _crc32c(view) != int(fp[src]["crc32c"], 16)):
            raise BaseMismatchError(f"load_into: the module's '{name}' is not the delta's base tensor "
                                    "(CRC-32 differs; pass force=True to apply anyway)")
        if op == "delta":
            if src != name:
                raise ValueError(f"load_into: '{name}' is rebuilt from base tensor '{src}'; pass base=...")
            _api.apply(view, d[name], alpha=alpha, out=view, threads=threads)
        elif op == "new":
            view[...] = _round_to(_api.decode(d[name], threads=threads), fname).reshape(view.shape)
        elif op == "resized":
            enc = d[name]
            k = enc.shape[0]
            _api.apply(view[:k], enc, alpha=alpha, out=view[:k], threads=threads)
            if view.shape[0] > k:
                view[k:] = _round_to(_api.decode(d[spec["new_rows"]], threads=threads), fname).reshape(view[k:].shape)
    return module


# ----------------------------------------------------------------------------- verify / info

def verify(base, ft, delta, force: bool = False, threads: int | None = None, quiet: bool = True) -> list[dict]:
    """Rebuild every fine-tune tensor and compare with the real one: per tensor rel_error =
    |rebuilt - ft| / |ft|, cosine(rebuilt, ft), and the same for the deltas (rebuilt - base vs ft - base)."""
    rb = _Rebuilder(base, delta, 1.0, force, threads)
    ftc = _as_checkpoint(ft)
    specs = rb.specs()
    for name in ftc.tensors:
        if name not in specs:
            raise ValueError(f"{ftc.path}: tensor '{name}' is not in the delta's fine-tune layout")
    rows = []
    bar = _progress(sum(ftc[n].nbytes for n in specs if n in ftc), "verify", quiet)
    try:
        for name, spec in specs.items():
            if name not in ftc:
                raise ValueError(f"{ftc.path}: the fine-tune has no tensor '{name}', which the delta rebuilds")
            fi = ftc[name]
            if list(fi.shape) != spec["shape"]:
                raise ValueError(f"{ftc.path}: tensor '{name}' is {list(fi.shape)}, the delta rebuilds {spec['shape']}")
            got = rb.rebuild(name)
            want = ftc.read(name).reshape(fi.shape)
            if fi.float_name is None:
                same = np.array_equal(got.view(np.uint8), want.view(np.uint8))
                rows.append({"name": name, "op": spec["op"], "rel_error": 0.0 if same else 1.0,
                             "cosine": 1.0 if same else 0.0, "delta_rel_error": 0.0, "delta_cosine": 1.0,
                             "exact": same})
                continue
            g = reference.widen(got, fi.float_name).astype(np.float64).reshape(-1)
            w = reference.widen(want, fi.float_name).astype(np.float64).reshape(-1)
            src = spec.get("source", name)
            b = np.zeros_like(w)
            if spec["op"] != "new" and src in rb.base:
                bv = reference.widen(rb.base.read(src), rb.base[src].float_name).astype(np.float64)
                n = min(bv.size, w.size)
                b[:n] = bv[:n]
            rows.append({"name": name, "op": spec["op"], **_errors(g, w, b),
                         "exact": bool(np.array_equal(got.view(np.uint8), want.view(np.uint8)))})
            bar.update(fi.nbytes)
    finally:
        bar.close()
    return rows


def _errors(g, w, b):
    def cos(x, y):
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        if nx == 0 and ny == 0:
            return 1.0
        return float(x @ y / (nx * ny)) if nx and ny else 0.0

    nw, dt = np.linalg.norm(w), np.linalg.norm(w - b)
    err = np.linalg.norm(g - w)
    return {"rel_error": float(err / nw) if nw else float(err), "cosine": cos(g, w),
            "delta_rel_error": float(err / dt) if dt else float(err), "delta_cosine": cos(g - b, w - b)}


def describe(delta) -> dict:
    """A summary of a checkpoint delta: tensors by op, added/removed/resized, tied sources, kept files."""
    d = _as_delta(delta)
    rec = checkpoint_record(d)
    specs = rec["tensors"]
    by = lambda op: [n for n, s in specs.items() if s["op"] == op]  # noqa: E731
    return {"ft_bytes": rec.get("ft_bytes"), "ratio": (rec.get("ft_bytes") or 0) / max(d.nbytes, 1),
            "tensors": len(specs), "unchanged": len(by("same")), "delta": len(by("delta")),
            "added_or_replaced": by("new"), "removed": rec.get("removed", []),
            "resized": {n: {"base_shape": specs[n]["base_shape"], "shape": specs[n]["shape"]} for n in by("resized")},
            "sources": {n: s["source"] for n, s in specs.items() if "source" in s},
            "files": sorted(rec.get("files") or {})}


def _install_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so temporary files and directories are cleaned up."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass
