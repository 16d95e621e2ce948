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

from .args import add_follow_links, count, finite_float, model_path

# Modules that add subcommands (each defines register(subparsers)); kept in one list here.
PLUGIN_MODULES: list[str] = ["deltapack.cli.export", "deltapack.cli.analyze"]

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
            enc = f[row["recipe"]]  # read back from the file (checksummed)
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


def cmd_card(args) -> int:
    """Write a model card for a checkpoint delta: its base (Hub id and revision when compress read the base from
    the Hugging Face cache), how to rebuild the fine-tune, the codecs and bits per parameter, the files taken from
    the base, and the quality figures given with --quality."""
    from .. import card

    quality = {}
    for item in args.quality:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"deltapack card: error: --quality {shown(item)}: expected METRIC=VALUE")
        quality[key.strip()] = value.strip()
    text = card.model_card(args.file, quality, args.title)
    if not args.output:
        sys.stdout.write(text)
        return 0
    if args.overwrite and os.path.lexists(args.output) and not card.is_card(args.output):
        raise SystemExit(f"deltapack card: error: {shown(args.output)} exists and is not a card deltapack wrote: "
                         "--overwrite replaces only those; move it away or choose another name")
    out = dp._core.AtomicFile(args.output, args.overwrite)
    try:
        with open(out.reopen_path, "w", encoding="utf-8") as fh:
            fh.write(text)
        out.commit()
    except BaseException:
        out.abort()
        raise
    print(f"wrote {shown(args.output)}")
    return 0


def cmd_info(args) -> int:
    """Per-tensor codec, parameters, shape and bits per parameter of a delta file; for a checkpoint
    delta also what changed (added, removed, resized tensors) and the compression ratio."""
    f = dp.open(args.file, verify=not args.no_verify)
    ckpt = None
    if isinstance(f.metadata, dict) and "checkpoint" in f.metadata:
        from .. import checkpoint
        ckpt = checkpoint.describe(f)
        ops = {n: s["op"] for n, s in f.metadata["checkpoint"]["tensors"].items()}
    tensors, total_params, total_bytes = [], 0, 0
    for name in f.keys():
        enc = f.get(name)
        row = {"name": name, "codec": enc.codec, "params": enc.params, "shape": list(enc.shape),
               "dtype": enc.dtype, "bytes": enc.nbytes, "bits_per_param": enc.bits_per_param}
        if ckpt is not None:
            row["op"] = ops.get(name, "new_rows" if name.endswith("#new_rows") else "?")
        tensors.append(row)
        total_params += enc.numel
        total_bytes += enc.nbytes
    metadata = {k: v for k, v in f.metadata.items() if k != "checkpoint"} if isinstance(f.metadata, dict) \
        else f.metadata
    base = f.base
    if isinstance(base, dict) and isinstance(base.get("tensors"), dict):  # a fingerprint: summarise it
        base = {k: v for k, v in base.items() if k != "tensors"} | {"tensors": len(base["tensors"])}
    summary = {"file": args.file, "file_bytes": f.nbytes, "tensors": len(tensors), "params": total_params,
               "bits_per_param": 8.0 * total_bytes / max(total_params, 1), "metadata": metadata,
               "base": base, "tool": f.manifest.get("tool")}
    if ckpt is not None:
        summary["checkpoint"] = ckpt
        summary["compression_ratio"] = ckpt["ratio"]
    if args.json:
        print(json.dumps({**summary, "tensor_list": tensors}, indent=1))
        return 0
    w = max([len(shown(t["name"])) for t in tensors] + [6])
    print(f"{'tensor':{w}s}  {'codec':8s} {'shape':>16s} {'dtype':5s} {'bits/param':>10s}  params")
    for t in tensors:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        params = ",".join(f"{k}={v}" for k, v in t["params"].items())
        op = f"  [{t['op']}]" if t.get("op") not in (None, "delta") else ""
        print(f"{shown(t['name']):{w}s}  {t['codec']:8s} {shape:>16s} {t['dtype']:5s} {t['bits_per_param']:10.3f}  "
              f"{params}{op}")
    print(f"{len(tensors)} tensors, {total_params:,} parameters, {f.nbytes:,} bytes on disk, "
          f"{summary['bits_per_param']:.3f} bits/param")
    if ckpt is not None:
        print(f"fine-tune: {ckpt['tensors']} tensors, {ckpt['ft_bytes'] or 0:,} bytes; compression ratio "
              f"{ckpt['ratio']:.2f}x; {ckpt['unchanged']} unchanged (not stored), {ckpt['delta']} as deltas")
        for label, key in (("added/replaced", "added_or_replaced"), ("removed", "removed")):
            if ckpt[key]:
                print(f"{label}: {', '.join(map(shown, ckpt[key]))}")
        for n, r in ckpt["resized"].items():
            print(f"resized: {shown(n)} {r['base_shape']} -> {r['shape']}")
        for n, src in ckpt["sources"].items():
            print(f"rebuilt from another base tensor: {shown(n)} <- {shown(src)} (untied embeddings)")
        if ckpt["files"]:
            print(f"kept files: {', '.join(map(shown, ckpt['files']))}")
        if ckpt["files_from_base"]:
            print(f"taken from the base at apply (SHA-256 checked): {', '.join(map(shown, ckpt['files_from_base']))}")
    if ckpt is not None:
        _print_adapter_coverage(f.metadata["checkpoint"], {t["name"]: t["codec"] for t in tensors})
    budget = metadata.pop("budget", None) if isinstance(metadata, dict) else None
    if budget:
        _print_budget(budget, f)
    if metadata:
        print(f"metadata: {json.dumps(metadata)}")
    return 0


def shown(name: str) -> str:
    """A name from a file as it may be printed on a terminal: control characters escaped (a name holding
    ESC sequences would otherwise redraw the user's screen)."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")


def _print_adapter_coverage(record: dict, codecs: dict) -> None:
    """What a LoRA adapter exported from this delta carries (export gguf-lora / peft)."""
    from ..export.finetune import adapter_coverage
    c = adapter_coverage(record, codecs)
    matrices = len(c["lowrank"]) + len(c["svd"])
    if not matrices:
        return
    n = len(c["svd"])
    exact = "exactly as stored" if not n else f"the other{'s' * (n > 1)} ({n}) cut to --rank by SVD on export"
    print(f"LoRA adapter (export gguf-lora / peft): {len(c['lowrank'])} of {matrices} matrices low rank, {exact}")
    if c["vectors"]:
        print(f"  {len(c['vectors'])} changed vectors (norms, biases): PEFT carries them, a llama.cpp adapter does not")
    for n, why in c["other"]:
        print(f"  {shown(n)}: {why}")


def _print_budget(b: dict, f) -> None:
    """What `compress --budget` chose and what its proxy predicted."""
    ft_params = None
    rec = f.metadata.get("checkpoint", {}) if isinstance(f.metadata, dict) else {}
    if rec.get("tensors"):
        import math
        ft_params = sum(math.prod(s["shape"]) for s in rec["tensors"].values())
    used = f" ({8 * f.nbytes / ft_params:.3f} used)" if ft_params else ""
    only = ", matrices low rank only (--lora-only)" if b.get("lora_only") is True else ""
    print(f"budget: {b.get('bits_per_param')} bits/param{used}{only}, proxy '{b.get('proxy')}', predicted loss of "
          f"the weighted delta {100 * float(b.get('predicted_error', 0)):.2f} %")
    if b.get("data", {}).get("scores"):
        sc = ", ".join(f"{p} {100 * v.get('agreement', 0):.1f} % (KL {v.get('kl', 0):.3g})"
                       for p, v in b["data"]["scores"].items())
        print(f"  chosen on {b['data'].get('examples')} calibration examples by agreement with the fine-tune: {sc}")
    if "tensors_changed" in b.get("data", {}):
        print(f"  the data changed the recipe of {b['data']['tensors_changed']} tensors from the data-free allocation; "
              "the scales were refitted")
    per = b.get("tensors") or {}
    if per:
        w = max(len(shown(n)) for n in per)
        for n, e in per.items():
            print(f"  {shown(n):{w}s}  predicted {100 * float(e):6.2f} % lost" + ("  (not stored)" if n not in f else ""))


def _metadata_arg(items):
    meta = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--metadata {item!r}: expected KEY=VALUE")
        meta[key] = value
    return meta


def cmd_compress(args) -> int:
    """Store a fine-tune as a delta against its base: one tensor at a time, per-tensor recipes or a bit budget."""
    from .. import checkpoint
    if args.budget is None and args.data is not None:
        raise ValueError("--data goes with --budget (to fit a recipe's scales use `deltapack calibrate`)")
    if args.budget is not None and args.recipe is not None:
        raise ValueError("give either --recipe or --budget")
    if (args.lora_only or args.rank_multiple != 1) and args.budget is None:
        raise ValueError("--lora-only and --rank-multiple go with --budget (a recipe names its codecs itself: use "
                         "lowrank)")
    data = None
    if args.data is not None:
        from .analyze import load_examples
        data = load_examples(args.data, args.ft, args.max_examples)
    checkpoint.install_sigterm()
    s = checkpoint.compress(args.base, args.ft, args.output, args.recipe or "sign", budget=args.budget, data=data,
                            lora_only=args.lora_only, rank_multiple=args.rank_multiple, min_size=args.min_size,
                            metadata=_metadata_arg(args.metadata),
                            threads=args.threads or None, quiet=args.quiet, force=args.force,
                            overwrite=args.overwrite, follow_links=args.follow_links)
    if args.json:
        print(json.dumps(s, indent=1))
    elif not args.quiet:
        print(f"wrote {s['file']}: {s['file_bytes']:,} bytes, {s['ratio']:.2f}x smaller than the fine-tune "
              f"({s['ft_bytes']:,} bytes); {s['delta']} deltas, {s['new']} added, {s['resized']} resized, "
              f"{s['removed']} removed, {s['same']} unchanged")
        if "budget" in s:
            b = s["budget"]
            print(f"budget {b['bits_per_param']} bits/param: {s['bits_per_param']:.3f} used; proxy '{b['proxy']}' "
                  f"predicts {100 * b['predicted_error']:.2f} % of the weighted delta lost"
                  + (f"; agrees with the fine-tune on {100 * b['data']['scores'][b['proxy']]['agreement']:.1f} % of "
                     "the calibration examples" if "scores" in b.get("data", {}) else ""))
            if "tensors_changed" in b.get("data", {}):
                print(f"--data: {b['data']['tensors_changed']} tensors got another recipe than the data-free "
                      f"allocation; {s.get('refitted', 0)} tensors' scales refitted")
    return 0


def cmd_apply(args) -> int:
    """Rebuild the fine-tune (base + alpha*delta) as a Hugging Face directory sharded like the base."""
    from .. import checkpoint, hub
    checkpoint.install_sigterm()
    if args.base is None:  # the base the delta records, from the Hugging Face cache
        snap = (dp.open(args.delta, verify=False).base or {}).get("hub")
        if snap is None:
            raise SystemExit(f"deltapack apply: error: {shown(args.delta)} does not name its base (it was made from a "
                             "directory outside the Hugging Face cache): give BASE")
        try:
            args.base = hub.snapshot(snap["id"], snap["revision"])
        except FileNotFoundError as e:
            raise SystemExit(f"deltapack apply: error: {shown(args.delta)} was made from {shown(snap['id'])}@"
                             f"{snap['revision']}, but {e}: give BASE") from None
    s = checkpoint.apply_checkpoint(args.base, args.delta, args.output, alpha=args.alpha, dtype=args.dtype,
                                    force=args.force, overwrite=args.overwrite, threads=args.threads or None,
                                    quiet=args.quiet, fsync=not args.no_fsync, follow_links=args.follow_links,
                                    rounding=args.rounding)
    if not args.quiet:
        print(f"wrote {s['out']}: {s['tensors']} tensors, {s['bytes']:,} bytes")
    return 0


def cmd_verify(args) -> int:
    """Rebuild every tensor and compare with the real fine-tune; exit 3 past the thresholds."""
    from .. import checkpoint
    rows = checkpoint.verify(args.base, args.ft, args.delta, force=args.force, threads=args.threads or None,
                             quiet=args.quiet, follow_links=args.follow_links)
    bad = [r for r in rows if r["rel_error"] > args.max_rel_error or r["delta_cosine"] < args.min_cosine]
    if args.json:
        print(json.dumps({"ok": not bad, "max_rel_error": args.max_rel_error, "min_cosine": args.min_cosine,
                          "tensors": rows}, indent=1))
    else:
        if not args.quiet:
            w = max([len(shown(r["name"])) for r in rows] + [6])
            print(f"{'tensor':{w}s}  {'op':8s} {'rel.error':>10s} {'cosine':>10s} {'Δ rel.err':>10s} "
                  f"{'Δ cosine':>9s}")
            for r in rows:
                flag = "  <-- over threshold" if r in bad else ""
                print(f"{shown(r['name']):{w}s}  {r['op']:8s} {r['rel_error']:10.3e} {r['cosine']:10.7f} "
                      f"{r['delta_rel_error']:10.4f} {r['delta_cosine']:9.5f}{flag}")
        worst = max(rows, key=lambda r: r["rel_error"], default=None)
        if worst is not None:
            print(f"{len(rows)} tensors; worst relative error {worst['rel_error']:.3e} ({worst['name']}); "
                  f"{sum(r['exact'] for r in rows)} bit-exact; "
                  + (f"{len(bad)} over threshold" if bad else "all within threshold"))
    return 3 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltapack", description="Compact fine-tune deltas (W_ft - W_base): encode, "
                                "store, inspect and rebuild. See README.md and docs/FORMAT.md.")
    p.add_argument("--version", action="version", version=f"deltapack {dp.__version__}")
    p.add_argument("--simd", choices=["auto", "scalar", "avx2", "avx512", "neon"], help="force a SIMD path (default: auto)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="encode a realistic synthetic delta with every codec; print size, error, speed",
                       description=cmd_demo.__doc__)
    d.add_argument("--size", type=int, default=2048, help="matrix size N (N x N); default 2048")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=count, default=0, help="threads (0 = all cores)")
    d.add_argument("--recipes", nargs="+", default=DEMO_RECIPES, metavar="RECIPE",
                   help="recipes to try (default: one of each codec)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(fn=cmd_demo)

    i = sub.add_parser("info", help="list the tensors of a delta file (and, for a checkpoint, what changed)",
                       description=cmd_info.__doc__)
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--no-verify", action="store_true", help="skip the CRC-32C check of each tensor")
    i.set_defaults(fn=cmd_info)

    k = sub.add_parser("card", help="write a model card (README.md) for publishing a checkpoint delta",
                       description=cmd_card.__doc__)
    k.add_argument("file", metavar="FILE", help="delta file made by `deltapack compress`")
    k.add_argument("-o", "--output", metavar="OUT", help="file to write, e.g. README.md (default: print the card)")
    k.add_argument("--overwrite", action="store_true", help="replace OUT if it is a card deltapack wrote (its front "
                   "matter says library_name: deltapack); never another file")
    k.add_argument("--quality", action="append", metavar="METRIC=VALUE", default=[],
                   help="a quality figure you measured, shown in the card (repeatable)")
    k.add_argument("--title", help="the card's title (default: the file's name)")
    k.set_defaults(fn=cmd_card)

    c = sub.add_parser("compress", help="store a fine-tune checkpoint as a delta against its base",
                       description=cmd_compress.__doc__ + " BASE and FT are Hugging Face model directories "
                       "(model.safetensors or shards + index.json) or single .safetensors files.")
    c.add_argument("base", metavar="BASE", type=model_path,
                   help="base model directory or .safetensors file, or a Hub id in the Hugging Face cache")
    c.add_argument("ft", metavar="FT", type=model_path,
                   help="fine-tuned model directory or .safetensors file, or a Hub id in the Hugging Face cache")
    c.add_argument("-o", "--output", required=True, metavar="FILE", help="delta file to write (not inside BASE or FT)")
    c.add_argument("--overwrite", action="store_true", help="replace FILE if it exists (only a deltapack file)")
    c.add_argument("--recipe", default=None, help="recipe or per-tensor rules 'pattern=recipe;...' for "
                   "matrices, e.g. '*.mlp.*=lowrank:rank=64;*=sign' (default: sign). 1-D and small tensors "
                   "are stored dense where they changed; unchanged tensors are not stored")
    c.add_argument("--budget", type=float, metavar="B", help="instead of a recipe: at most B bits per parameter "
                   "for the whole file (all the fine-tune's parameters, header included); each matrix gets the "
                   "codec and parameters (mixed-precision low rank, sign, levels, quant, or nothing) that "
                   "minimise a loss proxy under the budget. Data-free unless --data is given")
    c.add_argument("--data", metavar="FILE", help="with --budget: calibration data (JSONL of {\"input_ids\": "
                   "[...], \"prompt_len\"} or text, one example per line) for data-aware proxies (Fisher "
                   "sensitivities); the proxy whose rebuilt model is closest to FT on this data is kept")
    c.add_argument("--lora-only", action="store_true", help="with --budget: choose for every matrix only "
                   "mixed-precision low rank (any rank) or nothing, what a LoRA adapter carries, so `export "
                   "gguf-lora` and `export peft` write the stored matrices without further loss (norms and biases "
                   "are stored as usual; a tied embedding reaches only llama.cpp, with --untied-output on export)")
    c.add_argument("--rank-multiple", type=count, default=1, metavar="N", help="with --budget: every low rank "
                   "kept is a multiple of N (or the whole rank analysed); 32 fills the blocks of a q8_0/q5_0/q4_0 GGUF "
                   "adapter without zero padding (default 1)")
    c.add_argument("--max-examples", type=count, default=None, help="use only the first N examples of --data")
    c.add_argument("--min-size", type=count, default=None, metavar="N",
                   help="tensors with fewer elements are stored dense (default 4096; with --budget 1: every "
                        "matrix is a candidate, exact dense among them)")
    c.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="user metadata (repeatable)")
    c.add_argument("--force", action="store_true", help="store FT even if it does not look like a fine-tune of "
                   "BASE (another architecture or size, most tensors new or reshaped, or matrices that changed "
                   "by as much as the weights)")
    add_follow_links(c)
    c.add_argument("--threads", type=count, default=0, help="threads for all the work, numpy's BLAS (the budget's "
                   "SVDs) and torch (--data) included (0 = all cores; a --budget of a model under 16 M parameters: "
                   "one, which is as fast and does not slow down 2x when another job holds a core)")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    c.set_defaults(fn=cmd_compress)

    a = sub.add_parser("apply", help="rebuild a fine-tune (base + alpha*delta) as a Hugging Face directory",
                       description=cmd_apply.__doc__ + " Config and tokenizer files kept in the delta are "
                       "written too. A single-file base gives a single .safetensors output.")
    a.add_argument("base", metavar="BASE", type=model_path, nargs="?",
                   help="base model directory or .safetensors file, or a Hub id in the Hugging Face cache "
                   "(default: the base the delta records, when it came from the cache and is still there)")
    a.add_argument("delta", metavar="FILE", help="delta file made by `deltapack compress`")
    a.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory (or file)")
    a.add_argument("--alpha", type=finite_float, default=1.0,
                   help="scale of the delta: 1 = the fine-tune, >1 extrapolates, <1 interpolates (default 1)")
    a.add_argument("--dtype", choices=["bf16", "f16", "f32"], help="output dtype (default: the fine-tune's)")
    a.add_argument("--rounding", choices=dp.tensors.ROUNDINGS, default="auto",
                   help="rounding into bf16/f16: auto (default) dithers tensors stored lossily, so a change smaller "
                   "than half a bf16 step survives on average instead of vanishing, and rounds exact ones to "
                   "nearest; nearest; dithered (docs/FORMAT.md section 3)")
    a.add_argument("--force", action="store_true", help="apply even if BASE does not match the delta's base")
    a.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is an earlier output "
                   "(a directory of weights and config/tokenizer files, or a .safetensors file)")
    add_follow_links(a)
    a.add_argument("--no-fsync", action="store_true", help="do not flush the files to disk before renaming "
                   "OUT into place (still atomic if killed, not on power loss; faster on slow disks)")
    a.add_argument("--threads", type=count, default=0, help="threads (0 = all cores)")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    a.set_defaults(fn=cmd_apply)

    v = sub.add_parser("verify", help="compare a rebuilt fine-tune with the real one, per tensor",
                       description=cmd_verify.__doc__ + " rel.error = |rebuilt - ft| / |ft| per tensor; "
                       "cosine of the weights, and relative error and cosine of the deltas (vs the base).")
    v.add_argument("base", metavar="BASE", type=model_path)
    v.add_argument("ft", metavar="FT", type=model_path)
    v.add_argument("delta", metavar="FILE")
    v.add_argument("--max-rel-error", type=finite_float, default=0.05,
                   help="fail (exit 3) if a tensor's weight relative error is above this (default 0.05)")
    v.add_argument("--min-cosine", type=finite_float, default=-1.0,
                   help="fail (exit 3) if a tensor's delta cosine is below this (default: off)")
    v.add_argument("--force", action="store_true", help="skip the base fingerprint check")
    add_follow_links(v)
    v.add_argument("--threads", type=count, default=0, help="threads (0 = all cores)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.add_argument("-q", "--quiet", action="store_true", help="only the summary line")
    v.set_defaults(fn=cmd_verify)

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
    except ImportError as ex:  # an optional feature's package is missing
        extra = {"export": "export", "import": "export", "analyze": "hf", "calibrate": "hf"}.get(args.command, "hf")
        print(f"deltapack {args.command}: error: {ex}; install it, e.g. pip install 'deltapack[{extra}]'",
              file=sys.stderr)
        return 1
    except (dp.FormatError, ValueError, OSError, KeyError) as ex:
        # An OSError from the C++ core carries its whole message (path and problem) as strerror.
        text = ex.strerror if isinstance(ex, OSError) and ex.filename is None and ex.strerror else ex
        print(f"deltapack {args.command}: error: {shown(str(text))}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"deltapack {args.command}: error: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
