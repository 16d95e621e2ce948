"""Integrity against hostile inputs (issue 20): a delta file, a model directory or an adapter from a stranger,
and an output path that already holds something, can do no harm beyond one clear error.

Crafted deltas have valid checksums: `craft` writes the tensors with deltapack's own writer, then sets the
metadata and base fingerprint in the manifest text (no CRC covers them, and a fixed writer refuses bad records);
`patch_manifest` writes JSON literals no writer produces, such as 1e400. Models are tiny bf16 Llamas (2 layers,
hidden 64) written with safetensors. Commands run as child processes (`python -m deltapack.cli`,
`deltapack-apply`) except in the class 7 matrix, which calls the CLI's main() in process (an exception escaping
main() is a traceback in the real CLI). A refusal must be: exit code 1 (2 for a
usage error), no traceback / bad_alloc / MemoryError, no death by signal, no hang, a message naming the offending
file (and the tensor or field), nothing new or changed on disk (every tree a test touches is snapshotted before
and after: files by hash, links by target, hidden entries included), inputs byte-identical.

1. Outputs bounded by the delta and the base
   - test_new_tensor_bomb_apply_cli[14|20]: an op "new" tensor stored as a 1-bit rank-1 `lowrank` of
     [2^k, 2^k] (a few KB); `deltapack apply` under a 1.5 GiB address-space limit must refuse it before
     allocating (peak RSS measured), naming the delta and the tensor.
   - test_new_tensor_bomb_deltapack_apply / _python_api / test_c_api_refuses_crafted_checkpoints: the same in
     deltapack-apply, checkpoint.load / apply_checkpoint / Bank.add, dp_apply_checkpoint.
   - test_resized_new_rows_bomb: the new rows of a resized embedding stored with < 1 bit per element.
   - test_load_into_without_base_checks_shapes_first[new|new_rows]: load_into(model, delta) must compare the
     stored tensor's shape with the parameter's before decoding it (traced memory; no MemoryError).
   - test_base_tensor_fanout[same|delta]: one base tensor the source of eight fine-tune tensors.
   - test_stored_tensor_feeds_one_output[...]: a resized tensor's new_rows naming another tensor's stored data.
   - test_legitimate_resized_tied_added_still_apply: the neighbours (resized vocabulary, untied embeddings of a
     tied base, an added tensor, sharded output) still rebuild, exact where stored exactly (guards over-refusal).
2. Kept files are data, never weights
   - test_kept_file_name_is_refused[...]: weight / index / shard names, hidden names, '/', '..', NUL and other
     control characters, 256-byte names: apply exits 1 naming delta and kept file, writes nothing (with the
     single-shard base, a kept `model.safetensors` must not replace the rebuilt shard); checkpoint.load refuses
     at open.
   - test_compress_keeps_only_what_apply_accepts: FT files with control characters in their names.
3. Writes that follow links or clobber
   - test_no_write_through_planted_links[...]: a symlink planted at OUT.tmp (and stale-looking
     `.OUT.deltapack-tmp-*` entries) is neither written through nor followed by any of the seven writers.
   - test_compress_refuses_outputs_inside_its_inputs, test_compress_does_not_replace_unasked,
     test_export_gguf_does_not_replace_unasked[...], test_exports_refuse_outputs_inside_their_inputs[...],
     test_import_peft_output_rules, test_calibrate_refuses_ft_shard: no output into BASE / FT / the delta / the
     adapter (equal, inside or an ancestor), no existing path replaced without --overwrite, and with it only a
     file of the command's own format.
   - test_deltapack_apply_never_replaces_its_base, test_deltapack_apply_rejects_bad_numbers[...],
     test_cli_alpha_must_be_finite[...].
4. --overwrite deletes nothing the command did not write
   - test_apply_overwrite_refuses[...]: the directory holding BASE and the delta (and thesis.tex), BASE itself,
     the delta itself, an unrelated directory, an earlier output with a subdirectory or a link, a new OUT
     inside BASE, a single-file OUT that is not safetensors, the single-file BASE itself.
   - test_apply_overwrite_does_not_follow_an_output_link (OUT a link to an earlier output elsewhere),
     test_apply_overwrite_replaces_its_own_output (positive), test_export_peft_keeps_foreign_files.
5. Secrets through symlinks
   - test_compress_does_not_store_a_linked_secret, test_apply_does_not_copy_linked_base_files,
     test_model_file_linked_outside_is_refused[shard|config.json], test_link_chain_through_blobs_is_refused,
     test_hf_cache_layout_is_followed (positive: models--x--y/snapshots/rev/f -> ../../blobs/hash).
6. A file changed under a mapping
   - test_delta_changed_under_dp_open[truncate|rewrite|views]: no SIGBUS from dp.open(...)[name] / dp.decode,
     also of components obtained before the change; a clean error naming the file (or the old bytes).
   - test_input_changed_during_a_command[...]: the delta truncated / rewritten (`cp new old`) during
     `apply` and `export gguf-lora`, a base shard truncated during `apply`: exit 1 naming it, nothing left.
7. Tracebacks instead of errors
   - test_wrong_json_types[...]: 32 structural mutations of the record, the metadata (budget) and the base
     fingerprint (wrong types, ranges, 1e400): dp.open, checkpoint.describe, checkpoint.load_into, Bank.add,
     and `info`, `info --json`, `apply`, `verify` must each give a FormatError / exit 1 naming file and field.
   - test_export_with_a_hostile_config[...]: config.json without num_attention_heads (and zero / string / non-
     dividing values) for `export gguf` and `gguf-lora`: exit 1 naming config.json and the field.
   - test_export_peft_with_hostile_peft_metadata[...]: metadata["peft"] (written by import peft) of wrong types
     or a zero scaling: a clean error, or an adapter of finite weights and numeric r / lora_alpha.
   - test_compress_metadata_cannot_shadow_deltapacks_own: `compress --metadata budget=1`.
   - test_fifo_is_refused_not_waited_on[...]: a FIFO as config.json or as the delta: an error, not a hang.
C API (ctypes on libdeltapack.so): test_c_api_refuses_crafted_checkpoints: dp_apply_checkpoint on the bomb, a
kept pytorch_model.bin, alpha NaN, `files: 5`, OUT = BASE and OUT = BASE's parent with overwrite;
dp_file_open / dp_checkpoint_open on `files: 5`.

Environment: DELTAPACK_LIBDELTAPACK=path/to/libdeltapack.so makes the C API test use that library instead of
the session's CMake build (tests/test_kernels_native.native_build).
"""
import copy
import ctypes
import glob
import hashlib
import json
import math
import mmap
import os
import re
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import run_child, write_model_dir

import deltapack as dp
from deltapack import _core
from deltapack import checkpoint as ck

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "deltapack.cli"]
# One BLAS thread and two malloc arenas in the children: steadier timings, and a small address space suffices.
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2",
           PYTHONDONTWRITEBYTECODE="1")
AS_LIMIT = 3 << 29      # 1.5 GiB of address space for children that meet a decompression bomb
BOMB_RSS_MIB = 400      # what such a child may reach (a legitimate apply of these models peaks at ~40 MiB)
RECIPE = "*.q_proj.*=sign;*=lowrank:rank=4"
EMBED, HEAD, EXTRA = "model.embed_tokens.weight", "lm_head.weight", "model.extra.weight"
T = "model.layers.0.mlp.up_proj.weight"     # a lowrank delta in d.dpk
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


# ----------------------------------------------------------------------------- running things

@dataclass
class Result:
    rc: object          # exit code; negative: killed by that signal; None: killed after the timeout (a hang)
    out: str
    err: str
    maxrss_mib: float   # this child's peak RSS (wait4)


def run(cmd, timeout=120, limit_as=None, cwd=None):
    """Run a command in a child (stdin closed), measuring its own peak RSS; optional RLIMIT_AS."""
    def pre():
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    rc, out, err, rss, _ = run_child(cmd, timeout=timeout, env=ENV, cwd=cwd, limits=pre)
    return Result(rc, out, err, rss)


def cli(*args, **kw):
    return run(CLI + list(args), **kw)


def _apply_bin():
    cands = [os.path.join(os.path.dirname(_core.__file__), "bin", "deltapack-apply"),
             os.path.join(os.path.dirname(dp.__file__), "bin", "deltapack-apply")]
    cands += sorted(glob.glob(os.path.join(ROOT, "build", "*", "deltapack-apply")))
    return next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)


APPLY_BIN = _apply_bin()
needs_apply_bin = pytest.mark.skipif(APPLY_BIN is None, reason="deltapack-apply is not built (DELTAPACK_EXAMPLES)")

_BAD_OUTPUT = ("Traceback", "bad_alloc", "MemoryError", "Segmentation fault", "core dumped")


def _last(text, n=1500):
    return text[-n:]


def _message(err):
    """stderr without Python warnings (whose echoed source line may hold any word) and without deltapack's
    progress notes ('deltapack: ...'): the error message itself."""
    keep, skip_next = [], False
    for line in err.splitlines():
        if skip_next:
            skip_next = False
            continue
        if re.search(r"\.py:\d+: \w*Warning", line):
            skip_next = True
            continue
        if not line.startswith("deltapack: "):
            keep.append(line)
    return "\n".join(keep)


def _bare(msg):
    """The message with the directories of its paths removed (they hold the test's name, e.g. 'shape' or
    'hostile'); file names stay."""
    return re.sub(r"(?:/[^\s/'\"]*)+/", "", msg)


def names(msg, needle):
    """Whether the message names `needle`: a path as written, anything else outside the paths' directories."""
    return needle in (msg if "/" in needle else _bare(msg))


def clean_error(r, *needles, codes=(1,), forbid=()):
    """A refusal as a user should see it: exit code in `codes`, no traceback, each needle (or one of a tuple of
    alternatives) in the message, none of `forbid`."""
    assert r.rc is not None, f"no answer within the timeout (a hang); stderr: {_last(r.err)}"
    assert r.rc >= 0, f"killed by signal {signal.Signals(-r.rc).name}; stderr: {_last(r.err)}"
    assert r.rc in codes, f"exit code {r.rc}, expected {codes}; stderr: {_last(r.err)}"
    for bad in _BAD_OUTPUT:
        assert bad not in r.err, f"{bad!r} in stderr: {_last(r.err)}"
    msg = _message(r.err)
    for n in needles:
        alts = n if isinstance(n, tuple) else (n,)
        assert any(names(msg, str(a)) for a in alts), f"the message does not name {alts}: {_last(r.err)}"
    for f in forbid:
        assert f not in _bare(msg), f"{f!r} in the message: {_last(r.err)}"


def ok(r):
    assert r.rc == 0, f"exit code {r.rc}; stderr: {_last(r.err)}"


def main_rc(capsys, *args):
    """The CLI's main() in this process: (exit code, or 'raised X: ...' when an exception escapes, stderr)."""
    from deltapack.cli import main
    old = signal.getsignal(signal.SIGTERM)   # apply / compress install their own handler
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as ex:
        rc = ex.code
    except Exception as ex:  # noqa: BLE001 - an escape is the finding
        rc = f"raised {type(ex).__name__}: {ex}"
    finally:
        signal.signal(signal.SIGTERM, old)
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- what is on disk

def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(*roots):
    """Every entry under the roots (not following links): files by hash, links by target, directories."""
    out = {}
    for root in map(str, roots):
        for d, dirs, files in os.walk(root):
            for n in dirs + files:
                p = os.path.join(d, n)
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    out[p] = ("link", os.readlink(p))
                elif stat.S_ISREG(st.st_mode):
                    out[p] = ("file", _sha(p))
                elif stat.S_ISDIR(st.st_mode):
                    out[p] = ("dir",)
                else:
                    out[p] = ("special", stat.S_IFMT(st.st_mode))
    return out


def changes(before, after, allow=()):
    """Entries created, changed or removed, except at or under the `allow` paths."""
    allow = [os.fspath(a) for a in allow]
    return [(p, before.get(p), after.get(p)) for p in sorted(set(before) | set(after))
            if before.get(p) != after.get(p) and not any(p == a or p.startswith(a + os.sep) for a in allow)]


def assert_nothing_changed(before, *roots, allow=()):
    diff = changes(before, snapshot(*roots), allow)
    assert not diff, f"changed on disk: {diff[:6]}"


# ----------------------------------------------------------------------------- models

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "max_position_embeddings": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
          "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
          "eos_token_id": 2}


def _shapes(vocab=96, tied=False):
    c = CONFIG
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    s = {EMBED: (vocab, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        s.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                  p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                  p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                  p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                  p + "post_attention_layernorm.weight": (h,)})
    s["model.norm.weight"] = (h,)
    if not tied:
        s[HEAD] = (vocab, h)
    return s


def _randn(shape, g, scale):
    return torch.randn(shape, generator=g) * scale


def _weights(seed, tied=False):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.ones(sh) if len(sh) == 1 else _randn(sh, g, 0.02)).to(torch.bfloat16)
            for n, sh in _shapes(tied=tied).items()}


def _perturbed(w, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + _randn(t.shape, g, 2e-3)).to(torch.bfloat16) for n, t in w.items()}


def write_model(path, tensors, config=CONFIG, shards=2):
    write_model_dir(path, tensors, config, shards)


@pytest.fixture(scope="module")
def M(tmp_path_factory):
    """The models and deltas every test reads (never written to: tests copy what they change).
    base/ft: 2 shards; base1/ft1: one model.safetensors; base.safetensors: a single file; d.dpk: sign + lowrank;
    rft: vocabulary 96 -> 104 (embed and lm_head resized) plus an added tensor, r.dpk; tbase: tied embeddings,
    tft an untied fine-tune of it, t.dpk (lm_head rebuilt from the base's embed_tokens); plain.dpk: a plain
    delta over base.safetensors; adapter: a PEFT adapter exported from d.dpk."""
    root = tmp_path_factory.mktemp("integrity-models")
    base = _weights(0)
    ft = _perturbed(base, 1)
    write_model(root / "base", base)
    write_model(root / "ft", ft)
    write_model(root / "base1", base, shards=1)
    write_model(root / "ft1", ft, shards=1)
    shutil.copy(root / "base1" / "model.safetensors", root / "base.safetensors")
    ck.compress(root / "base", root / "ft", root / "d.dpk", RECIPE, quiet=True)
    ck.compress(root / "base1", root / "ft1", root / "d1.dpk", "sign", quiet=True)
    g = torch.Generator().manual_seed(5)
    rft = _perturbed(base, 2)
    for n in (EMBED, HEAD):
        rft[n] = torch.cat([rft[n], _randn((8, 64), g, 0.02).to(torch.bfloat16)])
    rft[EXTRA] = _randn((8, 64), g, 0.02).to(torch.bfloat16)
    write_model(root / "rft", rft, {**CONFIG, "vocab_size": 104})
    ck.compress(root / "base", root / "rft", root / "r.dpk", "sign", quiet=True)
    tbase = _weights(0, tied=True)
    write_model(root / "tbase", tbase, {**CONFIG, "tie_word_embeddings": True})
    tft = _perturbed(tbase, 3)
    tft[HEAD] = (tbase[EMBED].float() + _randn((96, 64), g, 2e-3)).to(torch.bfloat16)
    write_model(root / "tft", tft)
    ck.compress(root / "tbase", root / "tft", root / "t.dpk", "sign", quiet=True)
    rng = np.random.default_rng(0)
    dp.save(root / "plain.dpk", {T: dp.encode((rng.standard_normal((96, 64)) * 1e-3).astype(np.float32), "sign")})
    from deltapack.export import peft as export_peft
    export_peft.export_peft(str(root / "base"), str(root / "d.dpk"), str(root / "adapter"))
    rec = ck.checkpoint_record(root / "r.dpk")
    assert rec["tensors"][EMBED]["op"] == "resized" and rec["tensors"][EXTRA]["op"] == "new"
    assert ck.checkpoint_record(root / "t.dpk")["tensors"][HEAD].get("source") == EMBED
    assert dp.open(root / "d.dpk")[T].codec == "lowrank"
    ns = types.SimpleNamespace(root=root, base_sd=base, ft_sd=ft, rft_sd=rft, tft_sd=tft)
    for name in ("base", "ft", "base1", "ft1", "rft", "tbase", "tft", "adapter"):
        setattr(ns, name, root / name)
    for name in ("d", "d1", "r", "t", "plain"):
        setattr(ns, name, root / f"{name}.dpk")
    ns.base_st = root / "base.safetensors"
    return ns


def copytree(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def module_of(tensors):
    """A torch module whose parameters have these names and values (what load_into needs)."""
    root = torch.nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if p not in m._modules:
                m.add_module(p, torch.nn.Module())
            m = m._modules[p]
        m.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    return root


def r_module(M):
    """A module of r.dpk's fine-tune shapes holding the base's values where the base has them."""
    sd = {n: M.base_sd[n] if n in M.base_sd and M.base_sd[n].shape == t.shape else t for n, t in M.rft_sd.items()}
    for n in (EMBED, HEAD):
        sd[n] = torch.cat([M.base_sd[n], M.rft_sd[n][96:]])
    return module_of(sd)


# ----------------------------------------------------------------------------- crafting deltas

def craft(src, dst, record=None, meta=None, base=None, drop=(), add=None):
    """A copy of delta `src` at `dst` with valid checksums: record(rec) edits metadata["checkpoint"] in place,
    meta(metadata) the metadata, base(fp) the base fingerprint (each may return a replacement value); `drop`
    leaves stored tensors out, `add` stores more ({name: Encoded}). The tensors are written by deltapack's own
    writer with no metadata (a fixed writer refuses to write a bad record); the metadata and base are then set
    in the manifest text, which no CRC covers."""
    f = dp.open(src)
    md, fp = copy.deepcopy(f.manifest.get("metadata")), copy.deepcopy(f.manifest.get("base"))
    if record is not None:
        new = record(md["checkpoint"])
        if new is not None:
            md["checkpoint"] = new
    if meta is not None:
        md = meta(md) or md
    if base is not None:
        new = base(fp)
        fp = fp if new is None else new
    w = _core.DeltaWriter(str(dst))
    for name in f.keys():
        if name not in drop:
            w.add(f.get(name)._core(name))
    for name, enc in (add or {}).items():
        w.add(enc._core(name))
    raw, n, hdr = _header(src)
    if "__files__" in hdr:  # the kept files' bytes, at the same places
        b, e = hdr["__files__"]["data_offsets"]
        w.add_file(raw[8 + n + b:8 + n + e])
    w.close("{}", True)
    return set_manifest(dst, md, fp)


def _header(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, n, json.loads(raw[8:8 + n])


def _with_manifest(path, fn):
    """Rewrite the manifest text of a delta file: fn(text) -> new text. The data section is kept as it is."""
    raw, n, hdr = _header(path)
    hdr["__metadata__"]["deltapack"] = fn(hdr["__metadata__"]["deltapack"])
    blob = json.dumps(hdr, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section stays 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return path


def set_manifest(path, metadata, base):
    """Set the manifest's metadata and base (None: absent); the tensors' entries keep their exact text (their CRC
    covers it)."""
    def fn(text):
        i = text.index(',"tensors":')
        head = {k: v for k, v in json.loads(text[:i] + "}").items() if k not in ("metadata", "base")}
        head.update({k: v for k, v in (("metadata", metadata), ("base", base)) if v is not None})
        return json.dumps(head, separators=(",", ":"), allow_nan=False)[:-1] + text[i:]
    return _with_manifest(path, fn)


def patch_manifest(path, old, new):
    """Replace text in the manifest (JSON a writer refuses, e.g. 1e400)."""
    def fn(text):
        assert old in text, old
        return text.replace(old, new, 1)
    return _with_manifest(path, fn)


def lowrank_bomb(rows, cols, seed=0):
    """A valid rank-1 `lowrank` delta of [rows, cols] with 1-bit quantized factors: (rows + cols) / 8 bytes of
    codes for rows * cols elements."""
    rng = np.random.default_rng(seed)
    group = 64
    comps = {"s": np.array([1e-3], np.float32),
             "codes": rng.integers(0, 256, (rows + 7) // 8 + (cols + 7) // 8, dtype=np.uint8),
             "scales": np.ones((1, -(-rows // group) - (-cols // group)), np.float16)}
    enc = dp.Encoded("lowrank", {"rank": 1, "bits": "1", "bands": "1", "group": group}, (rows, cols), "f32", comps)
    _core.validate(enc._core("bomb"))
    return enc


def with_new_tensor(M, dst, log2):
    """d.dpk plus an added tensor (op "new", bf16 [2^log2, 2^log2]) stored as a lowrank bomb."""
    n = 1 << log2

    def rec(r):
        r["tensors"][EXTRA] = {"dtype": "BF16", "shape": [n, n], "op": "new"}
    return craft(M.d, dst, record=rec, add={EXTRA: lowrank_bomb(n, n)})


def sign_delta(shape, seed=0):
    rng = np.random.default_rng(seed)
    return dp.encode((rng.standard_normal(shape) * 1e-3).astype(np.float32), "sign")


# ============================================================================= 1. outputs bounded

@pytest.mark.parametrize("log2", [14, 20])
def test_new_tensor_bomb_apply_cli(M, tmp_path, log2):
    """7 KB (2^14) / 265 KB (2^20) of codes describing 512 MiB / 2 TiB of output: refused before any allocation."""
    bomb = with_new_tensor(M, tmp_path / "bomb.dpk", log2)
    assert os.path.getsize(bomb) - os.path.getsize(M.d) < 2 * 4 ** log2 // 1000  # < 1/1000 of what it describes
    before = snapshot(M.root, tmp_path)
    r = cli("apply", M.base, bomb, "-o", tmp_path / "out", "-q", limit_as=AS_LIMIT)
    clean_error(r, "bomb.dpk", EXTRA)
    assert r.maxrss_mib < BOMB_RSS_MIB, f"peak RSS {r.maxrss_mib:.0f} MiB"
    assert_nothing_changed(before, M.root, tmp_path)


@needs_apply_bin
def test_new_tensor_bomb_deltapack_apply(M, tmp_path):
    bomb = with_new_tensor(M, tmp_path / "bomb.dpk", 20)
    before = snapshot(M.root, tmp_path)
    r = run([APPLY_BIN, M.base, bomb, tmp_path / "out"], limit_as=AS_LIMIT)
    clean_error(r, "bomb.dpk", EXTRA)
    assert r.maxrss_mib < BOMB_RSS_MIB
    assert_nothing_changed(before, M.root, tmp_path)


def test_new_tensor_bomb_python_api(M, tmp_path):
    """A typed error naming file and tensor, never MemoryError (not a ValueError), from every reader."""
    bomb = with_new_tensor(M, tmp_path / "bomb.dpk", 20)
    before = snapshot(M.root, tmp_path)
    for what, call in [("checkpoint.load", lambda: ck.load(M.base, bomb)),
                       ("checkpoint.apply_checkpoint", lambda: ck.apply_checkpoint(M.base, bomb, tmp_path / "out")),
                       ("Bank.add", lambda: dp.Bank(M.base).add("b", bomb))]:
        with pytest.raises(ValueError) as ei:
            call()
        assert names(str(ei.value), "bomb.dpk") and names(str(ei.value), EXTRA), (what, str(ei.value))
    assert_nothing_changed(before, M.root, tmp_path)


def test_resized_new_rows_bomb(M, tmp_path):
    """A resized embedding growing by 2^18 rows, its new rows a 1-bit rank-1 lowrank (0.016 bits per element)."""
    rows = 1 << 18

    def rec(r):
        r["tensors"][EMBED]["shape"] = [96 + rows, 64]
    bomb = craft(M.r, tmp_path / "rows.dpk", record=rec, drop=(EMBED + "#new_rows",),
                 add={EMBED + "#new_rows": lowrank_bomb(rows, 64)})
    before = snapshot(M.root, tmp_path)
    r = cli("apply", M.base, bomb, "-o", tmp_path / "out", "-q", limit_as=AS_LIMIT)
    clean_error(r, "rows.dpk", (EMBED, "new_rows"))
    assert_nothing_changed(before, M.root, tmp_path)


@pytest.mark.parametrize("how", ["new", "new_rows"])
def test_load_into_without_base_checks_shapes_first(M, tmp_path, how):
    """The record says the parameter's shape; the stored tensor is a lowrank of another, huge shape. load_into
    without base= must compare before decoding: a ValueError naming the tensor, no MemoryError, no GiB."""
    def bad(log2):
        n = 1 << log2
        if how == "new":
            def rec(r):
                r["tensors"]["model.norm.weight"] = {"dtype": "BF16", "shape": [64], "op": "new"}
            return craft(M.d, tmp_path / f"li{log2}.dpk", record=rec, drop=("model.norm.weight",),
                         add={"model.norm.weight": lowrank_bomb(n, n)}), "model.norm.weight"
        return craft(M.r, tmp_path / f"li{log2}.dpk", drop=(EMBED + "#new_rows",),
                     add={EMBED + "#new_rows": lowrank_bomb(n, n)}), EMBED

    def module():
        if how == "new":
            return module_of({"model.norm.weight": M.base_sd["model.norm.weight"]})
        return module_of({EMBED: torch.cat([M.base_sd[EMBED], M.rft_sd[EMBED][96:]])})

    path, name = bad(20)  # 4 TiB of f32 if decoded
    with pytest.raises(ValueError) as ei:
        ck.load_into(module(), path, strict=False)
    assert names(str(ei.value), name), str(ei.value)
    path, name = bad(12)  # 64 MiB of f32 if decoded: measured
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            ck.load_into(module(), path, strict=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"load_into allocated {peak >> 20} MiB before refusing a small parameter's delta"


@pytest.mark.parametrize("op", ["same", "delta"])
def test_base_tensor_fanout(M, tmp_path, op):
    """Eight fine-tune tensors all rebuilt from base embed_tokens (more than itself and one tied twin)."""
    names = [f"model.copy.{i}.weight" for i in range(8)]

    def rec(r):
        for n in names:
            r["tensors"][n] = {"dtype": "BF16", "shape": [96, 64], "op": op, "source": EMBED}
    add = {n: sign_delta((96, 64), i) for i, n in enumerate(names)} if op == "delta" else None
    bad = craft(M.d, tmp_path / "fan.dpk", record=rec, add=add)
    before = snapshot(M.root, tmp_path)
    r = cli("apply", M.base, bad, "-o", tmp_path / "out", "-q")
    clean_error(r, "fan.dpk", (EMBED, *names))
    assert_nothing_changed(before, M.root, tmp_path)
    with pytest.raises(ValueError, match="fan.dpk"):
        ck.load(M.base, bad)


@pytest.mark.parametrize("target", ["embed-new-rows", "added-tensor"])
def test_stored_tensor_feeds_one_output(M, tmp_path, target):
    """lm_head's new rows point at embed_tokens' new rows / at the added tensor's data: one stored tensor used
    twice (with thousands of record entries, a small delta writes gigabytes)."""
    shared = EMBED + "#new_rows" if target == "embed-new-rows" else EXTRA

    def rec(r):
        r["tensors"][HEAD]["new_rows"] = shared
    bad = craft(M.r, tmp_path / "shared.dpk", record=rec, drop=(HEAD + "#new_rows",))
    before = snapshot(M.root, tmp_path)
    r = cli("apply", M.base, bad, "-o", tmp_path / "out", "-q")
    clean_error(r, "shared.dpk", (shared, HEAD))
    assert_nothing_changed(before, M.root, tmp_path)


def _read_dir(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_legitimate_resized_tied_added_still_apply(M, tmp_path):
    """What the bounds must not refuse: a resized vocabulary (new rows), an added tensor, lm_head rebuilt from a
    tied base's embed_tokens; sharded like the base; deltapack-apply writes the same bytes."""
    for base, delta, ft, tag in ((M.base, M.r, M.rft_sd, "r"), (M.tbase, M.t, M.tft_sd, "t")):
        out = tmp_path / f"out-{tag}"
        ok(cli("apply", base, delta, "-o", out, "-q"))
        got = _read_dir(out)
        assert {n: tuple(t.shape) for n, t in got.items()} == {n: tuple(t.shape) for n, t in ft.items()}
        assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == [SHARD1, SHARD2]
        if tag == "r":  # stored exactly
            assert torch.equal(got[EXTRA], ft[EXTRA])
            for n in (EMBED, HEAD):
                assert torch.equal(got[n][96:], ft[n][96:])
        if APPLY_BIN:
            ok(run([APPLY_BIN, base, delta, tmp_path / f"bin-{tag}"]))
            assert snapshot(out) == {p.replace(f"bin-{tag}", f"out-{tag}"): v
                                     for p, v in snapshot(tmp_path / f"bin-{tag}").items()}


# ============================================================================= 2. kept files

KEPT_NAMES = {
    "model.safetensors": "model.safetensors",  # the single-shard base's own shard name
    "shard-name": SHARD1,
    "other-safetensors": "adapter_model.safetensors",
    "index": "model.safetensors.index.json",
    "pytorch_model.bin": "pytorch_model.bin",
    "pt": "optimizer.pt",
    "pth": "weights.pth",
    "ckpt": "last.ckpt",
    "gguf": "model.gguf",
    "hidden": ".env",
    "slash": "sub/evil.json",
    "dotdot": "..",
    "nul": "evil\x00.json",
    "control": "evil\x1b[2J.json",
    "newline": "evil\n.json",
    "long-256": "e" * 256,
}


@pytest.mark.parametrize("case", list(KEPT_NAMES))
def test_kept_file_name_is_refused(M, tmp_path, case):
    name = KEPT_NAMES[case]
    base, src = (M.base1, M.d1) if case == "model.safetensors" else (M.base, M.d)

    def rec(r):
        r["files"][name] = {"text": "PWNED: not a weight file"}
    bad = craft(src, tmp_path / "kept.dpk", record=rec)
    before = snapshot(M.root, tmp_path)
    r = cli("apply", base, bad, "-o", tmp_path / "out", "-q")
    visible = re.match(r"[ -~]*", name).group()[:40]  # up to the first control character
    clean_error(r, "kept.dpk", (visible, "kept file") if visible not in ("", "..") else ("kept file", "files"))
    assert_nothing_changed(before, M.root, tmp_path)
    with pytest.raises(dp.FormatError, match="kept.dpk"):  # at open, before any output work
        ck.load(base, bad)


def test_compress_keeps_only_what_apply_accepts(M, tmp_path):
    """Compress must not store a kept file that apply would refuse (or must refuse the FT naming it)."""
    ft = copytree(M.ft, tmp_path / "ft")
    (ft / "notes\x01.txt").write_text("a control character in the name")
    (ft / "tokenizer.model").write_bytes(bytes(range(256)))  # legitimate binary data: kept as bytes
    r = cli("compress", M.base, ft, "-o", tmp_path / "d.dpk", "-q")
    if r.rc != 0:
        clean_error(r, "notes")
        return
    kept = ck.checkpoint_record(tmp_path / "d.dpk")["files"]
    assert "tokenizer.model" in kept
    bad = [n for n in kept if not n.isprintable()]
    assert not bad, f"compress kept {bad}"
    ok(cli("apply", M.base, tmp_path / "d.dpk", "-o", tmp_path / "out", "-q"))
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == bytes(range(256))


# ============================================================================= 3. writes that follow links or clobber

@pytest.mark.parametrize("what", ["compress", "apply-file", "apply-dir", "export-gguf", "export-gguf-lora",
                                  "export-peft", "import-peft"])
def test_no_write_through_planted_links(M, tmp_path, what):
    """A symlink at OUT.tmp (the old fixed temporary name) and stale-looking `.OUT.deltapack-tmp-<pid>-*` entries
    (what the writers clean up) pointing at the user's files: nothing behind them is written, replaced or removed.
    The command itself is legitimate: it succeeds (or refuses with a clean error)."""
    if what.startswith("export-gguf"):
        pytest.importorskip("gguf")
    home = tmp_path / "home"
    home.mkdir()
    (home / "victim.txt").write_text("precious")
    (home / "dir").mkdir()
    (home / "dir" / "thesis.tex").write_text("chapter 1")
    work = tmp_path / "work"
    work.mkdir()
    leaf = {"compress": "o.dpk", "apply-file": "o.safetensors", "apply-dir": "o", "export-gguf": "o.gguf",
            "export-gguf-lora": "o.gguf", "export-peft": "o", "import-peft": "o.dpk"}[what]
    out = work / leaf
    os.symlink(home / "victim.txt", str(out) + ".tmp")
    os.symlink(home / "dir", work / f".{leaf}.deltapack-tmp-999998-deadbeef")
    stale = work / f".{leaf}.deltapack-tmp-999999-deadbeef"
    stale.mkdir()
    os.symlink(home / "dir" / "thesis.tex", stale / "thesis.tex")
    args = {"compress": ["compress", M.base, M.ft, "-o", out, "-q"],
            "apply-file": ["apply", M.base_st, M.d1, "-o", out, "-q"],
            "apply-dir": ["apply", M.base, M.d, "-o", out, "-q"],
            "export-gguf": ["export", "gguf", M.base, M.d, "-o", out],
            "export-gguf-lora": ["export", "gguf-lora", M.base, M.d, "-o", out],
            "export-peft": ["export", "peft", M.base, M.d, "-o", out],
            "import-peft": ["import", "peft", M.base, M.adapter, "-o", out]}[what]
    before = snapshot(M.root, home)
    r = cli(*args)
    if r.rc != 0:
        clean_error(r, leaf)
    assert (home / "victim.txt").read_bytes() == b"precious", "written through the planted link"
    assert (home / "dir" / "thesis.tex").read_bytes() == b"chapter 1", "written through the planted link"
    assert_nothing_changed(before, M.root, home)
    if r.rc == 0:
        assert not os.path.islink(out), "the output is the planted link"
        assert os.path.islink(str(out) + ".tmp"), "the planted link was renamed or removed"


def test_compress_refuses_outputs_inside_its_inputs(M, tmp_path):
    """`compress BASE FT -o FT/<shard>` swapped the fine-tune's weights for a delta; a new file inside BASE or FT
    is refused too (with or without --overwrite)."""
    base, ft = copytree(M.base, tmp_path / "base"), copytree(M.ft, tmp_path / "ft")
    before = snapshot(tmp_path)
    for out, extra in [(ft / SHARD1, []), (ft / "new.dpk", []), (base / "new.dpk", []),
                       (ft / SHARD1, ["--overwrite"]), (base / SHARD2, ["--overwrite"])]:
        r = cli("compress", base, ft, "-o", out, "-q", *extra)
        clean_error(r, out.name)
        assert_nothing_changed(before, tmp_path)


def test_compress_does_not_replace_unasked(M, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    old = tmp_path / "old.dpk"
    shutil.copy(M.d1, old)
    before = snapshot(M.root, tmp_path)
    for out, extra in [(notes, []), (old, []), (notes, ["--overwrite"])]:
        r = cli("compress", M.base, M.ft, "-o", out, "-q", *extra)
        clean_error(r, out.name)
        assert_nothing_changed(before, M.root, tmp_path)
    ok(cli("compress", M.base, M.ft, "-o", old, "-q", "--overwrite"))  # an earlier delta: replaced when asked
    assert set(ck.checkpoint_record(old)["tensors"]) == set(M.ft_sd)


@pytest.mark.parametrize("kind", ["gguf", "gguf-lora"])
def test_export_gguf_does_not_replace_unasked(M, tmp_path, kind):
    pytest.importorskip("gguf")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    before = snapshot(M.root, tmp_path)
    for extra in ([], ["--overwrite"]):
        clean_error(cli("export", kind, M.base, M.d, "-o", notes, *extra), "notes.txt")
        assert_nothing_changed(before, M.root, tmp_path)
    out = tmp_path / "a.gguf"
    ok(cli("export", kind, M.base, M.d, "-o", out))
    before = snapshot(M.root, tmp_path)
    clean_error(cli("export", kind, M.base, M.d, "-o", out), "a.gguf")
    assert_nothing_changed(before, M.root, tmp_path)
    ok(cli("export", kind, M.base, M.d, "-o", out, "--overwrite"))
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("kind,where", [("gguf", "inside-base"), ("gguf-lora", "the-delta"), ("peft", "inside-base"),
                                        ("peft", "holds-the-delta")])
def test_exports_refuse_outputs_inside_their_inputs(M, tmp_path, kind, where):
    if kind.startswith("gguf"):
        pytest.importorskip("gguf")
    base, delta = copytree(M.base, tmp_path / "base"), tmp_path / "in" / "d.dpk"
    delta.parent.mkdir()
    shutil.copy(M.d, delta)
    out = {"inside-base": base / "export", "the-delta": delta, "holds-the-delta": delta.parent}[where]
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]) if out.exists() else ([],):
        clean_error(cli("export", kind, base, delta, "-o", out, *extra), str(out))
        assert_nothing_changed(before, tmp_path)


def test_import_peft_output_rules(M, tmp_path):
    """import peft -o: not into the adapter or BASE, not over an existing file unasked."""
    ad, base = copytree(M.adapter, tmp_path / "ad"), copytree(M.base, tmp_path / "base")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    before = snapshot(tmp_path)
    for out, extra in [(ad / "x.dpk", []), (notes, []), (ad / "adapter_model.safetensors", ["--overwrite"]),
                       (base / SHARD1, ["--overwrite"])]:
        clean_error(cli("import", "peft", base, ad, "-o", out, *extra), out.name)
        assert_nothing_changed(before, tmp_path)


def test_calibrate_refuses_ft_shard(M, tmp_path):
    """`calibrate ... -o FT/<shard>` replaced the fine-tune's weights with a delta (after minutes of work on a
    real model): refused, before the work."""
    pytest.importorskip("transformers")
    ft = copytree(M.ft, tmp_path / "ft")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [3 + (7 * i + j) % 90 for j in range(12)]}) + "\n"
                            for i in range(4)))
    before = snapshot(M.root, tmp_path)
    r = cli("calibrate", M.base, ft, M.d, "--data", data, "-o", ft / SHARD1)
    clean_error(r, SHARD1)
    assert_nothing_changed(before, M.root, tmp_path)


@needs_apply_bin
def test_deltapack_apply_never_replaces_its_base(M, tmp_path):
    base = tmp_path / "base.safetensors"
    shutil.copy(M.base_st, base)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    bdir = copytree(M.base, tmp_path / "bdir")
    before = snapshot(M.root, tmp_path)
    for args in ([base, M.plain, base], [base, M.plain, base, "--overwrite"], [base, M.plain, notes],
                 [base, M.plain, notes, "--overwrite"], [bdir, M.d, bdir, "--overwrite"],
                 [bdir, M.d, tmp_path, "--overwrite"]):
        r = run([APPLY_BIN, *args])
        clean_error(r, str(args[2]))
        assert_nothing_changed(before, M.root, tmp_path)


@needs_apply_bin
@pytest.mark.parametrize("flag,value", [("--alpha", "garbage"), ("--alpha", "nan"), ("--alpha", "inf"),
                                        ("--alpha", "-inf"), ("--alpha", "1.5x"), ("--alpha", ""),
                                        ("--threads", "many")])
def test_deltapack_apply_rejects_bad_numbers(M, tmp_path, flag, value):
    before = snapshot(M.root, tmp_path)
    r = run([APPLY_BIN, M.base, M.d, tmp_path / "out", flag, value])  # the next argument is the value
    clean_error(r, flag.lstrip("-"), codes=(1, 2), forbid=("hostile", "damaged"))
    assert_nothing_changed(before, M.root, tmp_path)


@pytest.mark.parametrize("cmd,value", [("apply", "nan"), ("apply", "inf"), ("apply", "-inf"),
                                       ("gguf-lora", "nan"), ("peft", "inf")])
def test_cli_alpha_must_be_finite(M, tmp_path, cmd, value):
    """--alpha nan is the user's mistake: a usage error or an error about alpha, not 'a damaged or hostile delta'."""
    if cmd == "gguf-lora":
        pytest.importorskip("gguf")
    args = {"apply": ["apply", M.base, M.d, "-o", tmp_path / "out", "-q"],
            "gguf-lora": ["export", "gguf-lora", M.base, M.d, "-o", tmp_path / "out"],
            "peft": ["export", "peft", M.base, M.d, "-o", tmp_path / "out"]}[cmd]
    before = snapshot(M.root, tmp_path)
    r = cli(*args, f"--alpha={value}")  # (argparse reads '--alpha -inf' as two options)
    clean_error(r, "alpha", codes=(1, 2), forbid=("hostile", "damaged"))
    assert_nothing_changed(before, M.root, tmp_path)


# ============================================================================= 4. --overwrite

def _earlier_output(M, path):
    ok(cli("apply", M.base, M.d, "-o", path, "-q"))
    return path


@pytest.mark.parametrize("target", ["holds-inputs", "base", "delta", "unrelated", "output-with-subdir",
                                    "output-with-link", "inside-base", "file-not-safetensors", "base-file"])
def test_apply_overwrite_refuses(M, tmp_path, target):
    """apply --overwrite replaces only an earlier apply output (regular weight/config files); never an input,
    never anything else; and never writes inside BASE."""
    work = tmp_path / "work"
    base, delta = copytree(M.base, work / "base"), work / "d.dpk"
    shutil.copy(M.d, delta)
    (work / "thesis.tex").write_text("four years of work")
    base_st, d1 = work / "base.safetensors", work / "d1.dpk"
    shutil.copy(M.base_st, base_st)
    shutil.copy(M.d1, d1)
    args = [base, delta]
    if target == "holds-inputs":
        out = work
    elif target == "base":
        out = base
    elif target == "delta":
        out = delta
    elif target == "unrelated":
        out = tmp_path / "papers"
        out.mkdir()
        (out / "thesis.tex").write_text("other work")
    elif target in ("output-with-subdir", "output-with-link"):
        out = _earlier_output(M, tmp_path / "earlier")
        if target == "output-with-subdir":
            (out / "runs").mkdir()
            (out / "runs" / "log.txt").write_text("training log")
        else:
            os.symlink(work / "thesis.tex", out / "notes.txt")
    elif target == "inside-base":
        out = base / "rebuilt"
    elif target == "file-not-safetensors":
        out, args = work / "thesis.tex", [base_st, d1]
    else:
        out, args = base_st, [base_st, d1]
    before = snapshot(tmp_path)
    r = cli("apply", *args, "-o", out, "-q", *([] if target == "inside-base" else ["--overwrite"]))
    clean_error(r, str(out))
    assert_nothing_changed(before, tmp_path)


def test_apply_overwrite_does_not_follow_an_output_link(M, tmp_path):
    """OUT is a symlink to an earlier output elsewhere: --overwrite may refuse, or replace the link, but never
    write or delete through it."""
    target = _earlier_output(M, tmp_path / "elsewhere" / "earlier")
    (tmp_path / "elsewhere" / "thesis.tex").write_text("four years of work")
    os.symlink(target, tmp_path / "out")
    before = snapshot(tmp_path / "elsewhere")
    r = cli("apply", M.base, M.d, "-o", tmp_path / "out", "-q", "--overwrite", "--alpha", "0.5")
    if r.rc != 0:
        clean_error(r, str(tmp_path / "out"))
    assert_nothing_changed(before, tmp_path / "elsewhere")


def test_apply_overwrite_replaces_its_own_output(M, tmp_path):
    out = _earlier_output(M, tmp_path / "out")
    ok(cli("apply", M.base, M.d, "-o", out, "-q", "--overwrite", "--alpha", "0.5"))
    ok(cli("apply", M.base_st, M.d1, "-o", tmp_path / "o.safetensors", "-q"))
    ok(cli("apply", M.base_st, M.d1, "-o", tmp_path / "o.safetensors", "-q", "--overwrite"))
    # An empty directory (made with mkdir beforehand) holds nothing to lose: still only with --overwrite.
    (tmp_path / "empty").mkdir()
    clean_error(cli("apply", M.base, M.d, "-o", tmp_path / "empty", "-q"), "already exists")
    ok(cli("apply", M.base, M.d, "-o", tmp_path / "empty", "-q", "--overwrite"))
    assert (tmp_path / "empty" / "config.json").exists()


def test_export_peft_keeps_foreign_files(M, tmp_path):
    """export peft into an adapter directory deleted the user's README.md: refused, with or without --overwrite;
    an adapter directory of only the two files it writes is replaced when asked."""
    ad = tmp_path / "ad"
    ok(cli("export", "peft", M.base, M.d, "-o", ad))
    (ad / "README.md").write_text("model card")
    before = snapshot(M.root, tmp_path)
    for extra in ([], ["--overwrite"]):
        r = cli("export", "peft", M.base, M.d, "-o", ad, *extra)
        clean_error(r, str(ad))
        assert_nothing_changed(before, M.root, tmp_path)
    (ad / "README.md").unlink()
    ok(cli("export", "peft", M.base, M.d, "-o", ad, "--overwrite", "--rank", "2"))


# ============================================================================= 5. links

SECRET = "TOPSECRET-9f2c4e-not-for-a-delta"


def _secret(tmp_path):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / ".secret").write_text(SECRET)
    return home / ".secret"


def _holds_secret(root):
    """Every regular file under root whose bytes hold the secret."""
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p) and SECRET.encode() in open(p, "rb").read():
                out.append(p)
    return out


def test_compress_does_not_store_a_linked_secret(M, tmp_path):
    secret = _secret(tmp_path)
    ft = copytree(M.ft, tmp_path / "ft")
    os.symlink(secret, ft / "notes.txt")
    r = cli("compress", M.base, ft, "-o", tmp_path / "d.dpk", "-q")
    clean_error(r, "notes.txt")
    assert _holds_secret(tmp_path) == [str(secret)]
    r = cli("compress", M.base, ft, "-o", tmp_path / "e.dpk", "-q", "--follow-links")  # when asked, it is read
    ok(r)
    begin, end = ck.checkpoint_record(tmp_path / "e.dpk")["files"]["notes.txt"]["bytes"]
    from safetensors.numpy import load_file
    assert load_file(tmp_path / "e.dpk")["__files__"].tobytes()[begin:end] == SECRET.encode()


def test_apply_does_not_copy_linked_base_files(M, tmp_path):
    """A delta with no kept files gets the base directory's; one of them is a link to a secret outside."""
    secret = _secret(tmp_path)
    base = copytree(M.base, tmp_path / "base")
    os.symlink(secret, base / "notes.txt")
    d0 = craft(M.d, tmp_path / "d0.dpk", record=lambda r: r.__setitem__("files", {}))
    r = cli("apply", base, d0, "-o", tmp_path / "out", "-q")
    clean_error(r, "notes.txt")
    assert not (tmp_path / "out").exists()
    assert _holds_secret(tmp_path) == [str(secret)]


@pytest.mark.parametrize("which", ["shard", "config.json"])
def test_model_file_linked_outside_is_refused(M, tmp_path, which):
    """A model directory whose shard / config.json is a link to a file outside it (and outside any HF cache)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base = copytree(M.base, tmp_path / "base")
    name = SHARD2 if which == "shard" else "config.json"
    shutil.move(base / name, elsewhere / name)
    os.symlink(elsewhere / name, base / name)
    before = snapshot(M.root, tmp_path)
    clean_error(cli("compress", base, M.ft, "-o", tmp_path / "d.dpk", "-q"), name)
    clean_error(cli("apply", base, M.d, "-o", tmp_path / "out", "-q"), name)
    assert_nothing_changed(before, M.root, tmp_path)


def _hf_cache(src, cache, repo, redirect=None):
    """src laid out as a Hugging Face hub cache: models--<repo>/snapshots/<rev>/<f> -> ../../blobs/<sha256>.
    redirect: {file name: path} makes that file's blob itself a link to `path`."""
    top = cache / f"models--{repo}"
    (top / "blobs").mkdir(parents=True)
    snap = top / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in sorted(os.listdir(src)):
        digest = _sha(src / f)
        blob = top / "blobs" / digest
        if redirect and f in redirect:
            os.symlink(redirect[f], blob)
        else:
            shutil.copy(src / f, blob)
        os.symlink(os.path.join("..", "..", "blobs", digest), snap / f)
    return snap


def test_hf_cache_layout_is_followed(M, tmp_path):
    cache = tmp_path / "hub"
    base = _hf_cache(M.base, cache, "org--base")
    ft = _hf_cache(M.ft, cache, "org--ft")
    os.symlink("config.json", ft / "generation_config.json")  # a link inside the same directory
    ok(cli("compress", base, ft, "-o", tmp_path / "d.dpk", "-q"))
    assert {"config.json", "generation_config.json"} <= set(ck.checkpoint_record(tmp_path / "d.dpk")["files"])
    ok(cli("apply", base, tmp_path / "d.dpk", "-o", tmp_path / "out", "-q"))


def test_link_chain_through_blobs_is_refused(M, tmp_path):
    """notes.txt -> ../../blobs/<h> looks like the hub layout, but that blob is itself a link to a secret."""
    secret = _secret(tmp_path)
    src = copytree(M.ft, tmp_path / "src")
    (src / "notes.txt").write_text("placeholder")
    ft = _hf_cache(src, tmp_path / "hub", "org--ft", redirect={"notes.txt": secret})
    r = cli("compress", M.base, ft, "-o", tmp_path / "d.dpk", "-q")
    clean_error(r, "notes.txt")
    assert _holds_secret(tmp_path) == [str(secret)]


# ============================================================================= 6. files changed under a mapping

_OPEN_SCRIPT = r"""
import mmap, os, sys
import numpy as np
import deltapack as dp
path, mode, other, last = sys.argv[1:5]
f = dp.open(path)
early = f[last] if mode == "views" else None
if mode == "rewrite":   # what `cp other path` does: truncate, then write
    data = open(other, "rb").read()
    with open(path, "r+b") as fh:
        fh.truncate(0)
        fh.write(data)
else:
    with open(path, "rb") as fh:
        header = 8 + int.from_bytes(fh.read(8), "little")
    os.truncate(path, -(-header // mmap.PAGESIZE) * mmap.PAGESIZE)  # the header's pages stay whole
try:
    if early is not None:
        dp.decode(early)
        for c in early.components.values():
            float(np.asarray(c, dtype=np.float64).sum())
    for name in f.keys():
        dp.decode(f[name])
    print("READ-OK")
except (dp.FormatError, ValueError, OSError) as ex:
    print("ERROR", type(ex).__name__, ex)
"""


def _stored_last(path):
    """The tensor whose data lies furthest into the file (beyond the header's page)."""
    _, _, hdr = _header(path)
    key = max((k for k in hdr if k != "__metadata__"), key=lambda k: hdr[k]["data_offsets"][1])
    return key.split(":")[0]


@pytest.mark.parametrize("mode", ["truncate", "rewrite", "views"])
def test_delta_changed_under_dp_open(M, tmp_path, mode):
    """The delta is truncated (or rewritten as `cp new.dpk old.dpk` does) after dp.open: reading a tensor, or
    using components obtained before the change, is a clean error naming the file (or still the old bytes),
    never SIGBUS."""
    d = tmp_path / "d.dpk"
    shutil.copy(M.d, d)
    r = run([sys.executable, "-c", _OPEN_SCRIPT, d, mode, M.plain, _stored_last(M.d)], timeout=60)
    assert r.rc is not None, "hung"
    assert r.rc >= 0, f"killed by signal {signal.Signals(-r.rc).name}"
    assert r.rc == 0, _last(r.err)
    assert "READ-OK" in r.out or ("ERROR" in r.out and names(r.out, "d.dpk")), r.out


_HOOK_SCRIPT = r"""
import os, sys
victim, action, size, other = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def change():
    if action == "rewrite":
        data = open(other, "rb").read()
        with open(victim, "r+b") as fh:
            fh.truncate(0)
            fh.write(data)
    else:
        os.truncate(victim, size)
    print("CHANGED", file=sys.stderr, flush=True)
from deltapack import checkpoint, modeldir
from deltapack.export import finetune
class Bar:
    hit = False
    def update(self, n):
        if not Bar.hit:
            Bar.hit = True
            change()
    def close(self):
        pass
checkpoint.progress_bar = modeldir.progress_bar = lambda *a, **k: Bar()
real = finetune.FineTune.delta_enc
def delta_enc(self, name):
    if not Bar.hit:
        Bar.hit = True
        change()
    return real(self, name)
finetune.FineTune.delta_enc = delta_enc
from deltapack.cli import main
sys.exit(main(sys.argv[5:]))
"""


@pytest.mark.parametrize("case", ["apply-delta-truncated", "apply-delta-rewritten", "apply-base-shard-truncated",
                                  "gguf-lora-delta-truncated"])
def test_input_changed_during_a_command(M, tmp_path, case):
    """The input is changed after the command opened it and rebuilt its first tensor (hooked on the first
    progress update / the first delta tensor read): exit 1 naming the file, no output, no temporary left."""
    if case.startswith("gguf"):
        pytest.importorskip("gguf")
    d, base = tmp_path / "in" / "d.dpk", copytree(M.base, tmp_path / "in" / "base")
    shutil.copy(M.d, d)
    victim = base / SHARD2 if "base-shard" in case else d
    page = mmap.PAGESIZE  # the delta cut after its header's pages (some tensors stay readable), a shard halved
    size = -(-(8 + _header(d)[1]) // page) * page if victim == d else os.path.getsize(victim) // 2
    o = tmp_path / "o"
    o.mkdir()
    args = (["export", "gguf-lora", base, d, "-o", o / "a.gguf"] if case.startswith("gguf")
            else ["apply", base, d, "-o", o / "out", "-q"])
    r = run([sys.executable, "-c", _HOOK_SCRIPT, victim, "rewrite" if "rewritten" in case else "truncate", size,
             M.plain, *args])
    assert "CHANGED" in r.err, f"the hook did not fire (the command no longer calls it): {_last(r.err)}"
    clean_error(r, victim.name)
    assert os.listdir(o) == [], f"left behind: {os.listdir(o)}"


# ============================================================================= 7. wrong JSON types

def _setter(top, path, value):
    def mutate(md, fp):
        d = md if top == "metadata" else fp
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    mutate.top = top
    return mutate


def _set(path, value):
    """metadata[path...] = value (the first key 'checkpoint' for the record)."""
    return _setter("metadata", path, value)


def _fp_set(path, value):
    """base fingerprint[path...] = value."""
    return _setter("base", path, value)


def _del(path):
    def mutate(md, fp):
        d = md
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    mutate.top = "metadata"
    return mutate


_BUDGET = {"bits_per_param": 1.0, "proxy": "magnitude", "predicted_error": 0.1}
C = "checkpoint"

# id: (pair "d" (base/ft/d.dpk) | "r" (base/rft/r.dpk), mutation, fields the message may name[, "consistent"]).
# "consistent": a range or a nested field the brief does not name; every reader must then either refuse it (as
# above) or accept it cleanly (info exit 0, no exception) - never some readers one way and some the other.
MUTATIONS = {
    "tensor-entry-is-a-string": ("d", _set([C, "tensors", T], "delta"), (T,)),
    "shape-is-a-string": ("d", _set([C, "tensors", T, "shape"], "96"), ("shape",)),
    "shape-has-a-float": ("d", _set([C, "tensors", T, "shape"], [96.5, 64]), ("shape",)),
    "shape-negative": ("d", _set([C, "tensors", T, "shape"], [-96, 64]), ("shape",)),
    "shape-too-large": ("d", _set([C, "tensors", T, "shape"], [1 << 40, 1 << 40]), ("shape",)),
    "dtype-unknown": ("d", _set([C, "tensors", T, "dtype"], "Q4_K"), ("dtype", "Q4_K")),
    "dtype-not-a-string": ("d", _set([C, "tensors", T, "dtype"], 16), ("dtype",)),
    "op-not-a-string": ("d", _set([C, "tensors", T, "op"], 1), ("op",)),
    "op-unknown": ("d", _set([C, "tensors", T, "op"], "copy"), ("op", "copy")),
    "source-not-a-string": ("d", _set([C, "tensors", T, "source"], 7), ("source",)),
    "files-is-a-number": ("d", _set([C, "files"], 5), ("files",)),
    "kept-file-is-a-string": ("d", _set([C, "files", "config.json"], "{}"), ("config.json",)),
    "kept-file-bad-base64": ("d", _set([C, "files", "config.json"], {"base64": "@@@@"}), ("config.json",)),
    "ft_bytes-is-a-string": ("d", _set([C, "ft_bytes"], "148096"), ("ft_bytes",)),
    "ft_bytes-negative": ("d", _set([C, "ft_bytes"], -1), ("ft_bytes",), "consistent"),
    "removed-is-a-string": ("d", _set([C, "removed"], "lm_head.weight"), ("removed",)),
    "removed-holds-numbers": ("d", _set([C, "removed"], [1, 2]), ("removed",)),
    "version-is-a-string": ("d", _set([C, "version"], "1"), ("version",)),
    "version-is-a-float": ("d", _set([C, "version"], 1.0), ("version",), "consistent"),
    "tensors-is-a-list": ("d", _set([C, "tensors"], []), ("tensors", "checkpoint")),
    "budget-is-a-string": ("d", _set(["budget"], "1"), ("budget",)),
    "budget-data-is-a-string": ("d", _set(["budget"], {**_BUDGET, "data": "x"}), ("budget", "data"), "consistent"),
    "budget-tensor-error-is-a-string": ("d", _set(["budget"], {**_BUDGET, "tensors": {T: "x"}}), ("budget", T),
                                        "consistent"),
    "fingerprint-entry-is-a-string": ("d", _fp_set(["tensors", T], "x"), (T,)),
    "fingerprint-crc-is-a-number": ("d", _fp_set(["tensors", T, "crc32c"], 12345678), ("crc32c",)),
    "fingerprint-shape-is-a-string": ("d", _fp_set(["tensors", T, "shape"], "96"), ("shape",)),
    "fingerprint-tensors-is-a-list": ("d", _fp_set(["tensors"], []), ("tensors", "base")),
    "fingerprint-is-a-string": ("d", "base-is-a-string", ("base",)),
    "resized-without-base_shape": ("r", _del([C, "tensors", EMBED, "base_shape"]), ("base_shape",)),
    "new_rows-not-a-string": ("r", _set([C, "tensors", EMBED, "new_rows"], 5), ("new_rows",)),
    "ft_bytes-1e400": ("d", "text:ft_bytes", ("ft_bytes",)),
    "shape-1e400": ("d", "text:shape", ("shape",)),
}


def _record_as_python_reads_it(path):
    """The record straight from the bytes (Python's json reads 1e400 as inf), not through deltapack's reader."""
    return json.loads(_header(path)[2]["__metadata__"]["deltapack"])["metadata"]["checkpoint"]


def _mutated(M, tmp_path, case):
    pair, mutation, fields = MUTATIONS[case][:3]
    src = M.d if pair == "d" else M.r
    path = tmp_path / "bad.dpk"
    if mutation == "base-is-a-string":
        craft(src, path, base=lambda fp: "crc32c")
    elif isinstance(mutation, str):  # "text:...": numbers a JSON writer refuses, edited in the manifest text
        craft(src, path)
        rec = _record_as_python_reads_it(path)
        if mutation == "text:ft_bytes":
            patch_manifest(path, f'"ft_bytes":{rec["ft_bytes"]}', '"ft_bytes":1e400')
            assert math.isinf(_record_as_python_reads_it(path)["ft_bytes"])
        else:
            spec = rec["tensors"][T]
            entry = json.dumps({T: spec}, separators=(",", ":"))[1:-1]
            shape = json.dumps(spec["shape"], separators=(",", ":"))
            patch_manifest(path, entry, entry.replace(shape, "[1e400,64]", 1))
            assert math.isinf(_record_as_python_reads_it(path)["tensors"][T]["shape"][0])
    elif mutation.top == "base":
        craft(src, path, base=lambda fp: mutation(None, fp))
    else:
        craft(src, path, meta=lambda md: mutation(md, None))
    return path, pair, fields


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_wrong_json_types(M, tmp_path, capsys, case):
    """Valid JSON of the wrong shape in the record, the metadata or the base fingerprint: every reader gives
    a FormatError (a ValueError) / exit 1 naming the file and the field; nothing escapes as TypeError,
    KeyError, AttributeError; nothing is silently ignored (a fingerprint CRC of the wrong type would skip the
    base check)."""
    bad, pair, fields = _mutated(M, tmp_path, case)
    consistent = MUTATIONS[case][3:] == ("consistent",)
    base, ft = M.base, (M.ft if pair == "d" else M.rft)
    out = tmp_path / "out"
    problems, accepted, refused = [], [], []

    def named(msg, need_field=True):
        if not names(msg, bad.name):
            return "does not name the file"
        if need_field and not any(names(msg, f) for f in fields):
            return f"does not name the field {fields}"
        return None

    def api(what, call, need_field=True):
        try:
            call()
        except ValueError as ex:  # dp.FormatError is a ValueError
            refused.append(what)
            why = named(str(ex), need_field)
            if why:
                problems.append(f"{what}: {type(ex).__name__} {why}: {ex}")
        except Exception as ex:  # noqa: BLE001
            problems.append(f"{what}: {type(ex).__name__}: {ex}")
        else:
            accepted.append(what)

    api("dp.open", lambda: dp.open(bad))
    api("checkpoint.describe", lambda: ck.describe(bad))
    api("checkpoint.load_into", lambda: ck.load_into(module_of(M.base_sd) if pair == "d" else r_module(M), bad))
    if pair == "d":
        api("Bank.add", lambda: dp.Bank(base).add("x", bad), need_field=False)
    for cmd in (["info", bad], ["info", bad, "--json"], ["apply", base, bad, "-o", out, "-q"],
                ["verify", base, ft, bad, "-q"]):
        what = f"deltapack {cmd[0]}{' --json' if '--json' in cmd else ''}"
        rc, err = main_rc(capsys, *cmd)
        why = named(err)
        if rc == 1 and not why and not any(b in err for b in _BAD_OUTPUT):
            refused.append(what)
        elif rc in (0, 3):  # verify: 3 = over its error threshold
            accepted.append(what)
            if out.exists():
                shutil.rmtree(out)
        else:
            problems.append(f"{what}: exit {rc}{'' if rc != 1 else ', ' + str(why)}: {err.strip()[-300:]}")
    if consistent and not refused:
        accepted = []  # accepted by every reader: a consistent reading of a value the brief leaves open
    problems += [f"{what}: accepted" for what in accepted]
    assert not problems, "\n".join(problems)


def test_compress_metadata_cannot_shadow_deltapacks_own(M, tmp_path, capsys):
    """`compress --metadata budget=1` wrote a user string where deltapack reads its own record (`info` then
    crashed): compress refuses the key, or every reader takes the file cleanly."""
    out = tmp_path / "m.dpk"
    rc, err = main_rc(capsys, "compress", M.base, M.ft, "-o", out, "-q", "--metadata", "budget=1")
    if rc != 0:
        assert rc == 1 and names(err, "budget") and "Traceback" not in err, (rc, err)
        assert not out.exists()
        return
    for cmd in (["info", out], ["info", out, "--json"]):
        rc, err = main_rc(capsys, *cmd)
        assert rc == 0, (cmd, rc, err)


@pytest.mark.parametrize("kind,change,field", [
    ("gguf-lora", {"num_attention_heads": None}, "num_attention_heads"),
    ("gguf", {"num_attention_heads": None}, "num_attention_heads"),
    ("gguf-lora", {"num_attention_heads": 0}, "num_attention_heads"),
    ("gguf", {"num_attention_heads": 3}, "num_attention_heads"),   # does not divide hidden_size 64
    ("gguf-lora", {"num_hidden_layers": "2"}, "num_hidden_layers"),
    ("gguf", {"hidden_size": None}, "hidden_size"),
])
def test_export_with_a_hostile_config(M, tmp_path, kind, change, field):
    pytest.importorskip("gguf")
    base = copytree(M.base, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    for k, v in change.items():
        cfg.pop(k) if v is None else cfg.__setitem__(k, v)
    (base / "config.json").write_text(json.dumps(cfg))
    before = snapshot(M.root, tmp_path)
    r = cli("export", kind, base, M.d, "-o", tmp_path / "a.gguf")
    clean_error(r, "config.json", field)
    assert_nothing_changed(before, M.root, tmp_path)


MOD = T.removesuffix(".weight")


@pytest.mark.parametrize("peft", [
    {"modules": []},
    {"modules": {MOD: {"scaling": "x", "alpha": 4, "rank": 4}}},
    {"modules": {MOD: {"rank": 4}}},
    {"modules": {MOD: {"scaling": 0.0, "alpha": 4, "rank": 4}}},
    {"r": "x", "lora_alpha": [1], "modules": {}},
], ids=["modules-list", "scaling-string", "scaling-missing", "scaling-zero", "r-and-alpha-wrong-types"])
def test_export_peft_with_hostile_peft_metadata(M, tmp_path, capsys, peft):
    """metadata["peft"] (import peft keeps the adapter's config there) from a stranger's delta: a clean error
    naming the file, or an adapter with finite weights and numeric r / lora_alpha."""
    bad = craft(M.d, tmp_path / "peft.dpk", meta=lambda md: md.__setitem__("peft", peft))
    out = tmp_path / "ad"
    rc, err = main_rc(capsys, "export", "peft", M.base, bad, "-o", out)
    if rc == 0:
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert all(isinstance(cfg[k], (int, float)) and math.isfinite(cfg[k]) for k in ("r", "lora_alpha")), cfg
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in cfg["alpha_pattern"].values()), cfg
        with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as h:
            for k in h.keys():
                assert torch.isfinite(h.get_tensor(k).float()).all(), f"{k} holds inf/NaN"
    else:
        assert rc == 1 and names(err, "peft.dpk") and not any(b in err for b in _BAD_OUTPUT), (rc, err)
        assert not out.exists()


@pytest.mark.parametrize("where", ["config.json", "delta"])
def test_fifo_is_refused_not_waited_on(M, tmp_path, where):
    """A FIFO where a regular file is expected (a model directory from a tarball, a delta path): opening it
    for reading blocks forever. An error, not a hang."""
    if where == "config.json":
        ft = copytree(M.ft, tmp_path / "ft")
        (ft / "config.json").unlink()
        os.mkfifo(ft / "config.json")
        r = cli("compress", M.base, ft, "-o", tmp_path / "d.dpk", "-q", timeout=5)
        clean_error(r, "config.json")
    else:
        os.mkfifo(tmp_path / "d.dpk")
        r = cli("info", tmp_path / "d.dpk", timeout=5)
        clean_error(r, "d.dpk")


# ============================================================================= the C API

@pytest.fixture(scope="module")
def capi(tmp_path_factory):
    path = os.environ.get("DELTAPACK_LIBDELTAPACK")
    if not path:
        from test_kernels_native import HAVE_TOOLS, native_build
        if not HAVE_TOOLS:
            pytest.skip("cmake, ctest, gcc and g++ needed to build libdeltapack.so")
        path = native_build(tmp_path_factory) / "libdeltapack.so"
    lib = ctypes.CDLL(str(path))

    class ApplyParams(ctypes.Structure):
        _fields_ = [("alpha", ctypes.c_float), ("threads", ctypes.c_int), ("verify", ctypes.c_int)]

    p, cp = ctypes.c_void_p, ctypes.c_char_p
    for name, res, args in [("dp_last_error", cp, []), ("dp_apply_default_params", ApplyParams, []),
                            ("dp_file_open", p, [cp]), ("dp_file_close", None, [p]), ("dp_base_open", p, [cp]),
                            ("dp_base_close", None, [p]), ("dp_checkpoint_open", p, [p, p, ctypes.c_int]),
                            ("dp_checkpoint_close", None, [p]),
                            ("dp_apply_checkpoint", ctypes.c_int,
                             [cp, cp, cp, cp, ApplyParams, ctypes.c_int, ctypes.c_int])]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def test_c_api_refuses_crafted_checkpoints(capi, M, tmp_path):
    lib = capi
    work = tmp_path / "work"
    base = copytree(M.base, work / "base")
    bomb = with_new_tensor(M, work / "bomb.dpk", 20)
    kept = craft(M.d, work / "kept.dpk", record=lambda r: r["files"].__setitem__("pytorch_model.bin", {"text": "x"}))
    types_ = craft(M.d, work / "types.dpk", record=lambda r: r.__setitem__("files", 5))
    before = snapshot(tmp_path)
    problems = []

    def apply(delta, out, overwrite=0, alpha=1.0):
        params = lib.dp_apply_default_params()
        params.alpha = alpha
        return lib.dp_apply_checkpoint(str(base).encode(), str(delta).encode(), str(out).encode(), None, params, 0,
                                       overwrite)

    f = lib.dp_file_open(str(types_).encode())
    if f:  # the record's schema is checked when the file or the checkpoint is opened
        b = lib.dp_base_open(str(base).encode())
        c = lib.dp_checkpoint_open(f, b, 0) if b else None
        if c:
            problems.append("dp_file_open and dp_checkpoint_open accept a record whose files is 5")
            lib.dp_checkpoint_close(c)
        if b:
            lib.dp_base_close(b)
        lib.dp_file_close(f)
    for what, call, needles in [
            ("bomb", lambda: apply(bomb, tmp_path / "o1"), ("bomb.dpk", EXTRA)),
            ("kept weight file", lambda: apply(kept, tmp_path / "o2"), ("kept.dpk", "pytorch_model.bin")),
            ("alpha nan", lambda: apply(M.d, tmp_path / "o3", alpha=float("nan")), ("alpha", "!hostile", "!damaged")),
            ("files: 5", lambda: apply(types_, tmp_path / "o4"), ("types.dpk", "files")),
            ("OUT = BASE with overwrite", lambda: apply(M.d, base, overwrite=1), (str(base),)),
            ("OUT = the directory holding BASE", lambda: apply(M.d, work, overwrite=1), (str(work),))]:
        rc = call()
        err = (lib.dp_last_error() or b"").decode("utf-8", "replace")
        if rc != -1:
            problems.append(f"{what}: returned {rc}")
        elif "bad_alloc" in err or not all(n[1:] not in _bare(err) if n[0] == "!" else names(err, n) for n in needles):
            problems.append(f"{what}: the error should {needles} ('!': not say): {err}")
    diff = changes(before, snapshot(tmp_path))
    if diff:
        problems.append(f"changed on disk: {diff[:4]}")
    assert not problems, "\n".join(problems)
