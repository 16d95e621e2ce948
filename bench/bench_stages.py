"""Wall time and peak RSS of each stage of a `deltapack compress --budget` run, as its progress names them.

    python bench/bench_stages.py deltapack compress BASE FT -o /tmp/x.dpk --budget 0.5 --data data.jsonl --overwrite

Runs the command (its progress must not be silenced: the stages are read from "[i/n] name" on its stderr) and
samples the process's resident memory every 0.3 s; prints when each stage started and its peak RSS.
"""
import re
import subprocess
import sys
import threading
import time

STAGE = re.compile(rb"\[\d+/\d+\] (\w+)")


def main():
    cmd = sys.argv[1:]
    if not cmd:
        sys.exit(__doc__)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stage, started, peak = ["start"], {"start": 0.0}, {}

    def follow():  # the last stage name seen on stderr (progress bars rewrite their line with \r)
        tail = b""
        while chunk := p.stderr.read1(4096):
            tail = (tail + chunk)[-4096:]
            names = STAGE.findall(tail)
            if names and names[-1].decode() != stage[0]:
                stage[0] = names[-1].decode()
                started.setdefault(stage[0], time.perf_counter() - t0)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024
            peak[stage[0]] = max(peak.get(stage[0], 0), rss)
        except (OSError, AttributeError):
            pass
        time.sleep(0.3)
    reader.join(5)
    total = time.perf_counter() - t0
    print(f"exit {p.returncode}, {total:.1f} s in all")
    for name, at in started.items():
        print(f"  {name:12s} from {at:7.1f} s   peak RSS {peak.get(name, 0) / 1e9:.2f} GB")
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
