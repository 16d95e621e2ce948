"""What compress stores for each tensor, decided before any encoding: how the fine-tune's tensors relate to
the base's (plan_tensors), whether the pair is a fine-tune of this base at all (check_related), which tensors a
recipe or budget may encode lossily, the kept non-weight files and the base's fingerprint."""
from __future__ import annotations

import hashlib
import math
import os
import sys

import numpy as np

from .. import _core, hub
from ..modeldir import BaseMismatchError, Checkpoint, as_checkpoint, widen_into
from ..recipes import Rules


def plan_tensors(base: Checkpoint, ft: Checkpoint) -> dict:
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
    base, ft = as_checkpoint(base), as_checkpoint(ft)
    why = f"{ft.path} does not look like a fine-tune of {base.path}"
    hint = " (use --force / force=True to go on anyway)"
    if base.config and ft.config:
        for key in _CONFIG_IDENTITY:
            if key in base.config and key in ft.config and base.config[key] != ft.config[key]:
                raise BaseMismatchError(f"{why}: config.json {key} is {ft.config[key]!r}, the base's is "
                                        f"{base.config[key]!r}{hint}")
    plan = plan or plan_tensors(base, ft)
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
        widen_into(braw, bi.float_name, w)
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


def choose_codec(rules: Rules, name: str, shape, min_size: int):
    """Codec for a tensor's delta: the recipe for 2-D+ tensors of at least min_size elements, else dense f32."""
    if lossy(shape, min_size):
        found = rules.recipe_for(name)
        if found is not None:
            return found
    return "dense", {"dtype": "f32"}


def lossy(shape, min_size: int) -> bool:
    """Tensors a recipe or budget may encode lossily: 2-D and larger, at least min_size elements."""
    return len(shape) >= 2 and math.prod(shape) >= min_size


def keep_files_record(ft: Checkpoint, base: Checkpoint, writer=None) -> tuple[dict, int]:
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


def fingerprint(base: Checkpoint, crcs: dict) -> dict:
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


def total_bytes(base, ft, plan) -> int:
    return sum(ft[n].nbytes + (base[s.get("source", n)].nbytes if s["op"] in ("delta", "resized") else 0)
               for n, s in plan.items())
