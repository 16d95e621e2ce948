"""PEFT LoRA adapters as delta files of `lowrank` deltas (the way out is deltapack.export.peft).

    report = import_peft("base_dir", "adapter_dir", "ft.dpk")             # LoRA factors -> lowrank deltas

Each LoRA pair becomes u = scaling * B, v = A: the product PEFT adds to the weight, stored exactly.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np

from .. import _core, files, modeldir, reference, tensors
from ..compress.plan import fingerprint
from .peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FLOATS, PEFT_PREFIX


def _pattern_value(patterns: dict, module: str, default, where: str):
    """PEFT's rank/alpha pattern lookup: a key matches the module name exactly or as a dotted suffix."""
    if patterns is None:
        return default
    if not isinstance(patterns, dict):
        raise files.FormatError(f"{where}: alpha_pattern is not a JSON object")
    for key, value in patterns.items():
        try:
            if key == module or re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        except re.error as ex:
            raise files.FormatError(f"{where}: alpha_pattern key {key!r} is not a valid pattern ({ex})") from None
    return default


def import_peft(base, adapter_dir, out, dtype: str | None = None, *, overwrite: bool = False,
                follow_links: bool = False) -> dict:
    """Store a PEFT LoRA adapter (against `base`) as a delta file of `lowrank` deltas; returns a report.

    Each LoRA pair becomes u = scaling * B, v = A in the adapter's dtype (or `dtype`); saved modules and
    LoRA-layer biases become `dense` f32 deltas against the base. The adapter's config is kept in the
    file's metadata so that `export_peft` writes the same tensors back. overwrite: replace an existing
    deltapack file at `out`; follow_links: read the adapter's and BASE's files through links wherever they point."""
    adapter_dir = os.fspath(adapter_dir)
    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    w_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.lexists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no adapter config (not a PEFT adapter directory?)")
    if not os.path.lexists(w_path):
        raise FileNotFoundError(f"{w_path}: no adapter weights (only adapter_model.safetensors is read)")
    _core.check_output(os.fspath(out), _core.OutputKind.DELTA_FILE, [os.fspath(base), adapter_dir], overwrite)
    cfg = modeldir.read_json_object(_core.resolve_in_model_dir(adapter_dir, ADAPTER_CONFIG, follow_links), cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be imported")
    for key, why in (("use_dora", "DoRA rescales the merged weight; not a low-rank delta"),
                     ("fan_in_fan_out", "fan_in_fan_out (Conv1D) adapters are not supported")):
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: {key} is set: {why}")
    if dtype is not None and dtype not in FLOATS:
        raise ValueError(f"dtype must be f32, f16 or bf16 (got {dtype!r})")
    r_cfg = cfg.get("r")  # kept in the delta's metadata (FORMAT.md §7)
    if r_cfg is not None and not (isinstance(r_cfg, int) and not isinstance(r_cfg, bool) and 1 <= r_cfg <= 1 << 20):
        raise files.FormatError(f"{cfg_path}: r is {r_cfg!r}, not an integer in [1, 2^20]")
    base_ck = modeldir.Checkpoint(base, follow_links)
    ad = modeldir.Checkpoint(_core.resolve_in_model_dir(adapter_dir, ADAPTER_WEIGHTS, follow_links))
    pairs: dict[str, dict] = {}
    vectors: dict[str, str] = {}   # base tensor name -> adapter tensor name holding its new value
    ignored = []
    for key in ad.keys():
        if not key.startswith(PEFT_PREFIX):
            raise files.FormatError(f"{w_path}: tensor '{key}' does not start with '{PEFT_PREFIX}'")
        rest = key[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", rest)
        if m:
            mod, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            pairs.setdefault(mod, {})[part] = key
        elif rest.endswith(".base_layer.weight"):
            ignored.append(key)  # embedding base layers saved alongside embedding LoRAs: the base itself
        elif rest.endswith(".base_layer.bias"):
            vectors[rest.replace(".base_layer.bias", ".bias")] = key
        elif rest.endswith((".weight", ".bias")):
            vectors[rest] = key
        else:
            raise files.FormatError(f"{w_path}: tensor '{key}' is not a LoRA factor, bias or saved module")
    use_rslora = bool(cfg.get("use_rslora"))
    encs, modules, report = {}, {}, []
    for mod, parts in sorted(pairs.items()):
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        need = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        missing = [p for p in need if p not in parts]
        if missing:
            raise files.FormatError(f"{w_path}: module '{mod}' has no {missing[0]} tensor")
        a_info, b_info = ad[parts[need[0]]], ad[parts[need[1]]]
        a = reference.widen(ad.read_tensor(a_info.name), a_info.float_name)
        b = reference.widen(ad.read_tensor(b_info.name), b_info.float_name)
        name = mod + ".weight"
        if name not in base_ck:
            raise ValueError(f"{w_path}: module '{mod}' has no weight '{name}' in the base {base_ck.path}")
        shape = tuple(base_ck[name].shape)
        r = a.shape[0] if a.ndim == 2 else 0
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r or r == 0:
            raise files.FormatError(f"{w_path}: module '{mod}': factor shapes {list(a.shape)} and {list(b.shape)} "
                                    "do not form a low-rank pair")
        alpha_m = _pattern_value(cfg.get("alpha_pattern"), mod, cfg.get("lora_alpha", 8), cfg_path)
        if isinstance(alpha_m, bool) or not isinstance(alpha_m, (int, float)) or not math.isfinite(alpha_m):
            raise files.FormatError(f"{cfg_path}: the LoRA alpha of module '{mod}' is {alpha_m!r}, not a finite number")
        scaling = alpha_m / (math.sqrt(r) if use_rslora else r)
        with np.errstate(over="ignore"):
            s = np.float32(scaling)
        if not np.isfinite(s):
            raise files.FormatError(f"{cfg_path}: module '{mod}': scaling {scaling!r} does not fit in float32")
        if emb:   # delta (vocab x dim) = scaling * (B @ A).T = A.T @ (scaling * B.T)
            u, v = a.T, b.T * s
        else:     # delta (out x in) = (scaling * B) @ A
            u, v = b * s, a
        if (u.shape[0], v.shape[1]) != shape:
            raise ValueError(f"{w_path}: module '{mod}': LoRA product is {[u.shape[0], v.shape[1]]}, the base "
                             f"weight '{name}' is {list(shape)}")
        dt = dtype or (a_info.float_name if a_info.float_name == b_info.float_name else "f32")
        enc = tensors.Encoded("lowrank", {"rank": int(r), "dtype": dt}, shape, base_ck[name].float_name,
                              {"u": reference.round_to(np.ascontiguousarray(u), dt),
                               "v": reference.round_to(np.ascontiguousarray(v), dt)}, name)
        tensors.decode(enc)  # validates component shapes and dtypes
        encs[name] = enc
        modules[mod] = {"scaling": float(scaling), "alpha": alpha_m, "rank": int(r)}
        report.append({"name": name, "rank": int(r), "scaling": float(scaling), "dtype": dt})
    for name, key in sorted(vectors.items()):
        if name not in base_ck:
            raise ValueError(f"{w_path}: tensor '{key}' replaces '{name}', which is not in the base {base_ck.path}")
        info = ad[key]
        new = reference.widen(ad.read_tensor(key), info.float_name)
        if tuple(new.shape) != tuple(base_ck[name].shape):
            raise ValueError(f"{w_path}: tensor '{key}' has shape {list(new.shape)}, the base '{name}' has "
                             f"{list(base_ck[name].shape)}")
        d = new - reference.widen(base_ck.read_tensor(name), base_ck[name].float_name)
        if d.any():
            enc = tensors.encode(np.ascontiguousarray(d, np.float32), "dense", dtype="f32")
            enc.name = name
            encs[name] = enc
            report.append({"name": name, "dense": True})
    if not encs:
        raise ValueError(f"{w_path}: the adapter changes nothing")
    lora_alpha = cfg.get("lora_alpha")  # each module's alpha was checked above; this one may be unused by them
    if lora_alpha is not None and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float))
                                   or not math.isfinite(lora_alpha)):
        raise files.FormatError(f"{cfg_path}: lora_alpha is {lora_alpha!r}, not a finite number")
    peft_meta = {"r": r_cfg, "lora_alpha": lora_alpha, "use_rslora": use_rslora,
                 "modules": modules}
    record = {"version": modeldir.CHECKPOINT_VERSION,
              "tensors": {n: {"op": "delta" if n in encs else "same", "dtype": i.dtype, "shape": list(i.shape)}
                          for n, i in base_ck.tensors.items()},
              "removed": [], "ft_bytes": sum(i.nbytes for i in base_ck.tensors.values()), "files": {}}
    # The adapter's directory name only: a delta file is shared, the path on this machine is nobody's business.
    files.save(out, encs, metadata={"source": "peft", "adapter": os.path.basename(os.path.normpath(adapter_dir)),
                                    "peft": peft_meta,
                                    "checkpoint": record},
               base=fingerprint(base_ck, {}), overwrite=overwrite)
    return {"out": os.fspath(out), "tensors": report, "ignored": ignored}
