"""The CUDA path (docs/cuda.md): the C++ core's kernels on torch CUDA tensors, on their GPU and its current stream,
with the CPU engine's numerics (the same bits as deltapack.apply / decode / delta_product on the CPU).

    dp.apply(base_cuda, enc)             # deltapack.apply routes CUDA tensors here
    dp.decode(enc, device="cuda")        # the delta as an f32 CUDA tensor (deltapack.decode routes here)
    dp.delta_product(enc, x_cuda)        # y = x @ D.T from the packed delta, on x's GPU
    dp.Bank(base, device="cuda")         # a bank whose buffers and deltas live on the GPU

The first call for a tensor on a GPU copies its components there (to_device); they stay while the Encoded
lives, so later calls copy nothing. device="emulate" runs the same kernels' bodies on the CPU over host tensors
(host emulation: slow; it is how the CUDA path is tested on machines without a GPU).
"""
from __future__ import annotations

from . import _core, reference

EMULATE = "emulate"


def built() -> bool:
    """Whether this deltapack was built with the CUDA kernels (a CUDA toolkit was found at build time)."""
    return _core.cuda_built()


def device_count() -> int:
    """GPUs the kernels can use: 0 when not built with CUDA, or without a driver or device."""
    return _core.cuda_device_count()


def is_cuda(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and x.is_cuda


class Target:
    """Where the kernels run: a CUDA device (its torch.device, its number, the current stream) or the host
    emulation (device "emulate": CPU tensors)."""

    def __init__(self, device):
        import torch

        if device == EMULATE:
            self.index, self.device = _core.HOST_EMULATION, torch.device("cpu")
            return
        d = torch.device(device)
        if d.type != "cuda":
            raise ValueError(f"device {device!r}: the CUDA path takes a CUDA device (or {EMULATE!r})")
        if not built():
            raise RuntimeError("this deltapack was built without CUDA: reinstall it where a CUDA toolkit (nvcc) is "
                               "found (docs/cuda.md)")
        self.index = d.index if d.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)

    @property
    def emulated(self) -> bool:
        return self.index == _core.HOST_EMULATION

    def stream(self) -> int:
        """The current stream of the device (torch's), as the kernels take it."""
        if self.emulated:
            return 0
        import torch

        return torch.cuda.current_stream(self.device).cuda_stream

    def check(self, t, what: str):
        """t itself, which must lie on this target and be contiguous."""
        if t.device != self.device:
            raise ValueError(f"{what} is on {t.device}; the kernels run on {self.device}")
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous")
        return t


def to_device(enc, device):
    """enc's components on `device` (a _core.DeviceDelta), copied on the first call for that device and kept with
    the Encoded afterwards."""
    target = device if isinstance(device, Target) else Target(device)
    copies = enc.device_copies
    if target.index not in copies:
        copies[target.index] = _core.DeviceDelta(enc._core(), target.index, target.stream())
    return copies[target.index]


def apply(base, enc, alpha: float = 1.0, out=None, rounding: str = "auto", device=None):
    """deltapack.apply on the device of `base` (a torch tensor; `device` "emulate" for the host emulation):
    out = round(base + alpha * delta), out=base in place. Waits for the stream to report a damaged delta."""
    import torch

    target = Target(device if device is not None else base.device)
    base = target.check(base, f"tensor '{enc.name}': base")
    if out is None:
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
    target.check(out, f"tensor '{enc.name}': out")
    to_device(enc, target).apply(base, out, float(alpha), rounding, target.stream())
    return out


def decode(enc, device="cuda"):
    """The delta as an f32 tensor of its shape on `device`."""
    import torch

    target = Target(device)
    out = torch.empty(tuple(enc.shape), dtype=torch.float32, device=target.device)
    to_device(enc, target).decode(out, target.stream())
    return out


def delta_product(enc, x, alpha: float = 1.0, out=None, device=None):
    """out += alpha * x @ D.T on x's device, from the packed delta (deltapack.delta_product's bits). x: f32
    (batch, cols); out: f32 (batch, rows), zeros when None."""
    return products([(enc, x, out)], alpha, device)[0]


def products(jobs, alpha: float = 1.0, device=None):
    """A mixed batch in one launch: for each (enc, x, out) of deltas of one shape, out += alpha * x @ D.T
    (out None: zeros). The workspace comes from torch's caching allocator. Returns the outs."""
    import torch

    if not jobs:
        return []
    target = Target(device if device is not None else jobs[0][1].device)
    core_jobs, outs = [], []
    for enc, x, out in jobs:
        target.check(x, f"tensor '{enc.name}': x")
        rows, _ = reference.rows_cols(enc.shape)
        if out is None:
            out = torch.zeros((x.shape[0], rows), dtype=torch.float32, device=target.device)
        target.check(out, f"tensor '{enc.name}': out")
        core_jobs.append((to_device(enc, target), x, out))
        outs.append(out)
    run_products(core_jobs, alpha, target)
    return outs


def run_products(core_jobs, alpha: float, target: Target) -> None:
    """_core.device_products with a workspace of the size the jobs need."""
    import torch

    nbytes = _core.device_products_workspace(core_jobs)
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=target.device)
    _core.device_products(core_jobs, float(alpha), workspace, target.stream())
