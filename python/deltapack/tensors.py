"""Tensors: encode a delta with a codec, decode it, apply it to a base (deltapack.files stores them)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from . import _core, cuda, lowrank, recipes, reference

_FLOAT_NAMES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _dtype_name(x) -> str:
    """'f32' / 'f16' / 'bf16' for a numpy array (uint16 = bf16 bits) or torch tensor."""
    if is_torch(x):
        name = str(x.dtype).removeprefix("torch.")
    else:
        name = "bfloat16" if x.dtype == np.uint16 else str(x.dtype)
    if name not in _FLOAT_NAMES:
        raise ValueError(f"unsupported dtype {name} (use float32, float16 or bfloat16)")
    return _FLOAT_NAMES[name]


def _contiguous(x):
    if is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"tensor is on {x.device}; deltapack runs on the CPU and on CUDA devices")
        return x.detach().contiguous()
    return np.ascontiguousarray(x)


def _as_f32_numpy(x) -> np.ndarray:
    if is_torch(x):
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
    # Copies of the components on GPUs, by device number (deltapack.cuda.to_device): made on first use there.
    device_copies: dict = field(default_factory=dict, repr=False, compare=False)

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


def encode(delta, codec: str, threads: int | None = None, weights=None, factors=None, **params) -> Encoded:
    """Encode a delta tensor (numpy f32/f16, or torch f32/f16/bf16) with a codec or recipe.

    `codec` is a codec name ("sign") or a recipe string ("sign:scope=row"); keyword arguments
    override the recipe's parameters. weights: for `lowrank` with `bits`, an optional (row, col) pair of
    positive weights; the SVD and the singular-value fit then minimise Σ row_i·col_j·error_ij² (see
    deltapack.compress.allocate) instead of the plain squared error. factors: for `lowrank` with `bits`, the
    delta's (u, s, v) from deltapack.lowrank.svd under the same weights, with at least the rank's directions:
    used instead of computing the SVD again.
    """
    name, rparams = recipes.parse(codec)
    rparams.update(params)
    delta = _contiguous(delta)
    dtype = _dtype_name(delta)
    shape = tuple(int(s) for s in delta.shape)
    if name == "lowrank":
        return _encode_lowrank(delta, shape, dtype, rparams, weights, factors)
    if weights is not None or factors is not None:
        given = "weights" if weights is not None else "factors"
        raise ValueError(f"{given} apply to the lowrank codec with bits=..., not to {name!r}")
    canon, comps = _core.encode(name, json.dumps(rparams), delta, _threads(threads))
    return Encoded(name, json.loads(canon), shape, dtype, dict(comps))


def _encode_lowrank(delta, shape, dtype, params, weights=None, factors=None) -> Encoded:
    canon = json.loads(_core.canonical_params("lowrank", json.dumps(params)))
    x = _as_f32_numpy(delta)
    flat = x.reshape(-1)
    if not all(np.isfinite(flat[i:i + (1 << 24)]).all() for i in range(0, flat.size, 1 << 24)):
        raise ValueError("delta contains NaN or infinity")
    rows, cols = reference.rows_cols(shape)
    if canon["rank"] > min(rows, cols):
        raise ValueError(f"lowrank: rank={canon['rank']} exceeds min(rows, cols) = {min(rows, cols)} "
                         f"for shape {list(shape)}")
    if "bits" in canon:
        row_w, col_w = weights if weights is not None else (None, None)
        comps = lowrank.encode_lowrank_quant(x, canon["bits"], canon["bands"], canon["group"], row_w, col_w, factors)
    elif weights is not None or factors is not None:
        given = "weights" if weights is not None else "factors"
        raise ValueError(f"{given} apply to the lowrank codec with bits=... (quantized factors)")
    else:
        comps = lowrank.encode_lowrank(x, canon["rank"], canon["dtype"])
    enc = Encoded("lowrank", canon, shape, dtype, comps)
    _core.validate(enc._core())
    return enc


def decode(enc: Encoded, threads: int | None = None, device=None):
    """The delta as a float32 numpy array of its original shape; with a CUDA `device` ("cuda", "cuda:1"), as a
    float32 torch tensor on that GPU (deltapack.cuda.decode: the same bits)."""
    if device is not None and str(device) != "cpu":
        return cuda.decode(enc, device)
    out = np.empty(enc.shape, dtype=np.float32)
    _core.decode(enc._core(), out, _threads(threads))
    return out


def delta_product(enc: Encoded, x, alpha: float = 1.0, out=None, threads: int | None = None) -> np.ndarray:
    """out += alpha * x @ D.T, for the delta's (rows, cols) matrix view D (a linear layer's delta part of its
    output), straight from the packed form: nothing is rebuilt. x: float32 (batch, cols); out: float32
    (batch, rows), zeros when None. f32 sums in a fixed order, the same bits on every SIMD path. Returns out.
    A torch CUDA x runs on its GPU (deltapack.cuda.delta_product)."""
    if cuda.is_cuda(x):
        return cuda.delta_product(enc, x, alpha, out)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = reference.rows_cols(enc.shape)
    if x.ndim != 2 or x.shape[1] != cols:
        raise ValueError(f"tensor '{enc.name}': x must be (batch, {cols}), not {list(x.shape)}")
    if out is None:
        out = np.zeros((x.shape[0], rows), dtype=np.float32)
    _core.delta_product(enc._core(), x, out, float(alpha), _threads(threads))
    return out


ROUNDINGS = tuple(_core.roundings)  # auto, nearest, dithered: into bf16/f16 (docs/FORMAT.md §3)


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r}: use one of {', '.join(ROUNDINGS)}")
    return rounding


def apply(base, enc: Encoded, alpha: float = 1.0, out=None, threads: int | None = None, rounding: str = "auto"):
    """base + alpha * delta, rounded once to the output dtype (that of `out`, else of `base`): into bf16/f16
    by `rounding`, "auto" (dithered for a lossy codec, nearest for dense), "nearest" or "dithered"
    (docs/FORMAT.md §3; reference.apply is the rule).

    base/out: numpy f32/f16 (uint16 = bf16 bits) or torch f32/f16/bf16 of the delta's shape, torch CUDA tensors
    included (deltapack.cuda: the same bits); `out=base` updates in place. Returns `out`.
    """
    if tuple(base.shape) != tuple(enc.shape):
        raise ValueError(f"tensor '{enc.name}': base shape {list(base.shape)} does not match the delta's "
                         f"shape {list(enc.shape)}")
    _dtype_name(base)
    if cuda.is_cuda(base):  # the CUDA kernels, on base's GPU and its current stream
        return cuda.apply(base, enc, alpha, out, check_rounding(rounding))
    if is_torch(base):
        base_c = _contiguous(base)
        if out is None:
            out = _torch_empty_like(base_c)
    else:
        base_c = np.ascontiguousarray(base)
        if out is None:
            out = np.empty_like(base_c)
    _dtype_name(out)
    contiguous = out.is_contiguous() if is_torch(out) else out.flags.c_contiguous
    if not contiguous:
        raise ValueError(f"tensor '{enc.name}': out must be C-contiguous")
    _core.apply(enc._core(), base_c, out, float(alpha), _threads(threads), check_rounding(rounding))
    return out


def _torch_empty_like(t):
    import torch

    return torch.empty_like(t, memory_format=torch.contiguous_format)


def set_simd(path: str) -> None:
    """Force a SIMD path: 'auto', 'scalar', 'avx2', 'avx512', 'neon' (also env DELTAPACK_SIMD)."""
    _core.set_simd(path)


def simd() -> str:
    return _core.simd()


def simd_available() -> list[str]:
    return _core.simd_available()


