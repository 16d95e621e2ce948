"""What the benchmarks share: timing, and writing synthetic sharded bf16 checkpoints."""
from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np


def median_time(fn, repeats):
    """Median wall time of `repeats` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns, repeats):
    """Median wall time of each of fns over `repeats` rounds that call each once, in turn, after one warm-up
    call each: a machine that slows down for a while slows them all, so their ratios stay fair."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def write_bf16_checkpoint(path, shapes, pattern, config, shard_bytes):
    """A Hugging Face directory of bf16 safetensors shards (at most shard_bytes each, unless one tensor is
    larger), its index and `config`. shapes: [(name, shape)]; pattern(k, name, shape) gives tensor k's bf16 bit
    patterns (uint16), repeated to fill it: written piece by piece, one pattern in memory at a time.
    Returns the bytes of tensor data written."""
    os.makedirs(path)
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        nbytes = int(np.prod(shape)) * 2
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    weight_map, total, k = {}, 0, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(os.path.join(path, fname), "wb") as fh:
            fh.write(len(text).to_bytes(8, "little") + text)
            for name, shape in shard:
                k += 1
                n = int(np.prod(shape))
                t = np.ascontiguousarray(pattern(k, name, shape), dtype=np.uint16)
                for s in range(0, n, t.size):
                    fh.write(t[:min(t.size, n - s)])
                total += n * 2
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    return total
