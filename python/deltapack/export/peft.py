"""Delta files as PEFT LoRA adapters (the way back is deltapack.export.import_peft).

    report = export_peft("base_dir", "ft.dpk", "adapter_dir", rank=16)   # adapter_config.json + safetensors

A LoRA module adds scaling * B @ A to a weight (B: rows x r, A: r x cols). deltapack's `lowrank`
codec stores the same product as u @ v, so a lowrank delta maps to B = u, A = v with scaling 1
(lora_alpha = r). Other codecs are first approximated at rank R by truncated SVD; the relative
error of each approximation is reported. Changed vectors (norms, biases) have no LoRA form: they
go to `modules_to_save` (norms) or to the LoRA layer's own bias (`bias="lora_only"`).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter

import numpy as np

from .. import _core, files, modeldir, reference
from .finetune import FineTune, is_input_embedding, lowrank_factors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FLOATS = ("f32", "f16", "bf16")  # the dtypes an adapter may be written in


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
                progress=None, force: bool = False, overwrite: bool = False, follow_links: bool = False) -> dict:
    """Write `delta` (against `base`) as a PEFT LoRA adapter directory; returns a report.

    dtype: 'auto' (each factor in its stored dtype, SVD factors f32), 'f32', 'f16' or 'bf16';
    force: skip the check that `base` is the delta's base (names, shapes, contents);
    overwrite: replace an existing adapter directory (one holding only adapter_config.json and
    adapter_model.safetensors); follow_links: read BASE through links wherever they point."""
    if dtype not in ("auto",) + FLOATS:
        raise ValueError(f"dtype must be auto, f32, f16 or bf16 (got {dtype!r})")
    ft = FineTune(base, delta, alpha, force=force, follow_links=follow_links)
    _core.check_output(os.fspath(out_dir), _core.OutputKind.ADAPTER_DIRECTORY, [ft.base.path, ft.delta.path],
                       overwrite, [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
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
        emb = is_input_embedding(f.name)  # PEFT Embedding: delta = scaling * (B @ A).T, A: r x vocab, B: dim x r
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            b = (f.v.T if emb else f.u) / np.float32(scale)
        if not np.isfinite(b).all():  # the scaling came from the delta file's metadata
            raise files.FormatError(f"{ft.delta.path}: metadata.peft.modules[{json.dumps(mod)}].scaling {scale!r} "
                                    "does not give finite LoRA factors")
        if emb:
            tensors[f"{PEFT_PREFIX}{mod}.lora_embedding_A"] = _torch_tensor(f.u.T, out_dt)
            tensors[f"{PEFT_PREFIX}{mod}.lora_embedding_B"] = _torch_tensor(b, out_dt)
        else:
            tensors[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = _torch_tensor(f.v, out_dt)
            tensors[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = _torch_tensor(b, out_dt)
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
    _write_adapter(out_dir, tensors, config, overwrite)
    rep = view.report()
    rep["skipped"] += [{"name": n, "reason": r} for n, r in unrepresented]
    rep.update(out=os.fspath(out_dir), modules_to_save=modules_to_save, bias=config["bias"],
               r=r_default, lora_alpha=a_default)
    return rep


def _write_adapter(out_dir, tensors, config, overwrite) -> None:
    """Weights and config written into a hidden sibling directory that replaces `out_dir` in one rename: a
    killed or failed export leaves the previous adapter (or nothing), never a mix or a half-written one. What
    `out_dir` may be was checked before any work (check_output)."""

    out_dir = os.path.abspath(os.fspath(out_dir))
    writer = _core.AtomicDir(out_dir, overwrite=overwrite)
    try:
        try:
            modeldir.write_torch_safetensors(os.path.join(writer.tmp, ADAPTER_WEIGHTS), tensors, {"format": "pt"})
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
