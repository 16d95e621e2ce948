"""Peak memory and throughput of `deltapack compress` / `deltapack apply` at Llama-3-8B tensor shapes.

    python bench/bench_checkpoint.py [--layers 4 8] [--dir /tmp] [--recipe sign] [--budget 1.0]

Builds a synthetic bf16 checkpoint pair (embeddings 128256x4096, attention 4096x4096 and 1024x4096,
MLP 14336x4096, norms; embed_tokens and lm_head) as ~2 GiB shards, then for each layer count:
  - peak RSS of `deltapack compress` and `deltapack apply` (os.wait4 of the subprocess), against the
    bound 1 GiB + 3 x the largest tensor;
  - their wall time against, in the same run, two baselines: safetensors (compress: get_tensor + clone of
    base + fine-tune; apply: base read + output written with safetensors.torch.save_file, which copies every
    byte twice and does not fsync) and the plain bound (compress: one readinto pass over base + fine-tune into
    a reused buffer; apply: one read of the base and one write of the same bytes, fsync'd).
With --budget B also `deltapack compress --budget B` (time, peak RSS and size next to the recipe's).
Needs ~3 x 5.6 GiB of disk at 8 layers; everything is deleted afterwards. Results go to
bench/results/checkpoint.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchlib import write_bf16_checkpoint

HIDDEN, KV, INTER, VOCAB = 4096, 1024, 14336, 128256
SHARD_BYTES = 2 << 30


def layer_shapes(n_layers):
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (HIDDEN,)
        for proj, rows in (("q_proj", HIDDEN), ("k_proj", KV), ("v_proj", KV), ("o_proj", HIDDEN)):
            yield p + f"self_attn.{proj}.weight", (rows, HIDDEN)
        yield p + "post_attention_layernorm.weight", (HIDDEN,)
        yield p + "mlp.gate_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.up_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.down_proj.weight", (HIDDEN, INTER)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def _pattern(n, seed):
    """bf16 bit patterns of N(0, 0.02)-like weights (sign, exponent near 2^-6, random mantissa)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def write_checkpoint(path, n_layers, fine_tune):
    """Stream a sharded bf16 checkpoint to disk (one tensor pattern in memory at a time)."""
    block = _pattern(1 << 24, 0)
    flip = np.random.default_rng(1).integers(0, 4, 1 << 24, dtype=np.uint16)  # low mantissa bits
    shapes = list(layer_shapes(n_layers))

    def pattern(k, name, shape):
        t = np.roll(block, 7919 * k)
        return t ^ flip if fine_tune and len(shape) == 2 else t

    config = {"model_type": "llama", "torch_dtype": "bfloat16", "num_hidden_layers": n_layers}
    total = write_bf16_checkpoint(path, shapes, pattern, config, SHARD_BYTES)
    return total, max(int(np.prod(s)) * 2 for _, s in shapes)


_LAUNCHER = ("import os, subprocess, sys, time; t = time.perf_counter(); p = subprocess.Popen(sys.argv[1:], "
             "stdout=subprocess.DEVNULL); _, st, ru = os.wait4(p.pid, 0); "
             "print(st, time.perf_counter() - t, ru.ru_maxrss)")


def run_measured(cmd):
    """Wall time and peak RSS (bytes) of a subprocess. It is started by a small launcher process: Linux
    folds the spawning process's own peak RSS into a child's ru_maxrss at exec, and this one is large."""
    r = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    status, wall, maxrss = r.stdout.split()
    if int(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr}")
    return float(wall), int(maxrss) * 1024


def _shards(d):
    """The .safetensors files of a directory, in name order."""
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]


def safetensors_read(dirs):
    """Seconds to read every tensor of the given HF directories with safetensors (copy out of the mmap)."""
    from safetensors import safe_open
    t0 = time.perf_counter()
    for d in dirs:
        for path in _shards(d):
            with safe_open(path, framework="pt") as st:
                for k in st.keys():
                    st.get_tensor(k).clone()  # get_tensor may be a lazy view of the mmap: copy it out
    return time.perf_counter() - t0


def plain_read(dirs, chunk=64 << 20):
    """Seconds to read every byte of the dirs' shards once (readinto into one reused buffer): what compress
    cannot beat."""
    buf = memoryview(bytearray(chunk))
    t0 = time.perf_counter()
    for d in dirs:
        for path in _shards(d):
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    return time.perf_counter() - t0


def plain_read_write(src, dst, chunk=64 << 20):
    """Seconds to read each shard of src once and write the same bytes to dst, fsync'd: what apply cannot
    beat (it reads the base and writes as many bytes, made durable)."""
    buf = memoryview(bytearray(chunk))
    os.makedirs(dst)
    t0 = time.perf_counter()
    for path in _shards(src):
        with open(path, "rb", buffering=0) as f, open(os.path.join(dst, os.path.basename(path)), "wb",
                                                      buffering=0) as g:
            while n := f.readinto(buf):
                g.write(buf[:n])
            os.fsync(g.fileno())
    t = time.perf_counter() - t0
    shutil.rmtree(dst)
    return t


def safetensors_read_write(src, dst):
    """Seconds to read each shard of src and write it to dst with safetensors.torch.save_file."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    os.makedirs(dst)
    t0 = time.perf_counter()
    for path in _shards(src):
        with safe_open(path, framework="pt") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        save_file(tensors, os.path.join(dst, os.path.basename(path)), metadata={"format": "pt"})
        del tensors
    t = time.perf_counter() - t0
    shutil.rmtree(dst)
    return t


def bench(n_layers, workdir, recipe, repeats, budget=None):
    root = tempfile.mkdtemp(prefix=f"dpk-bench-{n_layers}-", dir=workdir)
    try:
        t0 = time.perf_counter()
        total, largest = write_checkpoint(os.path.join(root, "base"), n_layers, False)
        write_checkpoint(os.path.join(root, "ft"), n_layers, True)
        print(f"[{n_layers} layers] built 2 x {total / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        base, ft, delta, out = (os.path.join(root, x) for x in ("base", "ft", "d.dpk", "out"))
        cli = [sys.executable, "-m", "deltapack.cli"]
        safetensors_read([base, ft])  # warm the page cache so both sides read from memory
        t_read, t_c, t_rw, t_a, t_nf, rss_c, rss_a = [], [], [], [], [], 0, 0
        t_pread, t_prw = [], []
        t_b, rss_b, budget_bytes = [], 0, None
        for rep in range(repeats):  # alternate baseline and deltapack; each step starts with no dirty pages
            os.sync()
            t_read.append(safetensors_read([base, ft]))
            t_pread.append(plain_read([base, ft]))
            os.sync()
            if os.path.exists(delta):
                os.unlink(delta)
            t, rss1 = run_measured(cli + ["compress", base, ft, "-o", delta, "--recipe", recipe, "-q"])
            t_c.append(t)
            rss_c = max(rss_c, rss1)
            os.sync()
            if budget is not None:
                bdelta = os.path.join(root, "budget.dpk")
                t, rss2 = run_measured(cli + ["compress", base, ft, "-o", bdelta, "--budget", str(budget), "-q"])
                t_b.append(t)
                rss_b = max(rss_b, rss2)
                budget_bytes = os.path.getsize(bdelta)
                os.unlink(bdelta)
                print(f"  compress --budget {budget}: {t:.1f} s (peak RSS {rss2 / 2**30:.2f} GiB), "
                      f"{budget_bytes / 2**20:.0f} MiB", file=sys.stderr)
                os.sync()
            t_rw.append(safetensors_read_write(base, os.path.join(root, "st_out")))
            os.sync()
            t_prw.append(plain_read_write(base, os.path.join(root, "plain_out")))
            os.sync()
            shutil.rmtree(out, ignore_errors=True)
            t, rss = run_measured(cli + ["apply", base, delta, "-o", out, "-q"])
            t_a.append(t)
            rss_a = max(rss_a, rss)
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            t_nf.append(run_measured(cli + ["apply", base, delta, "-o", out, "-q", "--no-fsync"])[0])
            os.sync()
            shutil.rmtree(out, ignore_errors=True)
            print(f"  compress {t_c[-1]:.1f} s (peak RSS {rss1 / 2**30:.2f} GiB) vs safetensors read "
                  f"{t_read[-1]:.1f} s;"
                  f" apply {t_a[-1]:.1f} s (peak RSS {rss / 2**30:.2f} GiB; --no-fsync {t_nf[-1]:.1f} s) vs "
                  f"safetensors read+write {t_rw[-1]:.1f} s", file=sys.stderr)
        t_read, t_c, t_rw, t_a, t_nf, t_pread, t_prw = (float(np.median(x))
                                                        for x in (t_read, t_c, t_rw, t_a, t_nf, t_pread, t_prw))
        bound = (1 << 30) + 3 * largest
        extra = {} if budget is None else {
            "budget": budget, "budget_compress_s": float(np.median(t_b)), "budget_compress_peak_rss_bytes": rss_b,
            "budget_delta_bytes": budget_bytes, "budget_vs_recipe_time": float(np.median(t_b)) / t_c}
        return {**extra, "layers": n_layers, "recipe": recipe, "repeats": repeats, "model_bytes": total,
                "largest_tensor_bytes": largest,
                "delta_bytes": os.path.getsize(delta), "rss_bound_bytes": bound,
                "compress_s": t_c, "compress_peak_rss_bytes": rss_c, "safetensors_read_s": t_read,
                "compress_vs_read": t_read / t_c, "apply_s": t_a, "apply_peak_rss_bytes": rss_a,
                "safetensors_read_write_s": t_rw, "apply_vs_read_write": t_rw / t_a,
                "apply_no_fsync_s": t_nf, "apply_no_fsync_vs_read_write": t_rw / t_nf,
                "plain_read_s": t_pread, "compress_vs_plain_read": t_pread / t_c,
                "plain_read_write_fsync_s": t_prw, "apply_vs_plain_read_write": t_prw / t_a,
                "compress_gbps": 2 * total / t_c / 1e9, "apply_gbps": 2 * total / t_a / 1e9}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--recipe", default="sign")
    ap.add_argument("--budget", type=float, default=None, help="also time `compress --budget B`")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per step (median reported)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "checkpoint"))
    ap.add_argument("--note", default="", help="what else was running on the machine (kept with the figures)")
    args = ap.parse_args()
    rows = [bench(n, args.dir, args.recipe, args.repeats, args.budget) for n in args.layers]
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"), "note": args.note}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1)
    gib = 2 ** 30
    lines = ["| layers | model GiB | delta MiB | compress s | vs read | vs plain read | compress peak RSS GiB | "
             "apply s | vs read+write | vs plain read+write | apply --no-fsync s | vs read+write | "
             "apply peak RSS GiB | RSS bound GiB |",
             "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['model_bytes'] / gib:.2f} | {r['delta_bytes'] / 2**20:.0f} | "
                     f"{r['compress_s']:.1f} | {r['compress_vs_read']:.2f}x | {r['compress_vs_plain_read']:.2f}x | "
                     f"{r['compress_peak_rss_bytes'] / gib:.2f} | "
                     f"{r['apply_s']:.1f} | {r['apply_vs_read_write']:.2f}x | {r['apply_vs_plain_read_write']:.2f}x | "
                     f"{r['apply_no_fsync_s']:.1f} | "
                     f"{r['apply_no_fsync_vs_read_write']:.2f}x | {r['apply_peak_rss_bytes'] / gib:.2f} | "
                     f"{r['rss_bound_bytes'] / gib:.2f} |")
    if args.budget is not None:
        lines += ["", f"| layers | compress --budget {args.budget} s | x recipe time | peak RSS GiB | RSS bound GiB | "
                  "delta MiB | bits/param |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['layers']} | {r['budget_compress_s']:.1f} | {r['budget_vs_recipe_time']:.1f}x | "
                         f"{r['budget_compress_peak_rss_bytes'] / gib:.2f} | {r['rss_bound_bytes'] / gib:.2f} | "
                         f"{r['budget_delta_bytes'] / 2**20:.0f} | {8 * r['budget_delta_bytes'] / (r['model_bytes'] / 2):.3f} |")
    text = (f"# deltapack compress / apply at Llama-3-8B shapes (bf16, recipe `{args.recipe}`)\n\n"
            f"{meta}\n\n" + "\n".join(lines) + "\n\n'vs read' = time to read base + fine-tune with safetensors "
            "/ compress time; 'vs read+write' = time to read the base and write the same bytes with safetensors "
            "/ apply time; 'vs plain ...' = the same against the plain bound: one readinto pass over base + "
            "fine-tune, and one read of the base plus one fsync'd write of the same bytes (the target is >= 0.8x "
            "of each). Median of the repeats; peak RSS = max over repeats of the subprocess (os.wait4 in a small launcher). apply includes fsync of every shard (safetensors' save_file does not fsync).\n")
    with open(args.out + ".md", "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
