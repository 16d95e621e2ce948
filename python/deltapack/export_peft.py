"""Delta files as PEFT LoRA adapters, and PEFT LoRA adapters as `lowrank` delta files.

    report = export_peft("base_dir", "ft.dpk", "adapter_dir", rank=16)   # adapter_config.json + safetensors
    report = import_peft("base_dir", "adapter_dir", "ft.dpk")             # LoRA factors -> lowrank deltas

A LoRA module adds scaling * B @ A to a weight (B: rows x r, A: r x cols). deltapack's `lowrank`
codec stores the same product as u @ v, so a lowrank delta maps to B = u, A = v with scaling 1
(lora_alpha = r). Other codecs are first approximated at rank R by truncated SVD; the relative
error of each approximation is reported. Changed vectors (norms, biases) have no LoRA form: they
go to `modules_to_save` (norms) or to the LoRA layer's own bias (`bias="lora_only"`).

This module also holds what the GGUF adapter export shares with it: `FineTune` (a base checkpoint
plus a delta file, read one tensor at a time) and `lowrank_factors` (one LoRA pair per changed matrix).
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import _api, _core, checkpoint, reference

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_FLOATS = ("f32", "f16", "bf16")


def _is_input_embedding(name: str) -> bool:
    return name.endswith("embed_tokens.weight")


# ----------------------------------------------------------------------------- the fine-tune

class FineTune:
    """A base checkpoint (HF directory or .safetensors file) plus an optional delta file.

    Works with delta files made by `deltapack compress` (which record how every fine-tune tensor is
    rebuilt) and with plain delta files whose tensor names are base tensor names."""

    def __init__(self, base, delta=None, alpha: float = 1.0, threads: int | None = None, force: bool = False):
        self.base = checkpoint.Checkpoint(base)
        self.config = self.base.config or {}
        self.alpha, self.threads = float(alpha), threads
        self.delta = _api.open(delta) if delta is not None else None
        self.record, self._rb = None, None
        meta = self.delta.metadata if self.delta is not None else None
        if isinstance(meta, dict) and "checkpoint" in meta:
            self._rb = checkpoint._Rebuilder(self.base, self.delta, alpha, force=force, threads=threads)
            self.record = self._rb.record
        elif self.delta is not None:
            for name in self.delta.keys():
                if name not in self.base:
                    raise ValueError(f"{self.delta.path}: tensor '{name}' is not in the base {self.base.path}")
                want, got = tuple(self.base[name].shape), tuple(self.delta.get(name, verify=False).shape)
                if want != got:
                    raise ValueError(f"{self.delta.path}: tensor '{name}' has shape {list(got)}, the base "
                                     f"{self.base.path} has {list(want)}")

    @property
    def tied_embeddings(self) -> bool:
        """The output projection is the input embedding (Hugging Face then stores no lm_head tensor)."""
        return "lm_head.weight" not in self.names()

    def names(self) -> list[str]:
        return list(self.record["tensors"]) if self.record else self.base.keys()

    def shape(self, name) -> tuple:
        if self.record:
            return tuple(self.record["tensors"][name]["shape"])
        return tuple(self.base[name].shape)

    def float_name(self, name):
        """'f32' / 'f16' / 'bf16' of the fine-tune tensor, None for non-float tensors."""
        if self.record:
            return checkpoint._ST_DTYPES[self.record["tensors"][name]["dtype"]][0]
        return self.base[name].float_name

    def kind(self, name) -> tuple[str, str]:
        """('same', ''), ('delta', '') for base + alpha*delta, or ('other', why) for anything else."""
        if self.delta is None:
            return "same", ""
        if self.record:
            spec = self.record["tensors"][name]
            if spec["op"] == "same":
                return "same", ""
            if spec["op"] == "delta" and spec.get("source", name) == name:
                return "delta", ""
            why = {"new": "new or reshaped tensor", "resized": "resized tensor"}.get(spec["op"], spec["op"])
            if spec.get("source", name) != name:
                why = f"rebuilt from base tensor '{spec['source']}'"
            return "other", why
        return ("delta", "") if name in self.delta else ("same", "")

    def delta_enc(self, name) -> _api.Encoded:
        return self.delta[name]

    def tensor(self, name, dtype: str = "f32") -> np.ndarray:
        """The fine-tune tensor, rounded once to `dtype` ('f32', 'f16', or 'bf16' as uint16 bits)."""
        if self._rb is not None:
            return self._rb.rebuild(name, dtype)
        info = self.base[name]
        b = self.base.read_tensor(name)
        if info.float_name is None:
            raise ValueError(f"{self.base.path}: tensor '{name}' is {info.dtype}, not a float tensor")
        if self.delta is not None and name in self.delta:
            out = np.empty(info.shape, {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[dtype])
            return _api.apply(b, self.delta[name], alpha=self.alpha, out=out, threads=self.threads)
        return reference.round_to(reference.widen(b, info.float_name), dtype) if dtype != info.float_name else b

    def base_tensor(self, name) -> np.ndarray:
        """The base tensor as float32."""
        return reference.widen(self.base.read_tensor(name), self.base[name].float_name)


# ----------------------------------------------------------------------------- LoRA factors

@dataclass
class LoraFactor:
    """delta(name) ~= u @ v (u: rows x r, v: r x cols, float32, alpha already applied)."""

    name: str
    u: np.ndarray
    v: np.ndarray
    source: str  # "lowrank" (stored as such, exact) or "svd" (approximated at the requested rank)
    rel_error: float
    dtype: str  # the lowrank codec's dtype, or "f32" for SVD factors

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


@dataclass
class LowRankView:
    """Every changed tensor of a fine-tune, as LoRA factors or as a vector/other change."""

    factors: list = field(default_factory=list)   # LoraFactor
    vectors: list = field(default_factory=list)   # names of changed 1-D tensors (norms, biases)
    skipped: list = field(default_factory=list)   # (name, reason): not representable as LoRA

    def report(self) -> dict:
        return {"tensors": [{"name": f.name, "rank": f.rank, "source": f.source, "rel_error": f.rel_error}
                            for f in self.factors],
                "vectors": list(self.vectors),
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}


def svd_factors(d: np.ndarray, rank: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """u (rows x rank), v (rank x cols), float32, with u @ v ~= d: the truncated SVD (reference.lowrank_svd:
    exact, or randomized for a small rank of a large matrix), split as sqrt(S) each side."""
    u, s, v, _, _ = reference.lowrank_svd(np.asarray(d, np.float32), rank, seed=seed)
    root = np.sqrt(s).astype(np.float32)
    return np.ascontiguousarray((u.T * root).astype(np.float32)), np.ascontiguousarray((root[:, None] * v).astype(np.float32))


def lowrank_factors(ft: FineTune, rank: int = 16, progress=None) -> LowRankView:
    """LoRA factors for every changed matrix of `ft` (lowrank deltas as they are, others by SVD at `rank`).

    The input embedding of a model with tied embeddings is skipped: a LoRA on it would change only the
    input side in PEFT and llama.cpp, while the delta changes the output projection too."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1 (got {rank})")
    view = LowRankView()
    for name in ft.names():
        kind, why = ft.kind(name)
        if kind == "same":
            continue
        if kind == "other":
            view.skipped.append((name, why))
            continue
        shape = ft.shape(name)
        if ft.float_name(name) is None:
            view.skipped.append((name, "not a float tensor"))
            continue
        if len(shape) == 1:
            view.vectors.append(name)
            continue
        if len(shape) != 2:
            view.skipped.append((name, f"{len(shape)}-d tensor (LoRA covers matrices)"))
            continue
        if _is_input_embedding(name) and ft.tied_embeddings:
            view.skipped.append((name, "input embedding tied to the output projection (a LoRA would "
                                       "change only the input side)"))
            continue
        enc = ft.delta_enc(name)
        if enc.codec == "lowrank":  # quantized factors are dequantized (f32), float ones kept in their dtype
            u, v = reference.lowrank_factors(enc.components, enc.shape, **enc.params)
            u = u * np.float32(ft.alpha)
            dt = enc.params.get("dtype", "f32")
            f = LoraFactor(name, u.astype(np.float32), np.ascontiguousarray(v, np.float32), "lowrank", 0.0,
                           dt if ft.alpha == 1.0 else "f32")
        else:
            d = _api.decode(enc, threads=ft.threads) * np.float32(ft.alpha)
            if not d.any():
                continue
            u, v = svd_factors(d, min(rank, *shape))
            err = float(np.linalg.norm(d - u @ v) / max(np.linalg.norm(d), 1e-30))
            f = LoraFactor(name, np.ascontiguousarray(u), np.ascontiguousarray(v), "svd", err, "f32")
        view.factors.append(f)
        if progress:
            progress(f)
    return view


# ----------------------------------------------------------------------------- PEFT export

def _torch_tensor(arr: np.ndarray, dtype: str):
    import torch

    stored = reference.round_to(np.asarray(arr, np.float32), dtype)
    t = torch.from_numpy(np.ascontiguousarray(stored))
    return t.view(torch.bfloat16) if dtype == "bf16" else t


def _peft_record(ft: FineTune) -> dict:
    """What `import_peft` kept of the original adapter (to write the same tensors back), if anything."""
    meta = ft.delta.metadata if ft.delta is not None else None
    rec = meta.get("peft") if isinstance(meta, dict) else None
    return rec if isinstance(rec, dict) else {}


def export_peft(base, delta, out_dir, rank: int = 16, alpha: float = 1.0, dtype: str = "auto",
                progress=None, force: bool = False) -> dict:
    """Write `delta` (against `base`) as a PEFT LoRA adapter directory; returns a report.

    dtype: 'auto' (each factor in its stored dtype, SVD factors f32), 'f32', 'f16' or 'bf16';
    force: skip the check that `base` is the delta's base (names, shapes, contents)."""
    if dtype not in ("auto",) + _FLOATS:
        raise ValueError(f"dtype must be auto, f32, f16 or bf16 (got {dtype!r})")
    ft = FineTune(base, delta, alpha, force=force)
    view = lowrank_factors(ft, rank, progress)
    prior = _peft_record(ft) if alpha == 1.0 else {}
    prior_modules = prior.get("modules", {})
    rslora = bool(prior.get("use_rslora"))
    tensors, ranks, alphas = {}, {}, {}
    lora_modules = set()
    for f in view.factors:
        mod = f.module
        out_dt = f.dtype if dtype == "auto" else dtype
        p = prior_modules.get(mod) if f.source == "lowrank" else None
        scale = float(p["scaling"]) if p else 1.0
        if _is_input_embedding(f.name):  # PEFT Embedding: delta = scaling * (B @ A).T, A: r x vocab, B: dim x r
            tensors[f"{PEFT_PREFIX}{mod}.lora_embedding_A"] = _torch_tensor(f.u.T, out_dt)
            tensors[f"{PEFT_PREFIX}{mod}.lora_embedding_B"] = _torch_tensor(f.v.T / np.float32(scale), out_dt)
        else:
            tensors[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = _torch_tensor(f.v, out_dt)
            tensors[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = _torch_tensor(f.u / np.float32(scale), out_dt)
        ranks[mod] = f.rank
        # scaling 1 for new pairs: alpha = r (rsLoRA, kept from an imported adapter, scales by alpha / sqrt(r))
        alphas[mod] = p["alpha"] if p else (math.sqrt(f.rank) if rslora else f.rank)
        lora_modules.add(mod)
    # Changed vectors: a LoRA layer's bias travels with bias="lora_only"; other modules are saved whole.
    bias_lora, to_save, unrepresented = False, {}, []
    for name in view.vectors:
        mod, _, leaf = name.rpartition(".")
        if leaf == "bias" and mod in lora_modules:
            bias_lora = True
            tensors[f"{PEFT_PREFIX}{mod}.base_layer.bias"] = _ft_tensor(ft, name)
        elif leaf in ("weight", "bias") and mod:
            to_save.setdefault(mod, set()).add(leaf)
        else:
            unrepresented.append((name, "vector outside a module"))
    for mod, leaves in to_save.items():
        if mod in lora_modules:  # a module is either LoRA-wrapped or saved whole, not both
            unrepresented += [(f"{mod}.{leaf}", "vector of a LoRA-wrapped module") for leaf in sorted(leaves)]
            continue
        for leaf in ("weight", "bias"):  # a saved module replaces all its parameters
            if f"{mod}.{leaf}" in ft.names():
                tensors[f"{PEFT_PREFIX}{mod}.{leaf}"] = _ft_tensor(ft, f"{mod}.{leaf}")
    modules_to_save = sorted(m for m in to_save if m not in lora_modules)
    if not lora_modules and not modules_to_save:
        raise ValueError(f"{ft.delta.path}: no tensor of this delta can be written as a LoRA adapter "
                         f"({len(view.skipped)} not representable)")
    r_default = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    a_default = prior.get("lora_alpha", r_default) if prior else r_default
    if prior and prior.get("r") is not None:
        r_default = prior["r"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_name(ft),
        "r": r_default, "lora_alpha": a_default,
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != r_default},
        "alpha_pattern": {m: a for m, a in sorted(alphas.items()) if a != a_default},
        "target_modules": sorted(lora_modules) or None,
        "modules_to_save": modules_to_save or None,
        "bias": "lora_only" if bias_lora else "none",
        "lora_dropout": 0.0, "fan_in_fan_out": False, "use_rslora": rslora, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
    }
    _write_adapter(out_dir, tensors, config)
    rep = view.report()
    rep["skipped"] += [{"name": n, "reason": r} for n, r in unrepresented]
    rep.update(out=os.fspath(out_dir), modules_to_save=modules_to_save, bias=config["bias"],
               r=r_default, lora_alpha=a_default)
    return rep


def _write_adapter(out_dir, tensors, config) -> None:
    """Weights and config written into a hidden sibling directory that replaces `out_dir` in one rename: a
    killed or failed export leaves the previous adapter (or nothing), never a mix or a half-written one."""

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        others = set(os.listdir(out_dir)) - {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"} \
            if os.path.isdir(out_dir) else {os.path.basename(out_dir)}
        if others:
            raise FileExistsError(errno.EEXIST, f"{out_dir} exists and holds other files than an adapter "
                                  f"({sorted(others)[0]}, ...): choose a new directory")
    writer = _core.AtomicDir(out_dir, overwrite=True)
    try:
        try:
            checkpoint.write_torch_safetensors(os.path.join(writer.tmp, ADAPTER_WEIGHTS), tensors, {"format": "pt"})
        except OSError as ex:  # name the file the user asked for, not the hidden directory
            raise type(ex)(ex.errno, str(ex.strerror).replace(writer.tmp, out_dir)) from None
        with open(os.path.join(writer.tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
            fh.write("\n")
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def _ft_tensor(ft: FineTune, name):
    """A fine-tune vector in its own dtype, as a torch tensor."""
    import torch

    fl = ft.float_name(name)
    arr = np.ascontiguousarray(ft.tensor(name, fl))
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if fl == "bf16" else t


def _base_name(ft: FineTune):
    name = ft.config.get("_name_or_path")
    return name if name else os.path.abspath(ft.base.path)


# ----------------------------------------------------------------------------- PEFT import

def _pattern_value(patterns: dict, module: str, default, where: str):
    """PEFT's rank/alpha pattern lookup: a key matches the module name exactly or as a dotted suffix."""
    if patterns is None:
        return default
    if not isinstance(patterns, dict):
        raise _api.FormatError(f"{where}: alpha_pattern is not a JSON object")
    for key, value in patterns.items():
        try:
            if key == module or re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        except re.error as ex:
            raise _api.FormatError(f"{where}: alpha_pattern key {key!r} is not a valid pattern ({ex})") from None
    return default


def import_peft(base, adapter_dir, out, dtype: str | None = None) -> dict:
    """Store a PEFT LoRA adapter (against `base`) as a delta file of `lowrank` deltas; returns a report.

    Each LoRA pair becomes u = scaling * B, v = A in the adapter's dtype (or `dtype`); saved modules and
    LoRA-layer biases become `dense` f32 deltas against the base. The adapter's config is kept in the
    file's metadata so that `export_peft` writes the same tensors back."""
    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    w_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no adapter config (not a PEFT adapter directory?)")
    if not os.path.exists(w_path):
        raise FileNotFoundError(f"{w_path}: no adapter weights (only adapter_model.safetensors is read)")
    cfg = checkpoint.read_json_object(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be imported")
    for key, why in (("use_dora", "DoRA rescales the merged weight; not a low-rank delta"),
                     ("fan_in_fan_out", "fan_in_fan_out (Conv1D) adapters are not supported")):
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: {key} is set: {why}")
    if dtype is not None and dtype not in _FLOATS:
        raise ValueError(f"dtype must be f32, f16 or bf16 (got {dtype!r})")
    base_ck = checkpoint.Checkpoint(base)
    ad = checkpoint.Checkpoint(w_path)
    pairs: dict[str, dict] = {}
    vectors: dict[str, str] = {}   # base tensor name -> adapter tensor name holding its new value
    ignored = []
    for key in ad.keys():
        if not key.startswith(PEFT_PREFIX):
            raise _api.FormatError(f"{w_path}: tensor '{key}' does not start with '{PEFT_PREFIX}'")
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
            raise _api.FormatError(f"{w_path}: tensor '{key}' is not a LoRA factor, bias or saved module")
    use_rslora = bool(cfg.get("use_rslora"))
    encs, modules, report = {}, {}, []
    for mod, parts in sorted(pairs.items()):
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        need = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        missing = [p for p in need if p not in parts]
        if missing:
            raise _api.FormatError(f"{w_path}: module '{mod}' has no {missing[0]} tensor")
        a_info, b_info = ad[parts[need[0]]], ad[parts[need[1]]]
        a = reference.widen(ad.read_tensor(a_info.name), a_info.float_name)
        b = reference.widen(ad.read_tensor(b_info.name), b_info.float_name)
        name = mod + ".weight"
        if name not in base_ck:
            raise ValueError(f"{w_path}: module '{mod}' has no weight '{name}' in the base {base_ck.path}")
        shape = tuple(base_ck[name].shape)
        r = a.shape[0] if a.ndim == 2 else 0
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r or r == 0:
            raise _api.FormatError(f"{w_path}: module '{mod}': factor shapes {list(a.shape)} and {list(b.shape)} "
                                   "do not form a low-rank pair")
        alpha_m = _pattern_value(cfg.get("alpha_pattern"), mod, cfg.get("lora_alpha", 8), cfg_path)
        if isinstance(alpha_m, bool) or not isinstance(alpha_m, (int, float)) or not math.isfinite(alpha_m):
            raise _api.FormatError(f"{cfg_path}: the LoRA alpha of module '{mod}' is {alpha_m!r}, not a finite number")
        scaling = alpha_m / (math.sqrt(r) if use_rslora else r)
        with np.errstate(over="ignore"):
            s = np.float32(scaling)
        if not np.isfinite(s):
            raise _api.FormatError(f"{cfg_path}: module '{mod}': scaling {scaling!r} does not fit in float32")
        if emb:   # delta (vocab x dim) = scaling * (B @ A).T = A.T @ (scaling * B.T)
            u, v = a.T, b.T * s
        else:     # delta (out x in) = (scaling * B) @ A
            u, v = b * s, a
        if (u.shape[0], v.shape[1]) != shape:
            raise ValueError(f"{w_path}: module '{mod}': LoRA product is {[u.shape[0], v.shape[1]]}, the base "
                             f"weight '{name}' is {list(shape)}")
        dt = dtype or (a_info.float_name if a_info.float_name == b_info.float_name else "f32")
        enc = _api.Encoded("lowrank", {"rank": int(r), "dtype": dt}, shape, base_ck[name].float_name,
                           {"u": reference.round_to(np.ascontiguousarray(u), dt),
                            "v": reference.round_to(np.ascontiguousarray(v), dt)}, name)
        _api.decode(enc)  # validates component shapes and dtypes
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
            enc = _api.encode(np.ascontiguousarray(d, np.float32), "dense", dtype="f32")
            enc.name = name
            encs[name] = enc
            report.append({"name": name, "dense": True})
    if not encs:
        raise ValueError(f"{w_path}: the adapter changes nothing")
    peft_meta = {"r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "use_rslora": use_rslora,
                 "modules": modules}
    record = {"version": checkpoint.CHECKPOINT_VERSION,
              "tensors": {n: {"op": "delta" if n in encs else "same", "dtype": i.dtype, "shape": list(i.shape)}
                          for n, i in base_ck.tensors.items()},
              "removed": [], "ft_bytes": sum(i.nbytes for i in base_ck.tensors.values()), "files": {}}
    _api.save(out, encs, metadata={"source": "peft", "adapter": os.path.abspath(adapter_dir), "peft": peft_meta,
                                   "checkpoint": record},
              base=checkpoint._fingerprint(base_ck, {}))
    return {"out": os.fspath(out), "tensors": report, "ignored": ignored}
