"""The paper's loss-change estimator (Tang et al. 2024, Eq. 1) for a delta edit of a causal LM.

    ΔL = L(W_post + ΔW̃) - L(W_post) = ∫₀¹ ⟨∇L(W_post + tΔW̃), ΔW̃⟩ dt ≈ (1/C) Σ_{c<C} ⟨∇L(W_post + (c/C)ΔW̃), ΔW̃⟩

with ΔW̃ = ΔW_edit - ΔW, summed over every edited matrix. `estimate` computes the Riemann sum with torch
autograd, the exact ΔL on the same data, per-tensor contributions, and a category:
"competitive" (|ΔL| within noise), "decreased" (ΔL > 0, the edit hurts) or "improved" (ΔL < 0).

    r = estimate("ft_dir", "dare:p=0.9", pair.data, base="base_dir", C=5)
    r.estimate, r.exact, r.category, r.top(5)

L is the mean next-token cross-entropy over the labelled tokens of all examples (tokens after each
example's prompt_len; all tokens when there is none). Noise: the standard error of the exact ΔL over
examples (paired: the same examples before and after the edit); |ΔL| <= max(z·SE, rel_tol·L_post)
counts as competitive.

Memory: the model's own weights, one gradient buffer and ΔW̃ for the edited matrices; weights are moved
to W_post + tΔW̃ in place and restored afterwards (bit-exactly when they are bf16-representable, as
models loaded from bf16 checkpoints are; otherwise to within float32 rounding).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from . import edits as E
from .. import files, reference, tensors
from ..lm import batches, examples_of, load_model
from ..modeldir import Checkpoint, read_json_object


@dataclass
class Estimate:
    edit: str
    C: int
    estimate: float                     # the Riemann sum (1/C)·Σ terms
    terms: list                         # ⟨∇L(W_post + (c/C)ΔW̃), ΔW̃⟩ for c = 0..C-1
    exact: float | None                 # L(W_post + ΔW̃) - L(W_post), same data
    loss_post: float
    loss_edit: float | None
    se: float | None                    # standard error of the exact ΔL over examples
    noise: float                        # the competitive threshold used
    category: str                       # of the estimate
    category_exact: str | None
    contributions: dict = field(repr=False)  # tensor -> its share of the estimate
    n_examples: int = 0
    n_tokens: int = 0
    n_tensors: int = 0
    n_params: int = 0
    edited_result: object = None        # what on_edited(model) returned
    estimate_trapezoid: float | None = None  # with trapezoid=True

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The n tensors with the largest |contribution|."""
        return sorted(self.contributions.items(), key=lambda kv: -abs(kv[1]))[:n]

    def to_dict(self) -> dict:
        return asdict(self)


def categorize(delta_loss: float, noise: float) -> str:
    if abs(delta_loss) <= noise:
        return "competitive"
    return "decreased" if delta_loss > 0 else "improved"


def _check_C(C):
    if isinstance(C, bool) or not isinstance(C, int) or C < 1:
        raise ValueError(f"C={C!r} must be an integer >= 1 (the number of Riemann-sum points)")


def _base_tensors(base, names_shapes: dict):
    """A getter name -> base tensor (torch f32) from a model dir, a module or a state dict; checks
    names and shapes up front so a mismatched pair fails before any heavy work."""
    import torch

    if isinstance(base, (str, os.PathLike)):

        ck = Checkpoint(base)  # deltapack's reader: the index's tensors, pread, links only inside the directory
        shapes = {k: tuple(t.shape) for k, t in ck.tensors.items()}

        def get(name):
            arr, float_name = ck.read_tensor(name), ck[name].float_name
            return torch.from_numpy(reference.widen(arr, float_name) if float_name else arr.astype("float32"))
        label = ck.path
    else:
        sd = base.state_dict() if hasattr(base, "state_dict") else dict(base)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}

        def get(name):
            v = sd[name]
            return (v.detach().float() if isinstance(v, torch.Tensor) else torch.as_tensor(E.to_f32(v)))
        label = "base"
    for name, shape in names_shapes.items():
        if name not in shapes:
            raise ValueError(f"{label}: tensor '{name}' of the fine-tuned model is missing from the base "
                             "(different architectures?)")
        if tuple(shapes[name]) != tuple(shape):
            raise ValueError(f"{label}: tensor '{name}' has shape {list(shapes[name])} in the base but "
                             f"{list(shape)} in the fine-tuned model")
    return get


def _loss_pass(model, blist, n_tokens, grad: bool):
    """Mean loss over all labelled tokens; per-example loss sums; with grad, ∇L accumulated in .grad."""
    import torch

    total, per_example = 0.0, []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for ids, mask, labels in blist:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = labels[:, 1:]
            tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100,
                                                    reduction="none")
            sums = tok.sum(dim=1)
            if grad:
                (sums.sum() / n_tokens).backward()
            per_example.extend(sums.detach().double().tolist())
            total += float(sums.sum().detach())
    return total / n_tokens, per_example


def estimate(model, edit, data, base=None, deltas: dict | None = None, C: int = 5, seed: int = 0,
             batch_size: int = 64, exact: bool = True, select=E.default_selected, z: float = 2.0,
             rel_tol: float = 0.01, max_examples: int | None = None, on_edited=None,
             trapezoid: bool = False) -> Estimate:
    """The paper's Riemann-sum estimate of ΔL for `edit` applied to the delta of `model`, and the exact ΔL.

    model: the post-trained causal LM (transformers module in float32, or a model directory).
    edit: an edit string / rules ("dare:p=0.9", "*.mlp.*=dare:p=0.9;*=bitdelta"), or EditRules.
    data: a Pair, a JSONL path of {"input_ids", optional "prompt_len"}, or a list of examples.
    base: the base model (directory, module or state dict) or deltas: {name: ΔW} (exactly one).
    select(name, tensor): which parameters may be edited (default: 2-D matrices; None = all).
    on_edited(model): called while the weights are at W_edit (with exact=True), e.g. to measure a task
    metric without another copy of the model; its return value is kept in `Estimate.edited_result`.
    trapezoid: also take ∇L at t = 1 (a backward pass instead of the exact pass's forward) and report the
    trapezoid rule, left sum + (term(1) - term(0))/(2C), which removes the left sum's O(1/C) bias.
    """
    import torch

    # Cheap validation first.
    _check_C(C)
    if trapezoid and not exact:
        raise ValueError("estimate: trapezoid=True needs exact=True (it uses the pass at t = 1)")
    rules = E.EditRules(edit)
    if (base is None) == (deltas is None):
        raise ValueError("estimate: give exactly one of base= (model dir, module or state dict) or deltas=")
    examples = examples_of(data)
    if max_examples is not None:
        examples = examples[:max_examples]
    if not examples:
        raise ValueError("estimate: data has no examples")
    if isinstance(model, (str, os.PathLike)):
        if base is not None and isinstance(base, (str, os.PathLike)):
            _check_same_arch(model, base)
        model = load_model(model)
    if not isinstance(model, torch.nn.Module):
        raise ValueError("estimate: model must be a torch module or a model directory")
    vocab = model.get_input_embeddings().weight.shape[0]
    bad = [i for i, ex in enumerate(examples) if max(ex["input_ids"]) >= vocab]
    if bad:
        raise ValueError(f"data example {bad[0]}: token id {max(examples[bad[0]]['input_ids'])} >= the model's "
                         f"vocabulary size {vocab}")

    params = {n: p for n, p in model.named_parameters()}
    chosen = {n: p for n, p in params.items() if select is None or select(n, p)}
    chosen = {n: p for n, p in chosen.items() if rules.edit_for(n) is not None}
    if not chosen:
        raise ValueError(f"edit {rules}: no parameter of the model is selected and matched by a rule")
    for n, p in chosen.items():
        if p.dtype != torch.float32:
            raise ValueError(f"tensor '{n}' is {p.dtype}; the estimate needs a float32 model (model.float())")
    if deltas is not None:
        for n, p in chosen.items():
            if n not in deltas:
                raise ValueError(f"deltas: no delta for tensor '{n}'")
            if tuple(deltas[n].shape) != tuple(p.shape):
                raise ValueError(f"deltas: tensor '{n}' has shape {list(deltas[n].shape)}, the model {list(p.shape)}")
        get_delta = lambda n: torch.as_tensor(E.to_f32(deltas[n]))  # noqa: E731
    else:
        get_base = _base_tensors(base, {n: tuple(p.shape) for n, p in chosen.items()})
        get_delta = lambda n: chosen[n].detach().float() - get_base(n)  # noqa: E731

    blist = list(batches(examples, batch_size))
    n_tokens = int(sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in blist))
    if n_tokens == 0:
        raise ValueError("estimate: data has no labelled tokens (every example is all prompt)")

    was_training = model.training
    model.eval()
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in chosen)
    bf16_exact = all(bool((p.detach() == p.detach().bfloat16().float()).all()) for p in chosen.values())
    moved = 0.0
    try:
        model.zero_grad(set_to_none=True)
        loss_post, per_post = _loss_pass(model, blist, n_tokens, grad=True)
        # ΔW̃ = F(ΔW) - ΔW per tensor (the gradient at W_post is there for edits that need it).
        dtil = {}
        for n, p in chosen.items():
            d = get_delta(n)
            edited = rules.edit_for(n)(d, seed=E.tensor_seed(n, seed), grad=p.grad)
            dtil[n] = (torch.as_tensor(edited).float() - d).contiguous()
            del d, edited
        terms, contrib = [], dict.fromkeys(chosen, 0.0)

        def add_term():
            t = 0.0
            for n, p in chosen.items():
                v = float(torch.sum(p.grad.double() * dtil[n].double()))
                contrib[n] += v / C
                t += v
            terms.append(t)

        add_term()
        for c in range(1, C):
            t = c / C
            _move(chosen, dtil, t - moved)
            moved = t
            model.zero_grad(set_to_none=False)
            for p in chosen.values():
                p.grad.zero_()
            _loss_pass(model, blist, n_tokens, grad=True)
            add_term()
        model.zero_grad(set_to_none=True)
        loss_edit = se = exact_dl = edited_result = g1 = None
        if exact:
            _move(chosen, dtil, 1.0 - moved)
            moved = 1.0
            if trapezoid:  # the gradient at t = 1 too, for the trapezoid rule
                for p in chosen.values():
                    p.grad = torch.zeros_like(p)
            loss_edit, per_edit = _loss_pass(model, blist, n_tokens, grad=trapezoid)
            if trapezoid:
                g1 = sum(float(torch.sum(p.grad.double() * dtil[n].double())) for n, p in chosen.items())
                model.zero_grad(set_to_none=True)
            if on_edited is not None:
                edited_result = on_edited(model)
            exact_dl = loss_edit - loss_post
            diffs = [a - b for a, b in zip(per_edit, per_post)]
            m = len(diffs)
            if m > 1:
                mean = sum(diffs) / m
                var = sum((x - mean) ** 2 for x in diffs) / (m - 1)
                se = math.sqrt(var * m) / n_tokens
            else:
                se = 0.0
    finally:
        if moved:
            _move(chosen, dtil, -moved)
            if bf16_exact:
                with torch.no_grad():
                    for p in chosen.values():
                        p.copy_(p.bfloat16().float())
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.zero_grad(set_to_none=True)
        model.train(was_training)

    est = sum(terms) / C
    noise = max(z * se if se is not None else 0.0, rel_tol * abs(loss_post))
    return Estimate(edit=str(rules), C=C, estimate=est, terms=terms, exact=exact_dl, loss_post=loss_post,
                    loss_edit=loss_edit, se=se, noise=noise, category=categorize(est, noise),
                    category_exact=None if exact_dl is None else categorize(exact_dl, noise),
                    contributions=contrib, n_examples=len(examples), n_tokens=n_tokens,
                    n_tensors=len(chosen), n_params=int(sum(p.numel() for p in chosen.values())),
                    edited_result=edited_result,
                    estimate_trapezoid=None if g1 is None else est + (g1 - terms[0]) / (2 * C))


def _move(chosen, dtil, step: float):
    """W += step·ΔW̃ in place for every edited tensor."""
    import torch

    with torch.no_grad():
        for n, p in chosen.items():
            p.add_(dtil[n], alpha=step)


def _check_same_arch(model_dir, base_dir):
    def cfg(d):
        path = os.path.join(os.fspath(d), "config.json")
        return read_json_object(path) if os.path.isfile(path) else None
    a, b = cfg(model_dir), cfg(base_dir)
    if a is None or b is None:
        return
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if a.get(key) != b.get(key):
            raise ValueError(f"{model_dir} and {base_dir} differ in {key}: {a.get(key)!r} vs {b.get(key)!r} "
                             "(not a base / fine-tune pair)")


def first_order(model, dtil: dict, data, batch_size: int = 64) -> float:
    """⟨∇L(W), ΔW̃⟩ at the model's current weights (the C = 1 term), for checks and custom uses."""
    import torch

    examples = examples_of(data)
    blist = list(batches(examples, batch_size))
    n_tokens = int(sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in blist))
    model.zero_grad(set_to_none=True)
    _loss_pass(model, blist, n_tokens, grad=True)
    params = dict(model.named_parameters())
    out = 0.0
    for n, d in dtil.items():
        out += float(torch.sum(params[n].grad.double() * torch.as_tensor(d).double()))
    model.zero_grad(set_to_none=True)
    return out


def calibrate_scales(model, base, data, select=E.default_selected, steps: int = 100, lr: float = 1e-2,
                     batch_size: int = 32, seed: int = 0) -> dict:
    """BitDelta's scale distillation: per-tensor scales a_i of W_base + a_i·sign(ΔW_i), fitted so the edited
    model's next-token distribution matches the fine-tuned model's (KL on the labelled tokens of `data`).

    Starts from a_i = mean|ΔW_i| (plain BitDelta); returns {name: scale}. Use data that is not your test set.
    Holds the base and sign matrices of the selected tensors (two copies) while it runs.
    """
    import torch
    from torch.func import functional_call

    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    examples = examples_of(data)
    params = dict(model.named_parameters())
    chosen = {n: p for n, p in params.items() if select is None or select(n, p)}
    get_base = _base_tensors(base, {n: tuple(p.shape) for n, p in chosen.items()})
    bases, signs, init, logm = {}, {}, {}, {}
    for n, p in chosen.items():
        b = get_base(n)
        d = p.detach().float() - b
        bases[n], signs[n] = b, torch.sign(d)
        init[n] = d.abs().mean()
        logm[n] = torch.nn.Parameter(torch.zeros(()))  # scale = init · exp(logm): steps are relative
    blist = list(batches(examples, batch_size))
    with torch.no_grad():
        teacher = [torch.log_softmax(model(input_ids=i, attention_mask=m).logits[:, :-1].float(), -1)
                   for i, m, _ in blist]
    frozen = {n: p.detach() for n, p in params.items() if n not in chosen}
    opt = torch.optim.Adam(logm.values(), lr=lr)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    for step in range(steps):
        j = step % len(blist)
        ids, mask, labels = blist[j]
        weights = {**frozen, **{n: bases[n] + init[n] * logm[n].exp() * signs[n] for n in chosen}}
        logits = functional_call(model, weights, (ids,), {"attention_mask": mask}).logits[:, :-1].float()
        logq = torch.log_softmax(logits, -1)
        keep = labels[:, 1:] != -100
        kl = (teacher[j].exp() * (teacher[j] - logq)).sum(-1)[keep].mean()
        opt.zero_grad()
        kl.backward()
        opt.step()
    model.train(was_training)
    return {n: float(init[n] * logm[n].detach().exp()) for n in chosen}


def save_calibrated(delta_path, scales: dict, out_path, overwrite: bool = False) -> list[str]:
    """Write the delta file `delta_path` to `out_path` with the scales of its `sign` (scope=tensor)
    tensors replaced by calibrated ones (e.g. from calibrate_scales); every other tensor, the metadata
    and the base fingerprint are kept (an existing `out_path` is replaced only with overwrite). Returns the
    names of the tensors updated."""
    import numpy as np

    f = files.open(delta_path)
    out, updated = {}, []
    for name in f.keys():
        enc = f[name]
        if name in scales and enc.codec == "sign" and enc.params["scope"] == "tensor":
            comps = dict(enc.components)
            comps["scales"] = np.array([scales[name]], dtype=np.float32)
            enc = tensors.Encoded(enc.codec, enc.params, enc.shape, enc.dtype, comps, name)
            updated.append(name)
        out[name] = enc
    files.save(out_path, out, metadata=f.metadata or None, base=f.base, overwrite=overwrite)
    return updated
