"""Encoding and writing: the Compressor reads base and fine-tune tensors (the C++ core subtracts, checksums
and, for every codec but lowrank, encodes while reading) and write_deltas streams the encodings of a plan into a
DeltaWriter with the checkpoint record (docs/checkpoints.md)."""
from __future__ import annotations

import json
import math
import os

import numpy as np

from .. import _core, files, recipes, tensors
from ..modeldir import CHECKPOINT_VERSION, NEW_ROWS, crc32c
from ..reference import as_matrix
from .plan import fingerprint, keep_files_record

_CHUNK = 16 << 20  # elements per streaming chunk (64 MiB of f32)


def dense_enc(values: np.ndarray, float_name: str) -> tensors.Encoded:
    """An in-memory dense encoding that holds `values` as they are (no copy)."""
    return tensors.Encoded("dense", {"dtype": float_name}, tuple(values.shape), float_name, {"values": values})


class Compressor:
    """Reads base and fine-tune tensors and encodes deltas. choose(name, shape) -> (codec, params), or None
    for a delta not stored; weights(name, matrix) -> the lowrank encoder's error weights, or None;
    factors(name) -> the delta's SVD (u, s, v) under those weights when it is known, else None."""

    def __init__(self, base, ft, choose, threads, bar, weights=None, factors=None):
        self.base, self.ft, self.choose, self.weights, self.factors = base, ft, choose, weights, factors
        self.threads, self.bar = threads, bar
        self.crcs = {}
        self._scratch = np.empty(0, np.float32)
        self._chunks = [np.empty(0, np.uint8), np.empty(0, np.uint8)]  # read buffers, reused like _scratch

    def _chunk(self, i, n, dtype):
        """Read buffer i as n elements of dtype (grown when too small, else reused: no page faults per tensor)."""
        nbytes = n * np.dtype(dtype).itemsize
        if self._chunks[i].size < nbytes:
            self._chunks[i] = None
            self._chunks[i] = np.empty(nbytes, np.uint8)
        return self._chunks[i][:nbytes].view(dtype)

    def _base_crc(self, name, crc):
        self.crcs.setdefault(name, crc)

    def delta_of(self, name, src, n, check_exact):
        """Delta of the first n elements of ft[name] vs base[src]; None when identical.
        Returns (delta f32 flat, exact) where exact says base + delta rounds back to ft exactly.
        The C++ core reads both tensors in blocks on all threads, checksums the base and subtracts in one pass."""
        fi, bi = self.ft[name], self.base[src]
        if self._scratch.size < n:  # one buffer reused for every tensor: no page faults per tensor
            self._scratch = None
            self._scratch = np.empty(n, np.float32)
        delta = self._scratch[:n]
        crc, identical = _core.read_delta(self.ft.model_files, name, self.base.model_files, src, delta,
                                          0 if self.threads is None else int(self.threads))
        self._base_crc(src, crc)
        self.bar.update(bi.nbytes + n * fi.np_dtype.itemsize)
        exact = True
        if check_exact and not identical:
            bbuf, fbuf = (self._chunk(i, min(n, _CHUNK), t.np_dtype) for i, t in enumerate((bi, fi)))
            for s in range(0, n, _CHUNK):
                e = min(n, s + _CHUNK)
                b, f = self.base.read(src, bbuf[:e - s], s, e), self.ft.read(name, fbuf[:e - s], s, e)
                back = np.empty(e - s, fi.np_dtype)
                tensors.apply(b, dense_enc(delta[s:e], "f32"), out=back, threads=self.threads)
                if not np.array_equal(back.view(np.uint8), f.view(np.uint8)):
                    exact = False
                    break
        return (None if identical else delta), exact

    def streams(self, choice) -> bool:
        """Whether encode_streamed can encode this (codec, params): every codec the C++ core encodes
        (lowrank's SVD runs in numpy on the whole delta)."""
        return recipes.parse(choice[0])[0] != "lowrank"

    def encode_streamed(self, name, src, shape):
        """The recipe's encoding of ft[name] - base[src] over `shape` (its first shape[0] rows), the same as
        encode(delta_of(...)) gives, but each row is formed from the files when the codec reads it: the f32
        delta of a large tensor is never held. None when those rows are identical."""
        codec, params = self.choose(name, shape)
        kind, rparams = recipes.parse(codec)
        rparams.update(params)
        fi, bi = self.ft[name], self.base[src]
        try:
            canon, comps, crc, identical = _core.encode_delta(
                kind, json.dumps(rparams), self.ft.model_files, name, self.base.model_files, src, list(shape),
                0 if self.threads is None else int(self.threads))
        except _core.FormatError:  # a damaged file: its message names it
            raise
        except ValueError as ex:  # the codec refused the delta
            raise ValueError(f"tensor '{name}' {list(shape)}: {codec}: {ex}") from None
        self._base_crc(src, crc)
        self.bar.update(bi.nbytes + math.prod(shape) * fi.np_dtype.itemsize)
        return None if identical else tensors.Encoded(kind, json.loads(canon), tuple(shape), "f32", dict(comps))

    def encode(self, name, values_f32, shape):
        codec, params = self.choose(name, shape)
        matrix = values_f32.reshape(shape)
        quantized_lowrank = codec == "lowrank" and "bits" in recipe_params(codec, params)
        weights = self.weights(name, as_matrix(matrix)) if self.weights and quantized_lowrank else None
        factors = self.factors(name) if self.factors and quantized_lowrank else None
        try:
            return tensors.encode(matrix, codec, threads=self.threads, weights=weights, factors=factors, **params)
        except ValueError as ex:
            raise ValueError(f"tensor '{name}' {list(shape)}: {codec}: {ex}") from None

    def raw(self, name, start_row=0):
        """Fine-tune rows [start_row:] stored exactly (dense in the fine-tune's own dtype)."""
        fi = self.ft[name]
        shape = (fi.shape[0] - start_row,) + fi.shape[1:] if start_row else fi.shape
        vals = self.ft.read(name, start=start_row * math.prod(fi.shape[1:])).reshape(shape)
        self.bar.update(vals.nbytes)
        try:
            return tensors.encode(vals, "dense", dtype=fi.float_name)
        except ValueError as ex:
            raise ValueError(f"{self.ft.path}: tensor '{name}': {ex}") from None


def recipe_params(codec, params) -> dict:
    return json.loads(_core.canonical_params(codec, json.dumps(params)))


def summarize(out, size, record, writer) -> dict:
    ops = [s["op"] for s in record["tensors"].values()]
    return {"file": os.fspath(out), "file_bytes": size, "ft_bytes": record["ft_bytes"],
            "ratio": record["ft_bytes"] / max(size, 1), "stored": len(writer),
            **{op: ops.count(op) for op in ("same", "delta", "new", "resized")}, "removed": len(record["removed"])}


def write_deltas(c: Compressor, plan: dict, out, metadata, keep_files, overwrite=False):
    """Encode every tensor of `plan` into a DeltaWriter for `out`; returns (writer, manifest metadata, base
    fingerprint) with the writer not yet closed (the caller closes or aborts it; with overwrite it may replace
    an existing file). `plan` is not modified."""
    base, ft = c.base, c.ft
    plan = {n: dict(s) for n, s in plan.items()}
    # every tensor added is encoded here, into arrays of its own that nothing changes afterwards
    writer = files.DeltaWriter(out, overwrite=overwrite, handed_over=True)
    try:
        for name, spec in plan.items():
            fi = ft[name]
            src = spec.get("source", name)
            if spec["op"] == "same":  # a non-float tensor: must be byte-identical
                a, b = ft.read(name), base.read(src)
                if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                    raise ValueError(f"{ft.path}: tensor '{name}' ({fi.dtype}) differs from the base; "
                                     "deltapack stores only f32/f16/bf16 changes")
                c._base_crc(src, crc32c(b))
                c.bar.update(a.nbytes + b.nbytes)
            elif spec["op"] == "new":
                writer.add(name, c.raw(name))
            elif spec["op"] == "delta":
                choice = c.choose(name, fi.shape)
                check = choice is not None and choice[0] == "dense" and choice[1].get("dtype", "f32") == "f32"
                if choice is not None and not check and c.streams(choice):
                    enc = c.encode_streamed(name, src, fi.shape)
                    if enc is None:
                        spec["op"] = "same"
                    else:
                        writer.add(name, enc)
                    continue
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
                  "files": keep_files_record(ft, base, writer)[0] if keep_files else {}}
        meta = dict(metadata or {})
        meta["checkpoint"] = record
        return writer, meta, fingerprint(base, c.crcs)
    except BaseException:
        writer.abort()
        raise
