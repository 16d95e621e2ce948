"""The Python API: encode / decode / apply tensors, save / open delta files."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from . import _core, recipes, reference

FormatError = _core.FormatError
_FLOAT_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _dtype_name(x) -> str:
    """'f32' / 'f16' / 'bf16' for a numpy array (uint16 = bf16 bits) or torch tensor."""
    if _is_torch(x):
        name = str(x.dtype).removeprefix("torch.")
    else:
        name = "bfloat16" if x.dtype == np.uint16 else str(x.dtype)
    if name not in _FLOAT_NAMES:
        raise ValueError(f"unsupported dtype {name} (use float32, float16 or bfloat16)")
    return _FLOAT_NAMES[name]


def _contiguous(x):
    if _is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"tensor is on {x.device}; deltapack's engine runs on the CPU")
        return x.detach().contiguous()
    return np.ascontiguousarray(x)


def _as_f32_numpy(x) -> np.ndarray:
    if _is_torch(x):
        return x.detach().float().cpu().numpy()
    if x.dtype == np.uint16:
        return reference.bf16_to_f32(x)
    return np.asarray(x, dtype=np.float32)


def _threads(threads):
    return 0 if threads is None else int(threads)


@dataclass
class Encoded:
    """One encoded delta tensor: codec, canonical params, original shape/dtype, components."""

    codec: str
    params: dict
    shape: tuple
    dtype: str
    components: dict = field(repr=False)
    name: str = "<tensor>"

    @property
    def nbytes(self) -> int:
        """Stored bytes of this tensor's components."""
        return int(sum(a.nbytes for a in self.components.values()))

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def _core(self, name=None):
        return (name or self.name, self.codec, json.dumps(self.params), list(self.shape), self.dtype,
                self.components)


def encode(delta, codec: str, threads: int | None = None, weights=None, **params) -> Encoded:
    """Encode a delta tensor (numpy f32/f16, or torch f32/f16/bf16) with a codec or recipe.

    `codec` is a codec name ("sign") or a recipe string ("sign:scope=row"); keyword arguments
    override the recipe's parameters. weights: for `lowrank` with `bits`, an optional (row, col) pair of
    positive weights; the SVD and the singular-value fit then minimise Σ row_i·col_j·error_ij² (see
    deltapack.budget) instead of the plain squared error.
    """
    name, rparams = recipes.parse(codec)
    rparams.update(params)
    delta = _contiguous(delta)
    dtype = _dtype_name(delta)
    shape = tuple(int(s) for s in delta.shape)
    if name == "lowrank":
        return _encode_lowrank(delta, shape, dtype, rparams, weights)
    if weights is not None:
        raise ValueError(f"weights apply to the lowrank codec with bits=..., not to {name!r}")
    canon, comps = _core.encode(name, json.dumps(rparams), delta, _threads(threads))
    return Encoded(name, json.loads(canon), shape, dtype, dict(comps))


def _encode_lowrank(delta, shape, dtype, params, weights=None) -> Encoded:
    canon = json.loads(_core.canonical_params("lowrank", json.dumps(params)))
    x = _as_f32_numpy(delta)
    flat = x.reshape(-1)
    if not all(np.isfinite(flat[i:i + (1 << 24)]).all() for i in range(0, flat.size, 1 << 24)):
        raise ValueError("delta contains NaN or infinity")
    rows, cols = reference._rc(shape)
    if canon["rank"] > min(rows, cols):
        raise ValueError(f"lowrank: rank={canon['rank']} exceeds min(rows, cols) = {min(rows, cols)} "
                         f"for shape {list(shape)}")
    if "bits" in canon:
        row_w, col_w = weights if weights is not None else (None, None)
        comps = reference.encode_lowrank_quant(x, canon["bits"], canon["bands"], canon["group"], row_w, col_w)
    elif weights is not None:
        raise ValueError("weights apply to the lowrank codec with bits=... (quantized factors)")
    else:
        comps = reference.encode_lowrank(x, canon["rank"], canon["dtype"])
    enc = Encoded("lowrank", canon, shape, dtype, comps)
    _core.validate(enc._core())
    return enc


def decode(enc: Encoded, threads: int | None = None) -> np.ndarray:
    """The delta as a float32 numpy array of its original shape."""
    out = np.empty(enc.shape, dtype=np.float32)
    _core.decode(enc._core(), out, _threads(threads))
    return out


def apply(base, enc: Encoded, alpha: float = 1.0, out=None, threads: int | None = None):
    """base + alpha * delta, rounded once to the output dtype (that of `out`, else of `base`).

    base/out: numpy f32/f16 (uint16 = bf16 bits) or torch f32/f16/bf16 of the delta's shape;
    `out=base` updates in place. Returns `out`.
    """
    if tuple(base.shape) != tuple(enc.shape):
        raise ValueError(f"tensor '{enc.name}': base shape {list(base.shape)} does not match the delta's "
                         f"shape {list(enc.shape)}")
    _dtype_name(base)
    if _is_torch(base):
        base_c = _contiguous(base)
        if out is None:
            out = _torch_empty_like(base_c)
    else:
        base_c = np.ascontiguousarray(base)
        if out is None:
            out = np.empty_like(base_c)
    _dtype_name(out)
    contiguous = out.is_contiguous() if _is_torch(out) else out.flags.c_contiguous
    if not contiguous:
        raise ValueError(f"tensor '{enc.name}': out must be C-contiguous")
    _core.apply(enc._core(), base_c, out, float(alpha), _threads(threads))
    return out


def _torch_empty_like(t):
    import torch

    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _extra_manifest(metadata, base) -> str:
    extra = {}
    if metadata is not None:
        extra["metadata"] = metadata
    if base is not None:
        extra["base"] = base
    try:
        return json.dumps(extra, allow_nan=False)
    except ValueError as ex:  # NaN or infinity: the manifest is strict JSON
        raise ValueError(f"metadata cannot be stored in a manifest: {ex}") from None


def save(path, tensors: dict, metadata: dict | None = None, base: dict | None = None) -> None:
    """Write encoded tensors to a delta file atomically (nothing under `path` unless it succeeds).

    metadata: free-form JSON-serialisable user metadata; base: the base model's fingerprint.
    """
    w = DeltaWriter(path)
    for name, enc in tensors.items():
        w.add(name, enc)
    w.close(metadata, base)


class DeltaWriter:
    """Writes a delta file tensor by tensor (the C++ core's writer): no tensor is held once added,
    and nothing appears under `path` unless close() succeeds. Same bytes as `save` for the same tensors."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._w = _core.DeltaWriter(self.path)

    def add(self, name: str, enc: Encoded) -> None:
        self._w.add(enc._core(name))

    def __len__(self) -> int:
        return len(self._w)  # tensors added

    def size(self, metadata=None, base=None) -> int:
        """The file size close() would write with this metadata."""
        return self._w.size(_extra_manifest(metadata, base))

    def close(self, metadata=None, base=None, durable: bool = True) -> int:
        """Write header + data and link it into place; returns the file size."""
        return self._w.close(_extra_manifest(metadata, base), durable)

    def abort(self) -> None:
        self._w.abort()


class DeltaFile:
    """A delta file opened read-only (memory-mapped). Components are zero-copy numpy views."""

    def __init__(self, path, verify: bool = True):
        self._f = _core.DeltaFile.open(os.fspath(path))
        self.path = os.fspath(path)
        self.verify = verify
        self.manifest = json.loads(self._f.manifest)

    def keys(self) -> list[str]:
        return self._f.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, name) -> bool:
        return name in self._f

    def get(self, name: str, verify: bool | None = None) -> Encoded:
        if name not in self._f:
            raise KeyError(f"{self.path}: no tensor '{name}' in this delta file")
        codec, params, shape, dtype, comps = self._f.get(name, self.verify if verify is None else verify)
        return Encoded(codec, json.loads(params), tuple(shape), dtype, dict(comps), name)

    __getitem__ = get

    def items(self):
        for k in self.keys():
            yield k, self[k]

    @property
    def metadata(self) -> dict:
        return self.manifest.get("metadata", {})

    @property
    def base(self) -> dict | None:
        return self.manifest.get("base")

    @property
    def nbytes(self) -> int:
        return os.path.getsize(self.path)

    def __repr__(self):
        return f"DeltaFile({self.path!r}, {len(self)} tensors)"


def open(path, verify: bool = True) -> DeltaFile:  # noqa: A001 - mirrors safetensors/h5py style
    """Open a delta file. With verify (default), each tensor's CRC-32C is checked when read."""
    return DeltaFile(path, verify)


def set_simd(path: str) -> None:
    """Force a SIMD path: 'auto', 'scalar', 'avx2', 'avx512', 'neon' (also env DELTAPACK_SIMD)."""
    _core.set_simd(path)


def simd() -> str:
    return _core.simd()


def simd_available() -> list[str]:
    return _core.simd_available()


def set_threads(n: int) -> None:
    """Default thread count for encode/decode/apply (0 = all cores)."""
    _core.set_default_threads(n)
