"""A command's wall time on an idle machine and beside one process that keeps a core busy.

    python bench/bench_busy.py [--repeats 3] -- deltapack compress BASE FT -o /tmp/x.dpk --budget 1.05 -q --overwrite

Runs the command `repeats` times idle, then starts `python -c "while True: pass"` and runs it `repeats` times
again; prints both medians and their ratio (the target in issue 24: at most 1.5x). Nothing else should run.
"""
import argparse
import statistics
import subprocess
import sys
import time


def median_seconds(cmd, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the command after --")
    idle = median_seconds(cmd, args.repeats)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = median_seconds(cmd, args.repeats)
    finally:
        spinner.kill()
        spinner.wait()
    print(f"idle {idle:.2f} s, one core busy {busy:.2f} s: {busy / idle:.2f}x")


if __name__ == "__main__":
    main()
