"""Apply / encode throughput of every codec at LLaMA-7B-like shapes, bf16 base.

For each codec, shape and thread count it reports, measured in the same run:
  apply GB/s (output bytes), ratio vs np.copyto of the same output bytes (memory bound),
  ratio vs a plain torch implementation of the same math, bits per parameter;
and the encode speed of `sign` vs np.copyto of the input bytes. Median of --repeats after a warm-up.

    python bench/bench_apply.py                # full run, writes bench/results/apply.{json,md}
    python bench/bench_apply.py --quick        # small shapes, a smoke test of the script
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

import deltapack as dp
from benchlib import median_time

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def unpack_bits_torch(packed: np.ndarray, width: int, cols: int) -> torch.Tensor:
    """LSB-first packed codes -> int32 tensor, in plain torch ops."""
    b = torch.from_numpy(packed).to(torch.int32)
    bits = ((b.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(b.shape[0], -1)
    bits = bits[:, :cols * width].reshape(b.shape[0], cols, width)
    return (bits << torch.arange(width, dtype=torch.int32)).sum(-1, dtype=torch.int32)


def torch_reference(enc: dp.Encoded, base: torch.Tensor):
    """A closure computing (base.float() + delta).to(bf16) with torch ops from the components."""
    rows, cols = base.shape
    c, p = enc.components, enc.params
    if enc.codec == "sign":
        signs, s = torch.from_numpy(c["signs"]), float(c["scales"][0])
        shifts = torch.arange(8, dtype=torch.uint8)

        def run():
            pos = ((signs.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, :cols].bool()
            return (base.float() + torch.where(pos, s, -s)).to(torch.bfloat16)
    elif enc.codec == "levels":
        table = torch.from_numpy(np.asarray(c["levels"]))
        signs, codes = c["signs"], c["codes"]

        def run():
            pos = unpack_bits_torch(signs, 1, cols).bool()
            mag = table[unpack_bits_torch(codes, p["bits"] - 1, cols)]
            return (base.float() + torch.where(pos, mag, -mag)).to(torch.bfloat16)
    elif enc.codec == "quant":
        qmax = 2 ** (p["bits"] - 1) - 1
        sc = torch.from_numpy(np.ldexp(c["scales"].astype(np.float32), p["scale_exp"]).astype(np.float32))
        codes, g = c["codes"], p["group"]

        def run():
            q = (unpack_bits_torch(codes, p["bits"], cols) - qmax).float()
            return (base.float() + q * sc.repeat_interleave(g, dim=1)[:, :cols]).to(torch.bfloat16)
    elif enc.codec == "sparse":
        d = torch.from_numpy(dp.decode(enc)).reshape(-1)
        idx = torch.nonzero(d).reshape(-1)
        vals = d[idx]

        def run():
            out = base.float().reshape(-1)
            out.index_add_(0, idx, vals)
            return out.reshape(rows, cols).to(torch.bfloat16)
    elif enc.codec == "lowrank":
        u, v = torch.from_numpy(c["u"]), torch.from_numpy(c["v"])

        def run():
            return (base.float() + u.float() @ v.float()).to(torch.bfloat16)
    else:
        vals = torch.from_numpy(c["values"])
        if p["dtype"] == "bf16":  # numpy keeps bf16 as uint16 bit patterns
            vals = torch.from_numpy(c["values"].view(np.int16)).view(torch.bfloat16)

        def run():
            return (base.float() + vals.float()).to(torch.bfloat16)
    return run


CODECS = [
    ("sign", "sign"),
    ("levels:bits=2", "levels:bits=2"),
    ("quant:bits=4", "quant:bits=4,group=128"),
    ("sparse:p=0.9", "sparse:p=0.9"),
    ("lowrank:rank=64", "lowrank:rank=64"),
    ("dense:dtype=bf16", "dense:dtype=bf16"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 repeats")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    shapes = [(512, 512), (1024, 512)] if args.quick else [(4096, 4096), (14336, 4096)]
    repeats = 3 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    rows_out = []
    for shape in shapes:
        delta = torch.from_numpy((rng.standard_t(4, size=shape) * 2e-3).astype(np.float32)).to(torch.bfloat16)
        base = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.02).to(torch.bfloat16)
        out = torch.empty_like(base)
        base_np, out_np = base.view(torch.int16).numpy(), out.view(torch.int16).numpy()
        t_copy = median_time(lambda: np.copyto(out_np, base_np), repeats)
        for label, recipe in CODECS:
            enc = dp.encode(delta, recipe)
            ref = torch_reference(enc, base)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                t_apply = median_time(lambda: dp.apply(base, enc, out=out, threads=threads), repeats)
                t_torch = median_time(ref, repeats)
                assert torch.equal(ref().view(torch.int16), dp.apply(base, enc).view(torch.int16)) or \
                    enc.codec in ("lowrank", "sparse"), label  # summation order may differ there
                rows_out.append(dict(
                    codec=label, shape=list(shape), threads=threads, bits_per_param=round(enc.bits_per_param, 4),
                    apply_ms=round(t_apply * 1e3, 3), apply_gbps=round(base.numel() * 2 / t_apply / 1e9, 2),
                    vs_memcpy=round(t_copy / t_apply, 3), vs_torch=round(t_torch / t_apply, 2),
                    memcpy_ms=round(t_copy * 1e3, 3), torch_ms=round(t_torch * 1e3, 3)))
                print(json.dumps(rows_out[-1]), flush=True)
        # Encode speed of sign (bf16 input) against copying the input bytes.
        for threads in (1, 2):
            t_enc = median_time(lambda: dp.encode(delta, "sign", threads=threads), repeats)
            rows_out.append(dict(codec="encode sign", shape=list(shape), threads=threads,
                                 encode_ms=round(t_enc * 1e3, 3), vs_memcpy=round(t_copy / t_enc, 3),
                                 memcpy_ms=round(t_copy * 1e3, 3)))
            print(json.dumps(rows_out[-1]), flush=True)
    meta = dict(machine=platform.machine(), cpus=os.cpu_count(), simd=dp.simd(), torch=torch.__version__,
                numpy=np.__version__, deltapack=dp.__version__, repeats=repeats,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.quick:
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "apply.json"), "w") as f:
        json.dump(dict(meta=meta, results=rows_out), f, indent=1)
    with open(os.path.join(args.out, "apply.md"), "w") as f:
        f.write(f"# Apply benchmark\n\n{json.dumps(meta)}\n\n")
        f.write("| codec | shape | threads | bits/param | ms | GB/s out | vs np.copyto | vs torch |\n|---|---|---|---|---|---|---|---|\n")
        for r in rows_out:
            if "apply_ms" in r:
                f.write(f"| {r['codec']} | {r['shape'][0]}x{r['shape'][1]} | {r['threads']} | {r['bits_per_param']} | "
                        f"{r['apply_ms']} | {r['apply_gbps']} | {r['vs_memcpy']} | {r['vs_torch']} |\n")
        f.write("\n| encode | shape | threads | ms | vs np.copyto of input |\n|---|---|---|---|---|\n")
        for r in rows_out:
            if "encode_ms" in r:
                f.write(f"| sign | {r['shape'][0]}x{r['shape'][1]} | {r['threads']} | {r['encode_ms']} | {r['vs_memcpy']} |\n")


if __name__ == "__main__":
    main()
