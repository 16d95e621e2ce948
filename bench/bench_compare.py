"""What a change costs: the same benchmarks run by two deltapack installs, alternated in one run.

    pip install --no-deps --no-build-isolation --target /tmp/old_site <checkout of the earlier commit>
    pip install --no-deps --no-build-isolation --target /tmp/new_site .
    python bench/bench_compare.py /tmp/old_site /tmp/new_site [--layers 4] [--repeats 3] [--dir /tmp]

Each install runs, in turn within every repeat (so both see the same machine and page cache):
  - `deltapack compress --recipe sign` and `deltapack apply` of bench_checkpoint.py's Llama-3-8B-shaped bf16 pair
    (wall time and peak RSS of the subprocess);
  - bench_apply.py (every codec's apply at LLaMA-7B shapes, 1 and 2 threads), once per install, alternated.
Reported: medians per install and new / old. An install is imported from its directory alone (the editable
install's import hook is removed in the child). Results: bench/results/compare.{json,md}.
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

from bench_checkpoint import run_measured, safetensors_read, write_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))

# Runs a module or a script with one install's deltapack: the editable install's finder is taken out of
# sys.meta_path and the install's directory goes first on sys.path.
_LAUNCH = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in type(f).__name__ "
           "and 'Redirecting' not in type(f).__name__]; site, what = sys.argv[1], sys.argv[2]; "
           "sys.path[:0] = [site, " + repr(HERE) + "]; sys.argv = [what] + sys.argv[3:]; "
           "runpy.run_path(what, run_name='__main__') if what.endswith('.py') else "
           "runpy.run_module(what, run_name='__main__', alter_sys=True)")


def with_install(site, what, *args):
    return [sys.executable, "-c", _LAUNCH, site, what, *map(str, args)]


def check_install(site):
    """Where `site`'s deltapack is imported from, run as with_install runs it (it must be that directory)."""
    probe = _LAUNCH.split("; site, what")[0] + "; sys.path.insert(0, sys.argv[1]); import deltapack; print(deltapack.__file__)"
    where = subprocess.run([sys.executable, "-c", probe, site], capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(os.path.abspath(site)):
        raise SystemExit(f"{site}: deltapack is imported from {where}, not from this install")
    return where


def checkpoint_steps(sites, n_layers, workdir, repeats, apply_flags=()):
    root = tempfile.mkdtemp(prefix=f"dpk-compare-{n_layers}-", dir=workdir)
    try:
        total, _ = write_checkpoint(os.path.join(root, "base"), n_layers, False)
        write_checkpoint(os.path.join(root, "ft"), n_layers, True)
        base, ft = os.path.join(root, "base"), os.path.join(root, "ft")
        safetensors_read([base, ft])  # warm the page cache
        times = {s: {"compress": [], "apply": []} for s in sites}
        rss = {s: {"compress": 0, "apply": 0} for s in sites}
        for rep in range(repeats):
            for site in sites if rep % 2 == 0 else sites[::-1]:  # alternate which install goes first
                delta, out = os.path.join(root, "d.dpk"), os.path.join(root, "out")
                for p in (delta, out):
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.path.exists(p) and os.unlink(p)
                os.sync()
                for step, cmd in (("compress", ["compress", base, ft, "-o", delta, "--recipe", "sign", "-q"]),
                                  ("apply", ["apply", base, delta, "-o", out, "-q", *apply_flags])):
                    t, peak = run_measured(with_install(site, "deltapack.cli", *cmd))
                    times[site][step].append(t)
                    rss[site][step] = max(rss[site][step], peak)
                    os.sync()
                print(f"  [{rep}] {site}: compress {times[site]['compress'][-1]:.2f} s, "
                      f"apply {times[site]['apply'][-1]:.2f} s", file=sys.stderr)
        return {"layers": n_layers, "model_bytes": total,
                "median_s": {s: {k: float(np.median(v)) for k, v in times[s].items()} for s in sites},
                "runs_s": times, "peak_rss_bytes": rss}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def apply_kernels(sites, repeats, workdir):
    """bench_apply.py run by each install (alternated, `repeats` times each): its per-codec apply times."""
    runs = {s: [] for s in sites}
    for rep in range(repeats):
        for site in sites if rep % 2 == 0 else sites[::-1]:
            out = os.path.join(workdir, f"apply-{os.path.basename(site)}-{rep}")
            subprocess.run(with_install(site, os.path.join(HERE, "bench_apply.py"), "--out", out, "--repeats", 5),
                           check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(out, "apply.json")) as fh:
                runs[site].append(json.load(fh))
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="directory of the earlier install (pip install --target)")
    ap.add_argument("new", help="directory of the install to measure")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--apply-repeats", type=int, default=1, help="bench_apply.py runs per install (0: none)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoints go (/dev/shm: no disk)")
    ap.add_argument("--no-fsync", action="store_true", help="apply with --no-fsync (the code's work, not the disk's)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "compare"))
    args = ap.parse_args()
    sites = [os.path.abspath(args.old), os.path.abspath(args.new)]
    for s in sites:
        print(f"{s}: {check_install(s)}", file=sys.stderr)
    ck = checkpoint_steps(sites, args.layers, args.dir, args.repeats, ["--no-fsync"] if args.no_fsync else [])
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        kernels = apply_kernels(sites, args.apply_repeats, tmp)
    old, new = sites

    def times(site):  # (codec, shape, threads) -> every run's time of that row
        out = {}
        for run in kernels[site]:
            for r in run["results"]:
                out.setdefault((r["codec"], tuple(r["shape"]), r["threads"]), []).append(r.get("apply_ms", r.get("encode_ms")))
        return out

    t_old, t_new = (times(old), times(new)) if args.apply_repeats else ({}, {})
    rows = [{"codec": k[0], "shape": list(k[1]), "threads": k[2], "old_ms": float(np.median(t_old[k])),
             "new_ms": float(np.median(t_new[k])), "new_over_old": float(np.median(t_new[k]) / np.median(t_old[k]))}
            for k in t_old if k in t_new]
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"), "old": old, "new": new}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "checkpoint": ck, "apply": rows}, fh, indent=1)
    m = ck["median_s"]
    lines = [f"# Cost of a change: {new} against {old}", "", str(meta), "",
             f"bench_checkpoint pair, {args.layers} layers ({ck['model_bytes'] / 2**30:.2f} GiB per model) in {args.dir}, "
             f"apply{' --no-fsync' if args.no_fsync else ''}, median of {args.repeats}, alternated:", "", "| step | old s | new s | new / old | old peak RSS GiB | new peak RSS GiB |",
             "|---|---|---|---|---|---|"]
    for step in ("compress", "apply"):
        lines.append(f"| {step} | {m[old][step]:.2f} | {m[new][step]:.2f} | {m[new][step] / m[old][step]:.3f} | "
                     f"{ck['peak_rss_bytes'][old][step] / 2**30:.2f} | {ck['peak_rss_bytes'][new][step] / 2**30:.2f} |")
    if rows:
        lines += ["", f"bench_apply.py (apply of an in-memory encoded tensor, bf16 base), median of {args.apply_repeats} "
                  "runs of each, alternated:", "", "| codec | shape | threads | old ms | new ms | new / old |",
                  "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('codec')} | {r.get('shape')} | {r.get('threads')} | {r['old_ms']:.2f} | "
                     f"{r['new_ms']:.2f} | {r['new_over_old']:.3f} |")
    text = "\n".join(lines) + "\n"
    with open(args.out + ".md", "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
