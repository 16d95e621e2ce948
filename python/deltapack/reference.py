"""The executable specification of every deltapack codec, in plain numpy.

This module is deliberately slow and simple. The C++ core must produce exactly the same bits as
these functions (components on encode, f32 values on decode, output bits on apply); the tests
compare them on every SIMD path. docs/FORMAT.md describes the same rules in prose.

Conventions shared by all codecs:
- A tensor of shape (..., cols) is viewed as a matrix (rows, cols), rows = prod(shape[:-1]);
  a 0-d tensor is (1, 1).
- Inputs are taken as exact float32 values (bf16/f16 widen exactly). Arithmetic is float32 with
  one rounding per operation, no fused multiply-add, unless a step says float64.
- Bit streams are packed LSB-first along a row; every row starts on a byte boundary.
- "lane sum" (see `lane_sum`) is the one summation order used wherever a mean is taken.
"""
from __future__ import annotations

import numpy as np

F32, F64 = np.float32, np.float64


# ----------------------------------------------------------------------------- helpers

def as_matrix(x: np.ndarray) -> np.ndarray:
    """View any tensor as (rows, cols) float32."""
    x = np.asarray(x, dtype=F32)
    if x.ndim == 0:
        return x.reshape(1, 1)
    return x.reshape(-1, x.shape[-1])


def lane_sum(a: np.ndarray) -> np.ndarray:
    """Sum float64 values along the last axis in deltapack's fixed order.

    Element j goes to lane j % 16; each lane adds its elements in index order; the 16 lanes are
    then folded as lane[i] += lane[i+8], then [i] += [i+4], [i] += [i+2], [0] += [1]. This is the
    order a 16-wide SIMD loop produces, so every path gets the same bits.
    """
    a = np.asarray(a, dtype=F64)
    n = a.shape[-1]
    pad = (-n) % 16
    if pad:
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (pad,), F64)], axis=-1)
    a = a.reshape(a.shape[:-1] + (-1, 16))
    lanes = np.zeros(a.shape[:-2] + (16,), F64)
    for j in range(a.shape[-2]):
        lanes = lanes + a[..., j, :]
    for half in (8, 4, 2, 1):
        lanes = lanes[..., :half] + lanes[..., half:2 * half]
    return lanes[..., 0]


def rows_then_sum(per_row: np.ndarray) -> F64:
    """Combine per-row float64 sums sequentially in row order."""
    total = F64(0.0)
    for v in np.asarray(per_row, F64):
        total = F64(total + v)
    return total


def pack_bits(codes: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned codes (rows, cols) of `width` bits LSB-first per row -> uint8 (rows, nbytes)."""
    codes = np.asarray(codes, dtype=np.uint32)
    rows, cols = codes.shape
    bits = ((codes[:, :, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(rows, cols * width), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, width: int, cols: int) -> np.ndarray:
    """Inverse of pack_bits -> uint32 codes (rows, cols)."""
    bits = np.unpackbits(packed, axis=-1, bitorder="little")[:, :cols * width]
    bits = bits.reshape(packed.shape[0], cols, width).astype(np.uint32)
    return (bits << np.arange(width, dtype=np.uint32)).sum(axis=-1).astype(np.uint32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even, NaN stays a quiet NaN."""
    u = np.asarray(x, dtype=F32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x0040).astype(np.uint16), rounded)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(F32)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> storage of `dtype` ('f32', 'f16' as float16, 'bf16' as uint16 bits)."""
    x = np.asarray(x, dtype=F32)
    if dtype == "f32":
        return x.copy()
    if dtype == "f16":
        with np.errstate(over="ignore"):  # beyond f16's range: infinity, as specified
            return x.astype(np.float16)
    if dtype == "bf16":
        return round_bf16(x)
    raise ValueError(f"unknown dtype {dtype!r}")


def widen(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Storage of `dtype` -> exact float32 values."""
    if dtype == "bf16":
        return bf16_to_f32(stored)
    return np.asarray(stored).astype(F32)


def sign_bits(m: np.ndarray) -> np.ndarray:
    """1 where the value is > 0 (zero and negatives give 0)."""
    return np.packbits(m > 0, axis=-1, bitorder="little")


def sign_plus_minus(bits: np.ndarray, cols: int) -> np.ndarray:
    pos = np.unpackbits(bits, axis=-1, bitorder="little")[:, :cols].astype(bool)
    return pos


# ----------------------------------------------------------------------------- sign

def encode_sign(x, scope="tensor", group=128):
    """BitDelta: signs + mean |x| over the scope (tensor, row, or groups of `group` columns)."""
    m = as_matrix(x)
    rows, cols = m.shape
    a = np.abs(m).astype(F64)
    if scope == "tensor":
        mean = rows_then_sum(lane_sum(a)) / F64(m.size) if m.size else F64(0)
        scales = np.array([mean], F64).astype(F32)
    elif scope == "row":
        scales = (lane_sum(a) / F64(cols)).astype(F32)
    elif scope == "group":
        ng = -(-cols // group)
        padded = np.zeros((rows, ng * group), F64)
        padded[:, :cols] = a
        counts = np.full(ng, group, F64)
        counts[-1] = cols - (ng - 1) * group
        scales = (lane_sum(padded.reshape(rows, ng, group)) / counts).astype(F32)
    else:
        raise ValueError(scope)
    return {"signs": sign_bits(m), "scales": scales}


def decode_sign(comps, shape, scope="tensor", group=128):
    rows, cols = rows_cols(shape)
    pos = sign_plus_minus(comps["signs"], cols)
    s = comps["scales"].astype(F32)
    if scope == "tensor":
        mag = np.broadcast_to(s[0], (rows, cols))
    elif scope == "row":
        mag = np.broadcast_to(s[:, None], (rows, cols))
    else:
        mag = np.repeat(s.reshape(rows, -1), group, axis=1)[:, :cols]
    return np.where(pos, mag, -mag).astype(F32)


def sign_tables(x: np.ndarray) -> np.ndarray:
    """(groups, batch, 16) for f32 x (batch, n): entry m of group q is the sum of x[:, 4q + c] over the bits c
    of m (columns past n count as absent), added in the order c = 0..3 to +0."""
    batch, n = x.shape
    groups = -(-n // 4)
    xp = np.zeros((batch, 4 * groups), F32)
    xp[:, :n] = x  # a +0 added to a sum that started at +0 changes nothing
    m = np.arange(16)
    t = np.zeros((groups, batch, 16), F32)
    for c in range(4):
        t = t + np.where((m >> c) & 1 == 1, xp.T.reshape(groups, 4, batch)[:, c, :, None], F32(0))
    return t


def table_sums(bits: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """(rows, batch): for each row of LSB-first `bits`, one f32 sum from +0 over the column groups in order,
    each step adding the group's table entry for the row's 4 bits."""
    acc = np.zeros((bits.shape[0], tables.shape[1]), F32)
    for q in range(tables.shape[0]):
        nibble = (bits[:, q // 2] >> (4 * (q % 2))) & 15
        acc = acc + tables[q][:, nibble].T
    return acc


def sign_product(comps, shape, x, alpha, out, scope="tensor", group=128):
    """out + alpha * x @ D.T for the sign delta D, in the C++ kernels' order (mixed batches): per scale span,
    s * (2 * (sum of x where the bit is set) - (sum of x)), each sum from +0 over the span's groups of 4 columns,
    the spans added in order, then alpha times that."""
    rows, cols = rows_cols(shape)
    x = np.asarray(x, F32)
    width = group if scope == "group" else max(cols, 1)
    s = comps["scales"].astype(F32)
    acc = np.zeros((rows, x.shape[0]), F32)
    for g, c0 in enumerate(range(0, cols, width)):
        span = slice(c0, min(cols, c0 + width))
        tables = sign_tables(x[:, span])
        set_sums = table_sums(comps["signs"][:, c0 // 8:], tables)
        x_sums = table_sums(np.full((1, comps["signs"].shape[1]), 255, np.uint8), tables)
        scale = (s[0] if scope == "tensor" else s if scope == "row" else s.reshape(rows, -1)[:, g])
        scale = np.broadcast_to(np.asarray(scale, F32).reshape(-1, 1), (rows, 1))
        acc = acc + scale * (F32(2) * set_sums - x_sums)
    return (np.asarray(out, F32) + F32(alpha) * acc.T).astype(F32)


# ----------------------------------------------------------------------------- levels

def encode_levels(x, bits=2):
    """Multi-bit BitDelta (paper Sec. 5.3): 2^(bits-1) equal-count magnitude blocks + signs.

    Magnitudes are ranked ascending (ties: lower flat index first); block k holds ranks
    [k*n//K, (k+1)*n//K). Each block is represented by the mean of its magnitudes, summed in the
    same row/lane order as `sign` (so bits=1 equals sign with scope=tensor exactly).
    """
    m = as_matrix(x)
    rows, cols = m.shape
    K = 1 << (bits - 1)
    mag = np.abs(m).reshape(-1)
    n = mag.size
    order = np.argsort(mag, kind="stable")
    block_of_rank = (np.arange(K + 1, dtype=np.int64) * n) // K
    idx = np.empty(n, np.int64)
    for k in range(K):
        idx[order[block_of_rank[k]:block_of_rank[k + 1]]] = k
    idx = idx.reshape(rows, cols)
    a = np.abs(m).astype(F64)
    levels = np.zeros(K, F32)
    for k in range(K):
        count = block_of_rank[k + 1] - block_of_rank[k]
        if count:
            total = rows_then_sum(lane_sum(np.where(idx == k, a, 0.0)))
            levels[k] = F32(total / F64(count))
    out = {"signs": sign_bits(m), "levels": levels}
    if bits > 1:
        out["codes"] = pack_bits(idx, bits - 1)
    return out


def decode_levels(comps, shape, bits=2):
    rows, cols = rows_cols(shape)
    pos = sign_plus_minus(comps["signs"], cols)
    if bits > 1:
        idx = unpack_bits(comps["codes"], bits - 1, cols)
    else:
        idx = np.zeros((rows, cols), np.uint32)
    mag = comps["levels"].astype(F32)[idx]
    return np.where(pos, mag, -mag).astype(F32)


# ----------------------------------------------------------------------------- quant

def quant_scale_exp(x, bits, group):
    """The power of two that brings the largest group scale into [2^14, 2^15) for f16 storage."""
    m = as_matrix(x)
    smax = F32(np.abs(m).max()) / F32((1 << (bits - 1)) - 1) if m.size else F32(0)
    if smax == 0:
        return 0
    return int(np.frexp(smax)[1]) - 15


def encode_quant(x, bits=4, group=128):
    """Symmetric k-bit group quantization along the last dimension.

    qmax = 2^(bits-1) - 1; per group scale = f16(max|x| / qmax / 2^e) (e = scale_exp, one per
    tensor); effective scale sc = f32(scale) * 2^e; q = clip(rint(x / sc), -qmax, qmax) (0 when
    sc == 0); stored code = q + qmax, `bits` wide.
    """
    m = as_matrix(x)
    rows, cols = m.shape
    qmax = F32((1 << (bits - 1)) - 1)
    e = quant_scale_exp(x, bits, group)
    ng = -(-cols // group)
    padded = np.zeros((rows, ng * group), F32)
    padded[:, :cols] = np.abs(m)
    amax = padded.reshape(rows, ng, group).max(axis=-1)
    scales16 = np.ldexp(amax / qmax, -e).astype(F32).astype(np.float16)
    if not np.isfinite(scales16).all():
        raise ValueError("quant: a group scale overflows float16")
    sc = np.ldexp(scales16.astype(F32), e).astype(F32)
    sc_full = np.repeat(sc, group, axis=1)[:, :cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(sc_full > 0, np.clip(np.rint(m / sc_full), -qmax, qmax), F32(0))
    codes = (q + qmax).astype(np.uint32)
    return {"codes": pack_bits(codes, bits), "scales": scales16}, {"scale_exp": e}


def decode_quant(comps, shape, bits=4, group=128, scale_exp=0):
    rows, cols = rows_cols(shape)
    qmax = (1 << (bits - 1)) - 1
    q = unpack_bits(comps["codes"], bits, cols).astype(np.int64) - qmax
    sc = np.ldexp(comps["scales"].astype(F32), scale_exp).astype(F32)
    sc_full = np.repeat(sc, group, axis=1)[:, :cols]
    return (q.astype(F32) * sc_full).astype(F32)


# ----------------------------------------------------------------------------- sparse

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def dare_uniform(seed: int, n: int) -> np.ndarray:
    """Counter-based uniforms in [0, 1): splitmix64 of seed + (i+1)*golden, top 24 bits."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + i * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(F64) * 2.0 ** -24


def topk_mask(a, n_keep):
    """True for the n_keep largest entries of a (flat order), ties by lower index."""
    flat = np.asarray(a).reshape(-1)
    keep = np.zeros(flat.size, bool)
    if n_keep > 0:
        keep[np.argsort(-flat, kind="stable")[:n_keep]] = True
    return keep.reshape(np.shape(a))


def sparse_keep_mask(m, p, mode, seed):
    n = m.size
    if mode == "random":
        return (dare_uniform(seed, n) >= p).reshape(m.shape)
    return topk_mask(np.abs(m), n - int(round(p * n)))


def encode_sparse(x, p=0.9, mode="random", seed=0, values="f16", index="auto"):
    """DARE (random drop, kept values * f32(1/(1-p))) or magnitude top-k (ties: lower index)."""
    m = as_matrix(x)
    rows, cols = m.shape
    keep = sparse_keep_mask(m, p, mode, seed)
    rescale = F32(1.0 / (1.0 - p)) if mode == "random" else F32(1.0)
    v = (m * rescale).astype(F32)
    # Entries: (row, col, value) in row-major order; gap encoding inserts zero-valued fillers.
    nnz_row = keep.sum(axis=1)
    bitmap_bytes = rows * (-(-cols // 8))
    gap_entries = []
    for r in range(rows):
        prev, ents = -1, []
        for c in np.flatnonzero(keep[r]):
            while c - prev - 1 > 255:
                prev += 256
                ents.append((prev, False))
            ents.append((c, True))
            prev = c
        while cols - prev - 1 > 255:  # the row's entries reach within 255 columns of its end (§4.3)
            prev += 256
            ents.append((prev, False))
        gap_entries.append(ents)
    n_gap = sum(len(e) for e in gap_entries)
    vsize = {"f32": 4, "f16": 2, "bf16": 2, "int8": 1}[values]
    use_gaps = index == "gaps" or (
        index == "auto" and n_gap * (1 + vsize) < bitmap_bytes + int(nnz_row.sum()) * vsize)
    out = {}
    if use_gaps:
        cols_list, rowptr = [], [0]
        for r, ents in enumerate(gap_entries):
            prev = -1
            for c, is_real in ents:
                cols_list.append((r, c, c - prev - 1, is_real))
                prev = c
            rowptr.append(rowptr[-1] + len(ents))
        gaps = np.array([g for _, _, g, _ in cols_list], np.uint8)
        vals = np.array([v[r, c] if real else 0.0 for r, c, _, real in cols_list], F32)
        out["gaps"] = gaps
    else:
        vals = v[keep]
        rowptr = np.concatenate([[0], np.cumsum(nnz_row)])
        out["mask"] = np.packbits(keep, axis=-1, bitorder="little")
    out["rowptr"] = np.asarray(rowptr, np.int64)
    if values == "int8":
        starts = out["rowptr"]
        vscale = np.zeros(rows, F32)
        q = np.zeros(vals.size, np.int8)
        for r in range(rows):
            seg = vals[starts[r]:starts[r + 1]]
            if seg.size:
                vscale[r] = F32(np.abs(seg).max()) / F32(127)
                if vscale[r] > 0:
                    q[starts[r]:starts[r + 1]] = np.clip(np.rint(seg / vscale[r]), -127, 127)
        out["values"], out["vscale"] = q, vscale
    else:
        out["values"] = round_to(vals, values)
    return out, {"index": "gaps" if use_gaps else "bitmap"}


def decode_sparse(comps, shape, values="f16", index="bitmap", **_):
    rows, cols = rows_cols(shape)
    rowptr = comps["rowptr"]
    if values == "int8":
        vals = np.empty(comps["values"].size, F32)
        for r in range(rows):
            s, e = rowptr[r], rowptr[r + 1]
            vals[s:e] = comps["values"][s:e].astype(F32) * comps["vscale"][r]
    else:
        vals = widen(comps["values"], values)
    out = np.zeros((rows, cols), F32)
    if index == "bitmap":
        keep = np.unpackbits(comps["mask"], axis=-1, bitorder="little")[:, :cols].astype(bool)
        out[keep] = vals
    else:
        gaps = comps["gaps"].astype(np.int64)
        for r in range(rows):
            s, e = rowptr[r], rowptr[r + 1]
            c = np.cumsum(gaps[s:e] + 1) - 1
            out[r, c] = vals[s:e]
    return out


# ----------------------------------------------------------------------------- lowrank

def encode_lowrank(x, rank=16, dtype="f16"):
    """Truncated SVD: u = U_r*sqrt(S_r) (rows, r), v = sqrt(S_r)*V_r^T (r, cols)."""
    m = as_matrix(x)
    U, S, Vt = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(S[:rank]).astype(F32)
    return {"u": round_to(U[:, :rank] * root, dtype), "v": round_to(root[:, None] * Vt[:rank], dtype)}


def parse_list(value) -> list[int]:
    """A lowrank `bits` / `bands` value: 6 or "8/4/2" -> [6] / [8, 4, 2]."""
    return [int(value)] if isinstance(value, int) else [int(t) for t in str(value).split("/")]


def vector_offset(bits: int) -> F32:
    """Codes 0 .. 2^bits - 1 stand for the levels (code - offset) * scale, symmetric around 0."""
    return F32(((1 << bits) - 1) / 2)


# Candidate clipping fractions of max|x| for a group's scale (the encoder picks the one with the
# smallest squared error; decoding does not depend on how the scale was chosen).
CLIP_FRACTIONS = np.linspace(0.1, 1.0, 19)


def quantize_vectors(x, bits: int, group: int):
    """Quantize each row of x (n, len) in groups of `group` elements to `bits`-wide codes with one f16 scale per
    group: scale = f16(max|group| · fraction / offset), the fraction (of CLIP_FRACTIONS) whose codes
    clip(rint(x / scale + offset), 0, 2^bits - 1) give the smallest squared error (the first on ties; a zero
    scale codes every element 0). Returns (packed codes uint8 (n, B(bits)), scales f16 (n, G))."""
    x = np.asarray(x, F32)
    n, length = x.shape
    ng = -(-length // group)
    top, off = (1 << bits) - 1, vector_offset(bits)
    codes = np.zeros((n, length), np.uint32)
    scales = np.zeros((n, ng), np.float16)
    for i in range(n):
        for g in range(ng):
            xs = np.zeros(group, F32)  # a last, shorter group is padded with zeros, which count in its error
            part = x[i, g * group:(g + 1) * group]
            xs[:len(part)] = part
            amax = np.abs(xs).max()
            best = (np.inf, np.float16(0), np.zeros(group, np.uint32))
            for frac in CLIP_FRACTIONS:
                sc16 = np.float16(amax * F32(frac) / off)
                sc = F32(sc16)
                if sc > 0:
                    q = np.clip(np.rint(xs / sc + off), 0, top)
                    err = (((q - off) * sc - xs).astype(F32) ** 2).sum()
                else:
                    q, err = np.zeros(len(xs)), (xs ** 2).sum()
                if err < best[0]:
                    best = (err, sc16, q.astype(np.uint32))
            scales[i, g], codes[i, g * group:(g + 1) * group] = best[1], best[2][:len(part)]
    return pack_bits(codes, bits), scales


def dequantize_vectors(packed, scales16, bits: int, group: int, length: int) -> np.ndarray:
    """Rows of (f32(code) - offset) * f32(scale of the element's group), one f32 product each."""
    packed = np.asarray(packed)
    step = max(1, (1 << 20) // max(length, 1))  # rows per chunk: unpacking temporaries stay small
    if packed.shape[0] > step:
        return np.concatenate([dequantize_vectors(packed[i:i + step], scales16[i:i + step], bits, group, length)
                               for i in range(0, packed.shape[0], step)])
    codes = unpack_bits(packed, bits, length).astype(F32)
    sc = np.repeat(np.asarray(scales16).astype(F32), group, axis=1)[:, :length]
    return ((codes - vector_offset(bits)) * sc).astype(F32)


def encode_lowrank_quant(x, bits, bands, group=64, row_weights=None, col_weights=None):
    """Mixed-precision low rank (Delta-CoMe). With weights r (rows) and c (cols), 1 when not given: the SVD
    of W = diag(√r)·M·diag(√c) gives directions k (largest first); u_k, v_k are W's singular vectors taken back
    to M's space (divided by √r, √c) and normalised, s_k the singular value times those norms. Direction k of
    band b keeps u_k and v_k in bits[b]-bit groups (quantize_vectors) and a float32 singular value, refitted by
    least squares to the quantized vectors in the same weighted norm, so quantization does not shrink the delta.
    Components: s (r,); codes (bytes): per direction its u codes then its v codes, each padded to a byte; scales
    (r, G_rows + G_cols): its u group scales, then v's."""
    m = as_matrix(x)
    rows, cols = m.shape
    sr = np.ones(rows, F32) if row_weights is None else np.sqrt(np.asarray(row_weights, F64)).astype(F32)
    sc = np.ones(cols, F32) if col_weights is None else np.sqrt(np.asarray(col_weights, F64)).astype(F32)
    rank = min(sum(parse_list(bands)), rows, cols)
    U, S, Vt = np.linalg.svd(m * sr[:, None] * sc[None, :], full_matrices=False)
    u, v = U[:, :rank].T / sr[None, :], Vt[:rank] / sc[None, :]
    nu, nv = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)
    nu[nu == 0], nv[nv == 0] = 1, 1
    u, v = (u / nu[:, None]).astype(F32), (v / nv[:, None]).astype(F32)
    s = S[:rank].astype(F64) * nu * nv
    codes, scales, uhat, vhat = [], [], [], []
    for k, w in enumerate(direction_bits(bits, bands)[:rank]):
        pu, su = quantize_vectors(u[k:k + 1], w, group)
        pv, sv = quantize_vectors(v[k:k + 1], w, group)
        codes += [pu.reshape(-1), pv.reshape(-1)]
        scales.append(np.concatenate([su, sv], axis=1))
        uhat.append(dequantize_vectors(pu, su, w, group, rows))
        vhat.append(dequantize_vectors(pv, sv, w, group, cols))
    uhat, vhat = np.concatenate(uhat).astype(F64), np.concatenate(vhat).astype(F64)
    r = np.ones(rows) if row_weights is None else np.asarray(row_weights, F64)
    c = np.ones(cols) if col_weights is None else np.asarray(col_weights, F64)
    # argmin_s Σ_ij r_i c_j (M - Σ_k s_k û_k v̂_kᵀ)_ij²: (Ûr Ûᵀ ∘ V̂c V̂ᵀ) s = diag(Ûr M c V̂ᵀ)
    gram = ((uhat * r) @ uhat.T) * ((vhat * c) @ vhat.T)
    rhs = (((uhat * r) @ m.astype(F64)) * (vhat * c)).sum(axis=1)
    try:
        s = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        pass
    return {"s": np.asarray(s, F32), "codes": np.concatenate(codes), "scales": np.concatenate(scales)}


def direction_bits(bits, bands) -> list[int]:
    """Bit width of each direction: bits[b] repeated bands[b] times."""
    return [w for w, n in zip(parse_list(bits), parse_list(bands)) for _ in range(n)]


def lowrank_factors(comps, shape, rank=16, dtype="f16", bits=None, bands=None, group=64):
    """The f32 factors (u (rows, r), v (r, cols)) whose product decode_lowrank computes."""
    rows, cols = rows_cols(shape)
    if bits is None:
        return widen(comps["u"], dtype), widen(comps["v"], dtype)
    gu = -(-rows // group)
    codes = np.asarray(comps["codes"])
    uh, vh = [], []
    at = 0
    for k, w in enumerate(direction_bits(bits, bands)):
        nu, nv = -(-rows * w // 8), -(-cols * w // 8)
        sc = np.asarray(comps["scales"])[k:k + 1]
        uh.append(dequantize_vectors(codes[None, at:at + nu], sc[:, :gu], w, group, rows))
        vh.append(dequantize_vectors(codes[None, at + nu:at + nu + nv], sc[:, gu:], w, group, cols))
        at += nu + nv
    u = (np.concatenate(uh).T * comps["s"].astype(F32)).astype(F32)  # f32(u_hat * s), one product
    return u, np.concatenate(vh)


def decode_lowrank(comps, shape, **params):
    u, v = lowrank_factors(comps, shape, **params)
    acc = np.zeros((u.shape[0], v.shape[1]), F32)
    for k in range(u.shape[1]):  # sequential over k, product and sum each rounded to f32
        acc = (acc + (u[:, k:k + 1] * v[k:k + 1, :]).astype(F32)).astype(F32)
    return acc


# ----------------------------------------------------------------------------- dense

def encode_dense(x, dtype="f32"):
    return {"values": round_to(np.asarray(x, dtype=F32), dtype)}


def decode_dense(comps, shape, dtype="f32"):
    return widen(comps["values"], dtype).reshape(rows_cols(shape))


# ----------------------------------------------------------------------------- apply

def apply(base_f32: np.ndarray, delta_f32: np.ndarray, alpha: float, out_dtype: str,
          rounding: str = "nearest") -> np.ndarray:
    """out = round(f32(base) + f32(alpha) * d): one f32 product, one f32 sum, one rounding, to nearest or
    dithered. "auto" is the caller's choice per tensor: dithered for a lossy codec (any but dense) into f16/bf16,
    else nearest."""
    b = np.asarray(base_f32, F32)
    t = (F32(alpha) * np.asarray(delta_f32, F32).reshape(b.shape)).astype(F32)
    s = (b + t).astype(F32)
    if rounding == "nearest" or out_dtype == "f32":
        return round_to(s, out_dtype)
    if rounding != "dithered":
        raise ValueError(f"rounding {rounding!r}")
    h = dither_bits(s.size).reshape(s.shape)
    return round_bf16_dithered(s, h) if out_dtype == "bf16" else round_f16_dithered(s, h).view(np.float16)


# Dithered rounding: rounded away from zero with probability = the fraction of an output ulp that truncation
# drops, the random bits a hash of the element's flat index: unbiased on average, deterministic.
_U64 = np.uint64


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, on uint64 arrays (arithmetic modulo 2^64)."""
    x = np.asarray(x, _U64)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def dither_bits(n: int) -> np.ndarray:
    """The 64 dither bits of flat indices 0 .. n-1: SplitMix64's outputs 1 .. n from seed 0, the same for every
    tensor."""
    return mix64((np.arange(n, dtype=_U64) + _U64(1)) * _U64(0x9E3779B97F4A7C15))


def round_bf16_dithered(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits: up (away from zero) iff the 16 dropped bits exceed the top 16 bits of h;
    inf and NaN as round_bf16."""
    u = np.asarray(x, F32).view(np.uint32)
    up = (u & 0xFFFF).astype(_U64) > (h >> _U64(48))
    out = ((u >> 16) + up).astype(np.uint16)
    return np.where((u & 0x7FFFFFFF) >= 0x7F800000, round_bf16(x), out)


def round_f16_dithered(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """float32 -> float16 bits (uint16): normal halves drop 13 bits (compared with h's top 13), subnormal ones
    `126 - e` bits (h's top as many); below 2^-63 zero; |x| >= 65536, inf and NaN as round_to(x, 'f16')."""
    u = np.asarray(x, F32).view(np.uint32).astype(_U64)
    sign, ax = (u >> _U64(16)) & _U64(0x8000), u & _U64(0x7FFFFFFF)
    v = ax - _U64(0x38000000)  # wraps for small ax; those take the subnormal branch
    normal = (v >> _U64(13)) + ((v & _U64(0x1FFF)) > (h >> _U64(51)))
    e = ax >> _U64(23)
    shift = np.clip(_U64(126) - np.minimum(e, _U64(126)), 14, 62).astype(_U64)
    m = (ax & _U64(0x7FFFFF)) | _U64(0x800000)
    rem = m & ((_U64(1) << shift) - _U64(1))
    sub = np.where(e < 64, _U64(0), (m >> shift) + (rem > (h >> (_U64(64) - shift))))
    q = np.where(ax >= 0x38800000, normal, sub)
    nearest = round_to(np.asarray(x, F32), "f16").view(np.uint16).astype(_U64)
    return np.where(ax >= 0x47800000, nearest, sign | q).astype(np.uint16)


def rows_cols(shape):
    shape = tuple(shape)
    if not shape:
        return 1, 1
    cols = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows, cols


ENCODERS = {"sign": encode_sign, "levels": encode_levels, "quant": encode_quant,
            "sparse": encode_sparse, "lowrank": encode_lowrank, "dense": encode_dense}
DECODERS = {"sign": decode_sign, "levels": decode_levels, "quant": decode_quant,
            "sparse": decode_sparse, "lowrank": decode_lowrank, "dense": decode_dense}
