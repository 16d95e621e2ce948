"""Serving many fine-tunes from one base: the bank (the C++ core's Bank, see docs/serving.md).

    bank = dp.Bank("base_dir")                 # the base, read once
    bank.add("math", "math.dpk")               # its fingerprint checked against the base
    sd = bank.activate("math")                 # name -> torch tensor: the bank's buffers, now the fine-tune
    bank.activate({"math": 1.0, "code": 0.5})  # several deltas at once (task arithmetic)
    bank.activate(None)                        # the base again, bit for bit
    bank.bind(model)                           # a transformers model's parameters become the buffers

    bank.patch(model)                          # mixed batches: each row of a batch its own fine-tune
    with bank.rows(["math", "code", None, "math"]):
        model.generate(ids, ...)

A switch rebuilds each tensor that the new or the previous fine-tunes touch from the base (one delta at
alpha 1 gives exactly what `deltapack apply` writes), and leaves the others alone. A patched model computes
W_base x + alpha * delta x per row from the packed deltas (Bank.product): nothing is rebuilt.
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

from . import _core, cuda


def _mix(which, alpha) -> list:
    if which is None:
        return []
    if isinstance(which, str):
        return [(which, float(alpha))]
    return [(k, float(v)) for k, v in which.items()]


class Bank:
    """One base model in memory and fine-tunes of it, switched in place (activate) or chosen per batch row
    (patch + rows). Fine-tunes that add, remove, resize or retype tensors (a grown vocabulary) are refused by
    add().

    Threads: add, remove and activate are serialized and wait for readers; a thread that reads the buffers
    while others may switch holds `with bank.reading():` (and does not call activate inside it). One rows()
    block at a time per bank (it is refused while another is open)."""

    def __init__(self, base, cache_bytes: int = 0, device=None):
        """cache_bytes: keep the rebuilt tensors of recently used mixes up to this many bytes, so switching back
        to one copies instead of rebuilding (0: no cache; CPU banks only).

        device: None or "cpu" (the buffers in host memory), or a CUDA device ("cuda", "cuda:1"): the buffers and
        the fine-tunes' deltas live on that GPU, activate() rebuilds there and a patched model's mixed batches
        run the CUDA batch-product kernels (docs/cuda.md); "emulate" runs that path on the CPU (tests)."""
        self._target = None if device is None or str(device) == "cpu" else cuda.Target(device)
        if cache_bytes and self._target is not None:
            raise ValueError("bank: cache_bytes is for a CPU bank (a GPU bank rebuilds faster than it would copy)")
        self._b = _core.Bank(os.fspath(base))
        if cache_bytes:
            self._b.set_cache_budget(int(cache_bytes))
        self._on_device = {}  # GPU bank: (fine-tune, tensor) -> DeviceDelta, or None where it changes nothing
        self._pristine = {}   # GPU bank: tensor -> the base, kept from its first rewrite on
        self._device_mix, self._device_rewritten = [], []
        self._device_lock = threading.RLock()  # GPU bank: activate, add, remove and readers one at a time
        self._torch = None
        self._readers = threading.local()
        self._rows = None  # the current mixed batch: a list of (fine-tune or None) per batch row
        self._rows_lock = threading.Lock()
        self._generation = 0  # counts add() and remove(): rebuilt parameters cached by patch() follow it

    def add(self, name: str, delta, force: bool = False) -> None:
        """Register fine-tune `name` (a delta file `deltapack compress` made against this base). The file is read
        into memory: changing or deleting it later does not affect the bank."""
        self._b.add(name, os.fspath(delta), force)
        self._generation += 1

    def remove(self, name: str) -> None:
        """Forget fine-tune `name` (refused while it is active)."""
        with self._device_lock:
            if any(n == name for n, _ in self._device_mix):
                raise ValueError(f"bank: fine-tune '{name}' is active; activate another mix first")
            self._b.remove(name)
            self._on_device = {k: v for k, v in self._on_device.items() if k[0] != name}
        self._generation += 1

    @property
    def fine_tunes(self) -> list[str]:
        return self._b.fine_tunes()

    @property
    def device(self):
        """Where the buffers live: a torch.device."""
        import torch

        return self._target.device if self._target is not None else torch.device("cpu")

    @property
    def active(self) -> dict:
        """The mix the buffers hold: {name: alpha}; {} for the base."""
        return dict(self._device_mix if self._target is not None else self._b.active())

    def activate(self, which=None, alpha: float = 1.0, threads: int | None = None) -> dict:
        """Make the buffers hold `which`: a fine-tune name (scaled by alpha), a {name: alpha} dict, or None
        for the base. Returns the state dict (name -> torch tensor viewing the bank's buffers). On an error the
        buffers keep the previous state."""
        if getattr(self._readers, "depth", 0):
            raise RuntimeError("bank.activate inside bank.reading() on the same thread would wait for itself")
        if self._rows is not None:
            raise RuntimeError("bank.activate inside bank.rows(): the mixed batch needs the base in the buffers")
        if self._target is not None:
            with self._device_lock:
                self._activate_on_device(_mix(which, alpha))
        else:
            self._b.activate(_mix(which, alpha), 0 if threads is None else int(threads))
        return self.state_dict()

    @property
    def last_rewritten(self) -> list[str]:
        """The tensors the last activate() rebuilt (the others were not written)."""
        return list(self._device_rewritten) if self._target is not None else self._b.last_rewritten()

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache of rebuilt mixes holds now."""
        return self._b.cache_bytes()

    def set_cache_budget(self, nbytes: int) -> None:
        self._b.set_cache_budget(int(nbytes))

    @contextlib.contextmanager
    def reading(self):
        """Hold while reading the buffers from one thread when another may call activate(): the switch waits.
        (On a GPU bank, readers also wait for each other.)"""
        lock = self._device_lock if self._target is not None else None
        if lock is not None:
            lock.acquire()
        else:
            self._b.lock_shared()
        self._readers.depth = getattr(self._readers, "depth", 0) + 1
        try:
            yield self
        finally:
            self._readers.depth -= 1
            if lock is not None:
                lock.release()
            else:
                self._b.unlock_shared()

    def rebuild(self, which, name: str, alpha: float = 1.0):
        """Tensor `name` as the mix `which` has it (see activate), in new memory: the buffers are not touched."""
        import torch

        ref = self.state_dict()[name]
        out = torch.empty_like(ref)
        if self._target is not None:
            self._rebuild_on_device(_mix(which, alpha), name, out)
            return out
        self._b.rebuild(_mix(which, alpha), name, out.view(torch.int16) if out.dtype == torch.bfloat16 else out)
        return out

    def numpy(self, name: str) -> np.ndarray:
        """The live buffer of tensor `name` as numpy (bf16 as uint16 bits), without a copy (a CPU bank's)."""
        if self._target is not None:
            raise ValueError("bank.numpy: a GPU bank's buffers are on the GPU; use state_dict()")
        return self._b.tensor(name)

    def state_dict(self) -> dict:
        """name -> torch tensor viewing the bank's buffers (the same objects on every call; on the bank's device)."""
        if self._torch is None:
            import torch

            out = {}
            for name in self._b.tensor_names():
                arr = self._b.tensor(name)
                t = torch.from_numpy(arr)
                t = t.view(torch.bfloat16) if arr.dtype == np.uint16 else t
                out[name] = t if self._target is None else t.to(self._target.device, copy=True)
            self._torch = out
        return self._torch

    # ------------------------------------------------------------------------------ a bank on a GPU

    def device_delta(self, name: str, tensor: str):
        """Fine-tune `name`'s delta of `tensor` on the bank's GPU (a _core.DeviceDelta, copied there on first use),
        or None where the fine-tune leaves the tensor unchanged."""
        key = (name, tensor)
        if key not in self._on_device:
            self._on_device[key] = self._b.to_device(name, tensor, self._target.index, self._target.stream())
        return self._on_device[key]

    def _base_on_device(self, tensor: str):
        """The base of `tensor` on the device: its live buffer until a mix first rewrites it, then the copy kept."""
        return self._pristine.get(tensor, self.state_dict()[tensor])

    def _rebuild_on_device(self, mix: list, tensor: str, out) -> None:
        """out = `tensor` as the CPU bank rebuilds it: the first delta from the base, the next ones on top, each
        rounded once (the same kernels' bits)."""
        source = self._base_on_device(tensor)
        stream = self._target.stream()
        for name, alpha in mix:
            d = self.device_delta(name, tensor)
            if d is None:
                continue
            d.apply(source, out, alpha, "auto", stream)
            source = out
        if source is not out:
            out.copy_(source)

    def _activate_on_device(self, mix: list) -> None:
        known = set(self.fine_tunes)
        unknown = [n for n, _ in mix if n not in known]
        if unknown:
            raise ValueError(f"bank: no fine-tune named '{unknown[0]}'")
        sd = self.state_dict()
        previous = self._device_mix
        touched = [t for t in sd if any(self._b.touches(n, t) for n, _ in previous + mix)]
        try:
            for t in touched:
                if t not in self._pristine:
                    self._pristine[t] = sd[t].clone()
                self._rebuild_on_device(mix, t, sd[t])
        except Exception:
            for t in touched:  # the previous mix again, as the CPU bank keeps it on an error
                self._rebuild_on_device(previous, t, sd[t])
            raise
        self._device_mix, self._device_rewritten = list(mix), touched

    def bind(self, model):
        """Make `model`'s parameters and buffers views of the bank's (tied ones included): every later
        activate() changes the model in place. Shapes and dtypes must match the base's."""
        sd = self.state_dict()
        named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        missing = [n for n, _ in model.named_parameters() if n not in sd]
        if missing:
            raise KeyError(f"bind: the bank's base has no tensor '{missing[0]}' (of {len(missing)} missing)")
        for name, t in named:
            if name not in sd:
                continue
            if tuple(t.shape) != tuple(sd[name].shape) or t.dtype != sd[name].dtype:
                raise ValueError(f"bind: '{name}' is {t.dtype} {list(t.shape)} in the model, "
                                 f"{sd[name].dtype} {list(sd[name].shape)} in the bank")
            t.data = sd[name]
        return model

    # ------------------------------------------------------------------------------ mixed batches

    def patch(self, model):
        """Bind `model` (see bind) and let each row of its batches use its own fine-tune: inside
        `with bank.rows([...])`, every module with a parameter some fine-tune may change adds that row's delta.
        Linear layers multiply the packed delta (W_base x + alpha * delta x, nothing rebuilt); embeddings add the
        delta's rows for the batch's tokens; other modules (norms) run once per fine-tune on its rows with their
        parameters rebuilt (small tensors). Outside rows() the model is the bank's current state. Returns model."""
        import torch

        self.bind(model)
        by_ptr = {t.data_ptr(): name for name, t in self.state_dict().items()}
        for module in model.modules():
            own = {p: by_ptr[t.data_ptr()] for p, t in module.named_parameters(recurse=False)
                   if t.data_ptr() in by_ptr}
            if not own or hasattr(module, "_deltapack_forward"):
                continue
            if isinstance(module, torch.nn.Linear):
                forward = _linear_forward(self, module, own)
            elif isinstance(module, torch.nn.Embedding):
                forward = _embedding_forward(self, module, own)
            else:
                forward = _rebuilt_forward(self, module, own)
            module._deltapack_forward = module.forward
            module.forward = forward
        return model

    @contextlib.contextmanager
    def rows(self, which, alpha: float = 1.0):
        """Inside: row i of every batch through a patched model uses fine-tune which[i] (scaled by alpha), None
        for the base. The buffers must hold the base (activate(None)); activate() is refused until the end."""
        names = list(which)
        unknown = sorted({n for n in names if n is not None} - set(self.fine_tunes))
        if unknown:
            raise ValueError(f"bank.rows: no fine-tune named '{unknown[0]}' (add it first)")
        with self._rows_lock:
            if self._rows is not None:
                raise RuntimeError("bank.rows: already inside rows() (one mixed batch at a time)")
            if self.active:
                raise RuntimeError(f"bank.rows: the buffers hold {self.active}; activate(None) first (a mixed batch "
                                   "adds each row's delta to the base)")
            self._rows = _Rows(self, names, float(alpha))
        try:
            yield self
        finally:
            self._rows = None


class _Rows:
    """A mixed batch: which batch rows use which fine-tune."""

    def __init__(self, bank, names, alpha):
        import torch

        self.bank, self.names, self.alpha = bank, names, alpha
        self.unique = sorted({n for n in names if n is not None})
        pos = {n: i for i, n in enumerate(self.unique)}
        self.which = torch.tensor([pos[n] if n is not None else -1 for n in names], dtype=torch.int32)
        self.groups = {n: torch.tensor([i for i, m in enumerate(names) if m == n], dtype=torch.long)
                       for n in self.unique}
        self._touched = {}

    def check(self, batch: int, module) -> None:
        if batch != len(self.names):
            raise ValueError(f"bank.rows names {len(self.names)} rows but {type(module).__name__} got a batch of "
                             f"{batch}")

    def touching(self, tensor: str) -> list:
        """The fine-tunes of this batch that change `tensor`."""
        if tensor not in self._touched:
            self._touched[tensor] = [n for n in self.unique if self.bank._b.touches(n, tensor)]
        return self._touched[tensor]


def _add_rows(y, idx, delta):
    """y[idx] += delta (f32), rounded once to y's dtype."""
    y[idx] = (y[idx].float() + delta.view(y[idx].shape)).to(y.dtype)


def _linear_forward(bank: Bank, module, own: dict):
    import torch

    weight, bias = own.get("weight"), own.get("bias")
    forward = module.forward

    def run(x):
        y = forward(x)
        rows = bank._rows
        if rows is None:
            return y
        rows.check(x.shape[0], module)
        by_weight = rows.touching(weight) if weight is not None else []
        by_bias = rows.touching(bias) if bias is not None else []
        if not by_weight and not by_bias:
            return y
        per_row = x[0].numel() // x.shape[-1]  # tokens per batch row
        xs = x.reshape(-1, x.shape[-1]).float().contiguous()
        d = torch.zeros(xs.shape[0], y.shape[-1], dtype=torch.float32, device=y.device)
        if by_weight and bank._target is not None:
            _device_products(bank, rows, weight, by_weight, per_row, xs, d)
        elif by_weight:
            which = rows.which.repeat_interleave(per_row) if per_row > 1 else rows.which
            bank._b.mixed_product(weight, rows.unique, which, xs, d, rows.alpha)
        for name in by_bias:
            db = torch.empty(1, y.shape[-1], dtype=torch.float32)
            bank._b.delta_rows(name, bias, torch.zeros(1, dtype=torch.long), db, rows.alpha)
            d.view(x.shape[0], per_row, -1)[rows.groups[name].to(d.device)] += db.to(d.device)
        return (y.reshape(d.shape).float() + d).to(y.dtype).reshape(y.shape)

    return run


def _device_products(bank: Bank, rows: _Rows, weight: str, names: list, per_row: int, xs, d) -> None:
    """d[token rows of fine-tune n] = alpha * x @ D_n.T for each n in names, in one launch of the CUDA batch-product
    kernels (Bank.mixed_product's bits: each row's product is added to zeros)."""
    import torch

    jobs, at = [], []
    for name in names:
        batch_rows = rows.groups[name]
        token_rows = (batch_rows[:, None] * per_row + torch.arange(per_row)).reshape(-1).to(xs.device)
        x = xs.index_select(0, token_rows).contiguous()
        jobs.append((bank.device_delta(name, weight), x, torch.zeros(x.shape[0], d.shape[1], dtype=torch.float32,
                                                                     device=xs.device)))
        at.append(token_rows)
    cuda.run_products(jobs, rows.alpha, bank._target)
    for (_, _, y), token_rows in zip(jobs, at):
        d.index_copy_(0, token_rows, y)


def _embedding_forward(bank: Bank, module, own: dict):
    import torch

    weight = own.get("weight")
    forward = module.forward

    def run(ids):
        y = forward(ids)
        rows = bank._rows
        if rows is None or weight is None:
            return y
        rows.check(ids.shape[0], module)
        for name in rows.touching(weight):
            idx = rows.groups[name].to(ids.device)
            tokens = ids[idx].reshape(-1).to(device="cpu", dtype=torch.long).contiguous()
            d = torch.empty(tokens.shape[0], y.shape[-1], dtype=torch.float32)
            bank._b.delta_rows(name, weight, tokens, d, rows.alpha)  # a few rows: on the CPU
            _add_rows(y, idx, d.to(y.device))
        return y

    return run


def _rebuilt_forward(bank: Bank, module, own: dict):
    """Modules other than Linear and Embedding (norms): rows of fine-tune t run with t's rebuilt parameters."""
    from torch.func import functional_call

    forward = module.forward
    cache = {}  # (fine-tune, alpha, bank generation) -> {parameter: rebuilt tensor}
    inner = threading.local()  # set while functional_call runs the module: its own forward, not this one

    def run(x, *args, **kwargs):
        rows = bank._rows
        if rows is None or getattr(inner, "plain", False):
            return forward(x, *args, **kwargs)
        rows.check(x.shape[0], module)
        y = forward(x, *args, **kwargs)
        for name, idx in rows.groups.items():
            key = (name, rows.alpha, bank._generation)
            if key not in cache:
                cache[key] = {p: bank.rebuild(name, t, rows.alpha) for p, t in own.items() if name in rows.touching(t)}
            if cache[key]:
                inner.plain = True
                try:
                    y[idx] = functional_call(module, cache[key], (x[idx], *args), kwargs)
                finally:
                    inner.plain = False
        return y

    return run
