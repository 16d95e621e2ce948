"""The `deltapack` command line."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

import numpy as np

import deltapack as dp

# Modules that add subcommands (each defines register(subparsers)); kept in one list here.
PLUGIN_MODULES: list[str] = []

DEMO_RECIPES = ["sign", "sign:scope=row", "levels:bits=2", "levels:bits=4", "quant:bits=4", "quant:bits=2",
                "sparse:p=0.9", "sparse:p=0.9,mode=magnitude", "lowrank:rank=32", "dense:dtype=bf16"]


def _demo_pair(n: int, seed: int):
    """A base matrix and a fine-tune delta shaped like real ones: a low-rank drift plus
    heavy-tailed element noise, about 1e-3 of the weights' scale."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
    drift = (rng.standard_normal((n, 16)) @ rng.standard_normal((16, n))) * (4e-4 / 4)
    noise = rng.standard_t(df=3, size=(n, n)) * 2e-4
    return base, (drift + noise).astype(np.float32)


def cmd_demo(args) -> int:
    """Encode one realistic delta with every codec; show size, error and rebuild speed."""
    base, delta = _demo_pair(args.size, args.seed)
    try:
        import torch
        base_t = torch.from_numpy(base).to(torch.bfloat16)
        base_label = "bf16 (torch)"
    except ImportError:  # the core needs no torch: use numpy float16
        base_t, base_label = base.astype(np.float16), "f16 (numpy)"
    if not args.json:
        print(f"deltapack {dp.__version__} demo: {args.size}x{args.size} delta, base {base_label}, "
              f"SIMD path {dp.simd()}, {args.threads or os.cpu_count()} threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        encoded = {}
        for recipe in args.recipes:
            t0 = time.perf_counter()
            encoded[recipe] = dp.encode(delta, recipe, threads=args.threads)
            encoded[recipe].name = recipe
            rows.append({"recipe": recipe, "encode_s": time.perf_counter() - t0})
        path = os.path.join(tmp, "demo.dpk")
        dp.save(path, encoded, metadata={"demo": True, "size": args.size})
        f = dp.open(path)
        out = base_t.clone() if hasattr(base_t, "clone") else base_t.copy()
        for row in rows:
            enc = f[row["recipe"]]  # read back from the file (checksummed, memory-mapped)
            d = dp.decode(enc)
            err = float(np.linalg.norm(d - delta) / np.linalg.norm(delta))
            cos = float((d * delta).sum() / (np.linalg.norm(d) * np.linalg.norm(delta) + 1e-30))
            dp.apply(base_t, enc, out=out, threads=args.threads)
            reps = []
            for _ in range(5):
                t0 = time.perf_counter()
                dp.apply(base_t, enc, out=out, threads=args.threads)
                reps.append(time.perf_counter() - t0)
            t = sorted(reps)[len(reps) // 2]
            row.update(bits_per_param=enc.bits_per_param, rel_error=err, cosine=cos, apply_ms=t * 1e3,
                       apply_gbps=base.size * 2 / t / 1e9)
        file_bytes = os.path.getsize(path)
    if args.json:
        print(json.dumps({"size": args.size, "file_bytes": file_bytes, "results": rows}, indent=1))
        return 0
    print(f"{'recipe':30s} {'bits/param':>10s} {'rel.error':>10s} {'cosine':>7s} {'apply ms':>9s} {'GB/s':>6s}")
    for r in rows:
        print(f"{r['recipe']:30s} {r['bits_per_param']:10.3f} {r['rel_error']:10.4f} {r['cosine']:7.4f} "
              f"{r['apply_ms']:9.2f} {r['apply_gbps']:6.1f}")
    print(f"all {len(rows)} encodings in one file: {file_bytes / 2**20:.1f} MiB "
          f"(the bf16 delta itself: {delta.size * 2 / 2**20:.1f} MiB)")
    return 0


def cmd_info(args) -> int:
    """Per-tensor codec, parameters, shape and bits per parameter of a delta file."""
    f = dp.open(args.file, verify=not args.no_verify)
    tensors, total_params, total_bytes = [], 0, 0
    for name in f.keys():
        enc = f.get(name)
        tensors.append({"name": name, "codec": enc.codec, "params": enc.params, "shape": list(enc.shape),
                        "dtype": enc.dtype, "bytes": enc.nbytes, "bits_per_param": enc.bits_per_param})
        total_params += enc.numel
        total_bytes += enc.nbytes
    summary = {"file": args.file, "file_bytes": f.nbytes, "tensors": len(tensors), "params": total_params,
               "bits_per_param": 8.0 * total_bytes / max(total_params, 1), "metadata": f.metadata,
               "base": f.base, "tool": f.manifest.get("tool")}
    if args.json:
        print(json.dumps({**summary, "tensor_list": tensors}, indent=1))
        return 0
    w = max([len(t["name"]) for t in tensors] + [6])
    print(f"{'tensor':{w}s}  {'codec':8s} {'shape':>16s} {'dtype':5s} {'bits/param':>10s}  params")
    for t in tensors:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        params = ",".join(f"{k}={v}" for k, v in t["params"].items())
        print(f"{t['name']:{w}s}  {t['codec']:8s} {shape:>16s} {t['dtype']:5s} {t['bits_per_param']:10.3f}  {params}")
    print(f"{len(tensors)} tensors, {total_params:,} parameters, {f.nbytes:,} bytes on disk, "
          f"{summary['bits_per_param']:.3f} bits/param")
    if f.metadata:
        print(f"metadata: {json.dumps(f.metadata)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltapack", description="Compact fine-tune deltas (W_ft - W_base): encode, "
                                "store, inspect and rebuild. See README.md and docs/FORMAT.md.")
    p.add_argument("--version", action="version", version=f"deltapack {dp.__version__}")
    p.add_argument("--simd", choices=["auto", "scalar", "avx2", "avx512"], help="force a SIMD path (default: auto)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="encode a realistic synthetic delta with every codec; print size, error, speed",
                       description=cmd_demo.__doc__)
    d.add_argument("--size", type=int, default=2048, help="matrix size N (N x N); default 2048")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=0, help="threads (0 = all cores)")
    d.add_argument("--recipes", nargs="+", default=DEMO_RECIPES, metavar="RECIPE",
                   help="recipes to try (default: one of each codec)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(fn=cmd_demo)

    i = sub.add_parser("info", help="list the tensors of a delta file", description=cmd_info.__doc__)
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--no-verify", action="store_true", help="skip the CRC-32C check of each tensor")
    i.set_defaults(fn=cmd_info)

    # Feature modules add their own subcommands: each has register(subparsers).
    for module in PLUGIN_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError as ex:  # an optional dependency of that feature is missing
            if ex.name and ex.name.split(".")[0] == "deltapack":
                raise
            continue
        mod.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.simd:
        dp.set_simd(args.simd)
    try:
        return args.fn(args)
    except (dp.FormatError, ValueError, OSError, KeyError) as ex:
        print(f"deltapack {args.command}: error: {ex}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
