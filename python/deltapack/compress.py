"""Compress a fine-tuned Hugging Face checkpoint into a delta file against its base, one tensor at a
time (deltapack.checkpoint rebuilds it).

    summary = compress("base_dir", "ft_dir", "ft.dpk", recipe="*.mlp.*=lowrank:rank=64;*=sign")

Memory: tensors are read with pread() in chunks (peak memory follows the largest tensor, not the
model), and the delta file is written by the C++ core's streaming DeltaWriter. How the fine-tune is
recorded (metadata["checkpoint"], the base fingerprint): see deltapack.checkpoint and docs/checkpoints.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import numpy as np

from . import _core, files, hub, recipes, reference, tensors
from .models import (CHECKPOINT_VERSION, NEW_ROWS, BaseMismatchError, Checkpoint, _as_checkpoint, _crc32c,
                     _progress, _widen_into)
from .recipes import Rules

_CHUNK = 16 << 20  # elements per streaming chunk (64 MiB of f32)



def _dense_enc(values: np.ndarray, float_name: str) -> tensors.Encoded:
    """An in-memory dense encoding that holds `values` as they are (no copy)."""
    return tensors.Encoded("dense", {"dtype": float_name}, tuple(values.shape), float_name, {"values": values})


def _keep_files(ft: Checkpoint, base: Checkpoint, writer=None) -> tuple[dict, int]:
    """The fine-tune's non-weight files (config, tokenizer, generation config ...) for the checkpoint record, and
    how many bytes of them the delta stores: the C++ core's read_kept_files (the rule apply checks them by; links
    only inside the directory unless ft was opened with follow_links). A file equal to the base's of the same name
    is named by its SHA-256 and taken from BASE at apply (a tokenizer is megabytes, and most fine-tunes keep their
    base's); any other is stored as bytes after the tensors (writer.add_file; without a writer, only placed, to
    size the file) and named by its place and SHA-256."""
    files, stored = {}, 0
    if not ft.dir:
        return files, stored
    kept, skipped = _core.read_kept_files(ft.dir, ft.follow_links)
    for name, why in skipped:
        print(f"deltapack: not keeping {os.path.join(ft.dir, name)} ({why})", file=sys.stderr)
    base_files = dict(_core.read_kept_files(base.dir, base.follow_links)[0]) if base.dir else {}
    for name, data in kept:
        files[name] = {"sha256": hashlib.sha256(data).hexdigest()}
        if base_files.get(name) != data:
            files[name]["bytes"] = writer.add_file(data) if writer else [stored, stored + len(data)]
            stored += len(data)
    return files, stored


def _fingerprint(base: Checkpoint, crcs: dict) -> dict:
    tensors = {}
    for name, info in base.tensors.items():
        entry = {"dtype": info.dtype, "shape": list(info.shape)}
        if name in crcs:
            entry["crc32c"] = f"{crcs[name]:08x}"
        tensors[name] = entry
    fp = {"fingerprint": "crc32c", "tensors": tensors,
          "config": {k: base.config[k] for k in ("model_type", "_name_or_path") if k in base.config}
          if base.config else None}
    if (snap := hub.snapshot_of(base.path)) is not None:  # a Hugging Face cache snapshot: apply can find it again
        fp["hub"] = snap
    return fp


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
        _core.delta_f32(fraw, braw, d)
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
        crc, identical = _core.read_delta(self.ft._files, name, self.base._files, src, delta,
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
                tensors.apply(b, _dense_enc(delta[s:e], "f32"), out=back, threads=self.threads)
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
                kind, json.dumps(rparams), self.ft._files, name, self.base._files, src, list(shape),
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
        weights = self.weights(name, reference.as_matrix(matrix)) if self.weights and codec == "lowrank" \
            and "bits" in _recipe_params(codec, params) else None
        try:
            return tensors.encode(matrix, codec, threads=self.threads, weights=weights, **params)
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


def _recipe_params(codec, params) -> dict:
    return json.loads(_core.canonical_params(codec, json.dumps(params)))


def compress(base, ft, out, recipe: str = "sign", *, budget: float | None = None, data=None, proxy=None,
             min_size: int | None = None, metadata: dict | None = None, threads: int | None = None, quiet: bool = True,
             keep_files: bool = True, force: bool = False, overwrite: bool = False, follow_links: bool = False) -> dict:
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
    overwrite: replace an existing delta file at `out` (only a deltapack file; never BASE or FT or a file in them).
    follow_links: read BASE's and FT's files through symbolic links wherever they point.
    Returns a summary dict (counts, bytes, ratio; with a budget also the choice and the proxy's prediction).
    """
    # BLAS (the SVDs of lowrank and of the budget's candidates) and torch (calibration) get `threads` too
    with tensors.bounded_threads(threads):
        base, ft = _as_checkpoint(base, follow_links), _as_checkpoint(ft, follow_links)
        # User metadata under a name deltapack reads ("budget", ...) must have its type (FORMAT.md §7): said now,
        # not by the writer after all the work.
        _core.check_manifest_fields(json.dumps({"metadata": metadata or {}}, allow_nan=False), os.fspath(out))
        _core.check_output(os.fspath(out), _core.OutputKind.DELTA_FILE, [base.path, ft.path], overwrite)
        plan = _plan(base, ft)
        if not force:
            check_related(base, ft, plan)
        if budget is not None:
            from .compress_budget import compress_to_budget
            return compress_to_budget(base, ft, out, plan, budget, data=data, proxy=proxy, min_size=min_size or 1,
                                      metadata=metadata, threads=threads, quiet=quiet, keep_files=keep_files,
                                      overwrite=overwrite)
        if data is not None:
            raise ValueError("data (calibration examples) is used with a budget; for a recipe use "
                             "`deltapack calibrate`")
        rules = Rules(recipe)
        min_size = 4096 if min_size is None else min_size
        bar = _progress(_total_bytes(base, ft, plan), "compress", quiet)
        try:
            c = _Compressor(base, ft, lambda name, shape: _choose(rules, name, shape, min_size), threads, bar)
            writer, meta, fp = _write_deltas(c, plan, out, metadata, keep_files, overwrite)
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


def _write_deltas(c: _Compressor, plan: dict, out, metadata, keep_files, overwrite=False):
    """Encode every tensor of `plan` into a DeltaWriter for `out`; returns (writer, manifest metadata, base
    fingerprint) with the writer not yet closed (the caller closes or aborts it; with overwrite it may replace
    an existing file). `plan` is not modified."""
    base, ft = c.base, c.ft
    plan = {n: dict(s) for n, s in plan.items()}
    writer = files.DeltaWriter(out, overwrite=overwrite)
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
                  "files": _keep_files(ft, base, writer)[0] if keep_files else {}}
        meta = dict(metadata or {})
        meta["checkpoint"] = record
        return writer, meta, _fingerprint(base, c.crcs)
    except BaseException:
        writer.abort()
        raise
