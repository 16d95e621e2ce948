"""Bit budgets: choose each tensor's codec and parameters to minimise a loss proxy under a size limit.

    opts = tensor_options(name, delta, weights)   # one tensor at a time: what each choice costs and saves
    # (options_under: the same under several weightings, element codecs encoded once)
    alloc = allocate({name: opts, ...}, bits)      # a recipe per tensor, total size <= bits

A proxy is a weighted squared error of the rebuilt delta, Σ_ij w_ij (D̂ - D)_ij², with w_ij = r_i·c_j per
tensor (`proxy_weights`):
  - "relative" (data-free, the default): every matrix keeps the same share of its own delta,
    w = 1/|D|²; an embedding counts row by row (token by token), r_i = 1/|D_i|², so the few tokens a
    fine-tune moves a little are kept as well as the ones it moves a lot. Of the weightings compared on
    the project's four non-saturated pairs (docs/REPRODUCTION.md) it was the only one above 90 % gain
    retention on all four at 1 bit/param of matrices; the plain Frobenius error starves embeddings and the
    first layer (33 % on one pair).
  - "fisher": r_i = Σ g_i², c_j = Σ x_j² (squared output gradients and inputs on calibration data, the
    diagonal Kronecker-factored Fisher of the fine-tuned model, `deltapack.compress.calibration`): ½ of it
    approximates the loss increase, in one unit for every tensor;
  - "fisher-relative": the same within a tensor, each tensor normalised to its own weighted delta;
  - "activation-relative": c_j = Σ x_j² only (how much each input is used), normalised per tensor.
With calibration data `deltapack compress --budget --data` allocates with each proxy, scores each rebuilt
model against the fine-tune on that data, and keeps the data-free allocation unless another is clearly better
there (no single proxy won on every pair; budget._choose_proxy).

Candidates per tensor:
  - mixed-precision low rank: the SVD of the weighted delta (√r)·D·(√c); direction k is stored with
    b_k ∈ BITS bits per vector element or dropped. Its error is its weighted energy S_k² times the relative
    error ε(b) of b-bit vectors (measured on this tensor's top directions); at a Lagrange multiplier λ each
    direction takes the b minimising S_k²·ε(b) + λ·cost(b), so bit widths fall along the spectrum and form
    bands (Delta-CoMe's layout, chosen by a multiplier where DeltaMix solves an integer program);
  - element codecs measured by encoding and decoding (sign, levels, quant), and "not stored".
`allocate` searches the one multiplier λ at which the total size meets the budget (bisection); each tensor
then takes the candidate minimising error + λ·size, which is optimal for the convex hull of the candidates.
"""
from __future__ import annotations

import dataclasses
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .. import lowrank, reference, tensors
from ..threads import SMALL_LAPACK, blas_threads_for, workers

BITS = (1, 2, 3, 4, 5, 6, 8)   # bits per singular-vector element the planner may pick
GROUP = 64                     # elements per f16 scale of a quantized singular vector
# Element codecs tried next to low rank (bits/param ~1, 2, 3, 4, 8, and the exact delta).
ELEMENT_CODECS = ("sign:scope=row", "levels:bits=2", "quant:bits=3,group=64", "quant:bits=4,group=64",
                  "quant:bits=8,group=128", "dense")
_EPS_SAMPLE = 48               # directions whose quantization error estimates ε(b)
_EPS_GROUPS = 64               # quantization groups of each vector it is measured on (evenly spaced, whole groups)
MAX_RANK = 512                 # directions analysed per tensor (the randomized SVD's rank on large matrices)
_ROW_SAMPLE = 2048             # rows on which element codecs are measured for larger tensors


PROXIES = ("relative", "fisher", "fisher-relative", "activation-relative")
DATA_FREE = "relative"
# fisher-relative weighs a tensor's errors as fisher does times one number per tensor: the same SVD directions,
# quantization errors and choices, every error and energy scaled (TensorOptions.scaled). Its analysis is fisher's.
SCALED_FROM = {"fisher-relative": "fisher"}


def weight_floor(w: np.ndarray) -> np.ndarray:
    """Weights as float64 with a floor of 1e-3 x their mean, so no row or column is free (a token absent from
    calibration data still matters) and whitening stays invertible."""
    w = np.asarray(w, np.float64)
    mean = float(w.mean()) if w.size else 1.0
    return np.maximum(w, 1e-3 * mean if mean > 0 else 1.0)


@dataclass
class Weights:
    """Per-row and per-column weights of a tensor's error (w_ij = row_i · col_j); None = all ones."""

    row: np.ndarray | None = None
    col: np.ndarray | None = None

    def floored(self, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.ones(rows) if self.row is None else weight_floor(self.row)
        c = np.ones(cols) if self.col is None else weight_floor(self.col)
        if r.shape != (rows,) or c.shape != (cols,):
            raise ValueError(f"weights of shape {r.shape} x {c.shape} do not match a {rows} x {cols} tensor")
        return r, c

    def error(self, e: np.ndarray) -> float:
        """Σ w_ij e_ij² of an error matrix."""
        r, c = self.floored(*e.shape)
        return float(np.einsum("i,ij,j->", r, np.square(e, dtype=np.float64), c))


def weight_ratio(scaled: Weights, of: Weights, rows: int, cols: int) -> float:
    """alpha with scaled = alpha x of (weights of one tensor under SCALED_FROM's two proxies)."""
    (r1, c1), (r0, c0) = scaled.floored(rows, cols), of.floored(rows, cols)
    return float(r1.sum() * c1.sum() / (r0.sum() * c0.sum()))


def proxy_weights(proxy: str, delta: np.ndarray, stats: Weights | None = None, embedding: bool = False) -> Weights:
    """The error weights of one tensor (a delta matrix) under a proxy; stats: its Fisher factors
    (`calibration.fisher_weights`), needed by every proxy but "relative"."""
    m = np.asarray(delta, np.float32)
    rows, cols = m.shape
    if proxy == "relative":
        per_row = lowrank.row_energy(m)
        if embedding:
            return Weights(1.0 / (rows * weight_floor(per_row)), None)
        return Weights(np.full(rows, 1.0 / max(float(per_row.sum()), 1e-300)), None)
    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy {proxy!r} (known: {', '.join(PROXIES)})")
    if stats is None:
        raise ValueError(f"proxy {proxy!r} needs calibration statistics (--data)")
    r, c = stats.floored(rows, cols)
    if proxy == "activation-relative":  # an embedding's inputs are its rows (tokens)
        r, c = (r, np.ones(cols)) if embedding else (np.ones(rows), c)
    if proxy != "fisher":
        r = r / max(float(r @ lowrank.row_energy(m, c)), 1e-300)
    return Weights(r, c)


# ----------------------------------------------------------------------------- per-tensor options

def entry_bits(name: str, codec: str, params: dict, components) -> int:
    """Header bits a stored tensor adds: one safetensors entry per component and its manifest entry (JSON
    escaped inside a string), estimated from their lengths (the writer checks the real file size)."""
    comps = list(components)
    st = sum(len(name) + len(c) + 75 for c in comps)
    manifest = 1.15 * (len(name) + 110 + len(json.dumps(params)) + sum(len(c) + 3 for c in comps))
    return int(8 * (st + manifest))


_LOWRANK_COMPONENTS = ("codes", "s", "scales")


def direction_bits(rows: int, cols: int, b: int, group: int = GROUP) -> int:
    """Stored bits of one direction at b bits: codes (each vector padded to a byte), f16 group scales, f32 s."""
    return 8 * (-(-rows * b // 8) + -(-cols * b // 8)) + 16 * (-(-rows // group) + -(-cols // group)) + 32


@dataclass
class TensorOptions:
    """What storing one tensor costs (bits) and leaves (weighted squared error), per choice."""

    name: str
    shape: tuple
    rows: int
    cols: int
    energy: float                       # Σ w_ij D_ij²: the error of not storing the tensor
    s2: np.ndarray                      # weighted energy of each SVD direction, descending
    eps: dict                           # b -> mean relative error of a b-bit direction
    dir_bits: dict                      # b -> stored bits of one direction
    elements: list = field(default_factory=list)  # [(recipe, bits, error)] of element codecs
    droppable: bool = True              # "not stored" is a candidate
    factors: tuple | None = None        # (u, s, v) of the SVD, when asked for (keep_factors): the encoder reuses them
    rank_multiple: int = 1              # the low rank kept is a multiple of this (or every direction analysed)

    def scaled(self, alpha: float) -> "TensorOptions":
        """The same candidates under weights multiplied by alpha (errors and energies x alpha; the SVD's
        directions and the relative errors ε(b) do not change)."""
        return dataclasses.replace(self, energy=self.energy * alpha, s2=self.s2 * alpha,
                                   elements=[(r, b, e * alpha) for r, b, e in self.elements])

    def lowrank_choice(self, lam: float):
        """Bits per direction minimising Σ err + λ·bits; returns (bits list, error, size)."""
        s2 = self.s2
        best_cost = s2.copy()                       # dropped: its whole energy
        best_b = np.zeros(len(s2), np.int64)
        for b in BITS:
            cost = s2 * self.eps[b] + lam * self.dir_bits[b]
            take = cost < best_cost
            best_cost = np.where(take, cost, best_cost)
            best_b = np.where(take, b, best_b)
        if self.rank_multiple > 1:
            best_b = self._whole_multiples(best_b, lam)
        kept = best_b > 0
        err = float(self.energy - s2[kept].sum() + (s2[kept] * np.array([self.eps[b] for b in best_b[kept]])).sum()) \
            if kept.any() else self.energy
        size = sum(self.dir_bits[int(b)] for b in best_b[kept])
        return best_b, max(err, 0.0), size

    def _whole_multiples(self, best_b, lam):
        """best_b with the number of kept directions rounded down or up to a multiple of rank_multiple, whichever
        costs less (error + λ·bits): down drops the last kept directions, up keeps the next ones, each at its
        best width. A quantized LoRA adapter then needs no zero directions to fill its blocks."""
        g, k, n = self.rank_multiple, int((best_b > 0).sum()), len(self.s2)
        if k % g == 0 or k == n:
            return best_b

        eps = np.array([1.0] + [self.eps.get(b, 1.0) for b in range(1, max(BITS) + 1)])   # by width; 0 = dropped
        bits = np.array([0.0] + [self.dir_bits.get(b, 0.0) for b in range(1, max(BITS) + 1)])

        def cost(b):
            return float((self.s2 * eps[b] + lam * bits[b]).sum())

        down = best_b.copy()
        down[np.flatnonzero(best_b > 0)[k // g * g:]] = 0
        up = best_b.copy()
        more = np.flatnonzero(best_b == 0)[:min(k // g * g + g, n) - k]
        widths = np.array(BITS)
        up[more] = widths[np.argmin(self.s2[more, None] * eps[widths] + lam * bits[widths], axis=1)]
        return min((down, up), key=cost)

    def best(self, lam: float):
        """(recipe or None, error, bits) minimising error + λ·bits over every candidate."""
        cands = [(None, self.energy, 0)] if self.droppable else []
        bits, err, size = self.lowrank_choice(lam)
        if size:
            recipe = lowrank_recipe(bits)
            params = dict(p.split("=") for p in recipe.partition(":")[2].split(","))
            cands.append((recipe, err, size + entry_bits(self.name, "lowrank", params, _LOWRANK_COMPONENTS)))
        cands += [(r, e, b) for r, b, e in self.elements]
        return min(cands, key=lambda t: t[1] + lam * t[2])


def _eps_elements(length: int) -> np.ndarray:
    """The element indices of at most _EPS_GROUPS evenly spaced whole groups of a vector (all of a short one), in
    order; the last group, always among them, stays last (it may be shorter)."""
    groups = -(-length // GROUP)
    if groups <= _EPS_GROUPS:
        return np.arange(length)
    pick = np.unique(np.linspace(0, groups - 1, _EPS_GROUPS).round().astype(np.int64))
    idx = (pick[:, None] * GROUP + np.arange(GROUP)).reshape(-1)
    return idx[idx < length]


def lowrank_recipe(bits_per_direction) -> str:
    """`lowrank:bits=8/4,bands=3/9,group=64` from per-direction widths (0 = dropped, at the end)."""
    runs = []
    for b in (int(x) for x in bits_per_direction if x > 0):
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return (f"lowrank:bits={'/'.join(str(b) for b, _ in runs)},bands={'/'.join(str(n) for _, n in runs)},"
            f"group={GROUP}")


def tensor_options(name: str, delta: np.ndarray, weights: Weights | None = None, **kw) -> TensorOptions:
    """The candidates of one tensor (a float32 delta of any shape, viewed as rows x cols): its top max_rank
    (default MAX_RANK) SVD directions and the element codecs (options_under's keywords). keep_factors: keep
    the SVD's (u, s, v) in `factors`, for encoding the lowrank choice without a second SVD."""
    return options_under(name, delta, {None: weights}, **kw)[None]


def options_under(name: str, delta: np.ndarray, weightings: dict, *, max_rank: int | None = None,
                  elements=ELEMENT_CODECS, droppable: bool = True, threads=None, seed: int = 0,
                  keep_factors: bool = False, rank_multiple: int = 1) -> dict:
    """{key: TensorOptions} of one tensor under several weightings ({key: Weights or None}): an SVD for each,
    the element codecs encoded and decoded once and their error weighed by each. keep_factors may also be a
    function keep(key, (u, s, v)), handed each weighting's factors as soon as they exist (and not kept in the
    options): a caller that moves them out of memory holds one weighting's at a time."""

    m = reference.as_matrix(delta)
    rows, cols = m.shape
    floored = {k: (w or Weights()).floored(rows, cols) for k, w in weightings.items()}

    def lowrank_under(key):
        r, c = floored[key]
        opts = _lowrank_options(name, np.shape(delta), m, r, c, max_rank, droppable, seed, bool(keep_factors))
        opts.rank_multiple = rank_multiple
        return key, opts

    def handed(pairs):
        for key, opts in pairs:
            if callable(keep_factors):
                keep_factors(key, opts.factors)
                opts.factors = None
            yield key, opts

    # A small matrix's SVD runs on one BLAS thread (threads.SMALL_LAPACK): the weightings take a thread each.
    n = min(len(floored), workers(threads)) if m.size < SMALL_LAPACK else 1
    if n > 1:
        with blas_threads_for(0), ThreadPoolExecutor(n) as pool:
            out = dict(handed(pool.map(lowrank_under, floored)))
    else:
        out = dict(handed(map(lowrank_under, floored)))
    # Element codecs: measured on all rows, or on evenly spaced rows of a larger tensor and scaled (their
    # size and error are sums over rows; levels' block means are then those of the sample).
    idx = np.arange(rows) if rows <= _ROW_SAMPLE else np.linspace(0, rows - 1, _ROW_SAMPLE).astype(np.int64)
    sample, scale = np.ascontiguousarray(m[idx]), rows / len(idx)
    for recipe in elements:
        try:
            enc = tensors.encode(sample, recipe, threads=threads)
        except ValueError:
            continue
        size = int(8 * enc.nbytes * scale) + entry_bits(name, enc.codec, enc.params, enc.components)
        diff = tensors.decode(enc, threads=threads) - sample
        for k, (r, c) in floored.items():
            out[k].elements.append((recipe, size, Weights(r[idx], c).error(diff) * scale))
    return out


def _lowrank_options(name, shape, m, r, c, max_rank, droppable, seed, keep_factors) -> TensorOptions:
    """A tensor's options with its low-rank candidates (the SVD of the delta weighted by r, c), no element codec."""
    rows, cols = m.shape
    full = min(rows, cols)
    # Beyond this rank a direction costs more than storing every element at 8 bits: never worth it.
    cap = max(1, min(full, (rows * cols * 8) // max(1, rows + cols) + 1))
    rank = min(cap, max_rank or MAX_RANK)
    u, s, v, s2, total = lowrank.svd(m, rank, r, c, seed)
    # ε(b): the weighted relative error of quantized directions, averaged over the top ones. Monotone bit
    # widths along the spectrum follow from one ε per width.
    n = min(len(s), _EPS_SAMPLE)
    # Groups are quantized independently: the error of a long vector is measured on evenly spaced whole groups
    # of it (numpy's element-wise passes are single-threaded, and a 128k-token embedding has 2000 groups).
    iu, iv = _eps_elements(rows), _eps_elements(cols)
    us, vs, rs, cs = u[:n, iu], v[:n, iv], r[iu], c[iv]
    eps = {}
    for b in BITS:
        if n == 0:
            eps[b] = 0.0
            continue
        pu, su = lowrank.quantize_vectors(us, b, GROUP)
        pv, sv = lowrank.quantize_vectors(vs, b, GROUP)
        uh = reference.dequantize_vectors(pu, su, b, GROUP, len(iu)).astype(np.float64)
        vh = reference.dequantize_vectors(pv, sv, b, GROUP, len(iv)).astype(np.float64)
        ud, vd = us.astype(np.float64), vs.astype(np.float64)
        # Weighted |u vᵀ - a·û v̂ᵀ|² / |u vᵀ|² with the best scalar a (the encoder refits s).
        uu, vv = (ud * ud) @ rs, (vd * vd) @ cs
        uh_, vh_ = (ud * uh) @ rs, (vd * vh) @ cs
        hh = ((uh * uh) @ rs) * ((vh * vh) @ cs)
        cross = uh_ * vh_
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(hh > 0, 1 - cross ** 2 / (hh * uu * vv), 1.0)
        eps[b] = float(np.clip(rel, 0, 1).mean())
    return TensorOptions(name, tuple(shape), rows, cols, total, s2, eps,
                         {b: direction_bits(rows, cols, b) for b in BITS}, droppable=droppable,
                         factors=(u, s, v) if keep_factors else None)


# ----------------------------------------------------------------------------- allocation

@dataclass
class Allocation:
    recipes: dict          # name -> recipe string, or None (not stored)
    bits: int              # predicted stored bits of the chosen tensors (entries included)
    error: float           # predicted Σ weighted error
    energy: float          # Σ weighted energy of the deltas (the error of storing nothing)
    lam: float
    per_tensor: dict       # name -> {"recipe", "bits", "error", "energy"}


def allocate(options: dict, budget_bits: float, iters: int = 60) -> Allocation:
    """Choose a candidate per tensor so the total stays within budget_bits, minimising the total error."""
    def at(lam):
        picks = {n: o.best(lam) for n, o in options.items()}
        return picks, sum(p[2] for p in picks.values())

    lo, hi = 0.0, 1.0
    picks, size = at(hi)
    while size > budget_bits and hi < 1e30:
        hi *= 16
        picks, size = at(hi)
    picks0, size0 = at(lo)
    if size0 <= budget_bits:
        picks, hi = picks0, lo
    else:
        for _ in range(iters):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
            p, s = at(mid)
            if s <= budget_bits:
                hi, picks = mid, p
            else:
                lo = mid
            if hi - lo <= 1e-6 * hi:
                break
    per = {n: {"recipe": p[0], "bits": int(p[2]), "error": float(p[1]), "energy": float(options[n].energy)}
           for n, p in picks.items()}
    return Allocation({n: p[0] for n, p in picks.items()}, sum(v["bits"] for v in per.values()),
                      sum(v["error"] for v in per.values()), sum(o.energy for o in options.values()), hi, per)


def describe(alloc: Allocation) -> str:
    return json.dumps({n: v["recipe"] for n, v in alloc.per_tensor.items()}, indent=1)
