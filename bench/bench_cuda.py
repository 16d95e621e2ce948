"""The CUDA kernels on a GPU (issue 22; run by bench/gpu_check.sh), each figure checked for the CPU engine's bits
where the CPU can afford it:

  1. apply, `sign` and `quant:bits=4`, 4096 x 4096 and 14336 x 4096 bf16, against a device-to-device copy of the
     output's bytes (goal >= 0.8x the copy's speed) and against the same math in torch (goal >= 10x);
  2. the mixed batch of 8 sign fine-tunes x 1, 4, 16 tokens at 4096^2 and 14336 x 4096 (device_products) against
     the base's bf16 matmul of the whole batch (goal <= 1.6x at 8 x 1) and against rebuilding each fine-tune and
     multiplying (goal >= 3x faster);
  3. greedy decoding of a mixed batch of 4 fine-tunes through bank.patch against the 4 run one after another.

GPU times are CUDA-event times of the work queued on the stream (apply's wait for its error flags included);
medians of --repeats. Writes cuda.md and cuda.json into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import deltapack as dp
from deltapack import _core


def gpu_time(fn, repeats):
    """Median milliseconds of fn's GPU work (CUDA events on the current stream), after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bits(t):
    return t.view(torch.int16).cpu().numpy() if t.dtype == torch.bfloat16 else t.cpu().numpy().view(np.uint32)


def torch_sign(signs, scales, shape, base):
    """The sign rebuild in plain torch ops (row scales): unpack the bits, +-s, add, round."""
    rows, cols = shape
    b = signs.unsqueeze(-1).bitwise_right_shift(torch.arange(8, device=signs.device, dtype=torch.uint8)) & 1
    b = b.reshape(rows, -1)[:, :cols].float()
    return (base.float() + (2 * b - 1) * scales.view(rows, 1)).to(base.dtype)


def torch_quant4(codes, scales, scale_exp, group, shape, base):
    """quant:bits=4 in torch: two codes a byte, (code - 7) * f16 scale * 2^scale_exp per group of columns."""
    rows, cols = shape
    lo, hi = codes & 15, codes >> 4
    c = torch.stack([lo, hi], dim=-1).reshape(rows, -1)[:, :cols].float() - 7
    s = torch.ldexp(scales.float(), torch.tensor(float(scale_exp), device=codes.device))
    s = s.repeat_interleave(group, dim=1)[:, :cols]
    return (base.float() + c * s).to(base.dtype)


def bench_apply(shapes, repeats, rows_out):
    g = torch.Generator().manual_seed(0)
    for shape in shapes:
        base_cpu = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
        delta = (torch.randn(shape, generator=g) * 1e-3).numpy()
        base = base_cpu.cuda()
        out = torch.empty_like(base)
        copy_ms = gpu_time(lambda: out.copy_(base), repeats)
        for recipe in ("sign:scope=row", "quant:bits=4"):
            enc = dp.encode(delta, recipe)
            dd = dp.cuda.to_device(enc, base.device)
            stream = torch.cuda.current_stream().cuda_stream
            for rounding in ("nearest", "auto"):
                ms = gpu_time(lambda: dd.apply(base, out, 1.0, rounding, stream), repeats)
                same = bool(np.array_equal(bits(out), bits(dp.apply(base_cpu, enc, rounding=rounding))))
                comps = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in enc.components.items()}

                def torch_fn():
                    if recipe.startswith("sign"):
                        return torch_sign(comps["signs"], comps["scales"], shape, base)
                    return torch_quant4(comps["codes"], comps["scales"].view(torch.float16), enc.params["scale_exp"],
                                        enc.params["group"], shape, base)
                torch_ms = gpu_time(torch_fn, repeats) if rounding == "nearest" else None
                rows_out.append({"shape": list(shape), "recipe": recipe, "rounding": rounding, "apply_ms": ms,
                                 "copy_ms": copy_ms, "vs_copy": copy_ms / ms,
                                 "torch_ms": torch_ms, "vs_torch": torch_ms / ms if torch_ms else None,
                                 "bits_equal_cpu": same, "GBps": 2 * base.numel() * 2 / ms / 1e6})
                print(rows_out[-1], flush=True)


def bench_products(shapes, tokens_list, repeats, rows_out, fine_tunes=8):
    g = torch.Generator().manual_seed(1)
    for shape in shapes:
        rows, cols = shape
        base = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16).cuda()
        encs = [dp.encode((torch.randn(shape, generator=g) * 1e-3).numpy(), "sign:scope=row")
                for _ in range(fine_tunes)]
        dds = [dp.cuda.to_device(e, base.device) for e in encs]
        rebuilt = torch.empty_like(base)
        stream = torch.cuda.current_stream().cuda_stream
        for tokens in tokens_list:
            xs = [torch.randn(tokens, cols, generator=g).cuda() for _ in encs]
            x_all = torch.cat(xs).to(torch.bfloat16)
            ys = [torch.zeros(tokens, rows, device="cuda") for _ in encs]
            jobs = [(d, x, y) for d, x, y in zip(dds, xs, ys)]
            workspace = torch.empty(max(1, _core.device_products_workspace(jobs)), dtype=torch.uint8, device="cuda")
            prod_ms = gpu_time(lambda: _core.device_products(jobs, 1.0, workspace, stream), repeats)
            base_ms = gpu_time(lambda: x_all @ base.T, repeats)

            def rebuild_each():
                for d, x in zip(dds, xs):
                    d.apply(base, rebuilt, 1.0, "auto", stream)
                    x.to(torch.bfloat16) @ rebuilt.T
            rebuild_ms = gpu_time(rebuild_each, max(3, repeats // 4))
            for y in ys:
                y.zero_()
            _core.device_products(jobs, 1.0, workspace, stream)
            torch.cuda.synchronize()
            same = all(np.array_equal(ys[i].cpu().numpy().view(np.uint32),
                                      dp.delta_product(encs[i], xs[i].cpu().numpy()).view(np.uint32))
                       for i in range(2))
            rows_out.append({"shape": list(shape), "fine_tunes": fine_tunes, "tokens": tokens, "products_ms": prod_ms,
                             "base_matmul_ms": base_ms, "products_plus_base_vs_base": (prod_ms + base_ms) / base_ms,
                             "rebuild_and_matmul_ms": rebuild_ms,
                             "speedup_vs_rebuild": rebuild_ms / (prod_ms + base_ms),
                             "bits_equal_cpu": same})
            print(rows_out[-1], flush=True)


def bench_bank(workdir, new_tokens, rows_out, device="cuda", size=(1024, 2816, 8)):
    """device "emulate" with a small size: a dry run of this code on the CPU."""
    import transformers

    from deltapack import checkpoint as ck
    hidden, inter, layers = size
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                   max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="bfloat16")
    where = "cpu" if device == dp.cuda.EMULATE else device

    def sync():
        if where != "cpu":
            torch.cuda.synchronize()
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    base.save_pretrained(f"{workdir}/base")
    names = ["a", "b", "c", "d"]
    for i, name in enumerate(names):
        ft = transformers.LlamaForCausalLM.from_pretrained(f"{workdir}/base", torch_dtype=torch.bfloat16)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(10 + i)
            for n, p in ft.named_parameters():
                if p.ndim == 2 and "embed" not in n:
                    p.add_((torch.randn(p.shape, generator=gen) * 0.05 * p.float().std()).to(p.dtype))
        ft.save_pretrained(f"{workdir}/ft_{name}")
        ck.compress(f"{workdir}/base", f"{workdir}/ft_{name}", f"{workdir}/{name}.dpk", "sign:scope=row")
    bank = dp.Bank(f"{workdir}/base", device=device)
    for name in names:
        bank.add(name, f"{workdir}/{name}.dpk")
    model = bank.patch(transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).to(where).eval())
    ids = torch.randint(0, 2048, (4, 16), generator=torch.Generator().manual_seed(3)).to(where)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with bank.rows(names):
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
            sync()
            t0 = time.perf_counter()
            mixed = model.generate(ids, **kw)
            sync()
            mixed_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        alone = []
        for i, name in enumerate(names):
            bank.activate(name)
            alone.append(model.generate(ids[i:i + 1], **kw))
        sync()
        alone_s = time.perf_counter() - t0
        bank.activate(None)
    agree = sum(int(torch.equal(mixed[i], alone[i][0])) for i in range(4))
    rows_out.append({"model": f"llama {layers} x {hidden}, bf16, 4 sign fine-tunes", "new_tokens": new_tokens,
                     "mixed_batch_s": mixed_s, "one_after_another_s": alone_s, "speedup": alone_s / mixed_s,
                     "rows_with_the_same_tokens_as_alone": agree})
    print(rows_out[-1], flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="the 4096 x 4096 shapes and 1 token only")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and dp.cuda.device_count()):
        sys.exit("no CUDA device (or deltapack built without CUDA): nothing to measure")
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (14336, 4096)]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "apply": [], "products": [],
              "bank": []}
    bench_apply(shapes, args.repeats, result["apply"])
    bench_products(shapes, [1] if args.quick else [1, 4, 16], args.repeats, result["products"])
    with tempfile.TemporaryDirectory() as d:
        bench_bank(d, 16 if args.quick else 32, result["bank"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cuda.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# CUDA kernels on {result['device']}", "", "Command: `bench/gpu_check.sh` (bench/bench_cuda.py).", "",
             "| shape | recipe | rounding | apply ms | copy ms | vs copy (goal >= 0.8) | torch ms "
             "| vs torch (goal >= 10) | bits = CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["apply"]:
        torch_cols = f"{r['torch_ms']:.3f} | {r['vs_torch']:.1f}x" if r["torch_ms"] else "- | -"
        lines.append(f"| {r['shape']} | {r['recipe']} | {r['rounding']} | {r['apply_ms']:.3f} | "
                     f"{r['copy_ms']:.3f} | {r['vs_copy']:.2f} | {torch_cols} | {r['bits_equal_cpu']} |")
    lines += ["", "| shape | fine-tunes x tokens | products ms | base bf16 matmul ms | (products + base) / base "
              "(goal <= 1.6 at 8 x 1) | rebuild + matmul ms | speed-up (goal >= 3) | bits = CPU |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["products"]:
        lines.append(f"| {r['shape']} | {r['fine_tunes']} x {r['tokens']} | {r['products_ms']:.3f} | "
                     f"{r['base_matmul_ms']:.3f} | {r['products_plus_base_vs_base']:.2f} | "
                     f"{r['rebuild_and_matmul_ms']:.3f} | {r['speedup_vs_rebuild']:.1f}x | {r['bits_equal_cpu']} |")
    for r in result["bank"]:
        lines += ["", f"Greedy decoding, {r['model']}, {r['new_tokens']} new tokens: mixed batch of 4 through "
                  f"bank.patch {r['mixed_batch_s']:.2f} s, the 4 one after another {r['one_after_another_s']:.2f} s "
                  f"({r['speedup']:.2f}x); rows with the tokens of their fine-tune alone: "
                  f"{r['rows_with_the_same_tokens_as_alone']} of 4."]
    with open(os.path.join(args.out, "cuda.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
