"""The delta-editing operations of Tang et al. 2024, "A Unified View of Delta Parameter Editing".

Every operation takes a delta ΔW = W_post - W_pre (numpy f32/f16, numpy uint16 = bf16 bits, or torch
f32/f16/bf16) and returns the edited delta ΔW_edit of the same type, dtype and shape. Math is float32
(SVD and means float64), rounded once to the input dtype.

    dare(d, p=0.9)                      random drop + rescale, (1-M)⊙ΔW/(1-p); with k: k·M⊙ΔW + (1-kp)/(1-p)·(1-M)⊙ΔW
    dare_biased(d, p, k, on="product", grad=g)   the same scaling chosen by sign(ΔW) or sign(ΔW⊙∇L) (Table 1)
    magnitude(d, p=0.9)                 keep the top (1-p) by |ΔW|;  magnitude_global({name: d}, p)
    bitdelta(d, scale=1, levels=1, random=None)   mean |ΔW| × sign(ΔW) (multi-bit: equal-count blocks)
    lowrank(d, rank=16) / lowrank(d, energy=0.9)  truncated SVD
    extrapolate(d, alpha)               (1+α)·ΔW

Edit strings name an operation and its parameters like recipes do: "dare:p=0.9,k=0.5", "bitdelta:levels=4";
`compose("dare:p=0.9+extrapolate:alpha=0.2")` chains them ('+' or ';'), and `edit_model(base_sd, ft_sd,
"*.mlp.*=dare:p=0.9;*=bitdelta")` edits a whole model with per-tensor rules (first match wins).
"""
from __future__ import annotations

import inspect
import math
import zlib

import numpy as np

from .. import reference
from ..recipes import first_match, parse_value, split_rules
from ..tensors import is_torch

F32, F64 = np.float32, np.float64


# ---------------------------------------------------------------- type plumbing
def to_f32(x) -> np.ndarray:
    """A float32 numpy copy of x (bf16 widened exactly)."""
    if is_torch(x):
        return x.detach().to("cpu").float().numpy().copy()
    x = np.asarray(x)
    if x.dtype == np.uint16:
        return reference.bf16_to_f32(x)
    if x.dtype not in (np.float32, np.float16, np.float64):
        raise ValueError(f"unsupported delta dtype {x.dtype} (use float32, float16, bfloat16)")
    return x.astype(F32)


def _like(y: np.ndarray, x):
    """y (float32) in x's type and dtype, rounded once (nearest-even)."""
    y = np.asarray(y, dtype=F32)
    if is_torch(x):
        import torch

        return torch.from_numpy(np.ascontiguousarray(y)).to(dtype=x.dtype, device=x.device)
    x = np.asarray(x)
    if x.dtype == np.uint16:
        return reference.round_bf16(y)
    return y.astype(x.dtype)


def _check_p(p, name="p"):
    if not isinstance(p, (int, float)) or not (0.0 <= p < 1.0) or math.isnan(p):
        raise ValueError(f"{name}={p!r} must be in [0, 1)")
    return float(p)


def _seed64(seed: int) -> int:
    return int(seed) & 0xFFFFFFFFFFFFFFFF


# ---------------------------------------------------------------- operations
def dare_mask(shape, p: float, seed: int = 0) -> np.ndarray:
    """The DARE drop mask M (True = dropped), each element i.i.d. Bernoulli(p).

    The same counter-based generator as the `sparse` codec, so `dare(d, p, seed=s)` drops exactly the
    elements that `dp.encode(d, "sparse", p=p, seed=s)` drops.
    """
    n = int(math.prod(shape))
    return (reference.dare_uniform(_seed64(seed), n) < p).reshape(shape)


def dare(delta, p: float = 0.9, k: float = 0.0, seed: int = 0):
    """Generalised DARE: ΔW_edit = k·M⊙ΔW + (1-k·p)/(1-p)·(1-M)⊙ΔW, M ~ Bernoulli(p) (1 = dropped).

    k = 0 is DARE (drop, rescale the kept by 1/(1-p)); E[ΔW_edit] = ΔW for every k.
    """
    p = _check_p(p)
    x = to_f32(delta)
    m = dare_mask(x.shape, p, seed)
    keep_scale = F32((1.0 - float(k) * p) / (1.0 - p))
    y = np.where(m, F32(k) * x, keep_scale * x)
    return _like(y, delta)


def dare_biased(delta, p: float = 0.9, k: float = 0.0, on: str = "delta", grad=None):
    """DARE's scaling with a deterministic, biased choice of the "dropped" set (paper Table 1).

    on="delta":   entries with ΔW < 0 are ×k, the others ×(1-k·p)/(1-p).
    on="product": entries with ΔW⊙∇L < 0 are ×k, the others ×(1-k·p)/(1-p); `grad` is ∇L at W_post.
    With k < 1 the product rule moves every entry against the descent direction, so loss rises.
    """
    p = _check_p(p)
    x = to_f32(delta)
    if on == "delta":
        sel = x < 0
    elif on == "product":
        if grad is None:
            raise ValueError("dare_biased(on='product') needs grad (∇L at W_post, the delta's shape)")
        g = to_f32(grad)
        if g.shape != x.shape:
            raise ValueError(f"dare_biased: grad shape {list(g.shape)} != delta shape {list(x.shape)}")
        sel = (x * g) < 0
    else:
        raise ValueError(f"dare_biased: on={on!r} must be 'delta' or 'product'")
    keep_scale = F32((1.0 - float(k) * p) / (1.0 - p))
    return _like(np.where(sel, F32(k) * x, keep_scale * x), delta)


def magnitude(delta, p: float = 0.9, scope: str = "tensor"):
    """Magnitude pruning: keep the n - rint(p·n) largest |ΔW| (per tensor, or per row), zero the rest.

    No rescale (the paper's M_top⊙ΔW); scope="tensor" equals `dp.encode(d, "sparse:mode=magnitude")`.
    """
    p = _check_p(p)
    x = to_f32(delta)
    if scope == "tensor":
        keep = reference.topk_mask(np.abs(x), x.size - int(round(p * x.size)))
    elif scope == "row":
        m = reference.as_matrix(x)
        cols = m.shape[1]
        keep = np.stack([reference.topk_mask(np.abs(r), cols - int(round(p * cols))) for r in m]).reshape(x.shape) \
            if m.shape[0] else np.zeros(x.shape, bool)
    else:
        raise ValueError(f"magnitude: scope={scope!r} must be 'tensor' or 'row'")
    return _like(np.where(keep, x, F32(0)), delta)


def magnitude_global(deltas: dict, p: float = 0.9) -> dict:
    """Magnitude pruning with one threshold over all tensors of a dict: keep the top (1-p) overall."""
    p = _check_p(p)
    names = list(deltas)
    xs = [to_f32(deltas[n]) for n in names]
    flat = np.concatenate([np.abs(x).reshape(-1) for x in xs]) if xs else np.zeros(0, F32)
    keep = reference.topk_mask(flat, flat.size - int(round(p * flat.size)))
    out, pos = {}, 0
    for n, x in zip(names, xs):
        k = keep[pos:pos + x.size].reshape(x.shape)
        pos += x.size
        out[n] = _like(np.where(k, x, F32(0)), deltas[n])
    return out


def bitdelta(delta, scale: float = 1.0, levels: int = 1, random: str | None = None, seed: int = 0):
    """BitDelta: scale · AVG(|ΔW|) · sign(ΔW), AVG over the whole tensor (sign(0) = 0).

    levels = K > 1: the multi-bit variant; |ΔW| ranked ascending (ties: lower index) and cut into K
    equal-count blocks, each replaced by its mean magnitude (levels=2**(b-1) equals the `levels:bits=b`
    codec on deltas without zeros). random = "normal" draws magnitudes AVG + std(|ΔW|)·z (z ~ N(0,1));
    "uniform" draws U(0, 2·AVG): both have mean AVG (a negative normal draw flips that entry's sign).
    """
    levels = int(levels)
    if levels < 1:
        raise ValueError(f"bitdelta: levels={levels} must be >= 1")
    x = to_f32(delta)
    mag = np.abs(x).astype(F64)
    sgn = np.sign(x).astype(F64)
    n = x.size
    if random is not None:
        if levels != 1:
            raise ValueError("bitdelta: random magnitudes are defined for levels=1 only")
        rng = np.random.default_rng(_seed64(seed))
        avg = mag.mean() if n else 0.0
        if random == "normal":
            m = avg + mag.std() * rng.standard_normal(x.shape)
        elif random == "uniform":
            m = rng.uniform(0.0, 2.0 * avg, x.shape)
        else:
            raise ValueError(f"bitdelta: random={random!r} must be None, 'normal' or 'uniform'")
    elif levels == 1:
        m = np.full(x.shape, mag.mean() if n else 0.0)
    else:
        flat = mag.reshape(-1)
        order = np.argsort(flat, kind="stable")
        bounds = (np.arange(levels + 1, dtype=np.int64) * n) // levels
        m = np.empty(n, F64)
        for b in range(levels):
            idx = order[bounds[b]:bounds[b + 1]]
            if idx.size:
                m[idx] = flat[idx].mean()
        m = m.reshape(x.shape)
    return _like((float(scale) * m * sgn).astype(F32), delta)


def lowrank(delta, rank: int | None = None, energy: float | None = None):
    """Best rank-r approximation U_r Σ_r V_rᵀ (Eckart-Young), or the smallest r whose singular values
    keep `energy` of Σσ². Tensors of more than 2 dims are viewed as (prod(shape[:-1]), shape[-1])."""
    if (rank is None) == (energy is None):
        raise ValueError("lowrank: give exactly one of rank= or energy=")
    x = to_f32(delta)
    if x.ndim < 2:
        raise ValueError(f"lowrank: needs a matrix, got shape {list(x.shape)}")
    m = x.reshape(-1, x.shape[-1]).astype(F64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    if energy is not None:
        if not 0.0 < float(energy) <= 1.0:
            raise ValueError(f"lowrank: energy={energy} must be in (0, 1]")
        cum = np.cumsum(s ** 2)
        r = int(np.searchsorted(cum, float(energy) * cum[-1] * (1 - 1e-12)) + 1) if cum[-1] > 0 else 0
    else:
        r = int(rank)
        if not 0 <= r <= min(m.shape):
            raise ValueError(f"lowrank: rank={r} must be in [0, {min(m.shape)}] for shape {list(x.shape)}")
    y = (u[:, :r] * s[:r]) @ vt[:r]
    return _like(y.reshape(x.shape).astype(F32), delta)


def extrapolate(delta, alpha: float = 0.0):
    """EXPO: (1+α)·ΔW (α < 0 interpolates toward the base; α = -1 removes the delta)."""
    x = to_f32(delta)
    return _like(F32(1.0 + float(alpha)) * x, delta)


def keep(delta):
    """The identity edit (useful in rules: "*norm*=keep")."""
    return _like(to_f32(delta), delta)


def drop(delta):
    """Remove the delta (ΔW_edit = 0)."""
    return _like(np.zeros_like(to_f32(delta)), delta)


OPS = {"dare": dare, "dare_biased": dare_biased, "magnitude": magnitude, "bitdelta": bitdelta,
       "lowrank": lowrank, "extrapolate": extrapolate, "keep": keep, "drop": drop}
_RANDOM_OPS = {"dare": "seed", "bitdelta": "seed"}  # ops whose seed edit_model varies per tensor


# ---------------------------------------------------------------- edit strings
class Edit:
    """One parsed edit: an operation name and its keyword parameters; callable on a delta."""

    def __init__(self, op: str, params: dict | None = None):
        if op not in OPS:
            raise ValueError(f"unknown edit {op!r} (known: {', '.join(OPS)})")
        params = dict(params or {})
        sig = inspect.signature(OPS[op])
        allowed = [n for n in sig.parameters if n not in ("delta",)]
        for key in params:
            if key not in allowed:
                raise ValueError(f"edit {op!r}: unknown parameter {key!r} (allowed: {', '.join(allowed) or 'none'})")
        if "p" in params:
            _check_p(params["p"])
        self.op, self.params = op, params

    def __call__(self, delta, **extra):
        return OPS[self.op](delta, **{**self.params, **extra})

    def __repr__(self):
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.op}:{args}" if args else self.op

    __str__ = __repr__


def parse_edit(text: str) -> Edit:
    """'dare:p=0.9,k=0.5' -> Edit('dare', {'p': 0.9, 'k': 0.5}). Values become int, float or str."""
    text = text.strip()
    op, _, rest = text.partition(":")
    params = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"edit {text!r}: expected key=value, got {item!r}")
        v = parse_value(val.strip())
        params[key.strip()] = None if v == "none" else v
    try:
        return Edit(op.strip(), params)
    except ValueError as e:
        raise ValueError(f"edit {text!r}: {e}") from None


class Composed:
    """Edits applied in order: compose([a, b])(d) = b(a(d))."""

    def __init__(self, edits):
        self.edits = list(edits)
        if not self.edits:
            raise ValueError("empty edit")

    def __call__(self, delta, seed: int | None = None, grad=None):
        for e in self.edits:
            extra = {}
            if seed is not None and e.op in _RANDOM_OPS and "seed" not in e.params:
                extra["seed"] = seed
            if e.op == "dare_biased" and grad is not None and "grad" not in e.params:
                extra["grad"] = grad
            delta = e(delta, **extra)
        return delta

    @property
    def needs_grad(self) -> bool:
        return any(e.op == "dare_biased" and e.params.get("on", "delta") == "product" for e in self.edits)

    def __repr__(self):
        return "+".join(map(str, self.edits))


def compose(spec) -> Composed:
    """An edit chain from 'dare:p=0.9+extrapolate:alpha=0.2' (or ';'-separated), or a list of strings/Edits."""
    if isinstance(spec, Composed):
        return spec
    if isinstance(spec, Edit):
        return Composed([spec])
    if isinstance(spec, str):
        parts = [s for s in (t.strip() for t in spec.replace(";", "+").split("+")) if s]
    else:
        parts = list(spec)
    return Composed([p if isinstance(p, Edit) else parse_edit(p) for p in parts])


class EditRules:
    """Per-tensor edit rules 'pattern=edit+edit;pattern=edit' (fnmatch on tensor names, first match wins).

    A bare edit ("dare:p=0.9") applies to every tensor; tensors no rule matches keep their delta.
    """

    def __init__(self, text):
        self.rules: list[tuple[str, Composed]] = []
        if isinstance(text, EditRules):
            self.rules = list(text.rules)
            return
        self.rules = [(pattern, compose(edit)) for pattern, edit in split_rules(str(text), chain="+")]
        if not self.rules:
            raise ValueError("empty edit rules")

    def edit_for(self, name: str) -> Composed | None:
        return first_match(self.rules, name)

    @property
    def needs_grad(self) -> bool:
        return any(e.needs_grad for _, e in self.rules)

    def __repr__(self):
        if len(self.rules) == 1 and self.rules[0][0] == "*":
            return str(self.rules[0][1])
        return ";".join(f"{p}={e}" for p, e in self.rules)


def tensor_seed(name: str, seed: int = 0) -> int:
    """A per-tensor seed, so equal-shaped tensors do not share one DARE mask."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) & 0x7FFFFFFFFFFFFFFF


def default_selected(name: str, tensor) -> bool:
    """Edited by default: the 2-D weight matrices (norms and biases keep their delta)."""
    return len(tuple(tensor.shape)) == 2


def edit_deltas(deltas: dict, rules, seed: int = 0, grads: dict | None = None, select=default_selected) -> dict:
    """{name: ΔW_edit} for the tensors `select` picks and a rule matches (others are not in the result)."""
    rules = EditRules(rules)
    out = {}
    for name, d in deltas.items():
        if select is not None and not select(name, d):
            continue
        edit = rules.edit_for(name)
        if edit is None:
            continue
        g = None
        if edit.needs_grad:
            if grads is None or name not in grads:
                raise ValueError(f"tensor '{name}': edit {edit} needs the gradient (pass grads=)")
            g = grads[name]
        out[name] = edit(d, seed=tensor_seed(name, seed), grad=g)
    return out


def deltas_of(base_sd: dict, ft_sd: dict) -> dict:
    """{name: ft - base} in float32 (torch if the inputs are torch), with clear errors on mismatch."""
    missing = sorted(set(ft_sd) - set(base_sd))
    if missing:
        raise ValueError(f"tensors of the fine-tune missing from the base: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    out = {}
    for name, w in ft_sd.items():
        b = base_sd[name]
        if tuple(b.shape) != tuple(w.shape):
            raise ValueError(f"tensor '{name}': base shape {list(b.shape)} != fine-tune shape {list(w.shape)}")
        if is_torch(w):
            out[name] = w.detach().float() - b.detach().float()
        else:
            out[name] = to_f32(w) - to_f32(b)
    return out


def edit_model(base_sd: dict, ft_sd: dict, rules, seed: int = 0, grads: dict | None = None,
               select=default_selected) -> dict:
    """The edited model's state dict W_pre + ΔW_edit (in the fine-tune's dtypes).

    Tensors that are not selected (by default: all but 2-D weight matrices) or that
    no rule matches keep the fine-tune's weights. rules: 'pattern=edit;...' (see EditRules).
    """
    deltas = deltas_of(base_sd, ft_sd)
    edited = edit_deltas(deltas, rules, seed=seed, grads=grads, select=select)
    out = dict(ft_sd)
    for name, d in edited.items():
        w = ft_sd[name]
        if is_torch(w):
            out[name] = (base_sd[name].detach().float() + d.float()).to(w.dtype)
        else:
            out[name] = _like(to_f32(base_sd[name]) + to_f32(d), w)
    return out
