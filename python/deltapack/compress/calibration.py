"""What calibration data says about a fine-tune: per-tensor sensitivities for the bit budget.

    weights = fisher_weights("ft_dir", examples)   # {tensor name: budget.Weights(row, col)}

For a weight matrix W (rows = outputs, cols = inputs) the loss increase of a small change E is about
½ Σ_ij F_ij E_ij² with F the diagonal of the Fisher information; its Kronecker-factored form
F_ij ≈ r_i·c_j has r_i = Σ g_i² (squared gradients of the loss at the layer's outputs) and c_j = Σ x_j²
(squared inputs), summed over the labelled tokens of the data, measured on the fine-tuned model (the
behaviour to keep). An embedding (rows = tokens) has r = how often each token occurs and c = the squared
gradients at its output. A tied input/output embedding adds both uses and keeps the best rank-1 fit.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .. import files, reference, tensors
from .. import reference as R
from ..files import DeltaWriter
from ..lm import answer_logits, batches, body_and_head, examples_of, load_model
from ..modeldir import as_checkpoint, checkpoint_record, progress_bar
from .allocate import Weights
from .writer import Compressor


def calibration_model(model):
    """The fine-tuned model the statistics, scores and refits run on (a directory is loaded; a module is
    taken as it is). A model stored in bf16 runs in bf16, which holds its weights (and any rebuilt weights,
    rounded to bf16 as apply stores them) exactly: half the memory of f32 and, on CPUs with bf16 instructions,
    1.5-2.5x faster (the Fisher pass and a scoring pass of SmolLM2-135M: 55 -> 37 s, 22 -> 9 s)."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, dtype="stored")
    return model


def fisher_weights(model, data, batch_size: int = 8, max_examples: int | None = None) -> dict:
    """{parameter name: Weights} for every Linear and Embedding weight of a causal LM (directory or module).
    Batches of 8: the backward pass keeps every layer's activations, 0.7 GB more at 16 on a 135 M model."""
    import torch

    model = calibration_model(model)
    examples = examples_of(data)[:max_examples]
    hooks = []
    real = {}  # the current batch's attention mask, flattened: padded positions do not count
    acc: dict[tuple, list] = {}  # (param name, role) -> [row sums, col sums]

    def accumulate(key, row, col):
        a = acc.get(key)
        if a is None:
            acc[key] = [row.double(), col.double()]
        else:
            a[0] += row.double()
            a[1] += col.double()

    def linear_hooks(name, mod):
        saved = {}

        def fwd(m, inp, out):
            saved["x2"] = inp[0].detach().float().reshape(-1, inp[0].shape[-1])[real["mask"]].pow(2).sum(0)

        def bwd(m, gin, gout):
            g2 = gout[0].detach().float().reshape(-1, gout[0].shape[-1])[real["mask"]].pow(2).sum(0)
            accumulate((name, "linear"), g2, saved.pop("x2"))

        return [mod.register_forward_hook(fwd), mod.register_full_backward_hook(bwd)]

    def embedding_hooks(name, mod):
        saved = {}

        def fwd(m, inp, out):
            saved["count"] = torch.bincount(inp[0].reshape(-1)[real["mask"]], minlength=mod.num_embeddings).float()
            out.register_hook(lambda g: accumulate(
                (name, "embedding"), saved.pop("count"),
                g.detach().float().reshape(-1, g.shape[-1])[real["mask"]].pow(2).sum(0)))

        return [mod.register_forward_hook(fwd)]

    # Only the gradients of the activations are needed, not the weights' (a model's worth of memory and a third
    # of the backward pass): the weights are frozen and the embedding's output starts the graph instead.
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def start_graph(m, inp, out):  # returns None: the output itself is kept, now requiring grad
        out.requires_grad_()

    hooks.append(model.get_input_embeddings().register_forward_hook(start_graph))
    for name, mod in _weight_modules(model):
        hooks += (linear_hooks if isinstance(mod, torch.nn.Linear) else embedding_hooks)(name, mod)
    was_training = model.training
    model.eval()
    try:
        for ids, mask, labels in batches(examples, batch_size):
            real["mask"] = mask.reshape(-1).bool()
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    by_name: dict[str, list] = {}
    for (name, _), (row, col) in acc.items():
        by_name.setdefault(name, []).append((row.numpy(), col.numpy()))
    return {name: _rank1(parts) for name, parts in by_name.items()}


def _rank1(parts) -> Weights:
    """One (row, col) pair, or the best rank-1 fit of Σ row_k col_kᵀ (a tied embedding's two uses)."""
    if len(parts) == 1:
        return Weights(*parts[0])
    rows = np.stack([p[0] for p in parts], 1)      # (n, k)
    cols = np.stack([p[1] for p in parts], 1)      # (m, k)
    # Σ_k r_k c_kᵀ = R Cᵀ; its top singular pair via the small k x k problem.
    qr, rr = np.linalg.qr(rows)
    qc, rc = np.linalg.qr(cols)
    u, s, vt = np.linalg.svd(rr @ rc.T)
    row, col = np.abs(qr @ u[:, 0]) * np.sqrt(s[0]), np.abs(qc @ vt[0]) * np.sqrt(s[0])
    return Weights(row, col)


class Scorer:
    """How close a rebuilt model is to the fine-tune on calibration data: agreement = the share of examples on
    which it predicts the fine-tune's greedy answer (its argmax at every labelled position), and the mean KL
    divergence KL(fine-tune || rebuilt) of next-token distributions over the labelled tokens, taken over the
    fine-tune's TOP_TOKENS most likely tokens and one bucket for all the others (a lower bound of the full KL,
    equal to it when the rest is negligible).

    On the project's pairs the agreement ranked candidate allocations like held-out accuracy did while the KL
    did not (docs/REPRODUCTION.md), so `compress --budget --data` ranks by agreement, then KL."""

    # The fine-tune's whole next-token distributions would be labelled tokens x vocabulary floats: 280 MB for
    # 256 short examples of SmolLM2's 49k-token vocabulary, 1.3 GB for Gemma 3's 262k.
    TOP_TOKENS = 64

    def __init__(self, model, data, batch_size: int = 32):
        import torch

        self.model = calibration_model(model)
        self.model.eval()
        self.batches = list(batches(examples_of(data), batch_size))
        self.teacher = []  # per batch: (argmax, top-k token ids, their log-probs, log-prob of the rest)
        with torch.no_grad():
            for ids, mask, labels in self.batches:
                logp = torch.log_softmax(answer_logits(self.model, ids, mask, labels)[0], -1)
                top, idx = logp.topk(min(self.TOP_TOKENS, logp.shape[-1]), -1)
                self.teacher.append((logp.argmax(-1), idx, top, _log_rest(logp, idx)))
        self.params = dict(self.model.named_parameters())

    def score(self, replacements, restore: bool = True) -> dict:
        """{"agreement", "kl"} with parameters replaced by `replacements` ((name, full shape, rows) tuples: the
        leading rows of the named parameter, float32 numpy). restore: put the fine-tune's parameters back after
        (a copy of each replaced one is held meanwhile); without it they stay replaced."""
        import torch

        saved = {}
        try:
            with torch.no_grad():
                for name, _, rows in replacements:
                    p = self.params[name]
                    if restore:
                        saved[name] = p.detach().clone()
                    head = p[:rows.shape[0]]
                    head.copy_(torch.from_numpy(np.ascontiguousarray(rows)).reshape(head.shape))
                    del rows  # not held while the next replacement is made
                total, count, agree, n = 0.0, 0, 0, 0
                for (ids, mask, labels), (best, idx, top, rest) in zip(self.batches, self.teacher):
                    logits, _, rows = answer_logits(self.model, ids, mask, labels)
                    logq = torch.log_softmax(logits, -1)
                    pooled = torch.where(rest > -torch.inf, rest.exp() * (rest - _log_rest(logq, idx)), 0.0)
                    total += float((top.exp() * (top - logq.gather(-1, idx))).sum() + pooled.sum())
                    count += top.shape[0]
                    # an example agrees when no labelled position of it predicts another token
                    differ = rows[logq.argmax(-1) != best]
                    agree += ids.shape[0] - int(differ.unique().numel())
                    n += ids.shape[0]
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    self.params[name].copy_(value)
        return {"agreement": agree / max(n, 1), "kl": total / max(count, 1)}


def _log_rest(logp, idx):
    """log of the probability outside the tokens idx, per row of log-probabilities logp."""
    import torch

    return logp.scatter(-1, idx, -torch.inf).logsumexp(-1)


# ----------------------------------------------------------------------------- least-squares refit of scales

# Codecs whose free scales `refit` fits (the others are returned unchanged).
REFIT_CODECS = ("sign", "levels", "quant", "lowrank")
_MAX_LEVELS_REFIT = 16   # levels with more magnitudes than this are left alone (K matrix products each)


@dataclass
class Term:
    """One use of a weight: its error counts as Σ_i row_i · e_i C e_iᵀ over rows e_i of the error
    (C = cov, the inputs' second moments; None = identity, as for an embedding's rows)."""

    row: np.ndarray
    cov: np.ndarray | None


def input_terms(model, data, names, batch_size: int = 16, max_bytes: int = 1 << 30) -> dict:
    """{parameter name: [Term]} for the named Linear / Embedding weights of a causal LM, from the fine-tuned
    model on calibration data: a Linear's inputs give C = Σ x xᵀ (rows weigh 1), an Embedding's rows weigh
    how often their token occurs (C = identity); a tied weight gets both. Linears that read the same input
    (q/k/v, gate/up) share one C. Input covariances are collected a group of layers at a time so their
    float32 matrices stay under max_bytes (one pass over the data per group)."""
    out = {}
    for group in input_terms_by_group(model, data, names, batch_size, max_bytes):
        out.update(group)
    return out


def input_terms_by_group(model, data, names, batch_size: int = 16, max_bytes: int = 1 << 30):
    """input_terms, yielded a group at a time ({name: [Term]} of under max_bytes of covariances), so that a
    caller can store or use each group before the next pass over the data gathers the next."""
    import torch

    model = calibration_model(model)
    examples = examples_of(data)
    groups = [[(n, mod) for n, mod in _weight_modules(model) if n in set(group)]
              for group in _cov_groups(model, names, max_bytes)]
    model.eval()
    # The body runs alone and the output head's hook is called on its hidden states: the head's logits (batch x
    # tokens x vocabulary) are not needed, only its input.
    body, head = body_and_head(model)
    real = {}  # the current batch's attention mask, flattened: padded positions do not count
    for group in groups:
        acc, same, hooks, head_hooks = {}, {}, [], []
        last = [None, None]  # the previous Linear's input tensor and its key: q/k/v are called on one tensor

        for name, mod in group:
            if isinstance(mod, torch.nn.Linear):
                def fwd(m, inp, o, name=name):
                    if inp[0] is last[0] and last[1] != name:
                        same[name] = last[1]
                        return
                    last[:] = inp[0], name
                    x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])[real["mask"]]
                    acc[(name, "linear")] = acc.get((name, "linear"), 0) + x.T @ x
            else:
                def fwd(m, inp, o, name=name, n=mod.num_embeddings):
                    acc[(name, "embedding")] = acc.get((name, "embedding"), 0) + \
                        torch.bincount(inp[0].reshape(-1)[real["mask"]], minlength=n).double()
            if mod is head:
                head_hooks.append(fwd)
            else:
                hooks.append(mod.register_forward_hook(fwd))
        try:
            with torch.no_grad():
                for ids, mask, _ in batches(examples, batch_size):
                    real["mask"] = mask.reshape(-1).bool()
                    if body is None:
                        model(input_ids=ids, attention_mask=mask)
                    else:
                        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
                        for fwd in head_hooks:
                            fwd(head, (hidden,), None)
                    last[:] = None, None
        finally:
            for h in hooks:
                h.remove()
        covs = {name: value.numpy() for (name, kind), value in acc.items() if kind == "linear"}
        covs.update({name: covs[first] for name, first in same.items()})
        out: dict[str, list] = {}
        for name, mod in group:  # (a module the forward never called has no term)
            if isinstance(mod, torch.nn.Linear):
                if name in covs:
                    out.setdefault(name, []).append(Term(np.ones(mod.weight.shape[0]), covs[name]))
            elif (name, "embedding") in acc:
                out.setdefault(name, []).append(Term(acc[(name, "embedding")].numpy(), None))
        yield out
        acc = covs = out = None  # not held while the next group is gathered


def _weight_modules(model):
    """(weight's parameter name, module) for every Linear and Embedding; a tied weight appears twice."""
    import torch

    names = {id(p): n for n, p in model.named_parameters()}
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and id(mod.weight) in names:
            yield names[id(mod.weight)], mod


def _times_cov(x: np.ndarray, term: Term) -> np.ndarray:
    """x @ C for the rows of x (float64)."""
    return x if term.cov is None else x @ term.cov


def refit(enc, delta: np.ndarray, terms: list) -> object:
    """`enc` with its free scales refitted so the rebuilt delta D̂ minimises Σ_terms Σ_i row_i (D - D̂)_i C
    (D - D̂)_iᵀ, the change of the layer's outputs on calibration inputs (least squares, closed form; codes,
    signs and singular vectors stay). sign: its scale(s); levels: the magnitudes; quant: the group scales;
    lowrank with bits: the group scales of u (output side, one small system per group of rows).
    Scales that would not fit their storage type keep their old values. The work is done in float64 a block
    of rows at a time (a float64 copy of a 49k-token embedding is 230 MB, and each codec needs a few)."""

    if enc.codec not in REFIT_CODECS or not terms:
        return enc
    d = reference.as_matrix(delta)
    comps = dict(enc.components)
    p = enc.params
    if enc.codec == "sign":
        comps["scales"] = _refit_sign(d, comps, p, terms)
    elif enc.codec == "levels":
        if len(comps["levels"]) > _MAX_LEVELS_REFIT:
            return enc
        comps["levels"] = _refit_levels(d, comps, p, terms)
    elif enc.codec == "quant":
        comps["scales"] = _refit_quant(d, comps, p, terms)
    elif "bits" in p:
        comps["scales"] = _refit_lowrank_u(d, comps, p, enc.shape, terms)
    else:
        return enc
    return tensors.Encoded(enc.codec, p, enc.shape, enc.dtype, comps, enc.name)


_BLOCK_ELEMENTS = 1 << 22  # elements of a block of rows the refit holds in float64 at once


def _row_blocks(rows, cols):
    step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]


def _block_terms(terms, rows):
    return [Term(t.row[rows], t.cov) for t in terms]


def _solve_rows(a, b, fallback):
    """Batched least squares a x = b (a: (n, k, k)), fallback where a row's system is singular."""
    out = np.array(fallback, np.float64, copy=True)
    for i in range(a.shape[0]):
        try:
            x = np.linalg.solve(a[i], b[i])
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(x).all():
            out[i] = x
    return out


def _grouped_refit(d, basis, group, terms, old):
    """Per row: scales a_g (g over column groups of `group`) minimising Σ_terms row_i |(d_i - Σ_g a_g b_ig) C^½|²
    where b_ig is the row's basis restricted to group g. Returns (rows, G) scales (old where singular)."""
    rows, cols = d.shape
    ng = -(-cols // group)
    a = np.zeros((rows, ng, ng))
    b = np.zeros((rows, ng))
    for t in terms:
        w = t.row[:rows, None]
        for g in range(ng):
            sl = slice(g * group, min(cols, (g + 1) * group))
            if t.cov is None:
                bg = basis[:, sl]
                a[:, g, g] += (w[:, 0] * (bg * bg).sum(1))
                b[:, g] += (w[:, 0] * (bg * d[:, sl]).sum(1))
                continue
            pg = basis[:, sl] @ t.cov[sl, :]                      # (rows, cols): b_ig C
            b[:, g] += w[:, 0] * (pg * d).sum(1)
            for h in range(ng):
                sh = slice(h * group, min(cols, (h + 1) * group))
                a[:, g, h] += w[:, 0] * (pg[:, sh] * basis[:, sh]).sum(1)
    return _solve_rows(a, b, old)


def _refit_sign(d, comps, p, terms):

    rows, cols = d.shape
    old = np.asarray(comps["scales"], np.float64)
    if p["scope"] == "group":
        old = old.reshape(rows, -1)
        new = np.concatenate([
            _grouped_refit(d[b].astype(np.float64), _signs(comps, b, cols), p["group"], _block_terms(terms, b),
                           old[b]) for b in _row_blocks(rows, cols)])
        return new.astype(np.float32).reshape(comps["scales"].shape)
    num = np.zeros(rows)
    den = np.zeros(rows)
    for b in _row_blocks(rows, cols):
        signs, db = _signs(comps, b, cols), d[b].astype(np.float64)
        for t in terms:
            sc = _times_cov(signs, t)
            num[b] += t.row[b] * (sc * db).sum(1)
            den[b] += t.row[b] * (sc * signs).sum(1)
    if p["scope"] == "row":
        with np.errstate(divide="ignore", invalid="ignore"):
            new = np.where(den > 0, num / den, old)
        return new.astype(np.float32)
    return np.array([num.sum() / den.sum() if den.sum() > 0 else old[0]], np.float32)


def _signs(comps, rows, cols):
    """±1 (float64) of a block of rows of a sign or levels code."""
    return np.where(R.sign_plus_minus(comps["signs"][rows], cols), 1.0, -1.0)


def _refit_levels(d, comps, p, terms):

    rows, cols = d.shape
    k = len(comps["levels"])
    a = np.zeros((k, k))
    b = np.zeros(k)
    for blk in _row_blocks(rows, cols):
        signs, db = _signs(comps, blk, cols), d[blk].astype(np.float64)
        idx = R.unpack_bits(comps["codes"][blk], p["bits"] - 1, cols) if p["bits"] > 1 else \
            np.zeros(signs.shape, np.uint32)
        basis = [np.where(idx == j, signs, 0.0) for j in range(k)]
        for t in terms:
            w = t.row[blk, None]
            mc = [_times_cov(m, t) for m in basis]
            for i in range(k):
                b[i] += float((w * mc[i] * db).sum())
                for j in range(k):
                    a[i, j] += float((w * mc[i] * basis[j]).sum())
    new = _solve_rows(a[None], b[None], np.asarray(comps["levels"], np.float64)[None])[0]
    return new.astype(np.float32)


def _refit_quant(d, comps, p, terms):

    rows, cols = d.shape
    bits, group, e = p["bits"], p["group"], p["scale_exp"]
    qmax = (1 << (bits - 1)) - 1
    old = np.ldexp(np.asarray(comps["scales"], np.float64), e)
    new = np.concatenate([
        _grouped_refit(d[b].astype(np.float64), R.unpack_bits(comps["codes"][b], bits, cols).astype(np.float64) - qmax,
                       group, _block_terms(terms, b), old[b]) for b in _row_blocks(rows, cols)])
    with np.errstate(over="ignore"):
        stored = np.ldexp(new, -e).astype(np.float32).astype(np.float16)
    return np.where(np.isfinite(stored), stored, comps["scales"])


def _refit_lowrank_u(d, comps, p, shape, terms):
    """Group scales of the u vectors: rows in one group of `group` share one scale per direction, so each
    group of rows is one r x r least-squares problem (the v side stays)."""

    rows, cols = d.shape
    group = p["group"]
    r = p["rank"]
    u, v = R.lowrank_factors(comps, shape, **p)            # u = û·s (rows, r), v̂ (r, cols)
    scales = np.asarray(comps["scales"]).astype(np.float64)
    gu = -(-rows // group)
    su = scales[:, :gu]                                    # (r, gu)
    row_scales = np.repeat(su, group, axis=1)[:, :rows].T  # each row's group scale per direction: (rows, r)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = np.where(row_scales != 0, u / row_scales, 0.0)  # codes·s per element: (rows, r)
    del row_scales
    v = v.astype(np.float64)
    vcs = [_times_cov(v, t) for t in terms]                # v̂ C (r, cols)
    grams = [vc @ v.T for vc in vcs]                       # v̂ C v̂ᵀ
    new = su.copy()
    for g in range(gu):
        sl = slice(g * group, min(rows, (g + 1) * group))
        dg = d[sl].astype(np.float64)
        a = np.zeros((r, r))
        b = np.zeros(r)
        for t, vc, gram in zip(terms, vcs, grams):
            x = unit[sl] * t.row[sl][:, None]              # (n, r)
            a += (x.T @ unit[sl]) * gram
            b += np.einsum("ik,ik->k", x, dg @ vc.T)
        new[:, g] = _solve_rows(a[None], b[None], su[:, g][None])[0]
    out = scales.copy()
    out[:, :gu] = new
    with np.errstate(over="ignore"):
        stored = out.astype(np.float32).astype(np.float16)
    return np.where(np.isfinite(stored), stored, comps["scales"])


def calibrate_file(base, ft, delta, out, data, *, model=None, max_bytes: int = 1 << 30, threads=None,
                   terms: dict | None = None, note: bool = True, overwrite: bool = False, bar=None) -> dict:
    """Refit the free scales (`refit`) of every tensor of a checkpoint delta file on calibration data and write
    the result to `out` (written atomically; an existing file, `delta` itself included, only with overwrite).
    Input covariances are gathered a group of layers at a time under max_bytes; the refitted tensors are held
    (compressed) until the file is written.
    terms: input_terms already gathered for these tensors (else gathered here). note: record the refit in
    metadata["calibration"] (compress --budget records it in its own budget record, so the size is known
    before). bar: a progress bar over the bytes read. Returns {"refitted": [names], "examples": n}."""

    base, ft = as_checkpoint(base), as_checkpoint(ft)
    f = files.open(delta)
    rec = checkpoint_record(f)
    examples = examples_of(data)
    if model is None and terms is None:
        if ft.dir is None:
            raise ValueError(f"{ft.path}: calibration needs the fine-tune as a model directory (config.json)")
        model = calibration_model(ft.dir)
    todo = [n for n in f.keys() if rec["tensors"].get(n, {}).get("op") in ("delta", "resized")
            and f.entry(n)[0] in REFIT_CODECS]
    reader = Compressor(base, ft, None, threads, bar or progress_bar(0, "", True))
    refitted = {}
    groups = [terms] if terms is not None else input_terms_by_group(model, examples, todo, max_bytes=max_bytes)
    for group_terms in groups:
        for name in todo:
            if name not in group_terms:
                continue
            enc = f.get(name)
            spec = rec["tensors"][name]
            n = math.prod(enc.shape)
            d, _ = reader.delta_of(name, spec.get("source", name), n, False)
            if d is None:
                continue
            refitted[name] = refit(enc, d.reshape(enc.shape), rows_of(group_terms[name], enc.shape))
        del group_terms  # not held while the next group is gathered
    writer = DeltaWriter(out, overwrite=overwrite)
    try:
        for name in f.keys():
            writer.add(name, refitted.get(name) or f.get(name))
        meta = dict(f.metadata) if isinstance(f.metadata, dict) else {}
        if note:
            meta["calibration"] = {"method": "least-squares", "examples": len(examples), "tensors": len(refitted)}
        writer.close(metadata=meta, base=f.base)
    except BaseException:
        writer.abort()
        raise
    return {"refitted": sorted(refitted), "examples": len(examples), "file": os.fspath(out)}


def rows_of(terms, shape):
    """Terms cut to a delta's rows (the shared rows of a resized vocabulary)."""
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return [Term(t.row[:rows], t.cov) for t in terms]


def _cov_groups(model, names, max_bytes):
    """Split names (each once) into groups whose input covariances fit max_bytes together: float32, one per
    Linear using the weight (a tied weight's embedding use needs none)."""
    import torch

    cov_bytes: dict[str, int] = {}
    for n, mod in _weight_modules(model):
        if isinstance(mod, torch.nn.Linear):
            cov_bytes[n] = cov_bytes.get(n, 0) + 4 * mod.weight.shape[1] ** 2
    groups, group, used = [], [], 0
    for n in dict.fromkeys(names):
        size = cov_bytes.get(n, 0)
        if group and used + size > max_bytes:
            groups.append(group)
            group, used = [], 0
        group.append(n)
        used += size
    return groups + ([group] if group else [])
