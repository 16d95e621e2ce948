"""`deltapack analyze BASE FT --edit E --data FILE`: the paper's loss-change estimate for an edit."""
from __future__ import annotations

import json
import os

from .args import count, finite_float, model_path


def register(sub) -> None:
    a = sub.add_parser(
        "analyze", help="estimate the loss change of a delta edit (Riemann sum of Eq. 1) and measure it exactly",
        description="Estimate ΔL = L(W_post + ΔW̃) - L(W_post) for an edit of the delta FT - BASE with the "
                    "Riemann sum (1/C)·Σ⟨∇L(W_post + (c/C)ΔW̃), ΔW̃⟩, and compute the exact ΔL on the same data.")
    a.add_argument("base", type=model_path, help="base model directory (Hugging Face: config.json + *.safetensors)")
    a.add_argument("ft", type=model_path, help="fine-tuned model directory")
    a.add_argument("--edit", required=True, help="edit or per-tensor rules, e.g. 'dare:p=0.9', "
                   "'*.mlp.*=dare:p=0.9;*=bitdelta', 'magnitude:p=0.9+extrapolate:alpha=0.2'")
    a.add_argument("--data", required=True, help="JSONL of {\"input_ids\": [...], optional \"prompt_len\"}, or a "
                   "text file (one example per line) tokenized with FT's tokenizer")
    a.add_argument("-C", type=count, default=5, help="Riemann-sum points (default 5, as in the paper)")
    a.add_argument("--seed", type=int, default=0, help="seed of random edits (DARE masks)")
    a.add_argument("--max-examples", type=count, default=None, help="use only the first N examples")
    a.add_argument("--batch-size", type=count, default=32)
    a.add_argument("--no-exact", action="store_true", help="skip the exact ΔL (one forward pass less)")
    a.add_argument("--trapezoid", action="store_true", help="also the trapezoid-rule estimate (one more backward)")
    a.add_argument("--top", type=count, default=8, help="show the N largest per-tensor contributions")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("--force", action="store_true", help="go on even if FT does not look like a fine-tune of BASE")
    a.set_defaults(fn=cmd_analyze)

    c = sub.add_parser(
        "calibrate", help="refit the scales of a delta on calibration data (layer by layer, or BitDelta distillation)",
        description="Refit the free scales of DELTA on calibration data and write the delta to OUT (codes, signs and "
                    "singular vectors stay; the size does not change). --method least-squares (default): every "
                    "codec with free scales (sign scales, levels magnitudes, quant group scales, the u group "
                    "scales of lowrank with bits), each layer's output change on FT's calibration inputs "
                    "minimised in closed form, a group of layers at a time. --method distill: BitDelta's scale "
                    "distillation of the per-tensor scales of `sign` (scope=tensor) tensors, so that BASE + delta "
                    "matches FT's next-token distributions (KL, Adam). Use calibration data that is not your test set.")
    c.add_argument("base", type=model_path, help="base model directory")
    c.add_argument("ft", type=model_path, help="fine-tuned model directory (the teacher)")
    c.add_argument("delta", help="delta file made by `deltapack compress --recipe sign`")
    c.add_argument("--data", required=True, help="calibration data: JSONL of {\"input_ids\": [...]} or text")
    c.add_argument("-o", "--output", required=True, help="delta file to write (DELTA itself with --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only a deltapack file)")
    c.add_argument("--method", choices=["least-squares", "distill"], default="least-squares",
                   help="least-squares (every codec with scales, layer by layer; default) or distill (sign "
                        "scope=tensor, end to end)")
    c.add_argument("--steps", type=count, default=100, help="distill: optimisation steps (default 100)")
    c.add_argument("--lr", type=finite_float, default=1e-2,
                   help="distill: Adam learning rate on log-scales (default 0.01)")
    c.add_argument("--max-examples", type=count, default=None, help="use only the first N examples")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--force", action="store_true", help="go on even if FT does not look like a fine-tune of BASE")
    c.set_defaults(fn=cmd_calibrate)


def load_examples(path: str, model_dir: str, max_examples: int | None = None) -> list[dict]:
    """JSONL examples as they are; any other text file: one example per non-empty line, tokenized with the
    model directory's tokenizer (an error if it has none)."""
    from .. import lm

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such data file")
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    if first.lstrip().startswith("{"):
        examples = lm.read_data(path)
    else:
        if not os.path.exists(os.path.join(model_dir, "tokenizer.json")) and \
                not os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
            raise ValueError(f"{path}: a text file needs a tokenizer, and {model_dir} has none "
                             "(give a JSONL file of {\"input_ids\": [...]} instead)")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        examples = [{"input_ids": tok(line)["input_ids"], "prompt_len": 0} for line in lines]
        examples = [e for e in examples if len(e["input_ids"]) >= 2]
        if not examples:
            raise ValueError(f"{path}: no line gives at least 2 tokens")
    return examples[:max_examples] if max_examples else examples


def cmd_analyze(args) -> int:
    from ..research import analysis, edits

    if args.C < 1:
        raise ValueError(f"-C {args.C}: must be >= 1")
    edits.EditRules(args.edit)  # parse errors before loading anything
    for d in (args.base, args.ft):
        if not os.path.isdir(d):
            raise ValueError(f"{d}: not a model directory")
    _check_related(args)
    examples = load_examples(args.data, args.ft, args.max_examples)
    r = analysis.estimate(args.ft, args.edit, examples, base=args.base, C=args.C, seed=args.seed,
                          batch_size=args.batch_size, exact=not args.no_exact, trapezoid=args.trapezoid)
    if args.json:
        out = r.to_dict()
        out["top"] = [{"tensor": n, "contribution": v} for n, v in r.top(args.top)]
        print(json.dumps(out, indent=1))
        return 0
    print(f"edit {r.edit} on {r.n_tensors} tensors ({r.n_params:,} parameters); data: {r.n_examples} examples, "
          f"{r.n_tokens} scored tokens; L(W_post) = {r.loss_post:.5f}")
    print(f"estimated ΔL (C={r.C}) = {r.estimate:+.5f}   terms: " + " ".join(f"{t:+.4f}" for t in r.terms))
    if r.estimate_trapezoid is not None:
        print(f"trapezoid estimate = {r.estimate_trapezoid:+.5f}")
    if r.exact is not None:
        print(f"exact ΔL           = {r.exact:+.5f}   (L(W_edit) = {r.loss_edit:.5f}, std. error {r.se:.5f})")
    print(f"category: {r.category} (noise threshold {r.noise:.5f})"
          + (f"; exact: {r.category_exact}" if r.category_exact else ""))
    print("top contributions:")
    w = max(len(n) for n, _ in r.top(args.top))
    for n, v in r.top(args.top):
        print(f"  {n:{w}s} {v:+.5f}")
    return 0


def _check_related(args) -> None:
    if not args.force:
        from .. import checkpoint
        checkpoint.check_related(args.base, args.ft)


def cmd_calibrate(args) -> int:
    from .. import _core, files
    from ..research import analysis

    _core.check_output(args.output, _core.OutputKind.DELTA_FILE, [args.base, args.ft], args.overwrite)
    _check_related(args)
    if args.method == "least-squares":
        from ..compress import calibration
        examples = load_examples(args.data, args.ft, args.max_examples)
        r = calibration.calibrate_file(args.base, args.ft, args.delta, args.output, examples, overwrite=args.overwrite)
        if args.json:
            print(json.dumps(r, indent=1))
        else:
            print(f"wrote {args.output}: scales of {len(r['refitted'])} tensors refitted on {r['examples']} examples")
        return 0
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be >= 1")
    f = files.open(args.delta)
    sign_tensors = set()
    for n in f.keys():
        codec, params, _, _ = f.entry(n)
        if codec == "sign" and params["scope"] == "tensor":
            sign_tensors.add(n)
    if not sign_tensors:
        raise ValueError(f"{args.delta}: no sign (scope=tensor) tensors to calibrate")
    examples = load_examples(args.data, args.ft, args.max_examples)
    scales = analysis.calibrate_scales(args.ft, args.base, examples, select=lambda n, p: n in sign_tensors,
                                       steps=args.steps, lr=args.lr)
    before = {n: float(f[n].components["scales"][0]) for n in scales}
    updated = analysis.save_calibrated(args.delta, scales, args.output, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"output": args.output, "scales": {n: {"before": before[n], "after": scales[n]}
                                                            for n in updated}}, indent=1))
    else:
        for n in updated:
            print(f"{n}: scale {before[n]:.6g} -> {scales[n]:.6g}")
        print(f"wrote {args.output}: {len(updated)} scales calibrated")
    return 0
