"""Compress a fine-tuned Hugging Face checkpoint into a delta file against its base, one tensor at a
time (deltapack.checkpoint rebuilds it).

    summary = compress("base_dir", "ft_dir", "ft.dpk", recipe="*.mlp.*=lowrank:rank=64;*=sign")

Memory: tensors are read with pread() in chunks (peak memory follows the largest tensor, not the
model), and the delta file is written by the C++ core's streaming DeltaWriter. How the fine-tune is
recorded (metadata["checkpoint"], the base fingerprint): see deltapack.checkpoint and docs/checkpoints.md.
"""
from __future__ import annotations

import json
import os

from .. import _core
from ..threads import bounded_threads, threads_for_model
from ..modeldir import as_checkpoint, progress_bar
from ..recipes import Rules
from .plan import check_related, choose_codec, plan_tensors, total_bytes
from .writer import Compressor, summarize, write_deltas

__all__ = ["compress", "check_related"]


def compress(base, ft, out, recipe: str = "sign", *, budget: float | None = None, data=None, proxy=None,
             lora_only: bool = False, rank_multiple: int = 1, min_size: int | None = None,
             metadata: dict | None = None, threads: int | None = None, quiet: bool = True,
             keep_files: bool = True, force: bool = False, overwrite: bool = False, follow_links: bool = False) -> dict:
    """Store fine-tune `ft` as a delta against `base` in the delta file `out` (written atomically).

    recipe: per-tensor rules `pattern=recipe;...` applied to tensors with >= 2 dims and >= min_size
    elements (default 4096); the others are stored `dense` (f32) where they changed. Unchanged tensors are
    not stored.
    budget: bits per parameter of the whole file (over all the fine-tune's parameters, header included)
    instead of a recipe: each matrix (>= 2 dims, >= min_size elements, default 1) gets the codec and
    parameters, exact `dense` among them, that minimise a loss proxy within it
    (deltapack.compress.allocate); data: calibration examples (a JSONL path or a list, see lm.read_data) for the
    data-aware proxies, the choice among them and the refit of scales (deltapack.compress.calibration); proxy: one of
    allocate.PROXIES instead of the choice.
    lora_only: with a budget, every matrix is stored low rank (mixed precision, any rank) or not at all, so that
    `export gguf-lora` and `export peft` carry the stored matrices without further loss (a tied embedding: only
    llama.cpp, through `export gguf --untied-output` and `export gguf-lora --untied-output`).
    rank_multiple: with a budget, every low rank kept is a multiple of this (32: whole blocks of a q8_0, q5_0 or
    q4_0 GGUF adapter, which then needs no zero padding).
    force: store a pair that does not look like base + fine-tune (check_related) anyway.
    overwrite: replace an existing delta file at `out` (only a deltapack file; never BASE or FT or a file in them).
    follow_links: read BASE's and FT's files through symbolic links wherever they point.
    Returns a summary dict (counts, bytes, ratio; with a budget also the choice and the proxy's prediction).
    """
    # BLAS (the SVDs of lowrank and of the budget's candidates) and torch (calibration) get `threads` too
    with bounded_threads(threads):
        base, ft = as_checkpoint(base, follow_links), as_checkpoint(ft, follow_links)
        # User metadata under a name deltapack reads ("budget", ...) must have its type (FORMAT.md §7): said now,
        # not by the writer after all the work.
        _core.check_manifest_fields(json.dumps({"metadata": metadata or {}}, allow_nan=False), os.fspath(out))
        _core.check_output(os.fspath(out), _core.OutputKind.DELTA_FILE, [base.path, ft.path], overwrite)
        plan = plan_tensors(base, ft)
        if not force:
            check_related(base, ft, plan)
        if budget is not None:
            from .budget import compress_to_budget  # the budget's pipeline (numpy SVDs, torch with data)
            threads = threads_for_model(sum(t.numel for t in ft.tensors.values()), threads)
            with bounded_threads(threads):
                return compress_to_budget(base, ft, out, plan, budget, data=data, proxy=proxy, lora_only=lora_only,
                                          rank_multiple=rank_multiple,
                                          min_size=min_size or 1, metadata=metadata, threads=threads, quiet=quiet,
                                          keep_files=keep_files, overwrite=overwrite)
        if lora_only or rank_multiple != 1:
            raise ValueError("lora_only and rank_multiple choose among low-rank candidates under a budget: "
                             "give a budget")
        if data is not None:
            raise ValueError("data (calibration examples) is used with a budget; for a recipe use "
                             "`deltapack calibrate`")
        rules = Rules(recipe)
        min_size = 4096 if min_size is None else min_size
        bar = progress_bar(total_bytes(base, ft, plan), "compress", quiet)
        try:
            c = Compressor(base, ft, lambda name, shape: choose_codec(rules, name, shape, min_size), threads, bar)
            writer, meta, fp = write_deltas(c, plan, out, metadata, keep_files, overwrite)
            try:
                size = writer.close(metadata=meta, base=fp)
            except BaseException:
                writer.abort()
                raise
        finally:
            bar.close()
        return summarize(out, size, meta["checkpoint"], writer)
