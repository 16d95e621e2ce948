"""A fine-tune seen through its base and a delta file, for the exporters (deltapack.export.peft,
deltapack.export.gguf): `FineTune` reads it one tensor at a time, and `lowrank_factors` gives one
LoRA pair per changed matrix (a `lowrank` delta as it is, other codecs by truncated SVD)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import checkpoint, files, lowrank, modeldir, reference, tensors


def is_input_embedding(name: str) -> bool:
    return name.endswith("embed_tokens.weight")


def ties_embeddings(names) -> bool:
    """A fine-tune's tensor names tie the output projection to the input embedding (Hugging Face then stores no
    lm_head tensor)."""
    return "lm_head.weight" not in names


def lora_role(name: str, shape, tied: bool) -> str:
    """How a LoRA adapter takes a changed tensor: 'vector' (1-D: norms, biases), 'n-d' (not a matrix), 'tied
    embedding' (an input embedding that is also the output projection, `tied`) or 'matrix' (one LoRA pair)."""
    if len(shape) == 1:
        return "vector"
    if len(shape) != 2:
        return "n-d"
    return "tied embedding" if tied and is_input_embedding(name) else "matrix"


# ----------------------------------------------------------------------------- the fine-tune

class FineTune:
    """A base checkpoint (HF directory or .safetensors file) plus an optional delta file.

    Works with delta files made by `deltapack compress` (which record how every fine-tune tensor is
    rebuilt) and with plain delta files whose tensor names are base tensor names."""

    def __init__(self, base, delta=None, alpha: float = 1.0, threads: int | None = None, force: bool = False,
                 follow_links: bool = False):
        if not math.isfinite(alpha):
            raise ValueError(f"alpha {alpha} is invalid: the scale of a delta must be a finite number")
        self.base = modeldir.Checkpoint(base, follow_links)
        self.config = self.base.config or {}
        self.alpha, self.threads = float(alpha), threads
        self.delta = files.open(delta) if delta is not None else None
        self.record, self._rb = None, None
        meta = self.delta.metadata if self.delta is not None else None
        if isinstance(meta, dict) and "checkpoint" in meta:
            self._rb = checkpoint.Rebuilder(self.base, self.delta, alpha, force=force, threads=threads)
            self.record = self._rb.record
        elif self.delta is not None:
            for name in self.delta.keys():
                if name not in self.base:
                    raise ValueError(f"{self.delta.path}: tensor '{name}' is not in the base {self.base.path}")
                want, got = tuple(self.base[name].shape), self.delta.shape(name)
                if want != got:
                    raise ValueError(f"{self.delta.path}: tensor '{name}' has shape {list(got)}, the base "
                                     f"{self.base.path} has {list(want)}")

    @property
    def tied_embeddings(self) -> bool:
        """The output projection is the input embedding."""
        return ties_embeddings(self.names())

    def names(self) -> list[str]:
        return list(self.record["tensors"]) if self.record else self.base.keys()

    def shape(self, name) -> tuple:
        if self.record:
            return tuple(self.record["tensors"][name]["shape"])
        return tuple(self.base[name].shape)

    def float_name(self, name):
        """'f32' / 'f16' / 'bf16' of the fine-tune tensor, None for non-float tensors."""
        if self.record:
            return modeldir.ST_DTYPES[self.record["tensors"][name]["dtype"]][0]
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

    def delta_enc(self, name) -> tensors.Encoded:
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
            return tensors.apply(b, self.delta[name], alpha=self.alpha, out=out, threads=self.threads)
        return reference.round_to(reference.widen(b, info.float_name), dtype) if dtype != info.float_name else b

    def base_tensor(self, name) -> np.ndarray:
        """The base tensor as float32."""
        return reference.widen(self.base.read_tensor(name), self.base[name].float_name)


def adapter_coverage(record: dict, codecs: dict) -> dict:
    """How a LoRA adapter exported from a checkpoint delta carries each changed tensor, from the file's checkpoint
    record and its stored tensors' codecs ({name: codec}) alone: {"lowrank": names written as stored, "svd": names
    cut to --rank by SVD, "vectors": changed 1-D tensors (norms, biases), "other": [(name, why)] not in it}."""
    rec = record["tensors"]
    tied = ties_embeddings(rec)
    out = {"lowrank": [], "svd": [], "vectors": [], "other": []}
    for name, spec in rec.items():
        if spec.get("op") == "same":
            continue
        if spec.get("op") != "delta" or spec.get("source", name) != name:
            out["other"].append((name, f"{spec.get('op')} tensor, in no adapter" if spec.get("source", name) == name
                                 else f"rebuilt from base tensor '{spec['source']}', in no adapter"))
            continue
        role = lora_role(name, spec["shape"], tied)
        if role == "vector":
            out["vectors"].append(name)
        elif role == "n-d":
            out["other"].append((name, f"{len(spec['shape'])}-d tensor, in no adapter"))
        elif name not in codecs:   # changed, yet not stored (a budget dropped it)
            continue
        elif role == "tied embedding":
            out["other"].append((name, "input embedding tied to the output projection: llama.cpp carries it "
                                       "with export gguf and gguf-lora --untied-output, PEFT does not"))
        else:
            out["lowrank" if codecs[name] == "lowrank" else "svd"].append(name)
    return out


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
    energy: dict = field(default_factory=dict)    # name -> Σ (alpha·Δ)² of each changed tensor that is a delta

    def lost_energy(self, names) -> float:
        """The share of the delta's energy (Σ Δ² over every changed tensor) in `names`."""
        total = sum(self.energy.values())
        return sum(self.energy.get(n, 0.0) for n in names) / total if total else 0.0

    def report(self) -> dict:
        return {"tensors": [{"name": f.name, "rank": f.rank, "source": f.source, "rel_error": f.rel_error}
                            for f in self.factors],
                "vectors": list(self.vectors),
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
                "energy": {"svd_error": sum(self.energy[f.name] * f.rel_error ** 2 for f in self.factors)
                           / max(sum(self.energy.values()), 1e-300),
                           "vectors": self.lost_energy(self.vectors),
                           "skipped": self.lost_energy(n for n, _ in self.skipped)}}


def svd_factors(d: np.ndarray, rank: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """u (rows x rank), v (rank x cols), float32, with u @ v ~= d: the truncated SVD (reference.lowrank_svd:
    exact, or randomized for a small rank of a large matrix), split as sqrt(S) each side."""
    u, s, v, _, _ = lowrank.svd(np.asarray(d, np.float32), rank, seed=seed)
    root = np.sqrt(s).astype(np.float32)
    return (np.ascontiguousarray((u.T * root).astype(np.float32)),
            np.ascontiguousarray((root[:, None] * v).astype(np.float32)))


def lowrank_factors(ft: FineTune, rank: int = 16, progress=None, tied_embedding: bool = False) -> LowRankView:
    """LoRA factors for every changed matrix of `ft` (lowrank deltas as they are, others by SVD at `rank`).

    The input embedding of a model with tied embeddings is skipped unless tied_embedding (the caller writes its
    factors for both uses): a LoRA on it alone would change only the input side in PEFT and llama.cpp, while the
    delta changes the output projection too."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1 (got {rank})")
    view = LowRankView()

    def energy(name):  # Σ (alpha·Δ)² of a stored delta, decoded a block of rows at a time
        d = reference.as_matrix(tensors.decode(ft.delta_enc(name), threads=ft.threads))
        view.energy[name] = float(ft.alpha) ** 2 * float(lowrank.row_energy(d).sum())

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
        role = lora_role(name, shape, ft.tied_embeddings and not tied_embedding)
        if role == "vector":
            view.vectors.append(name)
        elif role == "n-d":
            view.skipped.append((name, f"{len(shape)}-d tensor (LoRA covers matrices)"))
        elif role == "tied embedding":
            view.skipped.append((name, "input embedding tied to the output projection (a LoRA would "
                                       "change only the input side; llama.cpp: export gguf and gguf-lora "
                                       "--untied-output)"))
        if role != "matrix":
            energy(name)
            continue
        enc = ft.delta_enc(name)
        if enc.codec == "lowrank":  # quantized factors are dequantized (f32), float ones kept in their dtype
            u, v = reference.lowrank_factors(enc.components, enc.shape, **enc.params)
            u = u * np.float32(ft.alpha)
            dt = enc.params.get("dtype", "f32")
            f = LoraFactor(name, u.astype(np.float32), np.ascontiguousarray(v, np.float32), "lowrank", 0.0,
                           dt if ft.alpha == 1.0 else "f32")
            # |u v|² = Σ (uᵀu) ∘ (v vᵀ), without the product
            view.energy[name] = float(np.sum((f.u.T.astype(np.float64) @ f.u) * (f.v.astype(np.float64) @ f.v.T)))
        else:
            d = tensors.decode(enc, threads=ft.threads) * np.float32(ft.alpha)
            if not d.any():
                continue
            u, v = svd_factors(d, min(rank, *shape))
            norm = np.linalg.norm(d)
            err = float(np.linalg.norm(d - u @ v) / max(norm, 1e-30))
            f = LoraFactor(name, np.ascontiguousarray(u), np.ascontiguousarray(v), "svd", err, "f32")
            view.energy[name] = float(norm) ** 2
        view.factors.append(f)
        if progress:
            progress(f)
    return view


# ----------------------------------------------------------------------------- PEFT export
