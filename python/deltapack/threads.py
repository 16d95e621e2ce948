"""Threads: one setting bounds every pool deltapack's work uses (its C++ core's, numpy's BLAS and OpenMP,
torch's intra-op pool), and small LAPACK calls run on one thread."""
from __future__ import annotations

import contextlib
import sys

from . import _core


def set_threads(n: int) -> None:
    """Threads for all of deltapack's work (0 = all cores): its C++ core's default, and the pools it drives,
    bounded the same way (numpy's BLAS and OpenMP through threadpoolctl, torch's intra-op pool once torch is
    imported): pools that ignore each other oversubscribe a busy machine (an SVD 65x slower beside one other
    job on 2 cores)."""
    global _pools
    _core.set_default_threads(n)
    if _pools is not None:
        _pools.__exit__(None, None, None)
        _pools = None
    if n > 0:
        _pools = bounded_threads(n)
        _pools.__enter__()


_pools = None  # set_threads' bound, until the next call
_bound = None  # the innermost open bounded_threads' n
_torch_restore = None  # torch's thread count before that bound was applied to it


@contextlib.contextmanager
def bounded_threads(n: int | None):
    """Within it, the BLAS and OpenMP pools (threadpoolctl) and torch's intra-op pool use at most n threads;
    None or 0 changes nothing. compress runs inside one with its `threads`. torch is bounded now if it is
    imported, else when code that imports it later calls bound_torch (threadpoolctl only sees the libraries
    loaded when the bound is set)."""
    global _bound, _torch_restore
    if not n:
        yield
        return
    from threadpoolctl import threadpool_limits

    outer = _bound, _torch_restore
    _bound, _torch_restore = int(n), None
    try:
        with threadpool_limits(limits=int(n)):
            if "torch" in sys.modules:
                bound_torch(sys.modules["torch"])
            yield
    finally:
        torch = sys.modules.get("torch")  # gone when set_threads' bound closes as the interpreter exits
        if _torch_restore is not None and torch is not None:
            torch.set_num_threads(_torch_restore)
        _bound, _torch_restore = outer


def bound_torch(torch) -> None:
    """Applies the open bounded_threads' bound to torch's intra-op pool; called right after importing torch
    by the code that runs models (deltapack.lm). No bound open: nothing changes."""
    global _torch_restore
    if _bound is None:
        return
    if _torch_restore is None:
        _torch_restore = torch.get_num_threads()
    torch.set_num_threads(min(_bound, _torch_restore))


def workers(threads: int | None) -> int:
    """The number of threads a `threads` argument means (None or 0: the default, all cores unless set_threads)."""
    return threads if threads and threads > 0 else _core.default_threads()


# Below this many parameters a model's budget work (SVDs of a few hundred rows, the forward passes of --data)
# gains little from a second thread and loses half its speed when another process holds one of the cores.
# Measured on a 1.7 M-parameter pair, 2 cores, --budget 1.05: data-free 1.8 s on one thread and 2.0 s on two;
# --data 20.7 s and 17.3 s idle, but 19.1 s and 34.7 s with one core busy.
SMALL_MODEL = 16_000_000


def threads_for_model(n_params: int, threads: int | None) -> int | None:
    """The threads to use: `threads` when given (> 0), else one for a model below SMALL_MODEL parameters."""
    return threads if threads or n_params >= SMALL_MODEL else 1


# Below this many elements a LAPACK SVD is no faster on two threads than on one (measured on 2 cores: 576 x 1536
# 0.18 s vs 0.17 s), and its second thread, spinning while it waits, halves the speed of everything else on a
# machine where another process holds a core.
SMALL_LAPACK = 1 << 20
_controller = None


@contextlib.contextmanager
def blas_threads_for(elements: int):
    """Within it, the BLAS pool runs on one thread when the work is on fewer than SMALL_LAPACK elements."""
    global _controller
    if elements >= SMALL_LAPACK:
        yield
        return
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield
