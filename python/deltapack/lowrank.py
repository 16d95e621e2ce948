"""The low-rank encoders deltapack uses in production: a (weighted, randomized) truncated SVD and the
mixed-precision form of Delta-CoMe, whose singular vectors are kept in k-bit groups. numpy's LAPACK is the
right tool for these (no C++ kernel). deltapack.reference holds the readable specification of the same
encodings (a full SVD, one group at a time); the tests compare the two, bit for bit where both take LAPACK's
full SVD. Decoding follows the spec's rules (reference.dequantize_vectors, lowrank_factors) and the C++ core."""
from __future__ import annotations

import numpy as np

from .reference import as_matrix, dequantize_vectors, pack_bits, parse_list, round_to, vector_offset
from .threads import SMALL_LAPACK, blas_threads_for

F32, F64 = np.float32, np.float64

# Candidate clipping fractions of max|x| for a group's scale (the encoder picks the one with the
# smallest squared error; decoding does not depend on how the scale was chosen).
CLIP_FRACTIONS = np.linspace(0.1, 1.0, 19)


def quantize_vectors(x, bits: int, group: int):
    """Quantize each row of x (n, len) to `bits`-wide codes in groups of `group` with f16 scales, each
    scale chosen among clipping fractions of the group's max|x| to minimise the squared error.
    Returns (packed codes uint8 (n, B(bits)), scales f16 (n, G))."""
    x = np.asarray(x, F32)
    n, length = x.shape
    step = max(1, (1 << 22) // max(length, 1))  # rows per chunk: temporaries stay near 16 MB
    if n > step:
        parts = [quantize_vectors(x[i:i + step], bits, group) for i in range(0, n, step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    ng = -(-length // group)
    xp = np.zeros((n, ng * group), F32)
    xp[:, :length] = x
    xp = xp.reshape(n, ng, group)
    top = (1 << bits) - 1
    off = vector_offset(bits)
    amax = np.abs(xp).max(axis=-1)
    best_err = np.full((n, ng), np.inf)
    best_scale = np.zeros((n, ng), np.float16)
    for frac in CLIP_FRACTIONS:
        sc16 = (amax * F32(frac) / off).astype(np.float16)
        sc = sc16.astype(F32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.where(sc > 0, np.clip(np.rint(xp / sc + off), 0, top), 0)
        err = ((codes - off) * sc - xp) ** 2
        err = np.where(sc > 0, err, xp ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, sc16, best_scale)
    sc = best_scale.astype(F32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(sc > 0, np.clip(np.rint(xp / sc + off), 0, top), 0).reshape(n, ng * group)[:, :length]
    return pack_bits(codes.astype(np.uint32), bits), best_scale


def svd(m, rank, row_weights=None, col_weights=None, seed=0, power=2):
    """Top-`rank` SVD of W = diag(√r)·M·diag(√c) (r, c = 1 when not given), expressed in M's own space:
    M ≈ Σ_k s_k u_k v_kᵀ with unit u_k (rows of u) and v_k (rows of v). Returns (u, s, v, S², total) where
    S_k² is the weighted energy of direction k and total that of M. LAPACK's full SVD for small matrices or
    a rank that is a large part of the matrix; otherwise a randomized one (Halko, Martinsson & Tropp 2011:
    range finder with 16 oversamples and `power` power iterations, seeded) that applies the weights on the
    fly, so no weighted copy of a large M is made."""
    m = np.asarray(m, F32)
    rows, cols = m.shape
    sr = np.ones(rows, F32) if row_weights is None else np.sqrt(np.asarray(row_weights, F64)).astype(F32)
    sc = np.ones(cols, F32) if col_weights is None else np.sqrt(np.asarray(col_weights, F64)).astype(F32)
    total = 0.0
    for i in range(0, rows, 4096):  # Σ (√r_i m_ij √c_j)² in row blocks: no squared copy of M
        block = m[i:i + 4096] * sr[i:i + 4096, None] * sc[None, :]
        total += float(np.square(block, dtype=F64).sum())
    rank = min(rank, rows, cols)
    if rank >= min(rows, cols) // 2 or min(rows, cols) <= 512:
        u, S, v = _full_svd(m * sr[:, None] * sc[None, :], rank)
    else:  # a few (rows or cols) x (rank + 16) blocks at a time: no copy of M, in-place scaling
        rng = np.random.default_rng(seed)
        q = m @ (sc[:, None] * rng.standard_normal((cols, min(rank + 16, rows, cols))).astype(F32))
        # Inside the power iterations a basis only has to span the right space (one Cholesky QR pass); the last
        # one, which the small SVD is taken in, is orthonormal to float32 accuracy (two passes).
        q *= sr[:, None]
        q = _orthonormal(q, passes=1 if power else 2)
        for i in range(power):
            q *= sr[:, None]
            p = m.T @ q                                # Wᵀ q
            p *= sc[:, None]
            p = _orthonormal(p, passes=1)
            p *= sc[:, None]
            q = m @ p                                  # W p
            q *= sr[:, None]
            q = _orthonormal(q, passes=2 if i == power - 1 else 1)
        q *= sr[:, None]
        small = q.T @ m
        small *= sc[None, :]
        q /= sr[:, None]
        ub, S, v = _full_svd(small, rank)
        u = (q @ ub.T).T                               # (rank, rows)
        del q, small
    u /= sr[None, :]                                   # back to M's own space
    v /= sc[None, :]
    nu, nv = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)
    nu[nu == 0], nv[nv == 0] = 1, 1
    u /= nu[:, None]
    v /= nv[:, None]
    s = S.astype(F64) * nu * nv
    return np.ascontiguousarray(u, F32), s, np.ascontiguousarray(v, F32), np.square(S.astype(F64)), total


GRAM_SIDE = 2048  # a full SVD whose shorter side is at most this comes from the Gram matrix's eigenvectors


def _full_svd(w, rank):
    """The top `rank` singular triplets of w as (u (rank, rows), S, v (rank, cols)), float32 vectors. Small
    matrices: LAPACK's SVD (the spec's, bit for bit). Large ones with a short side of at most GRAM_SIDE: the
    eigenvectors of the float64 Gram matrix of the short side (0.3 s against LAPACK's 2.1 s on 1024 x 4096; a
    singular value keeps about 16 - 2·log10(s_max/s) digits, all of them for every direction a budget keeps)."""
    rows, cols = w.shape
    if w.size < SMALL_LAPACK or min(rows, cols) > GRAM_SIDE:
        with blas_threads_for(w.size):
            U, S, Vt = np.linalg.svd(w, full_matrices=False)
        return U[:, :rank].T.copy(), S[:rank], Vt[:rank].copy()
    if rows > cols:
        v, S, u = _full_svd(w.T, rank)
        return u, S, v
    step = max(1, (1 << 24) // rows)  # columns per float64 block (128 MB)
    gram = np.zeros((rows, rows))
    for j in range(0, cols, step):
        block = w[:, j:j + step].astype(F64)
        gram += block @ block.T
    e, vecs = np.linalg.eigh(gram)
    order = np.argsort(e)[::-1][:rank]
    S, u = np.sqrt(np.maximum(e[order], 0)), vecs[:, order].T  # (rank, rows)
    inv = np.divide(1.0, S, out=np.zeros_like(S), where=S > 0)
    v = np.empty((len(S), cols), F32)
    step = max(1, (1 << 22) // rows)  # narrower blocks here (32 MB): each makes a float64 product as large
    for j in range(0, cols, step):
        v[:, j:j + step] = (u @ w[:, j:j + step].astype(F64)) * inv[:, None]
    return u.astype(F32), S, v


def _orthonormal(y, passes=2):
    """An orthonormal basis of y's columns (float32), by Cholesky QR `passes` times (only k x k extra memory);
    numpy's QR when y is too ill-conditioned for it."""
    for _ in range(passes):
        g = y.T.astype(F64) @ y.astype(F64) if y.shape[0] * y.shape[1] <= (1 << 22) else (y.T @ y).astype(F64)
        try:
            inv = np.linalg.inv(np.linalg.cholesky(g)).T.astype(F32)
        except np.linalg.LinAlgError:
            return np.linalg.qr(y)[0]
        if not np.isfinite(inv).all():
            return np.linalg.qr(y)[0]
        y = y @ inv
    return y


def encode_lowrank_quant(x, bits, bands, group=64, row_weights=None, col_weights=None, factors=None):
    """Mixed-precision low rank (Delta-CoMe): SVD M ≈ Σ s_k u_k v_kᵀ (svd, optionally weighted);
    direction k of band b keeps its unit vectors in bits[b]-bit groups (quantize_vectors) and a float32
    singular value, refitted by least squares to the quantized vectors (in the same weighted norm), so
    quantization does not shrink the delta. Components: s (r,); codes (bytes): per direction its u codes
    then its v codes, each padded to a byte; scales (r, G_rows + G_cols): its u group scales, then v's.
    factors: (u, s, v) of svd() under the same weights, with at least the rank's directions (e.g. kept from
    the budget's analysis): used instead of computing them again."""
    m = as_matrix(x)
    rows, cols = m.shape
    rank = sum(parse_list(bands))
    u, s, v = factors[:3] if factors is not None else svd(m, rank, row_weights, col_weights)[:3]
    if len(s) < min(rank, rows, cols):
        raise ValueError(f"lowrank: {len(s)} directions given for rank {rank}")
    codes, scales, uhat, vhat = [], [], [], []
    at = 0
    for w, n in zip(parse_list(bits), parse_list(bands)):  # one band (one width) at a time
        pu, su = quantize_vectors(u[at:at + n], w, group)
        pv, sv = quantize_vectors(v[at:at + n], w, group)
        codes.append(np.concatenate([pu, pv], axis=1).reshape(-1))  # per direction: its u codes, then its v's
        scales.append(np.concatenate([su, sv], axis=1))
        uhat.append(dequantize_vectors(pu, su, w, group, rows))
        vhat.append(dequantize_vectors(pv, sv, w, group, cols))
        at += n
    return {"s": _refit_singular_values(m, np.concatenate(uhat), np.concatenate(vhat), s[:at], row_weights,
                                        col_weights),
            "codes": np.concatenate(codes), "scales": np.concatenate(scales)}


def _refit_singular_values(m, uhat, vhat, s0, row_weights=None, col_weights=None):
    """argmin_s Σ_ij r_i c_j (M - Σ_k s_k u_k v_kᵀ)_ij² for fixed quantized vectors (rows of uhat, vhat),
    float64; the SVD's values when the system is singular."""
    # float32 products (a large tensor's factors are big), float64 for the small system.
    r = np.ones(uhat.shape[1], F32) if row_weights is None else np.asarray(row_weights, F32)
    c = np.ones(vhat.shape[1], F32) if col_weights is None else np.asarray(col_weights, F32)
    ur, vc = uhat * r, vhat * c
    gram = (ur @ uhat.T).astype(F64) * (vc @ vhat.T).astype(F64)
    rhs = ((ur @ np.asarray(m, F32)).astype(F64) * vc).sum(axis=1)
    try:
        s = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        s = s0
    if not np.isfinite(s).all():
        s = s0
    return np.asarray(s, F32)


def encode_lowrank(x, rank=16, dtype="f16"):
    """The plain low-rank form (reference.encode_lowrank): u = U_r·√S_r, v = √S_r·V_rᵀ, from svd() (LAPACK's
    full SVD on small matrices, the randomized one on large)."""
    m = as_matrix(x)
    u, s, v, _, _ = svd(m, rank)
    root = np.sqrt(s).astype(F32)
    return {"u": round_to(np.ascontiguousarray(u.T * root), dtype), "v": round_to(root[:, None] * v, dtype)}


def row_energy(m: np.ndarray, col: np.ndarray | None = None) -> np.ndarray:
    """Σ_j c_j m_ij² per row, in float64, a block of rows at a time (no squared copy of a large m)."""
    out = np.empty(m.shape[0])
    for i in range(0, m.shape[0], 4096):
        block = np.square(m[i:i + 4096], dtype=np.float64)
        out[i:i + 4096] = block.sum(axis=1) if col is None else block @ col
    return out
