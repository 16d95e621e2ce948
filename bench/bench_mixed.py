"""Mixed batches (issue 12): rows of one batch for different fine-tunes, from the packed deltas.

    python bench/bench_mixed.py [--tokens 1 4 16] [--repeats 15] [--skip-layers] [--skip-decode]

1. Layers. A bf16 base weight at Llama-3-8B shapes (4096x4096 and 14336x4096) and 8 fine-tunes of it, each a
   `sign` delta made by `deltapack compress`, in one bank; a batch of 8 fine-tunes x T tokens (T = 1, 4, 16). Times, median of --repeats rounds that run
   each variant in turn, on all cores:
     base     x @ W_base.T (torch bf16 matmul) for the whole batch: the cost without fine-tunes;
     mixed    the same plus every row's delta from the packed bits, one Bank.mixed_product call (what a
              patched nn.Linear does: x to f32, the deltas' part added in f32, rounded once);
     rebuild  per fine-tune, rebuild its bf16 matrix (Bank.rebuild into a buffer) and multiply its rows.
   Targets: mixed / base <= 2 at 8 x 1 token; rebuild / mixed >= 3. torch's OpenMP threads spin for a while
   after each matmul and take cores from the delta's threads: run it again with OMP_WAIT_POLICY=PASSIVE
   (and --out bench/results/mixed_passive) to see the difference.
2. Decoding. Greedy decoding of a mixed batch of 4 fine-tunes on project pairs that share a base
   (llama-small and llama-small-reverse-light, each as a `sign` delta and a `lowrank:rank=16` delta): one
   patched model (bank.patch + bank.rows) against the four fine-tunes rebuilt and run one after another
   (rebuilding excluded; with bank.activate switches included as a second figure). The tokens must be
   the same; tokens/s is new tokens of all four over the wall time.
Results go to bench/results/mixed.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import deltapack as dp
from benchlib import interleaved_medians

SHAPES = [(4096, 4096), (14336, 4096)]
N_FINE_TUNES = 8


def bench_layer(rows, cols, tokens, repeats, rng, scratch_dir):
    """One bf16 weight as a one-tensor "model", 8 fine-tunes of it compressed to `sign`, served by a bank."""
    from safetensors.torch import save_file

    from deltapack import checkpoint as ck

    d = Path(tempfile.mkdtemp(prefix="bench_mixed_", dir=scratch_dir))
    w = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).to(torch.bfloat16)
    save_file({"w": w}, d / "base.safetensors")
    bank = dp.Bank(d / "base.safetensors")
    names = [f"ft{i}" for i in range(N_FINE_TUNES)]
    for n in names:
        ft = (w.float() + torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32) * 1e-3)).bfloat16()
        save_file({"w": ft}, d / f"{n}.safetensors")
        ck.compress(d / "base.safetensors", d / f"{n}.safetensors", d / f"{n}.dpk", "sign")
        (d / f"{n}.safetensors").unlink()
        bank.add(n, d / f"{n}.dpk")
    w_bits = w.view(torch.int16).numpy().view(np.uint16)
    scratch = np.empty_like(w_bits)
    out = []
    for t in tokens:
        x = torch.randn(N_FINE_TUNES * t, cols).to(torch.bfloat16)
        which = torch.arange(N_FINE_TUNES, dtype=torch.int32).repeat_interleave(t)

        def base():
            return torch.nn.functional.linear(x, w)

        def mixed():  # what a patched nn.Linear does
            y = torch.nn.functional.linear(x, w)
            delta = torch.zeros(x.shape[0], rows, dtype=torch.float32)
            bank._b.mixed_product("w", names, which, x.float(), delta, 1.0)
            return (y.float() + delta).to(y.dtype)

        def rebuild():
            y = torch.empty(x.shape[0], rows, dtype=torch.bfloat16)
            for i, n in enumerate(names):
                bank._b.rebuild([(n, 1.0)], "w", scratch)
                idx = slice(i * t, (i + 1) * t)
                y[idx] = torch.nn.functional.linear(x[idx], torch.from_numpy(scratch).view(torch.bfloat16))
            return y

        # the mixed result is the rebuilt one up to the rounding of the rebuilt weights to bf16
        ym, yr = mixed().float(), rebuild().float()
        rel = ((ym - yr).abs().max() / yr.abs().max()).item()
        tb, tm, tr = interleaved_medians((base, mixed, rebuild), repeats)
        out.append({"shape": [rows, cols], "fine_tunes": N_FINE_TUNES, "tokens_each": t, "batch": x.shape[0],
                    "base_s": tb, "mixed_s": tm, "rebuild_s": tr, "overhead": tm / tb, "speedup_vs_rebuild": tr / tm,
                    "max_rel_diff_vs_rebuild": rel})
        print(f"{rows}x{cols} 8x{t:<2} base {tb * 1e3:7.2f} ms  mixed {tm * 1e3:7.2f} ms ({tm / tb:.2f}x)  "
              f"rebuild {tr * 1e3:8.2f} ms ({tr / tm:.1f}x slower)  max rel diff {rel:.1e}", flush=True)
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    return out


def bench_decode(new_tokens, repeats):
    import transformers

    from deltapack import checkpoint as ck
    from deltapack.research import pairs

    root = Path(pairs.cache_dir()) if hasattr(pairs, "cache_dir") else Path.home() / ".cache/deltapack/pairs"
    a, b = root / "llama-small-0", root / "llama-small-reverse-light-0"
    if not (a / "ft").exists() or not (b / "ft").exists():
        print("decode: the llama-small pairs are not built (python -m deltapack.research.pairs); skipped")
        return None
    tmp = Path(tempfile.mkdtemp(prefix="bench_mixed_"))
    names = []
    for pair, tag in ((a, "plain"), (b, "reverse")):
        for recipe, rtag in (("sign", "sign"), ("lowrank:rank=16", "lowrank16")):
            name = f"{tag}-{rtag}"
            ck.compress(a / "base", pair / "ft", tmp / f"{name}.dpk", recipe)
            names.append(name)
    prompts = []
    for pair in (a, a, b, b):
        line = json.loads((pair / "data.jsonl").read_text().splitlines()[len(prompts)])
        prompts.append(line["input_ids"][:line["prompt_len"]])
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    bank = dp.Bank(a / "base")
    for n in names:
        bank.add(n, tmp / f"{n}.dpk")
    model = bank.patch(transformers.AutoModelForCausalLM.from_pretrained(a / "base").eval())
    rebuilt = {}
    for n in names:
        m = transformers.AutoModelForCausalLM.from_pretrained(a / "base").eval()
        ck.load_into(m, tmp / f"{n}.dpk")
        rebuilt[n] = m

    with torch.no_grad():
        def mixed():
            with bank.rows(names):
                return model.generate(ids, attention_mask=mask, **kw)

        def one_by_one():
            return [rebuilt[n].generate(ids[i:i + 1, width - len(prompts[i]):], **kw)[0] for i, n in enumerate(names)]

        def switching():  # one bound model, bank.activate between fine-tunes
            outs = []
            for i, n in enumerate(names):
                bank.activate(n)
                outs.append(model.generate(ids[i:i + 1, width - len(prompts[i]):], **kw)[0])
            bank.activate(None)
            return outs

        got, want, switched = mixed(), one_by_one(), switching()
        same = all(torch.equal(got[i, width:], want[i][len(prompts[i]):]) for i in range(len(names)))
        same_switch = all(torch.equal(switched[i], want[i]) for i in range(len(names)))
        tm, to, ts = interleaved_medians((mixed, one_by_one, switching), repeats)
    total = new_tokens * len(names)
    res = {"model": "llama-small (1.7 M params)", "fine_tunes": names, "new_tokens_each": new_tokens,
           "mixed_tok_s": total / tm, "one_by_one_tok_s": total / to, "switching_tok_s": total / ts,
           "same_tokens": same, "same_tokens_switching": same_switch}
    print(f"decode: mixed {total / tm:.0f} tok/s, rebuilt one by one {total / to:.0f} tok/s, "
          f"bank.activate between {total / ts:.0f} tok/s; same tokens: {same} / {same_switch}", flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=15)  # this VM moves 10-30 % between runs
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--dir", default=None, help="scratch directory (default: the system's temporary directory)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mixed"))
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "simd": dp.simd(), "torch_threads": torch.get_num_threads(),
                          "python": sys.version.split()[0], "torch": torch.__version__,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")},
              "layers": [], "decode": None}
    if not args.skip_layers:
        for rows, cols in SHAPES:
            result["layers"] += bench_layer(rows, cols, args.tokens, args.repeats, rng, args.dir)
    if not args.skip_decode:
        result["decode"] = bench_decode(args.new_tokens, max(3, args.repeats // 2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    policy = result["machine"]["omp_wait_policy"]
    lines = ["# Mixed batches", "", f"`{'' if policy == 'default' else f'OMP_WAIT_POLICY={policy} '}python "
             f"bench/bench_mixed.py` on {result['machine']['cores']} cores ({result['machine']['simd']}), median of "
             f"{args.repeats}; torch's OpenMP threads wait by the {policy} policy.", "",
             "| matrix | batch | base bf16 matmul | mixed | overhead | rebuild + matmul | mixed vs rebuild |",
             "|---|---|---|---|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | 8 x {r['tokens_each']} | {r['base_s'] * 1e3:.2f} ms | "
                     f"{r['mixed_s'] * 1e3:.2f} ms | {r['overhead']:.2f}x | {r['rebuild_s'] * 1e3:.1f} ms | "
                     f"{r['speedup_vs_rebuild']:.1f}x faster |")
    d = result["decode"]
    if d:
        lines += ["", f"Greedy decoding, {d['model']}, fine-tunes {', '.join(d['fine_tunes'])}, "
                  f"{d['new_tokens_each']} new tokens each:", "",
                  "| mixed batch (patch + rows) | rebuilt fine-tunes one by one | one bound model, activate between |",
                  "|---|---|---|",
                  f"| {d['mixed_tok_s']:.0f} tok/s | {d['one_by_one_tok_s']:.0f} tok/s | {d['switching_tok_s']:.0f} tok/s |",
                  "", f"Same tokens as the rebuilt fine-tunes: {d['same_tokens']} (mixed), "
                  f"{d['same_tokens_switching']} (switching)."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
