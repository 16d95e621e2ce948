"""deltapack: compact fine-tune deltas, edited with the paper's operations, rebuilt fast on load.

    import deltapack as dp
    enc = dp.encode(delta, "sign", scope="row")
    w = dp.apply(base, enc)                 # base + delta, in base's dtype
    dp.save("ft.dpk", {"layer.weight": enc}, metadata={"task": "gsm8k"})
    f = dp.open("ft.dpk"); f["layer.weight"]
"""
from .files import DeltaFile, DeltaWriter, FormatError, open, save
from .tensors import Encoded, apply, decode, delta_product, encode, set_simd, simd, simd_available
from .threads import set_threads
from ._core import __version__, codec_names
from .checkpoint import load, load_into
from .serving import Bank

__all__ = ["Bank", "DeltaFile", "DeltaWriter", "Encoded", "FormatError", "apply", "decode", "encode", "open", "save",
           "delta_product", "set_simd", "set_threads", "simd", "simd_available", "codec_names", "__version__", "load", "load_into"]

# Modules that moved into subpackages (docs/ARCHITECTURE.md) stay reachable by their old names:
# `from deltapack import pairs` or `deltapack.edits` import the new module on first use.
_MOVED = {"analysis": "research.analysis", "edits": "research.edits", "evaluation": "research.evaluation",
          "pairs": "research.pairs", "pretrained": "research.pretrained", "export_gguf": "export.gguf",
          "export_peft": "export.peft", "import_peft": "export.import_peft", "finetune": "export.finetune",
          "calibration": "compress.calibration", "budget": "compress.allocate", "models": "modeldir"}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        return importlib.import_module(f"{__name__}.{_MOVED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
