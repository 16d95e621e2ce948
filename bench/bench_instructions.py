"""Instructions deltapack's core executes per dp.apply, counted by callgrind for two installs: what a change costs
on the apply path, exactly (callgrind counts instructions, the same whatever else the machine does; wall-clock
figures on a shared VM move by 10-30 % between runs).

    python bench/bench_instructions.py OLD_SITE NEW_SITE [--codecs sign quant:bits=4] [--size 2048]

OLD_SITE / NEW_SITE as for bench_compare.py (pip install --target). Each install runs dp.apply of one codec on a
size x size f32 base, once and six times, under valgrind --tool=callgrind on the AVX2 path (valgrind has no
AVX-512); the instructions inside deltapack's _core per call are the difference divided by five. Needs valgrind.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile

_CHILD = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in type(f).__name__ and 'Redirecting' not in type(f).__name__]
sys.path.insert(0, sys.argv[1])
import numpy as np, deltapack as dp
dp.set_simd("avx2")
rng = np.random.default_rng(0)
codec, size, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
enc = dp.encode((rng.standard_normal((size, size)) * 1e-3).astype(np.float32), codec)
base = (rng.standard_normal((size, size)) * 0.02).astype(np.float32)
out = np.empty_like(base)
for _ in range(n):
    dp.apply(base, enc, out=out, threads=1)
"""


def core_instructions(site, codec, size, calls, tmp):
    """Instructions executed inside `site`'s deltapack/_core*.so by a run of `calls` applies."""
    out = os.path.join(tmp, "cg.out")
    python = os.path.realpath(sys.executable)  # not a shell shim: valgrind follows the process it starts
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, "-c", _CHILD, site, codec,
                    str(size), str(calls)], check=True, capture_output=True)
    text = subprocess.run(["callgrind_annotate", "--threshold=100", out], check=True, capture_output=True,
                          text=True).stdout
    core = glob.glob(os.path.join(site, "deltapack", "_core*.so"))[0]
    return sum(int(line.split()[0].replace(",", "")) for line in text.splitlines() if core in line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--codecs", nargs="+", default=["sign", "quant:bits=4", "sparse:p=0.9"])
    ap.add_argument("--size", type=int, default=2048)
    args = ap.parse_args()
    sites = [os.path.abspath(args.old), os.path.abspath(args.new)]
    print(f"| codec | {args.size}x{args.size}, instructions per apply in _core: old | new | new - old |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for codec in args.codecs:
            per = [(core_instructions(s, codec, args.size, 6, tmp) - core_instructions(s, codec, args.size, 1, tmp)) / 5
                   for s in sites]
            print(f"| {codec} | {per[0]:,.0f} | {per[1]:,.0f} | {per[1] - per[0]:+,.0f} |", flush=True)


if __name__ == "__main__":
    main()
