"""Model weights on disk: a Hugging Face directory or one .safetensors file (`Checkpoint`, read by the
C++ core's ModelFiles), the dtype tables, and the small helpers checkpoint compression and rebuilding
share (CRC-32C, exact widening and rounding, progress bars, JSON files of model directories)."""
from __future__ import annotations

import json
import math
import os
import stat
import sys
from dataclasses import dataclass

import numpy as np

from . import _core, files, reference

CHECKPOINT_VERSION = 1

NEW_ROWS = "#new_rows"

# safetensors dtype -> (deltapack float name or None, numpy dtype used to hold the bytes, size)
ST_DTYPES = {
    "F64": (None, np.float64, 8), "F32": ("f32", np.float32, 4), "F16": ("f16", np.float16, 2),
    "BF16": ("bf16", np.uint16, 2), "I64": (None, np.int64, 8), "I32": (None, np.int32, 4),
    "I16": (None, np.int16, 2), "I8": (None, np.int8, 1), "U64": (None, np.uint64, 8),
    "U32": (None, np.uint32, 4), "U16": (None, np.uint16, 2), "U8": (None, np.uint8, 1),
    "BOOL": (None, np.bool_, 1), "F8_E4M3": (None, np.uint8, 1), "F8_E5M2": (None, np.uint8, 1),
}

FLOAT_ST = {"f32": "F32", "f16": "F16", "bf16": "BF16"}

OUTPUT_EMBEDDINGS = ("lm_head.weight",)

INPUT_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight",
                    "transformer.word_embeddings.weight", "embed_tokens.weight")

BaseMismatchError = _core.BaseMismatchError  # the base given is not the one the delta was made from (ValueError)


def _no_duplicates(where):
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise files.FormatError(f"{where}: key '{k}' is listed twice")
            seen[k] = v
        return seen
    return hook


MAX_JSON_FILE = 64 << 20  # bytes: a tokenizer.json of a large vocabulary is ~33 MB, a config far smaller


def read_json(path, object_pairs_hook=None, name=None):
    """A JSON file from a model or adapter directory (read from `path`; `name`, default `path`, in messages): a
    regular file of at most 64 MiB, UTF-8 JSON, else a FormatError naming it."""
    name = name or path
    st = os.stat(path)  # before opening: a FIFO would block open()
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_JSON_FILE:
        raise files.FormatError(f"{name}: not a regular file of at most {MAX_JSON_FILE >> 20} MiB")
    with open(path, "rb") as fh:
        try:
            return json.loads(fh.read().decode("utf-8"), object_pairs_hook=object_pairs_hook)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as ex:
            raise files.FormatError(f"{name}: not valid JSON ({ex})") from None


def read_json_object(path, name=None) -> dict:
    """read_json of a file that must hold a JSON object (config.json, adapter_config.json)."""
    value = read_json(path, name=name)
    if not isinstance(value, dict):
        raise files.FormatError(f"{name or path}: not a JSON object")
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
        return ST_DTYPES[self.dtype][0]

    @property
    def np_dtype(self):
        return np.dtype(ST_DTYPES[self.dtype][1])


class Checkpoint:
    """A model: a directory (model.safetensors, or shards + model.safetensors.index.json) or one
    .safetensors file. Lists tensors (in shard and data order) and reads them one at a time.

    follow_links: read the directory's files through symbolic links wherever they point; by default a link is
    followed only inside the directory or into a Hugging Face cache's blobs/ (deltapack.h, resolve_in_model_dir)."""

    def __init__(self, path, follow_links: bool = False):
        self.path = os.fspath(path)
        self.follow_links = follow_links
        # The C++ reader, which checks the headers, the index and config.json
        self.model_files = _core.ModelFiles.open(self.path, follow_links)
        self.dir = self.path if self.model_files.is_directory else None
        self.shards = list(self.model_files.shards)
        index_meta = json.loads(self.model_files.index_metadata)
        self.weight_map = {} if self.model_files.has_index else None
        self.index_metadata = index_meta if self.model_files.has_index else None
        self.tensors: dict[str, TensorInfo] = {}
        self.shard_of: dict[str, str] = {}
        for name, st, shape, start, nbytes, shard in self.model_files.tensors():
            self.tensors[name] = TensorInfo(name, self.model_files.shard_path(shard), st, tuple(shape), start,
                                            start + nbytes)
            self.shard_of[name] = shard
            if self.weight_map is not None:
                self.weight_map[name] = shard
        self.shard_metadata = {s: dict(self.model_files.shard_metadata(s)) for s in self.shards}
        self.config = json.loads(self.model_files.config) if self.model_files.config else None

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
        self.model_files.read(name, out, start * size)
        return out

    def read_tensor(self, name) -> np.ndarray:
        """The whole tensor as a numpy array of its shape (bf16 as uint16 bits)."""
        return self.read(name).reshape(self.tensors[name].shape)

    def tied_source(self, name):
        """For an output embedding missing here (tied to the input embedding), the input embedding's name."""
        if name not in OUTPUT_EMBEDDINGS or name in self.tensors:
            return None
        if self.config is not None and self.config.get("tie_word_embeddings") is False:
            return None
        return next((n for n in INPUT_EMBEDDINGS if n in self.tensors), None)


def crc32c(arr, crc=0) -> int:
    """CRC-32C (the container's checksum) of an array's bytes."""
    return _core.crc32c(np.ascontiguousarray(arr).reshape(-1).view(np.uint8), crc)


def as_checkpoint(x, follow_links: bool = False):
    return x if isinstance(x, Checkpoint) else Checkpoint(x, follow_links)


def as_delta(x):
    return x if isinstance(x, files.DeltaFile) else files.open(x)


def checkpoint_record(delta) -> dict:
    """The fine-tune layout stored in a delta file made by compress()."""
    d = as_delta(delta)
    rec = d.metadata.get("checkpoint") if isinstance(d.metadata, dict) else None
    if not isinstance(rec, dict) or not isinstance(rec.get("tensors"), dict):
        raise files.FormatError(f"{d.path}: not a checkpoint delta (no metadata['checkpoint'] record; "
                                "it was not made by `deltapack compress`)")
    if rec.get("version") != CHECKPOINT_VERSION:
        raise files.FormatError(f"{d.path}: checkpoint record version {rec.get('version')!r} is not supported")
    return rec


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


def progress_bar(total, desc, quiet):
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


def widen_into(x, float_name, out):
    """Exact float32 values of f32/f16/bf16 storage, into `out` (float32)."""
    if float_name == "bf16":  # bf16 bits are the high half of the f32 bits
        bits = out.view(np.uint32)
        bits[...] = x
        bits <<= 16
    else:
        out[...] = x


def round_to(values_f32, float_name):
    return reference.round_to(values_f32, float_name)
