"""`deltapack compress --budget B [--data FILE]`: a checkpoint delta of at most B bits per parameter.

Four steps, one tensor in memory at a time:
  1. analyse: read each matrix's delta, compute what every candidate costs and leaves under the proxy
     (allocate.tensor_options; with --data, under each of allocate.PROXIES);
  2. allocate: one Lagrange multiplier for the whole model (allocate.allocate). With --data every proxy gives
     an allocation, fitted to the real file size first (step 3's loop, nothing written), each is scored
     against the fine-tune on the calibration data, and the data-free one is kept unless another agrees
     clearly better (_choose_proxy);
  3. write: encode with the chosen recipes (the lowrank SVD weighted like the proxy), then check the real
     file size, header included; if it is over the budget the target shrinks by the excess and step 3 runs
     again (the header is estimated before it exists).
  4. with --data, refit the free scales of what was written on the calibration data (calibration.calibrate_file:
     layer by layer least squares of the layers' output changes; the size does not change).
The file records the budget, the proxy and its prediction in metadata["budget"] (`deltapack info` shows it).
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Mapping

import numpy as np

from .. import tensors
from ..lm import examples_of
from ..modeldir import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS, progress_bar, widen_into
from ..reference import as_matrix
from ..recipes import parse
from . import allocate as B
from . import calibration
from .plan import keep_files_record, lossy, total_bytes
from .writer import Compressor, dense_enc, summarize, write_deltas

_EMBEDDINGS = frozenset(INPUT_EMBEDDINGS + OUTPUT_EMBEDDINGS)
_TRIES = 8
_TERMS_BYTES = 1 << 30  # input covariances gathered (and kept on disk) to compare candidates after their refit
_TERMS_GROUP_BYTES = 256 << 20  # of them in memory at once: a pass over the data gathers each group
_FACTORS_IN_MEMORY = 256 << 20  # bytes of SVD factors kept in memory between analysis and writing; more on disk
# With --data the model is loaded again for scoring: what is kept meanwhile goes to disk, so that a 135 M
# model's scoring peaks at 1.4 GB (its covariances are 0.4 GB, its factors under three proxies 2 GB).
_KEPT_IN_MEMORY_WITH_DATA = 32 << 20
_FACTORS_ON_DISK = 32 << 30     # bytes beyond which factors are computed again when written


class _Spill:
    """Arrays kept from one stage to later ones (tuples of arrays, None allowed, under a key): the first
    `in_memory` bytes stay in memory, the rest go to a hidden directory next to the output, up to `on_disk`
    bytes (beyond, put keeps nothing: the caller computes again), all removed at close. Used for the SVD
    factors of the analysis, which writing, each retry and scoring reuse (the SVDs are most of a budget's time;
    a large model's are gigabytes), and for the input covariances the refit reuses."""

    def __init__(self, out, tag, in_memory, on_disk=_FACTORS_ON_DISK):
        self.out, self.tag, self.dir, self.kept = out, tag, None, {}
        self.room = {"memory": in_memory, "disk": on_disk}

    def put(self, key, arrays):
        n = sum(a.nbytes for a in arrays if a is not None)
        if n <= self.room["memory"]:
            self.kept[key] = arrays
            self.room["memory"] -= n
        elif n <= self.room["disk"]:
            if self.dir is None:
                out = os.path.abspath(os.fspath(self.out))
                self.dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.{self.tag}", dir=os.path.dirname(out))
            path = os.path.join(self.dir, f"{len(self.kept)}.npz")
            np.savez(path, count=np.array(len(arrays)), **{f"a{i}": a for i, a in enumerate(arrays) if a is not None})
            self.kept[key] = path
            self.room["disk"] -= n

    def get(self, key):
        got = self.kept.get(key)
        if isinstance(got, str):
            with np.load(got) as z:
                return tuple(z[f"a{i}"] if f"a{i}" in z else None for i in range(int(z["count"])))
        return got

    def __contains__(self, key):
        return key in self.kept

    def share(self, key, same):
        """key's arrays are those kept under `same` (a proxy that only scales another's weights)."""
        if same in self.kept:
            self.kept[key] = self.kept[same]

    def of(self, proxy):
        """factors(name) for the Compressor: this proxy's."""
        return lambda name: self.get((proxy, name))

    def close(self):
        self.kept.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


class _SpilledTerms(Mapping):
    """calibration.input_terms' {name: [Term]}, kept in a _Spill as each group of them is gathered: read back
    one tensor's at a time."""

    def __init__(self, groups, spill: _Spill):
        self.spill, self.names = spill, []
        for terms in groups:
            self._keep(terms)
            del terms  # not held while the next group is gathered
            _return_freed_memory()

    def _keep(self, terms):
        for name, ts in terms.items():
            self.spill.put(name, tuple(a for t in ts for a in (t.row, t.cov)))
            if name not in self.spill:
                raise MemoryError(f"input covariances of {name} fit neither in memory nor on disk")
            self.names.append(name)

    def __getitem__(self, name):
        if name not in self.spill:
            raise KeyError(name)
        arrays = self.spill.get(name)
        return [calibration.Term(arrays[i], arrays[i + 1]) for i in range(0, len(arrays), 2)]

    def __contains__(self, name):
        return name in self.spill

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


class _Stages:
    """The budget's stages as the progress display names them ("[2/5] analyse"): a byte bar (tqdm's rate and
    ETA) for a stage that reads the checkpoint, a line on stderr when one without a bar starts."""

    def __init__(self, names, quiet):
        self.names, self.quiet = list(names), quiet

    def label(self, name):
        return f"[{self.names.index(name) + 1}/{len(self.names)}] {name}"

    def bar(self, name, total):
        return progress_bar(total, self.label(name), self.quiet)

    def start(self, name):
        if not self.quiet:
            print(f"deltapack: {self.label(name)}", file=sys.stderr, flush=True)


def compress_to_budget(base, ft, out, plan, bits_per_param: float, *, data=None, proxy=None, min_size=4096,
                       lora_only=False, rank_multiple=1, metadata=None, threads=None, quiet=True, keep_files=True,
                       overwrite=False) -> dict:
    if not (isinstance(rank_multiple, int) and 1 <= rank_multiple <= 4096):
        raise ValueError(f"rank_multiple={rank_multiple!r}: give an integer from 1 to 4096")
    if not (isinstance(bits_per_param, (int, float)) and 0 < bits_per_param < 64):
        raise ValueError(f"budget={bits_per_param!r}: give bits per parameter, a number in (0, 64)")
    if proxy is not None and proxy not in B.PROXIES:
        raise ValueError(f"unknown proxy {proxy!r} (known: {', '.join(B.PROXIES)})")
    if proxy not in (None, B.DATA_FREE) and data is None:
        raise ValueError(f"proxy {proxy!r} needs calibration data (--data)")
    n_params = sum(t.numel for t in ft.tensors.values())
    budget_bits = bits_per_param * n_params
    examples = stats = None
    proxies = (proxy,) if proxy else B.PROXIES if data is not None else (B.DATA_FREE,)
    with_data = data is not None
    stages = _Stages(["statistics"] * with_data + ["analyse"] + ["score"] * (len(proxies) > 1) + ["write"]
                     + ["refit"] * with_data, quiet)
    if data is not None:
        if ft.dir is None:
            raise ValueError(f"{ft.path}: --data needs the fine-tune as a model directory (config.json), "
                             "to run it on the calibration data")
        examples = examples_of(data)
        stages.start("statistics")
        stats = calibration.fisher_weights(ft.dir, examples)  # the model is not held while analysing
        _return_freed_memory()
    lossy = _lossy_tensors(ft, base, plan, min_size)
    # --lora-only: low rank or nothing, so that a LoRA adapter carries every matrix as stored
    elements = () if lora_only else B.ELEMENT_CODECS

    def weights_for(proxy):
        def weights(name, matrix):
            return B.proxy_weights(proxy, matrix, _stats_for(stats, name, matrix.shape), name in _EMBEDDINGS)
        return weights

    def encoder_weights(proxy):  # (row, col) arrays, floored, as the lowrank encoder takes them
        return lambda name, matrix: weights_for(proxy)(name, matrix).floored(*matrix.shape)

    # the SVDs of step 1, reused by steps 2 and 3; with data the input covariances of step 2, reused by step 4
    factors = _Spill(out, "svd", _FACTORS_IN_MEMORY if data is None else _KEPT_IN_MEMORY_WITH_DATA)
    kept_terms = _Spill(out, "cov", _KEPT_IN_MEMORY_WITH_DATA)
    try:
        # 1. analyse
        lossy_bytes = total_bytes(base, ft, {n: plan[n] for n in lossy})
        bar = stages.bar("analyse", lossy_bytes)
        try:
            reader = Compressor(base, ft, None, threads, bar)
            options = {p: {} for p in proxies}
            delta = m = None
            for name, (src, shape, droppable) in lossy.items():
                delta, _ = reader.delta_of(name, src, math.prod(shape), False)
                if delta is None:
                    continue
                m = as_matrix(delta.reshape(shape))
                ws = {p: weights_for(p)(name, m) for p in proxies}
                # a proxy that scales another's weights takes that one's analysis, scaled
                analysed = {p: ws[p] for p in proxies if B.SCALED_FROM.get(p) not in proxies}
                for p, opts in B.options_under(name, m, analysed, elements=elements, droppable=droppable,
                                               threads=threads, rank_multiple=rank_multiple,
                                               keep_factors=lambda p, f: factors.put((p, name), f)).items():
                    options[p][name] = opts
                for p in proxies:
                    if p not in analysed:
                        same = B.SCALED_FROM[p]
                        options[p][name] = options[same][name].scaled(B.weight_ratio(ws[p], ws[same], *m.shape))
                        factors.share((p, name), (same, name))
            del reader, delta, m  # its scratch buffer holds the largest delta: not twice in memory
            _return_freed_memory()
        finally:
            bar.close()

        # 2. allocate (and, with data, choose the proxy by the rebuilt model's distance to the fine-tune)
        target = budget_bits - _fixed_bits_estimate(ft, base, plan, lossy, keep_files)
        allocs = {p: B.allocate(options[p], target) for p in proxies}
        scores, terms = {}, None
        if data is not None and len(proxies) > 1:
            # Each allocation is fitted to the real file size before it is scored, so that what is written is
            # what was scored: shrinking the chosen one afterwards changed it behind its score (on qwen2-small
            # `add` at 0.5 bits one direction less of the embedding took the agreement from 0.53 to 0.19).
            placeholder = {p: {"agreement": 0.999999, "kl": 99.999999} for p in proxies}  # the record's widths
            for p in proxies:
                allocs[p] = _write_within_budget(base, ft, plan, _temporary_sibling(out), options[p], allocs[p],
                                                 target, budget_bits, bits_per_param, p, placeholder, examples,
                                                 len(lossy), lossy, metadata, keep_files, encoder_weights(p),
                                                 factors.of(p), threads, stages, fit_only=True,
                                                 lora_only=lora_only)
            bar = stages.bar("score", lossy_bytes * len(proxies))
            try:
                scorer = calibration.Scorer(ft.dir, examples)
                # Candidates are compared as they will be written: refitted (step 4), when the layers' input
                # covariances are not too many.
                if sum(4 * ft[n].shape[-1] ** 2 for n in lossy) <= _TERMS_BYTES:
                    terms = _SpilledTerms(calibration.input_terms_by_group(scorer.model, examples, list(lossy),
                                                                           max_bytes=_TERMS_GROUP_BYTES),
                                          kept_terms)
                    _return_freed_memory()
                # Every allocation replaces all the lossy tensors, so the model is not restored between them
                # (that would hold a copy of each): the refit loads the fine-tune again if it needs it.
                # A proxy that scales another's weights and allocates the same recipes rebuilds the same model
                # (the same SVD directions and choices): it is scored once.
                scored = {}
                for p, alloc in allocs.items():
                    key = (B.SCALED_FROM.get(p, p), tuple(sorted(alloc.recipes.items())))
                    if key in scored:
                        bar.update(lossy_bytes)
                    else:
                        scored[key] = scorer.score(_rebuilt(base, ft, lossy, alloc.recipes, encoder_weights(p),
                                                            factors.of(p), threads, bar, terms), restore=False)
                    scores[p] = scored[key]
            finally:
                bar.close()
            del scorer
            _return_freed_memory()
            chosen = _choose_proxy(scores, len(examples))
        else:
            chosen = proxies[0]
        # what the data changed: tensors whose recipe differs from the data-free allocation's
        changed = None if B.DATA_FREE not in allocs or data is None else \
            sum(allocs[chosen].recipes.get(n) != allocs[B.DATA_FREE].recipes.get(n) for n in lossy)

        # 3. write, shrinking the target while the real file is over the budget. With data the file is refitted
        # (step 4) from a temporary name, so nothing unfitted ever stands under the final name.
        written = out if data is None else _temporary_sibling(out)
        try:
            size, meta, writer, record = _write_within_budget(base, ft, plan, written, options[chosen], allocs[chosen],
                                                              target, budget_bits, bits_per_param, chosen, scores,
                                                              examples, changed, lossy, metadata, keep_files,
                                                              encoder_weights(chosen), factors.of(chosen), threads,
                                                              stages, overwrite=overwrite and data is None,
                                                              lora_only=lora_only)
            if data is not None:  # 4. refit the free scales on the calibration data (same size)
                bar = stages.bar("refit", lossy_bytes)
                try:
                    refit = calibration.calibrate_file(base, ft, written, out, examples,
                                                       threads=threads, terms=terms, note=False, overwrite=overwrite,
                                                       bar=bar)
                finally:
                    bar.close()
        finally:
            if written != out and os.path.exists(written):
                os.unlink(written)
        summary = summarize(out, size, meta["checkpoint"], writer)
        if data is not None:
            summary["refitted"] = len(refit["refitted"])
        summary["bits_per_param"] = 8 * size / n_params
        summary["budget"] = record
        return summary
    finally:
        factors.close()
        kept_terms.close()


def _return_freed_memory():
    """Give the memory a stage freed back to the system. glibc keeps what torch's threads free in their own
    heaps, where the next stage's allocations do not find it: after the Fisher pass over a 135 M model 1.1 GB
    stayed resident, and the scoring stage's peak stacked on it. Elsewhere than glibc this does nothing."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _temporary_sibling(path) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f".{os.path.basename(path)}.unfitted{secrets.token_hex(4)}")


def _write_within_budget(base, ft, plan, out, options, alloc, target, budget_bits, bits_per_param, proxy, scores,
                         examples, changed, lossy, metadata, keep_files, weights, factors, threads,
                         stages, overwrite=False, fit_only=False, lora_only=False):
    """Write the allocation; while the real file (header included) is over the budget, shrink the target by
    the excess and allocate again. Returns (size, metadata, writer, budget record); fit_only: the allocation
    that fits, nothing written."""
    for _ in range(_TRIES):
        record = _budget_record(bits_per_param, proxy, alloc, scores, examples, changed, lora_only)
        meta = dict(metadata or {})
        meta["budget"] = record
        bar = progress_bar(0, "", True) if fit_only else stages.bar("write", total_bytes(base, ft, plan))
        try:
            c = Compressor(base, ft, _chooser(alloc.recipes, lossy), threads, bar, weights=weights, factors=factors)
            writer, meta, fp = write_deltas(c, plan, out, meta, keep_files, overwrite)
            try:
                size = writer.size(meta, fp)
                if 8 * size <= budget_bits:
                    if fit_only:
                        writer.abort()
                        return alloc
                    return writer.close(metadata=meta, base=fp), meta, writer, record
            except BaseException:
                writer.abort()
                raise
            writer.abort()
        finally:
            bar.close()
        target -= (8 * size - budget_bits) * 1.1 + 256
        alloc = B.allocate(options, target)
    raise ValueError(f"budget {bits_per_param} bits/param ({budget_bits / 8:.0f} bytes) is too small for this "
                     f"checkpoint: the file needs {size} bytes even with the least the allocation can store "
                     "(dense tensors, header, kept files)")


def _choose_proxy(scores: dict, n: int) -> str:
    """The data-free proxy unless another agrees with the fine-tune on clearly more calibration examples (by
    more than two standard errors): on the project's pairs the data-aware proxies were sometimes better and
    sometimes worse on held-out data, and a small calibration set cannot tell a few examples' difference
    from noise."""
    ref = scores[B.DATA_FREE]["agreement"]
    margin = 2 * math.sqrt(max(ref * (1 - ref), 1.0 / n) / n)
    best = max(scores, key=lambda p: (scores[p]["agreement"], -scores[p]["kl"]))
    return best if scores[best]["agreement"] > ref + margin else B.DATA_FREE


def _lossy_tensors(ft, base, plan, min_size) -> dict:
    """{name: (base source, shape of the delta, droppable)} of the matrices the budget encodes."""
    out = {}
    for name, spec in plan.items():
        if spec["op"] not in ("delta", "resized"):
            continue
        fi, src = ft[name], spec.get("source", name)
        shape = fi.shape if spec["op"] == "delta" else (min(fi.shape[0], base[src].shape[0]),) + fi.shape[1:]
        if lossy(shape, min_size):
            out[name] = (src, shape, spec["op"] == "delta")  # a resized tensor's shared rows are always stored
    return out


def _stats_for(stats, name, shape):
    """A tensor's Fisher factors cut to the delta's rows (a resized vocabulary's shared rows)."""
    if stats is None or name not in stats:
        return None
    w = stats[name]
    rows, cols = shape
    return B.Weights(None if w.row is None else w.row[:rows], w.col)


def _chooser(recipes, lossy):
    """choose(name, shape) for the Compressor: a lossy tensor's recipe (None: not stored), else exact f32."""
    def choose(name, shape):
        if name in lossy:
            recipe = recipes.get(name)
            if recipe is None:
                return None
            return parse(recipe)
        return ("dense", {"dtype": "f32"})
    return choose


def _fixed_bits_estimate(ft, base, plan, lossy, keep_files) -> float:
    """Bits of what the budget does not choose: dense and new tensors, kept files, header entries."""

    total = 0
    for name, spec in plan.items():
        fi = ft[name]
        if spec["op"] == "new":
            total += fi.nbytes
        elif spec["op"] == "delta" and name not in lossy:
            total += 4 * fi.numel
        elif spec["op"] == "resized":
            k = min(fi.shape[0], base[spec.get("source", name)].shape[0])
            total += (fi.shape[0] - k) * math.prod(fi.shape[1:]) * fi.np_dtype.itemsize
            if name not in lossy:
                total += 4 * k * math.prod(fi.shape[1:])
        total += len(name) + 100                             # checkpoint record and budget record entries
    total += sum(len(n) + 90 for n in base.tensors)          # base fingerprint
    if keep_files:
        files, stored = keep_files_record(ft, base)
        total += len(json.dumps(files)) + stored
    return 8.0 * total


def _budget_record(bits_per_param, proxy, alloc, scores, examples, changed, lora_only=False) -> dict:
    """metadata["budget"]: what was asked, the proxy, its prediction (share of the weighted delta energy lost,
    per tensor and overall) and, with data, each proxy's agreement with the fine-tune and KL on the
    calibration data, and how many tensors the data gave another recipe than the data-free allocation;
    "lora_only": true when the matrices were chosen among what a LoRA adapter carries."""
    rec = {"bits_per_param": bits_per_param, "proxy": proxy,
           "predicted_error": round(alloc.error / alloc.energy, 6) if alloc.energy else 0.0,
           "tensors": {n: round(v["error"] / v["energy"], 6) if v["energy"] else 0.0
                       for n, v in alloc.per_tensor.items()}}
    if examples is not None:
        rec["data"] = {"examples": len(examples), "refit": "least-squares",
                       "scores": {p: {k: round(float(v), 6) for k, v in s.items()} for p, s in scores.items()},
                       **({} if changed is None else {"tensors_changed": changed})}
    if lora_only:
        rec["lora_only"] = True
    return rec


def _rebuilt(base, ft, lossy, recipes, weights, factors, threads, bar, terms=None):
    """{name: rebuilt fine-tune tensor (float32, rounded to the fine-tune's dtype as apply would)} for the
    lossy tensors of one allocation, refitted when `terms` (calibration.input_terms) are given; a generator,
    so one tensor is decoded at a time."""

    # the writer's encoder (the same weights and kept factors), without the writing
    reader = Compressor(base, ft, _chooser(recipes, lossy), threads, bar, weights=weights, factors=factors)
    for name, (src, shape, _) in lossy.items():
        fi = ft[name]
        n = math.prod(shape)
        delta, _ = reader.delta_of(name, src, n, False)
        if delta is None or recipes.get(name) is None:
            d = np.zeros(shape, np.float32)
        else:
            m = delta.reshape(shape)
            enc = reader.encode(name, m, shape)
            if terms is not None and name in terms:
                enc = calibration.refit(enc, m, calibration.rows_of(terms[name], shape))
            d = tensors.decode(enc, threads=threads)
        # an embedding's arrays are 100+ MB each: the fewest at once (the base is read once the delta is decoded)
        b = base.read(src, stop=n).reshape(shape)
        out = np.empty(shape, fi.np_dtype)
        tensors.apply(b, dense_enc(d.reshape(shape), "f32"), out=out, threads=threads)
        del b, d
        rebuilt = np.empty(shape, np.float32)
        widen_into(out, fi.float_name, rebuilt)
        del out
        yield name, fi.shape, rebuilt
