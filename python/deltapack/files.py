"""Delta files: write them (save, the streaming DeltaWriter) and open them (DeltaFile). The format is
written and read by the C++ core (docs/FORMAT.md); this is its Python face."""
from __future__ import annotations

import json
import os

import numpy as np

from . import _core
from .tensors import Encoded

FormatError = _core.FormatError


def _extra_manifest(metadata, base) -> str:
    extra = {}
    if metadata is not None:
        extra["metadata"] = metadata
    if base is not None:
        extra["base"] = base
    try:
        return json.dumps(extra, allow_nan=False)
    except ValueError as ex:  # NaN or infinity: the manifest is strict JSON
        raise ValueError(f"metadata cannot be stored in a manifest: {ex}") from None


def save(path, tensors: dict, metadata: dict | None = None, base: dict | None = None, *,
         overwrite: bool = True) -> None:
    """Write encoded tensors to a delta file atomically (nothing under `path` unless it succeeds).

    metadata: free-form JSON-serialisable user metadata (the keys deltapack itself reads, "checkpoint", "budget",
    "peft" and "calibration", must have the types docs/FORMAT.md §7 gives); base: the base model's fingerprint.
    overwrite: replace an existing file at `path` (as numpy.save does); False refuses (FileExistsError).
    """
    w = DeltaWriter(path, overwrite=overwrite)
    for name, enc in tensors.items():
        w.add(name, enc)
    w.close(metadata, base)


class DeltaWriter:
    """Writes a delta file tensor by tensor (the C++ core's writer): no tensor is held once added (its
    components are, up to `in_memory` bytes, default 256 MiB; beyond, in scratch files), and nothing appears
    under `path` unless close() succeeds. Same bytes as `save` for the same tensors.
    handed_over: the caller does not change a tensor's arrays once added, so the writer holds those it keeps in
    memory instead of copying them (a sign delta of 4 Llama-3-8B-shaped layers: 229 MiB not copied)."""

    def __init__(self, path, overwrite: bool = True, in_memory: int | None = None, handed_over: bool = False):
        self.path = os.fspath(path)
        self._w = _core.DeltaWriter(self.path, overwrite) if in_memory is None else \
            _core.DeltaWriter(self.path, overwrite, in_memory)
        self._handed_over = handed_over
        self._held = []

    def add(self, name: str, enc: Encoded) -> None:
        if not self._handed_over:
            self._w.add(enc._core(name))
            return
        core = enc._core(name)
        # the arrays the core reads (a copy of a non-contiguous one, which it would otherwise make and drop)
        arrays = {k: np.asarray(v) for k, v in core[5].items()}
        core = core[:5] + ({k: a if a.flags.c_contiguous else np.ascontiguousarray(a) for k, a in arrays.items()},)
        if self._w.add(core, True):
            self._held.append(core[5])

    def add_file(self, data: bytes) -> list:
        """Store a kept file's bytes; returns [begin, end], their place for the checkpoint record's `bytes`."""
        begin = self._w.add_file(data)
        return [begin, begin + len(data)]

    def __len__(self) -> int:
        return len(self._w)  # tensors added

    def size(self, metadata=None, base=None) -> int:
        """The file size close() would write with this metadata."""
        return self._w.size(_extra_manifest(metadata, base))

    def close(self, metadata=None, base=None, durable: bool = True) -> int:
        """Write header + data and link it into place; returns the file size."""
        try:
            return self._w.close(_extra_manifest(metadata, base), durable)
        finally:
            self._held.clear()

    def abort(self) -> None:
        self._w.abort()
        self._held.clear()


class DeltaFile:
    """A delta file opened read-only: the header is checked at once, each tensor is read (pread, checksummed)
    when asked for; its components are numpy views of the memory it was read into."""

    def __init__(self, path, verify: bool = True):
        self._f = _core.DeltaFile.open(os.fspath(path))
        self.path = os.fspath(path)
        self.verify = verify
        self.manifest = json.loads(self._f.manifest)

    def keys(self) -> list[str]:
        return self._f.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, name) -> bool:
        return name in self._f

    def get(self, name: str, verify: bool | None = None) -> Encoded:
        if name not in self._f:
            raise KeyError(f"{self.path}: no tensor '{name}' in this delta file")
        codec, params, shape, dtype, comps = self._f.get(name, self.verify if verify is None else verify)
        return Encoded(codec, json.loads(params), tuple(shape), dtype, dict(comps), name)

    __getitem__ = get

    def shape(self, name: str) -> tuple:
        """The shape of tensor `name` as the manifest states it (nothing is read)."""
        return tuple(self.entry(name)[2])

    def entry(self, name: str) -> tuple:
        """(codec, params, shape, dtype) of tensor `name` from the manifest, nothing read."""
        if name not in self._f:
            raise KeyError(f"{self.path}: no tensor '{name}' in this delta file")
        codec, params, shape, dtype = self._f.entry(name)
        return codec, json.loads(params), tuple(shape), dtype

    def items(self):
        for k in self.keys():
            yield k, self[k]

    @property
    def metadata(self) -> dict:
        return self.manifest.get("metadata", {})

    @property
    def base(self) -> dict | None:
        return self.manifest.get("base")

    @property
    def nbytes(self) -> int:
        return os.path.getsize(self.path)

    def __repr__(self):
        return f"DeltaFile({self.path!r}, {len(self)} tensors)"


def open(path, verify: bool = True) -> DeltaFile:  # noqa: A001 - mirrors safetensors/h5py style
    """Open a delta file. With verify (default), each tensor's CRC-32C is checked when read."""
    return DeltaFile(path, verify)
