"""Serving many fine-tunes from one base: the bank (the C++ core's Bank, see docs/serving.md).

    bank = dp.Bank("base_dir")                 # the base, read once
    bank.add("math", "math.dpk")               # its fingerprint checked against the base
    sd = bank.activate("math")                 # name -> torch tensor: the bank's buffers, now the fine-tune
    bank.activate({"math": 1.0, "code": 0.5})  # several deltas at once (task arithmetic)
    bank.activate(None)                        # the base again, bit for bit
    bank.bind(model)                           # a transformers model's parameters become the buffers

A switch rebuilds each tensor that the new or the previous fine-tunes touch from the base (one delta at
alpha 1 gives exactly what `deltapack apply` writes), and leaves the others alone.
"""
from __future__ import annotations

import os

import numpy as np

from . import _core


class Bank:
    """One base model in memory and fine-tunes of it switched in place. Fine-tunes that add, remove or
    resize tensors (a grown vocabulary) are refused by add(). Not for concurrent use: activate() must not
    run while another thread reads the tensors."""

    def __init__(self, base):
        self._b = _core.Bank(os.fspath(base))
        self._torch = None

    def add(self, name: str, delta, force: bool = False) -> None:
        """Register fine-tune `name` (a delta file `deltapack compress` made against this base)."""
        self._b.add(name, os.fspath(delta), force)

    @property
    def fine_tunes(self) -> list[str]:
        return self._b.fine_tunes()

    def activate(self, which=None, alpha: float = 1.0, threads: int | None = None) -> dict:
        """Make the buffers hold `which`: a fine-tune name (scaled by alpha), a {name: alpha} dict, or None
        for the base. Returns the state dict (name -> torch tensor viewing the bank's buffers)."""
        if which is None:
            deltas = []
        elif isinstance(which, str):
            deltas = [(which, float(alpha))]
        else:
            deltas = [(k, float(v)) for k, v in which.items()]
        self._b.activate(deltas, 0 if threads is None else int(threads))
        return self.state_dict()

    @property
    def last_rewritten(self) -> list[str]:
        """The tensors the last activate() rebuilt (the others were not written)."""
        return self._b.last_rewritten()

    def numpy(self, name: str) -> np.ndarray:
        """The live buffer of tensor `name` as numpy (bf16 as uint16 bits), without a copy."""
        return self._b.tensor(name)

    def state_dict(self) -> dict:
        """name -> torch tensor viewing the bank's buffers (the same objects on every call)."""
        if self._torch is None:
            import torch

            out = {}
            for name in self._b.tensor_names():
                arr = self._b.tensor(name)
                t = torch.from_numpy(arr)
                out[name] = t.view(torch.bfloat16) if arr.dtype == np.uint16 else t
            self._torch = out
        return self._torch

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
