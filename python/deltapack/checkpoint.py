"""Rebuild fine-tuned Hugging Face checkpoints from their base and a delta file that
deltapack.compress made (the C++ core's CheckpointDelta does the work), and the checkpoint API in one
place: compress, check_related and Checkpoint come from deltapack.compress and deltapack.modeldir.

    summary = compress("base_dir", "ft_dir", "ft.dpk", recipe="*.mlp.*=lowrank:rank=64;*=sign")
    apply_checkpoint("base_dir", "ft.dpk", "out_dir", alpha=1.0, dtype=None)   # a loadable HF dir
    sd = load("base_dir", "ft.dpk")                  # state dict of torch tensors
    load_into(model, "ft.dpk", base="base_dir")      # rebuild a torch module's parameters in place

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

import math
import os
import signal

import numpy as np

from . import _core, files, reference, tensors
from .compress import check_related, compress
from .modeldir import (FLOAT_ST, ST_DTYPES, BaseMismatchError, Checkpoint, as_checkpoint, as_delta, checkpoint_record,
                       crc32c, progress_bar, round_to)

__all__ = ["compress", "check_related", "apply_checkpoint", "load", "load_into", "verify", "describe",
           "checkpoint_record", "Checkpoint", "BaseMismatchError"]


def _out_st(spec, dtype):
    """The safetensors dtype a fine-tune tensor is rebuilt in: `dtype` (f32/f16/bf16) for a float tensor
    when given, else its own."""
    return FLOAT_ST[dtype] if dtype and ST_DTYPES[spec["dtype"]][0] else spec["dtype"]


class Rebuilder:
    """Rebuilds fine-tune tensors one at a time from a base checkpoint and a delta file (the C++ core's
    CheckpointDelta: record and base checked on open, each base tensor's CRC-32C as it is read)."""

    def __init__(self, base, delta, alpha=1.0, force=False, threads=None, follow_links=False, rounding="auto"):
        self.base, self.delta = as_checkpoint(base, follow_links), as_delta(delta)
        self.record = checkpoint_record(self.delta)
        self.alpha, self.force, self.threads = float(alpha), force, threads
        self.rounding = tensors.check_rounding(rounding)
        self._c = _core.CheckpointDelta(self.base.path, self.delta.path, force, self.base.follow_links)

    def specs(self):
        return self.record["tensors"]

    def out_float(self, name, dtype=None):
        return ST_DTYPES[_out_st(self.specs()[name], dtype)][0]

    def rebuild(self, name, dtype=None, out=None) -> np.ndarray:
        """Tensor `name` of the fine-tune as a numpy array (bf16 as uint16), in `dtype` (default: its own).

        `out` (optional): a C-contiguous numpy array of the right shape and dtype to fill."""
        spec = self.specs()[name]
        shape = tuple(spec["shape"])
        st = _out_st(spec, dtype)
        np_dst = np.dtype(ST_DTYPES[st][1])
        if out is not None and (tuple(out.shape) != shape or out.dtype != np_dst):
            raise ValueError(f"tensor '{name}': destination is {out.dtype} {list(out.shape)}, "
                             f"need {np_dst} {list(shape)}")
        res = out if out is not None else np.empty(shape, np_dst)
        self._c.rebuild(name, res, st, self.alpha, 0 if self.threads is None else int(self.threads), self.rounding)
        return res


def apply_checkpoint(base, delta, out, alpha: float = 1.0, dtype: str | None = None, *, force: bool = False,
                     overwrite: bool = False, threads: int | None = None, quiet: bool = True,
                     fsync: bool = True, follow_links: bool = False, rounding: str = "auto") -> dict:
    """Rebuild the fine-tune as a Hugging Face directory `out` (sharded like the base, with the kept
    config/tokenizer files), or as one .safetensors file when `base` is a file. Written atomically.

    alpha: base + alpha*delta (1 = the fine-tune; the paper's extrapolation > 1, interpolation < 1);
    added tensors and new rows are written as stored. dtype: 'bf16' | 'f16' | 'f32' (default: the fine-tune's).
    fsync=False skips flushing to disk before the rename: still atomic if the process is killed, not
    if the machine loses power; faster on slow disks.
    overwrite: replace an existing `out`, only if it is an earlier output (a model directory, or a safetensors
    file for a file base); never BASE, the delta or a directory holding them. follow_links: read BASE's files
    through symbolic links wherever they point (by default only inside it or into a Hugging Face cache).
    rounding: of tensors rebuilt into bf16/f16: "auto" (dithered where the delta is lossy, nearest where it is
    exact), "nearest" or "dithered" (docs/FORMAT.md §3).
    """
    tensors.check_rounding(rounding)
    if dtype not in (None, "bf16", "f16", "f32"):
        raise ValueError(f"dtype {dtype!r}: use bf16, f16 or f32")
    base_path = base.path if isinstance(base, Checkpoint) else os.fspath(base)
    delta_path = delta.path if isinstance(delta, files.DeltaFile) else os.fspath(delta)
    specs = checkpoint_record(as_delta(delta))["tensors"]
    total = sum(math.prod(s["shape"]) * ST_DTYPES[_out_st(s, dtype)][2] for s in specs.values())
    bar = progress_bar(total, "apply", quiet)
    try:  # the C++ core: the same code as deltapack-apply, so both write the same bytes
        path, n, size = _core.apply_checkpoint(base_path, delta_path, os.fspath(out), alpha, dtype or "", force,
                                               overwrite, fsync, 0 if threads is None else int(threads), bar.update,
                                               follow_links, rounding)
    finally:
        bar.close()
    return {"out": path, "tensors": n, "bytes": size}


def _to_torch(arr, float_name):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16) if float_name == "bf16" else t


def load(base, delta, alpha: float = 1.0, dtype: str | None = None, force: bool = False,
         threads: int | None = None, rounding: str = "auto") -> dict:
    """The fine-tune's state dict (torch tensors), rebuilt from `base` (dir or file) and a delta file, exactly
    as apply_checkpoint writes it (rounding: as there)."""
    rb = Rebuilder(base, delta, alpha, force, threads, rounding=rounding)
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
    d = as_delta(delta)
    record = checkpoint_record(d)
    if base is None:  # the record checked against the delta file (stored shapes, bounds) before anything is read
        _core.CheckpointDelta(None, d.path, force)
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
    rb = Rebuilder(base, d, alpha, force, threads) if base is not None else None
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
                and FLOAT_ST[fname] == fp[src]["dtype"] and crc32c(view) != int(fp[src]["crc32c"], 16)):
            raise BaseMismatchError(f"load_into: the module's '{name}' is not the delta's base tensor "
                                    "(CRC-32 differs; pass force=True to apply anyway)")
        if op == "delta":
            if src != name:
                raise ValueError(f"load_into: '{name}' is rebuilt from base tensor '{src}'; pass base=...")
            tensors.apply(view, d[name], alpha=alpha, out=view, threads=threads)
        elif op == "new":
            view[...] = round_to(tensors.decode(d[name], threads=threads), fname).reshape(view.shape)
        elif op == "resized":
            enc = d[name]
            k = enc.shape[0]
            tensors.apply(view[:k], enc, alpha=alpha, out=view[:k], threads=threads)
            if view.shape[0] > k:
                view[k:] = round_to(tensors.decode(d[spec["new_rows"]], threads=threads), fname).reshape(view[k:].shape)
    return module


def verify(base, ft, delta, force: bool = False, threads: int | None = None, quiet: bool = True,
           follow_links: bool = False) -> list[dict]:
    """Rebuild every fine-tune tensor and compare with the real one: per tensor rel_error =
    |rebuilt - ft| / |ft|, cosine(rebuilt, ft), and the same for the deltas (rebuilt - base vs ft - base)."""
    rb = Rebuilder(base, delta, 1.0, force, threads, follow_links)
    ftc = as_checkpoint(ft, follow_links)
    specs = rb.specs()
    for name in ftc.tensors:
        if name not in specs:
            raise ValueError(f"{ftc.path}: tensor '{name}' is not in the delta's fine-tune layout")
    rows = []
    bar = progress_bar(sum(ftc[n].nbytes for n in specs if n in ftc), "verify", quiet)
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
    d = as_delta(delta)
    rec = checkpoint_record(d)
    specs = rec["tensors"]
    by = lambda op: [n for n, s in specs.items() if s["op"] == op]  # noqa: E731
    return {"ft_bytes": rec.get("ft_bytes"), "ratio": (rec.get("ft_bytes") or 0) / max(d.nbytes, 1),
            "tensors": len(specs), "unchanged": len(by("same")), "delta": len(by("delta")),
            "added_or_replaced": by("new"), "removed": rec.get("removed", []),
            "resized": {n: {"base_shape": specs[n]["base_shape"], "shape": specs[n]["shape"]} for n in by("resized")},
            "sources": {n: s["source"] for n, s in specs.items() if "source" in s},
            "files": sorted(rec.get("files") or {}),
            "files_from_base": sorted(n for n, f in (rec.get("files") or {}).items()
                                      if "bytes" not in f and "sha256" in f)}


def install_sigterm():
    """Turn SIGTERM into KeyboardInterrupt so temporary files and directories are cleaned up."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass
