"""Switch latency and memory of the bank (`dp.Bank`, issue 12) at Llama-3.2-1B shapes.

    python bench/bench_serving.py [--layers 16] [--mem-layers 4] [--mem-vocab 128256] [--mem-fine-tunes 8]
                                  [--repeats 7] [--dir /tmp] [--skip-cold] [--skip-switch] [--skip-memory]
                                  [--out bench/results/serving]

Builds synthetic bf16 Hugging Face LlamaForCausalLM directories (config.json + safetensors shards +
index) at Llama-3.2-1B shapes: hidden 2048, intermediate 8192, 32 heads / 8 KV heads of dim 64 (q, o
2048x2048; k, v 512x2048; gate, up 8192x2048; down 2048x8192), embed_tokens 128256x2048 with a tied
lm_head, RMSNorm weights. A fine-tune is the base with a small seeded perturbation (the low mantissa bits
of every weight flipped at random, about 1 % of each weight); its delta is made by `deltapack compress
--recipe sign`.

Part 1, switch latency (--layers layers; fine-tunes A and B change every tensor, C only the attention
q_proj and v_proj). A LlamaForCausalLM (no weight init) is bound to the bank, so the bank's buffers are
the module's parameters; the loads below write into those same buffers.
  (a) warm: `bank.activate` switching A -> B -> A ... (each switch timed) against loading A's safetensors
      from the page cache into the same buffers: os.preadv of each tensor into its buffer (1 thread, and
      64 MiB pieces over all cores), mmap + numpy copyto, and safetensors' safe_open().get_tensor + copy_
      for reference (two warm-up rounds; each repeat starts with another loader).
      ratio = load time / activate time (target >= 1x).
  (b) cold (not with --skip-cold; needs root): the page cache dropped (sync; echo 3 >
      /proc/sys/vm/drop_caches) before each timed switch and each timed load (target >= 3x). The bank holds
      the base and its pristine copies in anonymous memory; whether it maps its delta files (then a cold
      switch reads them from storage) or holds them in memory is read from /proc/self/maps and reported.
  (c) partial: base -> C (q/v only) against base -> A (everything): time, bytes rewritten, time per byte.
Part 2, memory (--mem-layers layers, --mem-vocab rows of the embedding; each case in its own process, peak
RSS by os.wait4): a bank with the base and 8 `sign` deltas, one active, against 8 full fine-tunes held at
once (read into anonymous memory; and as safetensors.torch.load_file dicts, which map the files, every
page touched), and against an idle interpreter with the same imports. Ideal = base + one active copy +
the delta files = 4 bytes/param + the deltas' bits/8.

Everything is built under a temporary directory in --dir and deleted afterwards (~10 GiB at 16 layers,
~9 GiB for part 2 at 4 layers). Results: bench/results/serving.{json,md}.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchlib import write_bf16_checkpoint

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2048, 8192, 32, 8, 64, 128256
SHARD_BYTES = 2 << 30
BLOCK = 1 << 24  # elements of the random pattern a tensor is tiled from
PIECE = 64 << 20  # bytes per read in the threaded loader
GIB = 2 ** 30


# ---------------------------------------------------------------------------- synthetic checkpoints

def layer_shapes(n_layers, vocab=VOCAB):
    """Tensor names and shapes of a Llama-3.2-1B-shaped model (tied lm_head: not stored)."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    yield "model.embed_tokens.weight", (vocab, HIDDEN)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (HIDDEN,)
        for proj, shape in (("q_proj", (q, HIDDEN)), ("k_proj", (kv, HIDDEN)), ("v_proj", (kv, HIDDEN)),
                            ("o_proj", (HIDDEN, q))):
            yield p + f"self_attn.{proj}.weight", shape
        yield p + "post_attention_layernorm.weight", (HIDDEN,)
        yield p + "mlp.gate_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.up_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.down_proj.weight", (HIDDEN, INTER)
    yield "model.norm.weight", (HIDDEN,)


def llama_config(n_layers, vocab=VOCAB):
    """config.json of Llama-3.2-1B with n_layers layers (and vocab rows)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": HEAD_DIM,
            "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": INTER,
            "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": HEADS,
            "num_hidden_layers": n_layers, "num_key_value_heads": KV_HEADS, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                    "original_max_position_embeddings": 8192,
                                                    "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
            "vocab_size": vocab}


def _bf16(x):
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even."""
    u = np.asarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


_BASE_BLOCK = None


def _base_block():
    """bf16 bit patterns of N(0, 0.02) weights, BLOCK of them (made once, vectorised)."""
    global _BASE_BLOCK
    if _BASE_BLOCK is None:
        _BASE_BLOCK = _bf16(np.random.default_rng(0).standard_normal(BLOCK, dtype=np.float32) * 0.02)
    return _BASE_BLOCK


def write_checkpoint(path, n_layers, vocab=VOCAB, seed=None, only=None):
    """A sharded bf16 checkpoint: the base (seed None), or a fine-tune of it: the base with the low 2 mantissa
    bits of each weight xor-ed with seeded random bits (tensors whose name passes `only`, default all).
    Every tensor is a BLOCK-element pattern tiled (its own rotation): written piece by piece, no big copy."""
    block = _base_block()
    flip = None if seed is None else np.random.default_rng(seed).integers(0, 4, BLOCK, dtype=np.uint16)

    def pattern(j, name, shape):
        n = int(np.prod(shape))
        if len(shape) == 1:  # RMSNorm weights: near 1
            t = _bf16(1.0 + 0.05 * np.random.default_rng(1000 + j).standard_normal(n, dtype=np.float32))
        else:
            t = np.roll(block, 7919 * j)
        if flip is not None and (only is None or only(name)):
            t = t ^ np.roll(flip, 104729 * j)[:t.size]
        return t

    return write_bf16_checkpoint(path, list(layer_shapes(n_layers, vocab)), pattern, llama_config(n_layers, vocab),
                                 SHARD_BYTES)


def n_params(n_layers, vocab=VOCAB):
    return sum(int(np.prod(s)) for _, s in layer_shapes(n_layers, vocab))


def compress(base, ft, out):
    """`deltapack compress BASE FT -o OUT --recipe sign` (its own process); returns seconds."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deltapack.cli", "compress", base, ft, "-o", out, "--recipe", "sign", "-q"],
                   check=True)
    return time.perf_counter() - t


def shard_files(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def read_all(d):
    """Read every shard once (into the page cache)."""
    for f in shard_files(d):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(256 << 20):
                pass


# ---------------------------------------------------------------------------- loaders into given buffers

def _layout(fd):
    """(data start, header dict) of an open safetensors file."""
    n = int.from_bytes(os.pread(fd, 8, 0), "little")
    header = json.loads(os.pread(fd, n, 8))
    header.pop("__metadata__", None)
    return 8 + n, header


def _pread_into(fd, mv, off):
    while len(mv):
        got = os.preadv(fd, [mv], off)
        if got <= 0:
            raise OSError(f"short read at {off}")
        mv, off = mv[got:], off + got


def tensor_bytes(ft_dir, name):
    """The stored bytes of tensor `name` in a checkpoint directory (for checks)."""
    for f in shard_files(ft_dir):
        fd = os.open(f, os.O_RDONLY)
        try:
            start, header = _layout(fd)
            if name in header:
                b, e = header[name]["data_offsets"]
                return os.pread(fd, e - b, start + b)
        finally:
            os.close(fd)
    raise KeyError(name)


def load_preadv(ft_dir, dest, threads=1):
    """Read every tensor of ft_dir's shards straight into dest[name] (a writable C-contiguous numpy array of
    its bytes): headers parsed, one preadv per tensor (threads=1) or 64 MiB pieces over a thread pool."""
    fds = [os.open(f, os.O_RDONLY) for f in shard_files(ft_dir)]
    try:
        jobs = []
        for fd in fds:
            start, header = _layout(fd)
            for name, info in header.items():
                b, e = info["data_offsets"]
                mv = memoryview(dest[name]).cast("B")
                if len(mv) != e - b:
                    raise ValueError(f"{name}: {e - b} bytes in the file, {len(mv)} in the buffer")
                if threads == 1:
                    jobs.append((fd, mv, start + b))
                else:
                    jobs += [(fd, mv[o:o + PIECE], start + b + o) for o in range(0, e - b, PIECE)]
        if threads == 1:
            for job in jobs:
                _pread_into(*job)
        else:
            with cf.ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda job: _pread_into(*job), jobs))
    finally:
        for fd in fds:
            os.close(fd)


def load_mmap(ft_dir, dest):
    """Map each shard and copy every tensor out of the mapping into dest[name] (numpy copyto, one thread)."""
    import mmap
    for f in shard_files(ft_dir):
        with open(f, "rb") as fh:
            m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
            try:
                start, header = _layout(fh.fileno())
                for name, info in header.items():
                    b, e = info["data_offsets"]
                    dst = dest[name].reshape(-1).view(np.uint8)
                    if dst.size != e - b:
                        raise ValueError(f"{name}: {e - b} bytes in the file, {dst.size} in the buffer")
                    src = np.frombuffer(m, np.uint8, e - b, start + b)
                    np.copyto(dst, src)
                    del src
            finally:
                m.close()


def load_safetensors(ft_dir, dest_t):
    """safetensors' own path: safe_open(...).get_tensor(name) copied into dest_t[name] (torch)."""
    from safetensors import safe_open
    for f in shard_files(ft_dir):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                dest_t[k].copy_(st.get_tensor(k))


def mapped_files(paths):
    """Which of `paths` this process has memory-mapped (/proc/self/maps)."""
    real = {os.path.realpath(x) for x in paths}
    with open("/proc/self/maps") as fh:
        held = {line.split(None, 5)[5].strip() for line in fh if len(line.split(None, 5)) == 6}
    return sorted(real & held)


def _stats(xs):
    return {"min_s": min(xs), "median_s": statistics.median(xs), "n": len(xs)}


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------- part 1: switch latency

def bind_module(bank, base_dir):
    """A LlamaForCausalLM built without weight init from base_dir's config.json, bound to the bank: its
    parameters are the bank's buffers. None if transformers cannot build it."""
    try:
        import torch
        import transformers
        try:
            from transformers.initialization import no_init_weights
        except ImportError:
            from transformers.modeling_utils import no_init_weights
        cfg = transformers.LlamaConfig.from_pretrained(base_dir)
        with no_init_weights():
            try:
                model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
            except TypeError:  # transformers before 4.56 calls it torch_dtype
                model = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16)
        model.tie_weights()
        bank.bind(model)
        emb = model.get_input_embeddings().weight
        assert emb.data_ptr() == bank.numpy("model.embed_tokens.weight").ctypes.data
        assert model.lm_head.weight.data_ptr() == emb.data_ptr()
        return model
    except Exception as ex:  # the benchmark does not need the module: the buffers are the same
        print(f"  (no module bound: {type(ex).__name__}: {ex})", file=sys.stderr)
        return None


def part_switch(root, n_layers, repeats, cold):
    import deltapack as dp

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    d = {x: os.path.join(root, x) for x in ("base", "A", "B", "C")}
    t0 = time.perf_counter()
    model_bytes = write_checkpoint(d["base"], n_layers)
    write_checkpoint(d["A"], n_layers, seed=1)
    write_checkpoint(d["B"], n_layers, seed=2)
    write_checkpoint(d["C"], n_layers, seed=3, only=lambda n: ".q_proj." in n or ".v_proj." in n)
    params = n_params(n_layers)
    log(f"[switch] {n_layers} layers, {params / 1e9:.3f} B params, 4 x {model_bytes / GIB:.2f} GiB written in "
        f"{time.perf_counter() - t0:.0f} s")
    deltas, t_compress = {}, {}
    for x in "ABC":
        deltas[x] = os.path.join(root, f"{x}.dpk")
        t_compress[x] = compress(d["base"], d[x], deltas[x])
        if x != "A":
            shutil.rmtree(d[x])  # only A's safetensors are loaded
    log("[switch] compress (sign): " + ", ".join(f"{x} {t_compress[x]:.1f} s {os.path.getsize(deltas[x]) / 2**20:.0f} MiB"
                                                  for x in "ABC"))
    t0 = time.perf_counter()
    bank = dp.Bank(d["base"])
    t_bank = time.perf_counter() - t0
    t0 = time.perf_counter()
    for x in "ABC":
        bank.add(x, deltas[x])
    t_add = time.perf_counter() - t0
    deltas_mapped = mapped_files(deltas.values())
    holds = "mapped" if len(deltas_mapped) == len(deltas) else "in memory" if not deltas_mapped else "partly mapped"
    model = bind_module(bank, d["base"])
    names = list(bank.state_dict())
    dest = {n: bank.numpy(n) for n in names}
    dest_t = dict(model.state_dict()) if model is not None else bank.state_dict()
    if model is not None:  # the tied lm_head is not in the file: load what the file has
        dest_t = {n: dest_t[n] for n in names}
    nbytes = lambda ns: sum(dest[n].nbytes for n in ns)  # noqa: E731
    ref = {n: dest[n].copy() for n in ("model.norm.weight", "model.layers.0.self_attn.k_proj.weight")}
    threads = os.cpu_count() or 1

    def load_fast1():
        load_preadv(d["A"], dest, 1)

    def load_fastn():
        load_preadv(d["A"], dest, threads)

    def load_mm():
        load_mmap(d["A"], dest)

    def load_st():
        load_safetensors(d["A"], dest_t)

    loaders = {"preadv_1thread": load_fast1, f"preadv_{threads}threads": load_fastn, "mmap_copyto_1thread": load_mm,
               "safetensors_get_tensor_copy": load_st}
    order = lambda rep: list(loaders)[rep % len(loaders):] + list(loaders)[:rep % len(loaders)]  # noqa: E731

    # checks: a load gives the file's bytes, activate(None) the base's, activate(A) something else
    # (a load writes behind the bank's back: the next activate rewrites all A touches, which must be everything)
    bank.activate("A")
    assert not np.array_equal(dest["model.layers.0.self_attn.k_proj.weight"], ref["model.layers.0.self_attn.k_proj.weight"])
    rewritten_a = list(bank.last_rewritten)
    assert sorted(rewritten_a) == sorted(names), set(names) - set(rewritten_a)
    bank.activate(None)
    assert all(np.array_equal(dest[k], v) for k, v in ref.items())
    load_fast1()
    for k in ref:
        assert tensor_bytes(d["A"], k) == dest[k].tobytes(), k
    bank.activate("A")
    log(f"[switch] bank: base read in {t_bank:.1f} s, 3 deltas added in {t_add:.1f} s (deltas {holds}); "
        f"module bound: {model is not None}")

    def reset():  # after a load wrote the real A behind the bank's back: its state again, with A active
        bank.activate(None)
        bank.activate("A")

    # (a) warm
    read_all(d["A"])
    for _ in range(2):  # warm-up rounds, not recorded (mapped reads speed up as the page cache forms large folios)
        for fn in loaders.values():
            fn()
    bank.activate("B")
    bank.activate("A")
    warm = {"activate": [], **{k: [] for k in loaders}}
    switch_bytes = None
    for rep in range(repeats):
        for x in "BA":  # A active before: A -> B -> A
            warm["activate"].append(_timed(lambda: bank.activate(x)))
            switch_bytes = nbytes(bank.last_rewritten)
        for k in order(rep):  # each repeat starts with another loader
            warm[k].append(_timed(loaders[k]))
        log(f"  warm {rep + 1}/{repeats}: activate {warm['activate'][-2]:.3f} / {warm['activate'][-1]:.3f} s; " +
            ", ".join(f"{k} {warm[k][-1]:.3f} s" for k in loaders))
        reset()  # not timed
    out = {"layers": n_layers, "params": params, "model_bytes": model_bytes, "threads": threads,
           "module_bound": model is not None, "deltas_held": holds,
           "cache_bytes": bank._b.cache_bytes() if hasattr(bank._b, "cache_bytes") else None,
           "delta_bytes": {x: os.path.getsize(deltas[x]) for x in "ABC"},
           "delta_bits_per_param": {x: 8 * os.path.getsize(deltas[x]) / params for x in "ABC"},
           "compress_s": t_compress, "bank_open_s": t_bank, "bank_add_3_s": t_add,
           "switch_rewritten_bytes": switch_bytes, "repeats": repeats}
    out["warm"] = {k: _stats(v) for k, v in warm.items()}
    act = out["warm"]["activate"]["median_s"]
    out["warm"]["ratio_load_over_activate"] = {k: out["warm"][k]["median_s"] / act for k in loaders}
    out["warm"]["ratio_fastest_load"] = min(out["warm"][k]["median_s"] for k in loaders) / act
    out["warm"]["ratio_fastest_load_mins"] = (min(out["warm"][k]["min_s"] for k in loaders)
                                              / out["warm"]["activate"]["min_s"])

    # (b) cold
    if cold:
        cold_t = {"activate": [], **{k: [] for k in loaders}}
        for rep in range(repeats):
            for x in "BA":
                drop_caches()
                cold_t["activate"].append(_timed(lambda: bank.activate(x)))
            for k in order(rep):
                drop_caches()
                cold_t[k].append(_timed(loaders[k]))
            log(f"  cold {rep + 1}/{repeats}: activate {cold_t['activate'][-2]:.3f} / {cold_t['activate'][-1]:.3f} s; " +
                ", ".join(f"{k} {cold_t[k][-1]:.3f} s" for k in loaders))
            reset()
        out["cold"] = {k: _stats(v) for k, v in cold_t.items()}
        act = out["cold"]["activate"]["median_s"]
        out["cold"]["ratio_load_over_activate"] = {k: out["cold"][k]["median_s"] / act for k in loaders}
        out["cold"]["ratio_fastest_load"] = min(out["cold"][k]["median_s"] for k in loaders) / act
        out["cold"]["ratio_fastest_load_mins"] = (min(out["cold"][k]["min_s"] for k in loaders)
                                                  / out["cold"]["activate"]["min_s"])

    # (c) partial delta: base -> C against base -> A; and back to the base
    part = {k: [] for k in ("base_to_A", "base_to_C", "A_to_base", "C_to_base")}
    touched = {}
    for rep in range(repeats + 1):
        for x in "AC":
            bank.activate(None)
            t = _timed(lambda: bank.activate(x))
            touched[x] = list(bank.last_rewritten)
            t2 = _timed(lambda: bank.activate(None))
            if rep:  # the first round is a warm-up
                part[f"base_to_{x}"].append(t)
                part[f"{x}_to_base"].append(t2)
    out["partial"] = {k: _stats(v) for k, v in part.items()}
    for x in "AC":
        b = nbytes(touched[x])
        s = out["partial"][f"base_to_{x}"]["median_s"]
        out["partial"][x] = {"tensors": len(touched[x]), "bytes": b, "median_s": s, "ns_per_byte": 1e9 * s / b,
                             "delta_bytes": os.path.getsize(deltas[x])}
    out["partial"]["per_byte_ratio_C_over_A"] = out["partial"]["C"]["ns_per_byte"] / out["partial"]["A"]["ns_per_byte"]
    assert sorted(touched["A"]) == sorted(rewritten_a)
    shutil.rmtree(d["A"])
    shutil.rmtree(d["base"])
    return out


# ---------------------------------------------------------------------------- part 2: memory

_LAUNCHER = ("import os, subprocess, sys, time; t = time.perf_counter(); p = subprocess.Popen(sys.argv[1:], "
             "stdout=subprocess.DEVNULL); _, st, ru = os.wait4(p.pid, 0); "
             "print(st, time.perf_counter() - t, ru.ru_maxrss)")

_CHILD = r'''
import json, os, sys, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import numpy as np, torch, safetensors.torch, deltapack as dp
from bench_serving import load_preadv, mapped_files, shard_files, _layout
what, report, args = sys.argv[2], sys.argv[3], sys.argv[4:]
t = time.perf_counter()
held, extra = [], {}
if what == "bank":
    bank = dp.Bank(args[0])
    for i, d in enumerate(args[1:]):
        bank.add(f"ft{i}", d)
    bank.activate("ft0")
    held = bank.state_dict()
    extra["deltas_mapped"] = len(mapped_files(args[1:]))
elif what == "full_anon":  # each fine-tune read into its own torch tensors (anonymous memory)
    for d in args:
        sd = {}
        for f in shard_files(d):
            fd = os.open(f, os.O_RDONLY)
            _, header = _layout(fd)
            os.close(fd)
            for k, v in header.items():
                sd[k] = torch.empty(v["shape"], dtype=torch.bfloat16)
        load_preadv(d, {k: v.view(torch.int16).numpy() for k, v in sd.items()}, os.cpu_count() or 1)
        held.append(sd)
elif what == "full_load_file":  # safetensors.torch.load_file dicts (views of the mapped files), every page read
    for d in args:
        sd = {}
        for f in shard_files(d):
            sd.update(safetensors.torch.load_file(f))
        for v in sd.values():
            v.view(-1).view(torch.int16)[::2048].sum()
        held.append(sd)
status = {}
for line in open("/proc/self/status"):
    k, _, v = line.partition(":")
    if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
        status[k] = int(v.split()[0]) * 1024
json.dump({"seconds": time.perf_counter() - t, "status": status, **extra}, open(report, "w"))
'''


def run_measured(what, args, report):
    """Run one memory case in its own process (started by a small launcher: Linux folds the spawning process's
    own peak RSS into a child's ru_maxrss at exec). Returns (wall s, peak RSS bytes, the child's report)."""
    cmd = [sys.executable, "-c", _CHILD, os.path.abspath(__file__), what, report, *args]
    r = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    status, wall, maxrss = r.stdout.split()
    if int(status) != 0:
        raise RuntimeError(f"memory case {what} failed (status {status}): {r.stderr}")
    with open(report) as fh:
        return float(wall), int(maxrss) * 1024, json.load(fh)


def part_memory(root, n_layers, vocab, n_ft):
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    base = os.path.join(root, "mbase")
    t0 = time.perf_counter()
    model_bytes = write_checkpoint(base, n_layers, vocab)
    fts, deltas, t_c = [], [], []
    for i in range(n_ft):
        fts.append(os.path.join(root, f"mft{i}"))
        write_checkpoint(fts[-1], n_layers, vocab, seed=11 + i)
        deltas.append(os.path.join(root, f"m{i}.dpk"))
        t_c.append(compress(base, fts[-1], deltas[-1]))
    params = n_params(n_layers, vocab)
    delta_bytes = sum(os.path.getsize(x) for x in deltas)
    log(f"[memory] {n_layers} layers, vocab {vocab}: {params / 1e6:.1f} M params, {model_bytes / GIB:.2f} GiB a "
        f"copy; base + {n_ft} fine-tunes and deltas ({delta_bytes / 2**20:.0f} MiB) built in "
        f"{time.perf_counter() - t0:.0f} s")
    rep = os.path.join(root, "report.json")
    cases = {"interpreter": [], "bank": [base, *deltas], "full_anon": fts, "full_load_file": fts}
    out = {"layers": n_layers, "vocab": vocab, "params": params, "model_bytes": model_bytes, "fine_tunes": n_ft,
           "delta_bytes_total": delta_bytes, "delta_bits_per_param": 8 * delta_bytes / n_ft / params,
           "compress_s_median": statistics.median(t_c), "cases": {}}
    for what, args in cases.items():
        os.sync()
        wall, peak, child = run_measured(what, args, rep)
        out["cases"][what] = {"wall_s": wall, "peak_rss_bytes": peak, "peak_bytes_per_param": peak / params,
                              "end_status": child["status"], "work_s": child["seconds"]}
        if what == "bank":
            out["deltas_held"] = "mapped" if child["deltas_mapped"] == n_ft else (
                "in memory" if child["deltas_mapped"] == 0 else "partly mapped")
        log(f"  {what}: peak RSS {peak / GIB:.2f} GiB ({peak / params:.2f} B/param), end RssAnon "
            f"{child['status'].get('RssAnon', 0) / GIB:.2f} GiB, RssFile {child['status'].get('RssFile', 0) / GIB:.2f} GiB, "
            f"{child['seconds']:.1f} s")
    c, idle = out["cases"], out["cases"]["interpreter"]["peak_rss_bytes"]
    for v in c.values():
        v["net_bytes_per_param"] = (v["peak_rss_bytes"] - idle) / params
    ideal = 4 * params + delta_bytes
    out["ideal_bytes"] = ideal
    out["ideal_bytes_per_param"] = ideal / params
    bank = c["bank"]
    # mapped deltas are page cache, not in the bank's RSS once it releases their pages: count them for it
    out["bank_footprint_bytes_per_param"] = (bank["peak_rss_bytes"] - idle
                                             + (delta_bytes if out["deltas_held"] != "in memory" else 0)) / params
    out["ratio_full_over_bank"] = {k: c[k]["peak_rss_bytes"] / bank["peak_rss_bytes"] for k in ("full_anon", "full_load_file")}
    out["ratio_full_over_bank_net"] = {k: (c[k]["peak_rss_bytes"] - idle) / (bank["peak_rss_bytes"] - idle)
                                       for k in ("full_anon", "full_load_file")}
    out["bank_over_ideal_net"] = (bank["peak_rss_bytes"] - idle) / ideal
    for x in [base, *fts]:
        shutil.rmtree(x)
    return out


# ---------------------------------------------------------------------------- report

def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = None
    try:
        with open("/proc/meminfo") as fh:
            ram = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    vers = {}
    for mod in ("numpy", "torch", "safetensors", "transformers"):
        try:
            vers[mod] = __import__(mod).__version__
        except ImportError:
            pass
    import deltapack as dp
    return {"cpu": model, "cpus": os.cpu_count(), "ram_bytes": ram, "ram_gib": round(ram / GIB, 1) if ram else None,
            "kernel": platform.release(), "python": platform.python_version(), **vers,
            "simd": dp.simd_available(), "date": time.strftime("%Y-%m-%d %H:%M")}


def markdown(res):
    m, lines = res["meta"], []
    lines.append("# The bank: switch latency and memory at Llama-3.2-1B shapes (bf16, `sign` deltas)\n")
    lines.append(f"CPU {m['cpu']}, {m['cpus']} cores, {m['ram_gib']} GiB RAM; Linux {m['kernel']}, Python "
                 f"{m['python']}, torch {m.get('torch')}, safetensors {m.get('safetensors')}; {m['date']}. "
                 f"Command: `{res['command']}`\n")
    s = res.get("switch")
    if s:
        lines.append(f"## Switch latency ({s['layers']} layers, {s['params'] / 1e9:.3f} B parameters, "
                     f"{s['model_bytes'] / GIB:.2f} GiB; `sign` deltas {s['delta_bytes']['A'] / 2**20:.0f} MiB = "
                     f"{s['delta_bits_per_param']['A']:.2f} bits/param)\n")
        lines.append(f"A switch A -> B rewrites {s['switch_rewritten_bytes'] / GIB:.2f} GiB (every tensor); a load "
                     f"writes the same {s['model_bytes'] / GIB:.2f} GiB into the same buffers (the bank's, bound to a "
                     f"LlamaForCausalLM: {s['module_bound']}). Median and min of {s['repeats']} repeats "
                     f"({2 * s['repeats']} switches); ratio = load median / activate median.\n")
        for key, title in (("warm", "(a) from the page cache"), ("cold", "(b) page cache dropped before each step")):
            if key not in s:
                continue
            w = s[key]
            lines += [f"### {title}\n", "| step | median s | min s | GB/s (median) | load / activate |", "|---|---|---|---|---|"]
            lines.append(f"| `bank.activate` (A <-> B) | {w['activate']['median_s']:.3f} | {w['activate']['min_s']:.3f} | "
                         f"{s['switch_rewritten_bytes'] / w['activate']['median_s'] / 1e9:.2f} | 1 |")
            for k, r in w["ratio_load_over_activate"].items():
                lines.append(f"| load A: {k} | {w[k]['median_s']:.3f} | {w[k]['min_s']:.3f} | "
                             f"{s['model_bytes'] / w[k]['median_s'] / 1e9:.2f} | {r:.2f}x |")
            target = "1x" if key == "warm" else "3x"
            lines.append(f"\nFastest load / activate: **{w['ratio_fastest_load']:.2f}x** of the medians (target >= "
                         f"{target}); {w['ratio_fastest_load_mins']:.2f}x of the minima.\n")
        if "cold" in s:
            how = {"mapped": "memory-mapped (a cold switch reads the delta, about 1/16 of the bytes, from storage)",
                   "in memory": "read into memory by `add` (a cold switch reads nothing from storage)"}
            lines.append("Cold switches: the bank's base and its pristine copies are anonymous memory, which dropping "
                         f"the page cache does not touch; its deltas are {how.get(s['deltas_held'], s['deltas_held'])}.\n")
        p = s["partial"]
        lines += ["### (c) a delta touching only q_proj and v_proj\n",
                  "| switch | tensors rewritten | bytes rewritten | delta MiB | median s | min s | ns / byte |",
                  "|---|---|---|---|---|---|---|"]
        for x, what in (("A", "base -> A (every tensor)"), ("C", "base -> C (q, v only)")):
            lines.append(f"| {what} | {p[x]['tensors']} | {p[x]['bytes'] / GIB:.3f} GiB | {p[x]['delta_bytes'] / 2**20:.1f} | "
                         f"{p[x]['median_s']:.4f} | {p['base_to_' + x]['min_s']:.4f} | {p[x]['ns_per_byte']:.3f} |")
        for x in "AC":
            lines.append(f"| {x} -> base (copy from the pristine base) | {p[x]['tensors']} | {p[x]['bytes'] / GIB:.3f} GiB | - | "
                         f"{p[x + '_to_base']['median_s']:.4f} | {p[x + '_to_base']['min_s']:.4f} | "
                         f"{1e9 * p[x + '_to_base']['median_s'] / p[x]['bytes']:.3f} |")
        lines.append(f"\nTime per byte, C / A: **{p['per_byte_ratio_C_over_A']:.2f}** (1 = proportional to the bytes "
                     f"touched); bytes C / A {p['C']['bytes'] / p['A']['bytes']:.3f}, time C / A "
                     f"{p['C']['median_s'] / p['A']['median_s']:.3f}.\n")
    mm = res.get("memory")
    if mm:
        c = mm["cases"]
        lines.append(f"## Memory ({mm['layers']} layers, vocab {mm['vocab']}: {mm['params'] / 1e6:.1f} M parameters, "
                     f"{mm['model_bytes'] / GIB:.2f} GiB a copy; {mm['fine_tunes']} fine-tunes, `sign` deltas "
                     f"{mm['delta_bits_per_param']:.2f} bits/param)\n")
        lines += ["| process | peak RSS GiB | bytes/param | net of interpreter, bytes/param | end RssAnon GiB | end RssFile GiB | s |",
                  "|---|---|---|---|---|---|---|"]
        what = {"interpreter": "interpreter (torch, safetensors, deltapack imported)",
                "bank": f"bank: base + {mm['fine_tunes']} deltas, one active",
                "full_anon": f"{mm['fine_tunes']} full fine-tunes read into memory",
                "full_load_file": f"{mm['fine_tunes']} safetensors load_file dicts (mapped, pages read)"}
        for k, v in c.items():
            lines.append(f"| {what[k]} | {v['peak_rss_bytes'] / GIB:.2f} | {v['peak_bytes_per_param']:.2f} | "
                         f"{v['net_bytes_per_param']:.2f} | {v['end_status'].get('RssAnon', 0) / GIB:.2f} | "
                         f"{v['end_status'].get('RssFile', 0) / GIB:.2f} | {v['work_s']:.1f} |")
        r, rn = mm["ratio_full_over_bank"], mm["ratio_full_over_bank_net"]
        lines.append(f"\nFull fine-tunes / bank (peak RSS): **{r['full_anon']:.2f}x** read into memory, "
                     f"{r['full_load_file']:.2f}x load_file (net of the interpreter: {rn['full_anon']:.2f}x, "
                     f"{rn['full_load_file']:.2f}x; target >= 3x). Ideal (base + one active copy + the delta files): "
                     f"{mm['ideal_bytes_per_param']:.2f} bytes/param; the bank, net: "
                     f"{c['bank']['net_bytes_per_param']:.2f} bytes/param = {mm['bank_over_ideal_net']:.2f}x the ideal "
                     + ("(the deltas are in its RSS: `add` reads them into memory).\n" if mm["deltas_held"] == "in memory"
                        else f"(the deltas are {mm['deltas_held']}: page cache outside its RSS; counting them: "
                             f"{mm['bank_footprint_bytes_per_param']:.2f} bytes/param).\n"))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16, help="layers for the switch-latency part")
    ap.add_argument("--mem-layers", type=int, default=4, help="layers for the memory part")
    ap.add_argument("--mem-vocab", type=int, default=VOCAB, help="embedding rows for the memory part")
    ap.add_argument("--mem-fine-tunes", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per step (median and min reported)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="scratch space (a temporary directory in it)")
    ap.add_argument("--skip-cold", action="store_true", help="no page-cache-dropped measurements")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-switch", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "serving"))
    args = ap.parse_args()
    cold = not args.skip_cold
    if cold:
        try:
            drop_caches()
        except OSError as ex:
            print(f"cannot drop the page cache ({ex}): cold measurements skipped", file=sys.stderr)
            cold = False
    res = {"meta": machine(), "command": " ".join(["python", "bench/bench_serving.py", *sys.argv[1:]])}
    root = tempfile.mkdtemp(prefix="dpk-serving-", dir=args.dir)
    t0 = time.perf_counter()
    try:
        if not args.skip_switch:
            res["switch"] = part_switch(root, args.layers, args.repeats, cold)
            res["switch"]["part_s"] = time.perf_counter() - t0
            gc.collect()  # the bank and the module bound to it (reference cycles) are freed before part 2
        if not args.skip_memory:
            t1 = time.perf_counter()
            res["memory"] = part_memory(root, args.mem_layers, args.mem_vocab, args.mem_fine_tunes)
            res["memory"]["part_s"] = time.perf_counter() - t1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["total_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    text = markdown(res)
    with open(args.out + ".md", "w") as fh:
        fh.write(text + f"\nTotal {res['total_s']:.0f} s.\n")
    print(text)


if __name__ == "__main__":
    main()
