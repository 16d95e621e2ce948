"""One thread setting bounds every pool deltapack's work uses: counted as the threads of the process that did
CPU work (from /proc), not taken from the settings."""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                                reason="needs /proc and two cores")

# A child process: per-thread CPU ticks before and after `work`, and how many threads did at least a tenth of
# the busiest one's work (an idle pool thread may still spin for a few ticks).
CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    import deltapack as dp

    def ticks():
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[tid] = int(fields[11]) + int(fields[12])  # utime + stime
            except OSError:
                pass
        return out

    m = np.random.default_rng(0).standard_normal((1500, 1500)).astype(np.float32)
    np.linalg.svd(m[:200, :200])  # the BLAS pool exists before counting
    WORK
    """)


def busy_threads(work: str) -> int:
    code = CHILD.replace("WORK", textwrap.dedent(work))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


MEASURE = """
before = ticks()
{}
after = ticks()
gained = [n - before.get(t, 0) for t, n in after.items()]
print(sum(1 for g in gained if g >= max(3, max(gained) / 10)))
"""


def test_set_threads_bounds_the_blas_pool():
    """numpy's SVD (the budget's candidates) on one thread after dp.set_threads(1); threadpoolctl's own count
    of the BLAS pool says the same, and set_threads(0) gives the pool back."""
    # the count sees a second thread when the pool is not bounded (else this test could not fail)
    assert busy_threads(MEASURE.format("for _ in range(3): np.linalg.svd(m)")) >= 2
    assert busy_threads(MEASURE.format("dp.set_threads(1)\nfor _ in range(3): np.linalg.svd(m)")) == 1
    out = busy_threads("""
        from threadpoolctl import threadpool_info
        n0 = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        dp.set_threads(1)
        n1 = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        dp.set_threads(0)
        n2 = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        print(int(n1 == [1] * len(n1) and n2 == n0 and len(n0) > 0))
        """)
    assert out == 1


def test_bounded_threads_covers_blas_and_torch():
    """compress runs inside bounded_threads(threads): its BLAS and torch work stay on one thread."""
    work = """
        import torch
        from deltapack.threads import bounded_threads
        x = torch.randn(1500, 1500)
        with bounded_threads(1):
            for _ in range(3):
                np.linalg.svd(m)
                x @ x
    """
    assert busy_threads(MEASURE.format(textwrap.dedent(work).strip().replace("\n", "\n"))) == 1


def test_small_lapack_calls_run_on_one_thread():
    """lowrank.svd's full SVD of a matrix below threads.SMALL_LAPACK elements runs on one thread even when
    the pools may use two (its second thread only spins, and steals a busy machine's free core); a larger
    one still gets both."""
    small = """
        from deltapack import lowrank
        s = m[:600, :1000].copy()
        for _ in range(12): lowrank.svd(s, 600)
    """
    large = """
        from deltapack import lowrank
        for _ in range(2): lowrank.svd(m, 1500)
    """
    assert busy_threads(MEASURE.format(textwrap.dedent(small).strip())) == 1
    assert busy_threads(MEASURE.format(textwrap.dedent(large).strip())) >= 2


def test_torch_imported_inside_the_bound_is_bounded():
    """compress opens its bound before --data imports torch (threadpoolctl only sees libraries already loaded):
    load_model's bound_torch applies it then, and leaving the bound gives torch its threads back."""
    work = """
        from deltapack.threads import bounded_threads, bound_torch
        with bounded_threads(1):
            import torch
            bound_torch(torch)
            x = torch.randn(1500, 1500)
            for _ in range(6):
                x @ x
        assert torch.get_num_threads() == os.cpu_count(), torch.get_num_threads()
    """
    unbounded = """
        import torch
        x = torch.randn(1500, 1500)
        for _ in range(6):
            x @ x
    """
    assert busy_threads(MEASURE.format(textwrap.dedent(unbounded).strip())) >= 2  # else this could not fail
    assert busy_threads(MEASURE.format(textwrap.dedent(work).strip())) == 1


def test_a_set_threads_bound_open_at_exit_closes_quietly():
    """set_threads' bound is still open when the interpreter exits, after torch's module is gone: no traceback."""
    script = "import deltapack as dp, torch\ndp.set_threads(1)\nassert torch.get_num_threads() == 1\n"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
