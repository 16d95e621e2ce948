"""Integrity (issue 20): a delta file, a model directory or an adapter from a stranger can do no harm beyond a
clear error. Each section is one class of the issue, tried as an attacker would, with small crafted inputs
whose checksums are valid:

1. outputs bounded by a base: tensors without a base (op "new", a resized tensor's new rows) stored with a
   codec of less than one bit per element, and "same" entries that all copy one base tensor;
2. kept files are data, never weights: names apply writes itself, weight and index files, control
   characters, over-long names;
3. writes that follow links or replace what exists: a link at an exporter's temporary name, outputs over
   an existing file or inside an input, deltapack-apply's argument parsing;
4. data loss under --overwrite: a directory that is not an earlier output, an adapter directory holding the
   user's own files;
5. secrets through symbolic links out of a model directory (and the links that must still work: inside the
   directory, a Hugging Face cache's blobs/);
6. a delta file truncated or rewritten while it is read (no SIGBUS; nothing left behind);
7. tracebacks instead of errors: JSON of the right syntax but wrong types in the checkpoint record and the
   metadata deltapack reads, non-finite numbers, overflowing component shapes, an invalid alpha, an
   incomplete config.json.

Crafted records are made by writing a valid file and editing its manifest text in place (test_files'
edit_manifest): the metadata is not covered by the tensor CRCs, and the writer refuses to write a record of
the wrong types itself. Edits of a tensor's entry recompute its CRC (`_recrc`), as an attacker would.
Commands that may crash, allocate or write without bound run in child processes whose exit status, peak
RSS and output are checked.
"""
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest
from conftest import run_child, write_model_dir
from test_files import _entry_text, edit_manifest, read_raw, write_raw

import deltapack as dp
from deltapack import checkpoint as ck
from deltapack import cli

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

CLI = [sys.executable, "-m", "deltapack.cli"]
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
APPLY_BIN = os.path.join(os.path.dirname(dp._core.__file__), "bin", "deltapack-apply")
needs_apply_bin = pytest.mark.skipif(not os.path.exists(APPLY_BIN),
                                     reason="deltapack-apply is not built into this install")
RECIPE = "*.q_proj.*=sign;*=lowrank:rank=4"
# Peak RSS a refused input may cost a child (Python, numpy and deltapack loaded: ~60-120 MiB). The crafted
# inputs below would need 0.5 GiB to several TiB if they were rebuilt.
RSS_LIMIT_MIB = 400

# ----------------------------------------------------------------------------- models

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "max_position_embeddings": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
          "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
          "eos_token_id": 2}
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"


def _shapes(vocab=96, tie=False):
    h, i, kv = 64, 96, 32
    s = {EMBED: (vocab, h)}
    for n in range(2):
        p = f"model.layers.{n}."
        s.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                  p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                  p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                  p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                  p + "post_attention_layernorm.weight": (h,)})
    s[NORM] = (h,)
    if not tie:
        s["lm_head.weight"] = (vocab, h)
    return s


def _weights(seed, vocab=96, tie=False):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.ones(sh) if len(sh) == 1 else torch.randn(sh, generator=g) * 0.02).to(torch.bfloat16)
            for n, sh in _shapes(vocab, tie).items()}


def _perturbed(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: (t.float() + torch.randn(t.shape, generator=g) * 2e-3).to(torch.bfloat16) for n, t in state.items()}


def _write_model(path, state, config=CONFIG, shards=2):
    write_model_dir(path, state, config, shards)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny bf16 Llama pairs written directly (no transformers): base/ft (2 shards), a resized vocabulary,
    a tied base with an untied fine-tune, one-file copies, and their deltas; a plain delta of one tensor."""
    root = tmp_path_factory.mktemp("integrity")
    base = _weights(0)
    ft = _perturbed(base, 1)
    _write_model(root / "base", base)
    _write_model(root / "ft", ft)
    resized = _perturbed(_weights(0, vocab=104), 1)
    resized.update({n: ft[n] for n in ft if n not in (EMBED, "lm_head.weight")})
    for n in (EMBED, "lm_head.weight"):
        resized[n][:96] = ft[n]
    _write_model(root / "ft_resized", resized, {**CONFIG, "vocab_size": 104})
    tied = _weights(2, tie=True)
    _write_model(root / "base_tied", tied, {**CONFIG, "tie_word_embeddings": True})
    untied = _perturbed({**tied, "lm_head.weight": tied[EMBED].clone()}, 3)
    _write_model(root / "ft_untied", untied)
    for name, state in (("base", base), ("ft", ft)):
        safetensors_torch.save_file(state, str(root / f"{name}.safetensors"), metadata={"format": "pt"})
    pairs = {"d.dpk": ("base", "ft"), "resized.dpk": ("base", "ft_resized"), "tied.dpk": ("base_tied", "ft_untied"),
             "file.dpk": ("base.safetensors", "ft.safetensors")}
    for out, (b, f) in pairs.items():
        ck.compress(root / b, root / f, root / out, RECIPE, quiet=True)
    name = "model.layers.0.mlp.up_proj.weight"
    d = (ft[name].float() - base[name].float()).numpy()
    dp.save(root / "plain.dpk", {name: dp.encode(d, "sign", scope="row")})
    return root


def _digest(*paths):
    """Every file under the given paths (links as links, not followed) -> its bytes, for before/after checks."""
    out = {}
    for p in map(str, paths):
        if os.path.islink(p) or not os.path.isdir(p):
            out[p] = ("link", os.readlink(p)) if os.path.islink(p) else open(p, "rb").read()
            continue
        for d, dirs, fs in os.walk(p):
            for f in fs + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
                full = os.path.join(d, f)
                out[full] = ("link", os.readlink(full)) if os.path.islink(full) else open(full, "rb").read()
    return out


def _copy(src, dst):
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    return dst


# ----------------------------------------------------------------------------- crafting

def _manifest(path):
    return json.loads(read_raw(path)[0]["__metadata__"]["deltapack"])


def craft(dst, src, record=None, meta=None, fingerprint=None, drop=(), add=None):
    """A copy of delta file `src` (made by compress) with tensors dropped or added and its metadata edited:
    record(rec) edits metadata["checkpoint"], meta(md) the whole metadata, fingerprint(fp) the base's.
    The tensors are written by deltapack's writer under a neutral manifest; the record goes in afterwards,
    so the writer's own checks never see it (valid checksums, whatever the record says)."""
    man = _manifest(src)
    md, fp = man.get("metadata"), man.get("base")
    f = dp.open(src)
    tensors = {n: f[n] for n in f.keys() if n not in drop}
    tensors.update(add or {})
    w = dp.DeltaWriter(dst)
    for n, enc in tensors.items():
        w.add(n, enc)
    header, data = read_raw(src)
    if "__files__" in header:  # the kept files' bytes, at the same places
        b, e = header["__files__"]["data_offsets"]
        w.add_file(data[b:e])
    w.close()
    for fn, obj in ((record, md and md.get("checkpoint")), (meta, md), (fingerprint, fp)):
        if fn is not None:
            fn(obj)

    def put(m):
        m["metadata"] = md
        m["base"] = fp
    edit_manifest(dst, put)
    return dst


def _recrc(path, *names):
    """Recomputes the CRC-32C of tensors `names` over their components as stored and their entry text."""
    header, data = read_raw(path)
    man = json.loads(header["__metadata__"]["deltapack"])
    for name in names:
        entry = man["tensors"][name]
        c = 0
        for comp in entry["components"]:
            b, e = header[f"{name}:{comp}"]["data_offsets"]
            c = dp._core.crc32c(np.frombuffer(data[b:e], np.uint8), c)
        c = dp._core.crc32c(np.frombuffer(_entry_text(entry), np.uint8), c)
        entry["crc32c"] = f"{c:08x}"
    header["__metadata__"]["deltapack"] = json.dumps(man)
    write_raw(path, header, data)


def lowrank_bomb(rows, cols, seed=0):
    """A rank-1 `lowrank` tensor of [rows, cols] with 1-bit factors: (rows + cols) / 8 bytes of codes and a
    few scales describe rows * cols elements."""
    rng = np.random.default_rng(seed)
    group = 64
    comps = {"s": np.array([1e-3], np.float32),
             "codes": rng.integers(0, 256, (rows + 7) // 8 + (cols + 7) // 8, dtype=np.uint8),
             "scales": np.ones((1, -(-rows // group) - (-cols // group)), np.float16)}
    return dp.Encoded("lowrank", {"rank": 1, "bits": "1", "bands": "1", "group": group}, (rows, cols), "bf16", comps)


# ----------------------------------------------------------------------------- running

class Run:
    def __init__(self, rc, out, err, rss_mib, seconds):
        self.rc, self.out, self.err, self.rss_mib, self.seconds = rc, out, err, rss_mib, seconds

    def __repr__(self):
        return f"Run(rc={self.rc}, rss={self.rss_mib:.0f} MiB, {self.seconds:.1f} s)\nstdout: {self.out[-2000:]}\n" \
               f"stderr: {self.err[-3000:]}"


def run(args, timeout=300, env=None, fsize=None, cwd=None):
    """Runs a command; its exit code (negative: the signal that killed it), output and peak RSS.
    fsize: a limit on the size of the files it writes (RLIMIT_FSIZE), so that a defect cannot fill the disk."""
    def limits():
        if fsize is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead

    rc, out, err, rss, seconds = run_child(args, timeout=timeout, env=env or ENV, cwd=cwd, limits=limits)
    return Run(-signal.SIGKILL if rc is None else rc, out, err, rss, seconds)


def assert_clean_error(r, *words, rc=(1,)):
    """A command refused its input: the expected exit code, one message naming `words`, no traceback and no
    bare C++ exception text."""
    assert r.rc in rc, r
    for bad in ("Traceback", "bad_alloc", "MemoryError", "Segmentation", "core dumped"):
        assert bad not in r.err, r
    for w in words:
        assert str(w) in r.err, (w, r)


def _nothing_left(dirpath, before):
    """No new entry in `dirpath` (an output, a temporary file or directory) beyond `before`."""
    assert sorted(os.listdir(dirpath)) == sorted(before), sorted(set(os.listdir(dirpath)) - set(before))


def cli_main(capsys, *args):
    """`deltapack ARGS` in this process: exit code and stderr. An uncaught exception fails the test."""
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as ex:  # a usage error (argparse)
        rc = ex.code
    return rc, capsys.readouterr().err


# ============================================================================= 1. outputs bounded by a base

def _new_bomb(models, dst, exponent):
    """A tensor the fine-tune 'adds' (op new, no base) stored as a 1-bit rank-1 lowrank of [2^e, 2^e]."""
    n = 1 << exponent

    def rec(r):
        r["tensors"]["bomb.weight"] = {"dtype": "BF16", "shape": [n, n], "op": "new"}
    return craft(dst, models / "d.dpk", record=rec, add={"bomb.weight": lowrank_bomb(n, n)})


def _new_rows_bomb(models, dst, rows=1 << 22):
    """The resized embedding's new rows (no base either) stored as a 1-bit rank-1 lowrank: 512 MiB of bf16 rows."""
    rec0 = _manifest(models / "resized.dpk")["metadata"]["checkpoint"]["tensors"][EMBED]
    assert rec0["op"] == "resized", rec0
    nr = rec0["new_rows"]
    k = rec0["base_shape"][0]

    def rec(r):
        r["tensors"][EMBED]["shape"] = [k + rows, 64]
    return craft(dst, models / "resized.dpk", record=rec, drop=(nr,), add={nr: lowrank_bomb(rows, 64)}), nr


@pytest.mark.parametrize("case", ["new-2^14", "new-2^20", "new_rows"])
def test_tensor_without_a_base_below_one_bit_per_element_is_refused(models, tmp_path, case):
    """A 7 KB delta once made `apply` use 1.6 GB and write a 513 MB shard; a 265 KB one ended in
    `MemoryError: std::bad_alloc`. Now: a FormatError naming the file and the tensor, before any allocation."""
    if case == "new_rows":
        bomb, tensor = _new_rows_bomb(models, tmp_path / "bomb.dpk")
    else:
        bomb, tensor = _new_bomb(models, tmp_path / "bomb.dpk", int(case.split("^")[1])), "bomb.weight"
    assert os.path.getsize(bomb) < 1 << 20
    (tmp_path / "work").mkdir()
    r = run(CLI + ["apply", models / "base", bomb, "-o", tmp_path / "work" / "out", "-q"], fsize=64 << 20)
    assert_clean_error(r, bomb, tensor)
    assert r.rss_mib < RSS_LIMIT_MIB, r
    _nothing_left(tmp_path / "work", [])


def test_tensor_without_a_base_is_refused_by_every_reader(models, tmp_path):
    """The same bound in Python (apply_checkpoint, load): a FormatError, not MemoryError."""
    bomb = _new_bomb(models, tmp_path / "bomb.dpk", 20)
    with pytest.raises(dp.FormatError, match=r"bomb\.weight"):
        ck.apply_checkpoint(models / "base", bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(dp.FormatError, match=r"bomb\.weight"):
        ck.load(models / "base", bomb)
    assert sorted(os.listdir(tmp_path)) == ["bomb.dpk"]


@needs_apply_bin
@pytest.mark.parametrize("case", ["new-2^14", "new-2^20", "new_rows"])
def test_deltapack_apply_refuses_a_tensor_without_a_base_below_one_bit(models, tmp_path, case):
    """deltapack-apply (C++, no Python) printed only `std::bad_alloc`, or wrote the 513 MB shard."""
    if case == "new_rows":
        bomb, tensor = _new_rows_bomb(models, tmp_path / "bomb.dpk")
    else:
        bomb, tensor = _new_bomb(models, tmp_path / "bomb.dpk", int(case.split("^")[1])), "bomb.weight"
    (tmp_path / "work").mkdir()
    r = run([APPLY_BIN, models / "base", bomb, tmp_path / "work" / "out"], fsize=64 << 20)
    assert_clean_error(r, bomb, tensor)
    assert r.rss_mib < RSS_LIMIT_MIB, r
    _nothing_left(tmp_path / "work", [])


LOAD_INTO_CHILD = textwrap.dedent("""
    import sys, torch, deltapack as dp
    from deltapack import checkpoint as ck
    m = torch.nn.Module(); m.model = torch.nn.Module(); m.model.norm = torch.nn.Module()
    m.model.norm.weight = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    try:
        ck.load_into(m, sys.argv[1], strict=False)
    except dp.FormatError as ex:
        print("FormatError:", ex)
    except BaseException as ex:
        print("OTHER", type(ex).__name__, str(ex)[:300])
    else:
        print("ACCEPTED")
""")


@pytest.mark.parametrize("op", ["new", "delta"])
def test_load_into_checks_the_stored_tensor_before_decoding_it(models, tmp_path, op):
    """load_into(model, delta) without base= decoded a [2^14, 2^14] tensor (2.3 GiB) recorded for a 64-element
    parameter before comparing shapes. The stored tensor must agree with the record before it is decoded."""
    bomb = craft(tmp_path / "bomb.dpk", models / "d.dpk", drop=(NORM,), add={NORM: lowrank_bomb(1 << 14, 1 << 14)})
    if op == "new":
        edit_manifest(bomb, lambda m: m["metadata"]["checkpoint"]["tensors"][NORM].update(op="new"))
    r = run([sys.executable, "-c", LOAD_INTO_CHILD, bomb])
    assert r.rc == 0, r
    assert r.out.startswith("FormatError:") and str(bomb) in r.out and NORM in r.out, r
    assert r.rss_mib < RSS_LIMIT_MIB + 300, r  # torch is loaded too


def _many_copies(models, dst, n):
    """n outputs that all copy the base's embedding (op same, source EMBED): ~100 bytes of record each for
    12 KiB of output each; with an 8B model's embedding, terabytes."""
    def rec(r):
        for i in range(n):
            r["tensors"][f"copy.{i}.weight"] = {"dtype": "BF16", "shape": [96, 64], "op": "same", "source": EMBED}
    return craft(dst, models / "d.dpk", record=rec)


def test_same_entries_naming_one_source_are_bounded(models, tmp_path):
    """4000 'same' entries of one source: 48 MiB of output from a ~400 KB record and a 200 KB base. A base
    tensor may be the source of more than one output only within a bound the record cannot raise."""
    bomb = _many_copies(models, tmp_path / "copies.dpk", 4000)
    (tmp_path / "work").mkdir()
    r = run(CLI + ["apply", models / "base", bomb, "-o", tmp_path / "work" / "out", "-q"], fsize=64 << 20)
    assert_clean_error(r, bomb)
    _nothing_left(tmp_path / "work", [])
    with pytest.raises(dp.FormatError, match=re.escape(str(bomb))):
        ck.load(models / "base", bomb)


@needs_apply_bin
def test_deltapack_apply_bounds_same_entries(models, tmp_path):
    bomb = _many_copies(models, tmp_path / "copies.dpk", 4000)
    (tmp_path / "work").mkdir()
    r = run([APPLY_BIN, models / "base", bomb, tmp_path / "work" / "out"], fsize=64 << 20)
    assert_clean_error(r, bomb)
    _nothing_left(tmp_path / "work", [])


def test_new_tensor_whose_stored_shape_disagrees_with_the_record(models, tmp_path):
    """An 'added' tensor recorded as [2^15, 2^15] but stored as 64 dense values: refused, naming the tensor."""
    def rec(r):
        r["tensors"]["bomb.weight"] = {"dtype": "BF16", "shape": [1 << 15, 1 << 15], "op": "new"}
    bomb = craft(tmp_path / "bomb.dpk", models / "d.dpk", record=rec,
                 add={"bomb.weight": dp.encode(np.zeros(64, np.float32), "dense", dtype="bf16")})
    (tmp_path / "work").mkdir()
    r = run(CLI + ["apply", models / "base", bomb, "-o", tmp_path / "work" / "out", "-q"], fsize=64 << 20)
    assert_clean_error(r, bomb, "bomb.weight")
    assert r.rss_mib < RSS_LIMIT_MIB, r
    _nothing_left(tmp_path / "work", [])


@pytest.mark.parametrize("delta,base", [("d.dpk", "base"), ("resized.dpk", "base"), ("tied.dpk", "base_tied"),
                                        ("file.dpk", "base.safetensors")])
def test_legitimate_outputs_still_rebuild(models, tmp_path, delta, base):
    """The bounds' neighbours: resized rows, a tied embedding used twice, sharded and one-file outputs;
    the CLI, load and deltapack-apply agree."""
    out = tmp_path / ("out.safetensors" if base.endswith(".safetensors") else "out")
    r = run(CLI + ["apply", models / base, models / delta, "-o", out, "-q"])
    assert r.rc == 0, r
    sd = ck.load(models / base, models / delta)
    rec = dp.open(models / delta).metadata["checkpoint"]["tensors"]
    assert sd.keys() == rec.keys()
    if os.path.exists(APPLY_BIN):
        out2 = tmp_path / ("cpp.safetensors" if base.endswith(".safetensors") else "cpp")
        r = run([APPLY_BIN, models / base, models / delta, out2])
        assert r.rc == 0, r
        files = sorted(os.listdir(out)) if out.is_dir() else [""]
        for f in files:
            assert (out / f).read_bytes() == (out2 / f).read_bytes(), f


# ============================================================================= 2. kept files are data

# Kept-file names a checkpoint record may not carry: what apply writes itself (shards, index, single-file
# weights), other weight files (several are pickles: loading one runs code), control characters, names the
# file system cannot hold, hidden files, paths.
BAD_KEPT = {
    "single-file weights": "model.safetensors",
    "a shard": "model-00001-of-00002.safetensors",
    "the index": "model.safetensors.index.json",
    "a pickle": "pytorch_model.bin",
    "another pickle": "training_args.pkl",
    "gguf": "model.gguf",
    "upper case": "MODEL.SAFETENSORS",
    "NUL": "config.json\x00evil",
    "newline": "a\nb.txt",
    "escape": "\x1b[2Jx.txt",
    "over-long": "n" * 300 + ".txt",
    "hidden": ".bashrc",
    "a path": "sub/x.txt",
    "parent": "..",
}


def _kept(models, dst, name, text="x"):
    def rec(r):
        r["files"][name] = {"text": text}
    return craft(dst, models / "d.dpk", record=rec)


@pytest.mark.parametrize("case", list(BAD_KEPT))
def test_kept_file_that_is_not_data_is_refused_by_apply(models, tmp_path, case):
    """The kept file overwrote the rebuilt shard with exit code 0; a NUL was silently truncated; an
    over-long name failed only after all the work. Now refused before any work, by every writer."""
    bad = _kept(models, tmp_path / "kept.dpk", BAD_KEPT[case], "{}")
    (tmp_path / "work").mkdir()
    with pytest.raises(dp.FormatError, match=re.escape(str(bad))):
        ck.apply_checkpoint(models / "base", bad, tmp_path / "work" / "out")
    _nothing_left(tmp_path / "work", [])
    r = run(CLI + ["apply", models / "base", bad, "-o", tmp_path / "work" / "out", "-q"])
    assert_clean_error(r, bad)
    _nothing_left(tmp_path / "work", [])
    if os.path.exists(APPLY_BIN):
        r = run([APPLY_BIN, models / "base", bad, tmp_path / "work" / "out"])
        assert_clean_error(r, bad)
        _nothing_left(tmp_path / "work", [])


@pytest.mark.parametrize("case", ["a shard", "a pickle", "NUL", "over-long", "a path"])
def test_kept_file_names_are_checked_on_open(models, tmp_path, case):
    """One rule, in the C++ reader: the file is refused when it is opened (info too), naming the file."""
    bad = _kept(models, tmp_path / "kept.dpk", BAD_KEPT[case])
    with pytest.raises(dp.FormatError, match=re.escape(str(bad))):
        dp.open(bad)
    r = run(CLI + ["info", bad])
    assert_clean_error(r, bad)


def test_compress_keeps_only_data_files(models, tmp_path):
    """compress keeps config and tokenizer files, never weights of any container, pickles or odd names
    (the same rule as apply: what compress keeps, apply accepts)."""
    ft = _copy(models / "ft", tmp_path / "ft")
    extra = {"notes.txt": b"kept", "x.pkl": b"\x80\x04K\x01.", "y.npy": b"\x93NUMPY", "z.pth": b"PK",
             "w.ckpt": b"x", "tab\tname.txt": b"x", "bell\x07.json": b"{}", "model.gguf": b"GGUF"}
    for name, data in extra.items():
        (ft / name).write_bytes(data)
    r = run(CLI + ["compress", models / "base", ft, "-o", tmp_path / "d.dpk", "--recipe", "sign", "-q"])
    assert r.rc == 0, r
    kept = _manifest(tmp_path / "d.dpk")["metadata"]["checkpoint"]["files"]
    assert sorted(kept) == ["config.json", "notes.txt", "tokenizer_config.json"]
    r = run(CLI + ["apply", models / "base", tmp_path / "d.dpk", "-o", tmp_path / "out", "-q"])
    assert r.rc == 0, r
    assert (tmp_path / "out" / "notes.txt").read_bytes() == b"kept"


def test_kept_files_apply_accepts_are_written(models, tmp_path):
    """The neighbour: ordinary names (dots, dashes, unicode, a name like a shard's but of text) still work."""
    names = ["generation_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
             "README.md", "vocab-é.txt"]

    def rec(r):
        for n in names:
            r["files"][n] = {"text": n}
    d = craft(tmp_path / "k.dpk", models / "d.dpk", record=rec)
    ck.apply_checkpoint(models / "base", d, tmp_path / "out")
    for n in names:
        assert (tmp_path / "out" / n).read_text() == n


# ============================================================================= 3. writes that follow links or clobber

@pytest.mark.parametrize("kind", ["gguf", "gguf-lora"])
def test_gguf_exports_do_not_write_through_a_link(models, tmp_path, kind):
    """`export gguf` / `gguf-lora` wrote through the fixed name OUT.tmp and followed a link placed there.
    Now the temporary is created exclusively (no fixed name): the link and what it points to are untouched."""
    pytest.importorskip("gguf")
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "out.gguf"
    os.symlink(victim, str(out) + ".tmp")
    r = run(_writer_args(models, "export " + kind, out))
    assert victim.read_bytes() == b"precious"
    assert os.path.islink(str(out) + ".tmp") and os.readlink(str(out) + ".tmp") == str(victim)
    assert r.rc == 0, r
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(os.listdir(tmp_path)) == ["out.gguf", "out.gguf.tmp", "victim.txt"]


@pytest.fixture(scope="module")
def adapter(models):
    """A PEFT adapter directory exported from d.dpk (for `import peft`)."""
    r = run(CLI + ["export", "peft", models / "base", models / "d.dpk", "-o", models / "adapter"])
    assert r.rc == 0, r
    return models / "adapter"


def _writer_args(models, command, out, adapter=None):
    """The command line of `command` writing `out`."""
    return {
        "compress": CLI + ["compress", models / "base", models / "ft", "-o", out, "--recipe", "sign", "-q"],
        "export gguf": CLI + ["export", "gguf", models / "base", models / "d.dpk", "-o", out],
        "export gguf-lora": CLI + ["export", "gguf-lora", models / "base", models / "d.dpk", "-o", out],
        "export peft": CLI + ["export", "peft", models / "base", models / "d.dpk", "-o", out],
        "import peft": CLI + ["import", "peft", models / "base", adapter or "-", "-o", out],
        "apply": CLI + ["apply", models / "base", models / "d.dpk", "-o", out, "-q"],
    }[command]


WRITERS = ["compress", "export gguf", "export gguf-lora", "export peft", "import peft", "apply"]


def _needs(command):
    if command.startswith("export gguf"):
        pytest.importorskip("gguf")


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("what", ["file", "dir"])
def test_no_command_replaces_an_existing_path_without_overwrite(models, adapter, tmp_path, command, what):
    """`compress -o` and `export gguf -o` replaced an existing file without asking. Without --overwrite no
    command replaces anything: exit 1, a message naming the path, everything as it was."""
    _needs(command)
    x = tmp_path / "x"
    if what == "file":
        x.write_bytes(b"thesis")
    else:
        x.mkdir()
        (x / "thesis.tex").write_bytes(b"thesis")
    before = _digest(tmp_path)
    r = run(_writer_args(models, command, x, adapter))
    assert_clean_error(r, x)
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("command", WRITERS)
def test_no_command_writes_through_a_link_at_its_output(models, adapter, tmp_path, command):
    """An output path that is a symbolic link (to what looks like an earlier output of the command, so that
    --overwrite would replace it) is not followed: what it points to is untouched, with --overwrite too."""
    _needs(command)
    victim = tmp_path / "victim"
    r = run(_writer_args(models, command, victim, adapter))  # an earlier output of this very command
    assert r.rc == 0, r
    os.symlink(victim, tmp_path / "link")
    before = _digest(victim)
    for extra in ([], ["--overwrite"]):
        r = run(_writer_args(models, command, tmp_path / "link", adapter) + extra)
        assert "Traceback" not in r.err, r
        assert _digest(victim) == before, extra
        assert os.path.islink(tmp_path / "link") or r.rc == 0, r


def test_compress_refuses_to_write_into_an_input(models, tmp_path):
    """`compress BASE FT -o FT/model.safetensors` swapped the fine-tune's weights for a delta. An output
    inside BASE or FT (or that is one of them) is refused before any work, with --overwrite too."""
    base, ft = _copy(models / "base", tmp_path / "base"), _copy(models / "ft", tmp_path / "ft")
    _copy(models / "ft.safetensors", tmp_path / "ft.safetensors")
    before = _digest(tmp_path)
    outs = (ft / "model-00001-of-00002.safetensors", ft / "new.dpk", base / "d.dpk", ft, tmp_path / "ft.safetensors")
    for out in outs:
        for extra in ([], ["--overwrite"]):
            src = tmp_path / "ft.safetensors" if out.name == "ft.safetensors" else ft
            r = run(CLI + ["compress", base, src, "-o", out, "-q"] + extra)
            assert_clean_error(r, out, rc=(1, 2) if extra else (1,))
            assert _digest(tmp_path) == before, (out, extra)


def test_compress_overwrite_replaces_only_a_delta_file(models, tmp_path):
    """With --overwrite, compress replaces an earlier delta file, and nothing else."""
    old = tmp_path / "old.dpk"
    shutil.copy(models / "plain.dpk", old)
    r = run(CLI + ["compress", models / "base", models / "ft", "-o", old, "--recipe", "sign", "-q", "--overwrite"])
    assert r.rc == 0, r
    assert "checkpoint" in dp.open(old).metadata
    other = tmp_path / "thesis.tex"
    other.write_bytes(b"thesis")
    r = run(CLI + ["compress", models / "base", models / "ft", "-o", other, "--recipe", "sign", "-q", "--overwrite"])
    assert_clean_error(r, other)
    assert other.read_bytes() == b"thesis"


@needs_apply_bin
def test_deltapack_apply_plain_delta_does_not_replace_its_base(models, tmp_path):
    """deltapack-apply with a plain delta ignored --overwrite and replaced BASE itself."""
    base = _copy(models / "base.safetensors", tmp_path / "base.safetensors")
    before = _digest(tmp_path)
    for extra in ([], ["--overwrite"]):
        r = run([APPLY_BIN, base, models / "plain.dpk", base] + extra)
        assert_clean_error(r, base)
        assert _digest(tmp_path) == before
    other = tmp_path / "other.safetensors"
    shutil.copy(base, other)
    before = _digest(tmp_path)
    r = run([APPLY_BIN, base, models / "plain.dpk", other])
    assert_clean_error(r, other)
    assert _digest(tmp_path) == before
    r = run([APPLY_BIN, base, models / "plain.dpk", other, "--overwrite"])  # an earlier output: replaced
    assert r.rc == 0, r
    assert other.read_bytes() != base.read_bytes()
    r = run([APPLY_BIN, base, models / "plain.dpk", tmp_path / "new.safetensors"])
    assert r.rc == 0, r


@needs_apply_bin
@pytest.mark.parametrize("args,word", [(["--alpha", "garbage"], "alpha"), (["--alpha", "nan"], "alpha"),
                                       (["--alpha", "1e99"], "alpha"), (["--alpha", ""], "alpha"),
                                       (["--alpha", "0.5x"], "alpha"), (["--threads", "x"], "threads"),
                                       (["--threads", "-3"], "threads"), (["--threads", "99999999999"], "threads")])
def test_deltapack_apply_rejects_bad_numbers(models, tmp_path, args, word):
    """`--alpha garbage` was read as 0 (strtof), `--threads x` as 0 (atoi)."""
    for delta in ("d.dpk", "plain.dpk"):
        base = models / ("base" if delta == "d.dpk" else "base.safetensors")
        r = run([APPLY_BIN, base, models / delta, tmp_path / "out"] + args)
        assert_clean_error(r, word, rc=(1, 2))
        assert not (tmp_path / "out").exists()


# ============================================================================= 4. data loss under --overwrite

def test_apply_overwrite_refuses_what_apply_did_not_write(models, tmp_path):
    """`apply --overwrite` deleted any non-empty directory: pointed at the directory holding the base, it
    removed the base, the delta and an unrelated thesis.tex (rc 0)."""
    home = tmp_path / "home"
    home.mkdir()
    _copy(models / "base", home / "base")
    _copy(models / "d.dpk", home / "d.dpk")
    (home / "thesis.tex").write_bytes(b"thesis")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_bytes(b"todo")
    (notes / "drafts").mkdir()
    (notes / "model-00001-of-00002.safetensors").write_bytes(b"not a shard")
    before = _digest(tmp_path)
    for out in (home, home / "base", notes):
        r = run(CLI + ["apply", home / "base", home / "d.dpk", "-o", out, "--overwrite", "-q"])
        assert_clean_error(r, out)
        assert _digest(tmp_path) == before, out
        with pytest.raises((ValueError, OSError), match=re.escape(str(out))):
            ck.apply_checkpoint(home / "base", home / "d.dpk", out, overwrite=True)
        assert _digest(tmp_path) == before, out
    if os.path.exists(APPLY_BIN):
        for out in (home, home / "base", notes):
            r = run([APPLY_BIN, home / "base", home / "d.dpk", out, "--overwrite"])
            assert_clean_error(r, out)
            assert _digest(tmp_path) == before, out


def test_apply_overwrite_replaces_an_earlier_output(models, tmp_path):
    """The neighbour: an earlier apply's directory (weights, index, config, tokenizer files) is replaced, and
    a one-file output by a one-file output."""
    out = tmp_path / "out"
    ck.apply_checkpoint(models / "base", models / "d.dpk", out)
    want = _digest(out)
    ck.apply_checkpoint(models / "base", models / "d.dpk", out, alpha=0.5, overwrite=True)
    assert _digest(out) != want
    r = run(CLI + ["apply", models / "base", models / "d.dpk", "-o", out, "--overwrite", "-q"])
    assert r.rc == 0, r
    assert _digest(out) == want
    one = tmp_path / "one.safetensors"
    ck.apply_checkpoint(models / "base.safetensors", models / "file.dpk", one)
    r = run(CLI + ["apply", models / "base.safetensors", models / "file.dpk", "-o", one, "--overwrite", "-q"])
    assert r.rc == 0, r


def test_export_peft_keeps_the_users_files(models, tmp_path):
    """`export peft` into an adapter directory deleted the user's README.md."""
    ad = tmp_path / "ad"
    r = run(CLI + ["export", "peft", models / "base", models / "d.dpk", "-o", ad])
    assert r.rc == 0, r
    (ad / "README.md").write_bytes(b"my model card")
    before = _digest(tmp_path)
    for extra in ([], ["--overwrite"]):
        r = run(CLI + ["export", "peft", models / "base", models / "d.dpk", "-o", ad] + extra)
        assert r.rc != 0, r
        assert "Traceback" not in r.err, r
        assert _digest(tmp_path) == before, extra


def test_export_peft_overwrite_replaces_an_earlier_adapter(models, tmp_path):
    ad = tmp_path / "ad"
    r = run(CLI + ["export", "peft", models / "base", models / "d.dpk", "-o", ad])
    assert r.rc == 0, r
    r = run(CLI + ["export", "peft", models / "base", models / "d.dpk", "-o", ad, "--overwrite", "--alpha", "0.5"])
    assert r.rc == 0, r
    assert sorted(os.listdir(ad)) == ["adapter_config.json", "adapter_model.safetensors"]


# ============================================================================= 5. secrets through links

SECRET = b"BEGIN OPENSSH PRIVATE KEY 0123456789"


def _secret(tmp_path):
    s = tmp_path / "outside" / ".secret"
    s.parent.mkdir()
    s.write_bytes(SECRET)
    return s


def _no_secret_under(*paths):
    for p, data in _digest(*[p for p in paths if os.path.lexists(p)]).items():
        if isinstance(data, bytes):
            assert SECRET not in data and base64.b64encode(SECRET)[:24] not in data, p


def test_compress_does_not_read_a_link_out_of_the_fine_tune(models, tmp_path):
    """A link FT/notes.txt -> ~/.secret was read and stored in the delta. Now refused with a message naming
    the link (--follow-links reads it)."""
    secret = _secret(tmp_path)
    ft = _copy(models / "ft", tmp_path / "ft")
    os.symlink(secret, ft / "notes.txt")
    r = run(CLI + ["compress", models / "base", ft, "-o", tmp_path / "d.dpk", "--recipe", "sign", "-q"])
    assert_clean_error(r, "notes.txt", "--follow-links")
    assert not (tmp_path / "d.dpk").exists()
    _no_secret_under(tmp_path / "ft", tmp_path / "d.dpk")
    r = run(CLI + ["compress", models / "base", ft, "-o", tmp_path / "d.dpk", "--recipe", "sign", "-q",
                   "--follow-links"])
    assert r.rc == 0, r
    begin, end = _manifest(tmp_path / "d.dpk")["metadata"]["checkpoint"]["files"]["notes.txt"]["bytes"]
    from safetensors.numpy import load_file
    assert load_file(tmp_path / "d.dpk")["__files__"].tobytes()[begin:end] == SECRET


def test_weights_linked_out_of_the_model_directory_are_refused(models, tmp_path):
    """Shards are entries of the directory like any other: a link out of it is not followed either."""
    ft = _copy(models / "ft", tmp_path / "ft")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = "model-00002-of-00002.safetensors"
    shutil.move(ft / shard, elsewhere / shard)
    os.symlink(elsewhere / shard, ft / shard)
    r = run(CLI + ["compress", models / "base", ft, "-o", tmp_path / "d.dpk", "--recipe", "sign", "-q"])
    assert_clean_error(r, shard, "--follow-links")
    assert not (tmp_path / "d.dpk").exists()


def test_apply_does_not_copy_a_link_out_of_the_base(models, tmp_path):
    """A delta that keeps no files makes apply copy the base directory's own: a link there to a secret (or to
    /dev/zero: no size cap) was copied into OUT."""
    secret = _secret(tmp_path)
    base = _copy(models / "base", tmp_path / "base")
    os.symlink(secret, base / "tokenizer.model")
    d = craft(tmp_path / "nofiles.dpk", models / "d.dpk", record=lambda r: r.update(files={}))
    r = run(CLI + ["apply", base, d, "-o", tmp_path / "out", "-q"])
    _no_secret_under(tmp_path / "out")
    assert_clean_error(r, "tokenizer.model")
    assert not (tmp_path / "out").exists()
    os.remove(base / "tokenizer.model")
    os.symlink("/dev/zero", base / "tokenizer.model")
    r = run(CLI + ["apply", base, d, "-o", tmp_path / "out", "-q"], timeout=120, fsize=256 << 20)
    assert_clean_error(r, "tokenizer.model")
    assert not (tmp_path / "out").exists()


def test_links_inside_the_directory_and_into_a_hf_cache_are_followed(models, tmp_path):
    """The neighbours: a Hugging Face cache snapshot (every file a link to ../../blobs/<hash>) and a link to
    another file of the same directory are read as before; the results equal the plain directories'."""
    def as_cache(src, repo):
        snap = tmp_path / "hub" / f"models--org--{repo}" / "snapshots" / "0123abcd"
        blobs = tmp_path / "hub" / f"models--org--{repo}" / "blobs"
        snap.mkdir(parents=True)
        blobs.mkdir(exist_ok=True)
        for i, name in enumerate(sorted(os.listdir(src))):
            shutil.copy(src / name, blobs / f"{i:040x}")
            os.symlink(f"../../blobs/{i:040x}", snap / name)
        return snap
    base, ft = as_cache(models / "base", "base"), as_cache(models / "ft", "ft")
    (ft.parent.parent / "blobs" / "extra").write_text("{}")
    r = run(CLI + ["compress", base, ft, "-o", tmp_path / "d.dpk", "--recipe", RECIPE, "-q"])
    assert r.rc == 0, r
    r = run(CLI + ["apply", base, tmp_path / "d.dpk", "-o", tmp_path / "out", "-q"])
    assert r.rc == 0, r
    ref = tmp_path / "ref"
    ck.apply_checkpoint(models / "base", models / "d.dpk", ref)
    assert sorted(os.listdir(ref)) == sorted(os.listdir(tmp_path / "out"))
    for f in os.listdir(ref):
        assert (ref / f).read_bytes() == (tmp_path / "out" / f).read_bytes(), f
    local = _copy(models / "ft", tmp_path / "local")
    os.rename(local / "tokenizer_config.json", local / "tok.json")
    os.symlink("tok.json", local / "tokenizer_config.json")
    r = run(CLI + ["compress", models / "base", local, "-o", tmp_path / "l.dpk", "--recipe", "sign", "-q"])
    assert r.rc == 0, r
    assert sorted(_manifest(tmp_path / "l.dpk")["metadata"]["checkpoint"]["files"]) == \
        ["config.json", "tok.json", "tokenizer_config.json"]


# ============================================================================= 6. a file changed under the reader

TRUNCATE_CHILD = textwrap.dedent("""
    import os, sys, faulthandler
    import deltapack as dp
    faulthandler.enable()
    path, mode, other = sys.argv[1], sys.argv[2], sys.argv[3]
    f = dp.open(path)
    names = f.keys()
    size = os.path.getsize(path)
    if mode == "truncate":
        os.truncate(path, size // 3)
    elif mode == "empty":
        os.truncate(path, 0)
    else:  # cp other path: the same inode truncated, then rewritten with another (smaller) delta
        data = open(other, "rb").read()
        with open(path, "r+b") as g:
            g.truncate(0)
            g.write(data)
    results = []
    for name in names:
        try:
            f[name]
            results.append("ok")
        except dp.FormatError as ex:
            results.append("FormatError")
            assert path in str(ex), str(ex)
    print(" ".join(results))
""")


@pytest.mark.parametrize("mode", ["truncate", "empty", "rewritten"])
def test_delta_truncated_after_open_is_an_error_not_a_crash(models, tmp_path, mode):
    """A delta truncated in place after dp.open (what `cp new.dpk old.dpk` does) gave SIGBUS in f[name]."""
    d = _copy(models / "d.dpk", tmp_path / "d.dpk")
    r = run([sys.executable, "-c", TRUNCATE_CHILD, d, mode, models / "plain.dpk"])
    assert r.rc == 0, r
    results = r.out.split()
    assert len(results) == len(dp.open(models / "d.dpk").keys()) and "FormatError" in results, r
    assert results[-1] == "FormatError", r  # the last tensors lie past the cut


APPLY_TRUNCATE_CHILD = textwrap.dedent("""
    import os, sys, faulthandler
    faulthandler.enable()
    from deltapack import checkpoint as ck, cli
    delta = sys.argv[2]

    class Bar:  # the progress bar: its first update comes after the first tensor is rebuilt
        n = 0
        def update(self, k):
            Bar.n += 1
            if Bar.n == 1:
                os.truncate(delta, 8 + 4096)
        def close(self):
            pass

    ck.progress_bar = lambda *a, **k: Bar()
    sys.exit(cli.main(["apply", sys.argv[1], delta, "-o", sys.argv[3], "-q", "--threads", "1"]))
""")


def test_apply_of_a_delta_truncated_midway_fails_and_leaves_nothing(models, tmp_path):
    """`deltapack apply` of a delta truncated while it runs died of SIGBUS and left its temporary directory."""
    d = _copy(models / "d.dpk", tmp_path / "d.dpk")
    (tmp_path / "work").mkdir()
    r = run([sys.executable, "-c", APPLY_TRUNCATE_CHILD, models / "base", d, tmp_path / "work" / "out"])
    assert os.path.getsize(d) == 8 + 4096, "the child did not truncate the delta"
    assert_clean_error(r, d)
    _nothing_left(tmp_path / "work", [])


# ============================================================================= 7. wrong types: errors, not tracebacks

T = "model.layers.0.mlp.up_proj.weight"


def _rec(fn):
    return lambda m: fn(m["metadata"]["checkpoint"])


# case -> (delta to start from, manifest edit, a word the message must hold besides the file name)
WRONG_TYPES = {
    "tensor entry a string": ("d.dpk", _rec(lambda r: r["tensors"].update({T: "delta"})), T),
    "tensor entry a list": ("d.dpk", _rec(lambda r: r["tensors"].update({T: []})), T),
    "shape a string": ("d.dpk", _rec(lambda r: r["tensors"][T].update(shape="96,64")), "shape"),
    "shape a number": ("d.dpk", _rec(lambda r: r["tensors"][T].update(shape=64)), "shape"),
    "shape negative": ("d.dpk", _rec(lambda r: r["tensors"][T].update(shape=[-96, 64])), "shape"),
    "shape of strings": ("d.dpk", _rec(lambda r: r["tensors"][T].update(shape=["96", "64"])), "shape"),
    "shape of floats": ("d.dpk", _rec(lambda r: r["tensors"][T].update(shape=[96.5, 64])), "shape"),
    "shape huge": ("d.dpk", _rec(lambda r: r["tensors"][T].update(shape=[1 << 40, 1 << 40])), "shape"),
    "dtype unknown": ("d.dpk", _rec(lambda r: r["tensors"][T].update(dtype="Q7")), "dtype"),
    "dtype a number": ("d.dpk", _rec(lambda r: r["tensors"][T].update(dtype=16)), "dtype"),
    "dtype missing": ("d.dpk", _rec(lambda r: r["tensors"][T].pop("dtype")), "dtype"),
    "op unknown": ("d.dpk", _rec(lambda r: r["tensors"][T].update(op="teleport")), "op"),
    "op missing": ("d.dpk", _rec(lambda r: r["tensors"][T].pop("op")), "op"),
    "op a list": ("d.dpk", _rec(lambda r: r["tensors"][T].update(op=["delta"])), "op"),
    "source a number": ("d.dpk", _rec(lambda r: r["tensors"][T].update(source=5)), "source"),
    "base_shape missing": ("resized.dpk", _rec(lambda r: r["tensors"][EMBED].pop("base_shape")), "base_shape"),
    "base_shape a string": ("resized.dpk", _rec(lambda r: r["tensors"][EMBED].update(base_shape="96")), "base_shape"),
    "new_rows a number": ("resized.dpk", _rec(lambda r: r["tensors"][EMBED].update(new_rows=7)), "new_rows"),
    "tensors a list": ("d.dpk", _rec(lambda r: r.update(tensors=[])), "tensors"),
    "version a string": ("d.dpk", _rec(lambda r: r.update(version="1")), "version"),
    "files a number": ("d.dpk", _rec(lambda r: r.update(files=5)), "files"),
    "files a list": ("d.dpk", _rec(lambda r: r.update(files=["config.json"])), "files"),
    "kept file a string": ("d.dpk", _rec(lambda r: r["files"].update({"config.json": "{}"})), "config.json"),
    "kept text a number": ("d.dpk", _rec(lambda r: r["files"].update({"config.json": {"text": 5}})), "config.json"),
    "kept base64 invalid": ("d.dpk", _rec(lambda r: r["files"].update({"x.bin2": {"base64": "!!!"}})), "x.bin2"),
    "kept file empty object": ("d.dpk", _rec(lambda r: r["files"].update({"x.txt": {}})), "x.txt"),
    "removed a string": ("d.dpk", _rec(lambda r: r.update(removed="lm_head.weight")), "removed"),
    "removed of numbers": ("d.dpk", _rec(lambda r: r.update(removed=[1, 2])), "removed"),
    "ft_bytes a string": ("d.dpk", _rec(lambda r: r.update(ft_bytes="many")), "ft_bytes"),
    "ft_bytes negative": ("d.dpk", _rec(lambda r: r.update(ft_bytes=-5)), "ft_bytes"),
    "checkpoint a string": ("d.dpk", lambda m: m["metadata"].update(checkpoint="yes"), "checkpoint"),
    "checkpoint a list": ("d.dpk", lambda m: m["metadata"].update(checkpoint=[]), "checkpoint"),
    "budget a string": ("d.dpk", lambda m: m["metadata"].update(budget="2 bits"), "budget"),
    "budget a list": ("d.dpk", lambda m: m["metadata"].update(budget=[2]), "budget"),
    "peft a list": ("d.dpk", lambda m: m["metadata"].update(peft=[]), "peft"),
    "calibration a number": ("d.dpk", lambda m: m["metadata"].update(calibration=5), "calibration"),
    "fingerprint tensors a list": ("d.dpk", lambda m: m["base"].update(tensors=[]), "tensors"),
    "fingerprint entry a string": ("d.dpk", lambda m: m["base"]["tensors"].update({T: "x"}), T),
    "fingerprint crc a number": ("d.dpk", lambda m: m["base"]["tensors"][T].update(crc32c=5), "crc32c"),
    "fingerprint crc not hex": ("d.dpk", lambda m: m["base"]["tensors"][T].update(crc32c="xyz"), "crc32c"),
    "fingerprint shape a string": ("d.dpk", lambda m: m["base"]["tensors"][T].update(shape="96"), "shape"),
    "fingerprint dtype unknown": ("d.dpk", lambda m: m["base"]["tensors"][T].update(dtype="Q7"), "dtype"),
    "fingerprint a string": ("d.dpk", lambda m: m.update(base="abc"), "base"),
    "tool a number": ("d.dpk", lambda m: m.update(tool=5), "tool"),
}


@pytest.fixture(scope="module")
def wrong_types(models, tmp_path_factory):
    """Every WRONG_TYPES case as a file: a valid delta whose manifest text was edited in place."""
    root = tmp_path_factory.mktemp("wrong-types")
    out = {}
    for i, (case, (src, fn, _)) in enumerate(WRONG_TYPES.items()):
        p = root / f"case{i}.dpk"
        shutil.copy(models / src, p)
        edit_manifest(p, fn)
        out[case] = p
    return out


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_types_are_format_errors_on_open(wrong_types, case):
    """One schema for the record and the metadata, checked by the C++ reader when the file is opened: a
    FormatError naming the file and the field, never TypeError / KeyError / AttributeError."""
    path, word = wrong_types[case], WRONG_TYPES[case][2]
    with pytest.raises(dp.FormatError) as ei:
        dp.open(path)
    assert str(path) in str(ei.value) and word in str(ei.value), str(ei.value)


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_types_are_clean_errors_in_every_command(models, wrong_types, tmp_path, capsys, case):
    """info, apply (Python, CLI), load, describe: exit 1 with the message, no traceback (cli.main in this
    process: any other exception fails the test)."""
    path = wrong_types[case]
    for args in (["info", path], ["info", path, "--json"],
                 ["apply", models / "base", path, "-o", tmp_path / "out", "-q"]):
        rc, err = cli_main(capsys, *args)
        assert rc == 1 and str(path) in err, (args, err)
    assert not (tmp_path / "out").exists()
    for fn in (lambda: ck.load(models / "base", path), lambda: ck.describe(path),
               lambda: ck.apply_checkpoint(models / "base", path, tmp_path / "out")):
        with pytest.raises(dp.FormatError):
            fn()
    assert os.listdir(tmp_path) == []


@needs_apply_bin
@pytest.mark.parametrize("case", ["tensor entry a string", "shape a string", "files a number", "op unknown",
                                  "base_shape missing", "fingerprint crc a number", "ft_bytes a string"])
def test_wrong_types_in_deltapack_apply(models, wrong_types, tmp_path, case):
    r = run([APPLY_BIN, models / "base", wrong_types[case], tmp_path / "out"])
    assert_clean_error(r, wrong_types[case])
    assert not (tmp_path / "out").exists()


def _patch_manifest_text(src, dst, fn):
    header, data = read_raw(src)
    header["__metadata__"]["deltapack"] = fn(header["__metadata__"]["deltapack"])
    write_raw(dst, header, data)
    return dst


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1e999999999"])
@pytest.mark.parametrize("field", ["ft_bytes", "metadata"])
def test_non_finite_numbers_name_the_file(models, tmp_path, capsys, number, field):
    """1e400 gave "JSON cannot hold a non-finite number" naming no file."""
    if field == "ft_bytes":
        fn = lambda t: re.sub(r'"ft_bytes":\s*\d+', f'"ft_bytes":{number}', t)  # noqa: E731
    else:  # user metadata beside the record: free-form, but still JSON of finite numbers
        fn = lambda t: t.replace('"metadata":{', f'"metadata":{{"lr":{number},', 1).replace(  # noqa: E731
            '"metadata": {', f'"metadata": {{"lr": {number}, ', 1)
    bad = _patch_manifest_text(models / "d.dpk", tmp_path / "inf.dpk", fn)
    assert number in read_raw(bad)[0]["__metadata__"]["deltapack"]
    with pytest.raises(dp.FormatError, match=re.escape(str(bad))):
        dp.open(bad)
    rc, err = cli_main(capsys, "info", bad)
    assert rc == 1 and str(bad) in err, err
    rc, err = cli_main(capsys, "apply", models / "base", bad, "-o", tmp_path / "out", "-q")
    assert rc == 1 and str(bad) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["needed", "extra"])
@pytest.mark.parametrize("shape", [[0, 1 << 40, 1 << 40], [0, 1 << 62], [1 << 62, 0], [1 << 40, 1 << 40, 0]])
def test_component_shape_that_overflows_names_file_and_tensor(tmp_path, capsys, where, shape):
    """`deltapack info` of a component whose shape overflows (an empty array of [0, 2^40, 2^40], listed by a
    tensor whose codec does not need it) printed numpy's "array is too big" with no file or tensor. The shape
    is the component's (header) and, for the codec's own component, the tensor's (manifest); CRC recomputed.
    An extra component may also be ignored (FORMAT.md §5), but never reach numpy unchecked."""
    path = tmp_path / "ovf.dpk"
    empty = dp.Encoded("dense", {"dtype": "f32"}, (0, 8), "f32", {"values": np.zeros((0, 8), np.float32)})
    dp.save(path, {"w": dp.encode(np.ones((4, 8), np.float32), "dense") if where == "extra" else empty,
                   "x": empty, NORM: dp.encode(np.ones(64, np.float32), "dense")})
    header, data = read_raw(path)
    man = json.loads(header["__metadata__"]["deltapack"])
    if where == "extra":  # x's empty array becomes an extra component of w
        header["w:extra"] = dict(header.pop("x:values"), shape=shape, dtype="U8")
        del man["tensors"]["x"]
        man["tensors"]["w"]["components"].append("extra")
    else:
        header["w:values"]["shape"] = shape
        man["tensors"]["w"]["shape"] = shape
    header["__metadata__"]["deltapack"] = json.dumps(man)
    write_raw(path, header, data)
    _recrc(path, "w")
    for verify in (True, False):
        try:
            got = dp.open(path, verify=verify)["w"]
        except dp.FormatError as ex:
            assert str(path) in str(ex) and "'w" in str(ex), str(ex)
        else:
            assert where == "extra", got
            np.testing.assert_array_equal(dp.decode(got), np.ones((4, 8), np.float32))
            np.testing.assert_array_equal(dp.decode(dp.open(path)[NORM]), np.ones(64, np.float32))
    for extra in ([], ["--no-verify"], ["--json"]):
        rc, err = cli_main(capsys, "info", path, *extra)
        assert rc == 0 or (rc == 1 and str(path) in err and "'w" in err), err


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_invalid_alpha_is_called_an_invalid_alpha(models, tmp_path, capsys, alpha):
    """`--alpha nan` was blamed on "a damaged or hostile delta"."""
    rc, err = cli_main(capsys, "apply", models / "base", models / "d.dpk", "-o", tmp_path / "out",
                       f"--alpha={alpha}", "-q")
    assert rc in (1, 2) and "alpha" in err and "hostile" not in err and "damaged" not in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="alpha") as ei:
        ck.apply_checkpoint(models / "base", models / "d.dpk", tmp_path / "out", alpha=float(alpha))
    assert not isinstance(ei.value, dp.FormatError)
    with pytest.raises(ValueError, match="alpha") as ei:
        ck.load(models / "base", models / "d.dpk", alpha=float(alpha))
    assert not isinstance(ei.value, dp.FormatError)
    assert os.listdir(tmp_path) == []


def test_gguf_lora_config_without_heads_names_the_file(models, tmp_path, capsys):
    """`gguf-lora` on a config without num_attention_heads printed `error: 'num_attention_heads'`."""
    pytest.importorskip("gguf")
    base = _copy(models / "base", tmp_path / "base")
    cfg = dict(CONFIG)
    del cfg["num_attention_heads"]
    (base / "config.json").write_text(json.dumps(cfg))
    for kind in ("gguf-lora", "gguf"):
        rc, err = cli_main(capsys, "export", kind, base, models / "d.dpk", "-o", tmp_path / "a.gguf", "--force")
        assert rc == 1 and "config.json" in err and "num_attention_heads" in err, err
        assert not (tmp_path / "a.gguf").exists()
    for value in ("4", None, [4], 0, -4):
        (base / "config.json").write_text(json.dumps({**CONFIG, "num_attention_heads": value}))
        rc, err = cli_main(capsys, "export", "gguf-lora", base, models / "d.dpk", "-o", tmp_path / "a.gguf", "--force")
        assert rc == 1 and "config.json" in err and "num_attention_heads" in err, (value, err)


# ============================================================================= the C API

C_API_CHILD = textwrap.dedent("""
    import ctypes, os, sys, faulthandler
    faulthandler.enable()
    lib = ctypes.CDLL(sys.argv[1])
    cp, p = ctypes.c_char_p, ctypes.c_void_p
    lib.dp_last_error.restype = cp
    lib.dp_file_open.restype, lib.dp_file_open.argtypes = p, [cp]
    lib.dp_file_close.argtypes = [p]
    lib.dp_file_numel.restype, lib.dp_file_numel.argtypes = ctypes.c_int64, [p, cp]
    lib.dp_decode.restype = ctypes.c_int
    lib.dp_decode.argtypes = [p, cp, p, ctypes.c_size_t, ctypes.c_int]
    class Params(ctypes.Structure):
        _fields_ = [("alpha", ctypes.c_float), ("threads", ctypes.c_int), ("verify", ctypes.c_int)]
    lib.dp_apply_default_params.restype = Params
    lib.dp_apply_checkpoint.restype = ctypes.c_int
    lib.dp_apply_checkpoint.argtypes = [cp, cp, cp, cp, Params, ctypes.c_int, ctypes.c_int]
    mode = sys.argv[2]
    if mode == "open":
        f = lib.dp_file_open(sys.argv[3].encode())
        print("NULL" if not f else "OPENED", lib.dp_last_error().decode())
    elif mode == "apply":
        rc = lib.dp_apply_checkpoint(sys.argv[3].encode(), sys.argv[4].encode(), sys.argv[5].encode(), None,
                                     lib.dp_apply_default_params(), 0, int(sys.argv[6]))
        print(rc, lib.dp_last_error().decode())
    elif mode == "truncate":
        path = sys.argv[3]
        f = lib.dp_file_open(path.encode())
        assert f, lib.dp_last_error()
        os.truncate(path, os.path.getsize(path) // 3)
        results = []
        for name in sys.argv[4:]:
            n = lib.dp_file_numel(f, name.encode())
            buf = (ctypes.c_float * max(n, 1))()
            rc = lib.dp_decode(f, name.encode(), buf, ctypes.sizeof(buf), 0)
            results.append("ok" if rc == 0 else "error:" + lib.dp_last_error().decode())
        print("\\n".join(results))
""")


@pytest.fixture(scope="module")
def libpath(tmp_path_factory):
    from test_kernels_native import HAVE_TOOLS, native_build
    if not HAVE_TOOLS:
        pytest.skip("cmake, ctest, gcc and g++ needed")
    return native_build(tmp_path_factory) / "libdeltapack.so"


def test_c_api_open_refuses_a_record_of_wrong_types(models, libpath, tmp_path):
    bad = _copy(models / "d.dpk", tmp_path / "types.dpk")
    edit_manifest(bad, WRONG_TYPES["shape a string"][1])
    r = run([sys.executable, "-c", C_API_CHILD, libpath, "open", bad])
    assert r.rc == 0 and r.out.startswith("NULL") and str(bad) in r.out and "shape" in r.out, r


@pytest.mark.parametrize("case", ["new-2^20", "new-2^14", "copies", "kept shard"])
def test_c_api_apply_refuses_hostile_files(models, libpath, tmp_path, case):
    """dp_apply_checkpoint of a tensor without a base below one bit per element (it printed only
    std::bad_alloc), of 'same' copies without bound, and of a kept file named like a shard."""
    path, word = {"new-2^20": lambda: (_new_bomb(models, tmp_path / "bomb.dpk", 20), "bomb.weight"),
                  "new-2^14": lambda: (_new_bomb(models, tmp_path / "bomb.dpk", 14), "bomb.weight"),
                  "copies": lambda: (_many_copies(models, tmp_path / "copies.dpk", 4000), ""),
                  "kept shard": lambda: (_kept(models, tmp_path / "kept.dpk", "model-00001-of-00002.safetensors"),
                                         "")}[case]()
    (tmp_path / "work").mkdir()
    r = run([sys.executable, "-c", C_API_CHILD, libpath, "apply", models / "base", path, tmp_path / "work" / "out",
             "0"], fsize=64 << 20)
    assert r.rc == 0 and r.out.startswith("-1 ") and str(path) in r.out and word in r.out, r
    assert "bad_alloc" not in r.out and r.rss_mib < RSS_LIMIT_MIB, r
    _nothing_left(tmp_path / "work", [])


def test_c_api_overwrite_refuses_what_it_did_not_write(models, libpath, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_bytes(b"thesis")
    r = run([sys.executable, "-c", C_API_CHILD, libpath, "apply", models / "base", models / "d.dpk",
             tmp_path / "work", "1"])
    assert r.rc == 0 and r.out.startswith("-1 ") and str(tmp_path / "work") in r.out, r
    assert (tmp_path / "work" / "thesis.tex").read_bytes() == b"thesis"


def test_c_api_read_of_a_truncated_file_is_an_error(models, libpath, tmp_path):
    d = _copy(models / "d.dpk", tmp_path / "d.dpk")
    names = dp.open(d).keys()
    r = run([sys.executable, "-c", C_API_CHILD, libpath, "truncate", d, *names])
    assert r.rc == 0, r
    results = r.out.splitlines()
    assert len(results) == len(names) and results[-1].startswith("error:") and str(d) in results[-1], r


# ============================================================================= 8. found by a later attack
#
# A third attacker, against the fixed build: outputs spelled through a link and "..", files gguf-py reads by name,
# JSON of many small values, config.json numbers that size the export's work, many or large kept files, a model
# directory with one shard among other files, control characters on a terminal, and messages that named nothing.

def test_output_spelled_through_a_link_and_dotdot_is_checked_where_it_is_written(models, tmp_path):
    """LINK/../NAME is beside LINK's target (the kernel resolves LINK first); the check looked at NAME beside LINK:
    compress wrote into FT, apply replaced its single-file base."""
    ft = _copy(models / "ft", tmp_path / "ft")
    (ft / "sub").mkdir()
    os.symlink(ft / "sub", tmp_path / "L")
    before = _digest(ft)
    r = run(CLI + ["compress", models / "base", ft, "-o", "L/../new.dpk", "--recipe", "sign", "-q"], cwd=tmp_path)
    assert_clean_error(r, "lies inside the input")
    b = tmp_path / "b"
    b.mkdir()
    _copy(models / "base.safetensors", b / "base.safetensors")
    (b / "sub").mkdir()
    os.symlink(b / "sub", tmp_path / "B")
    held = _digest(b)
    r = run(CLI + ["apply", b / "base.safetensors", models / "file.dpk", "-o", "B/../base.safetensors", "--overwrite",
                   "-q"], cwd=tmp_path)
    assert_clean_error(r, "is the input")
    assert _digest(ft) == before and _digest(b) == held


@pytest.mark.parametrize("name", ["chat_template.jinja", "additional_chat_templates/tool.jinja", "merges.txt"])
def test_gguf_export_reads_tokenizer_files_only_inside_the_base(models, tmp_path, name):
    """gguf-py's SpecialVocab opens chat templates and merges by name, following links: a secret linked as one
    ended up in the GGUF's metadata. The export reads checked copies only."""
    pytest.importorskip("gguf")
    base = _copy(models / "base", tmp_path / "base")
    secret = _secret(tmp_path)
    os.makedirs(os.path.dirname(base / name), exist_ok=True)
    os.symlink(secret, base / name)
    r = run(CLI + ["export", "gguf", base, models / "d.dpk", "-o", tmp_path / "m.gguf"])
    assert_clean_error(r, os.path.basename(name), "outside the model directory")
    assert not (tmp_path / "m.gguf").exists()


def test_json_of_many_small_values_is_refused_before_it_costs_memory(models, tmp_path):
    """A manifest of a million zeros took ~90 bytes of memory per byte of JSON; at most one value per 8 bytes."""
    path = _copy(models / "d.dpk", tmp_path / "zeros.dpk")
    edit_manifest(path, lambda m: m["metadata"].update(junk=[0] * 1_000_000))
    with pytest.raises(dp.FormatError, match=r"more values than .* bytes of JSON may hold"):
        dp.open(path)


@pytest.mark.parametrize("field,value,kind", [("num_hidden_layers", 100000, "gguf-lora"),
                                              ("vocab_size", 300_000_000, "gguf")])
def test_gguf_export_config_numbers_must_agree_with_the_tensors(models, tmp_path, field, value, kind):
    """config.json's layer count sized gguf-py's name map and vocab_size the placeholder vocabulary: a number
    ran the export out of memory. They must agree with the tensors."""
    pytest.importorskip("gguf")
    base = _copy(models / "base", tmp_path / "base")
    (base / "config.json").write_text(json.dumps({**CONFIG, field: value}))
    r = run(CLI + ["export", kind, base, models / "d.dpk", "-o", tmp_path / "x.gguf", "--force"])
    assert_clean_error(r, "config.json", field)
    assert r.rss_mib < RSS_LIMIT_MIB, r


@pytest.mark.parametrize("what", ["fifo", "deep"])
def test_gguf_export_of_a_tokenizer_json_that_is_a_fifo_or_too_deep(models, tmp_path, what):
    pytest.importorskip("gguf")
    base = _copy(models / "base", tmp_path / "base")
    if what == "fifo":
        os.mkfifo(base / "tokenizer.json")
    else:
        (base / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
    r = run(CLI + ["export", "gguf", base, models / "d.dpk", "-o", tmp_path / "m.gguf"], timeout=60)
    assert_clean_error(r, "tokenizer.json")


def test_kept_files_are_bounded_in_number_and_kept_small(models, tmp_path):
    """compress keeps at most 256 files (a record of more is refused when opened: each is a file apply creates),
    and stores their bytes after the tensors, not in the header (where JSON would inflate NULs and quotes)."""
    ft = _copy(models / "ft", tmp_path / "ft")
    for i in range(300):
        (ft / f"note{i:03d}.txt").write_text("n")
    (ft / "zeros.txt").write_bytes(b"\0" * 4096)
    r = run(CLI + ["compress", models / "base", ft, "-o", tmp_path / "d.dpk", "--recipe", "sign"])
    assert r.rc == 0 and "more than 256 files" in r.err, r
    files = _manifest(tmp_path / "d.dpk")["metadata"]["checkpoint"]["files"]
    assert len(files) == 256 and list(files.get("config.json", {})) == ["sha256"]  # the base's own: by its hash
    many = craft(tmp_path / "many.dpk", models / "d.dpk",
                 record=lambda rec: rec["files"].update({f"f{i}.txt": {"text": ""} for i in range(300)}))
    with pytest.raises(dp.FormatError, match="more than the 256"):
        dp.open(many)
    ft2 = _copy(models / "ft", tmp_path / "ft2")
    (ft2 / "zeros.txt").write_bytes(b"\0" * 4096)
    (ft2 / "quotes.json").write_bytes(b'"\\' * 50_000)  # escaped twice in a header: 5x
    assert run(CLI + ["compress", models / "base", ft2, "-o", tmp_path / "z.dpk", "-q"]).rc == 0
    assert sorted(_manifest(tmp_path / "z.dpk")["metadata"]["checkpoint"]["files"]["zeros.txt"]) == ["bytes", "sha256"]
    with open(tmp_path / "z.dpk", "rb") as f:  # stored as bytes after the tensors: the header stays small
        assert int.from_bytes(f.read(8), "little") < 20_000


def test_apply_overwrite_of_a_directory_with_one_shard_among_other_files(models, tmp_path):
    """A directory holding one .safetensors file and the user's thesis.txt and results.json is not an output of
    apply: --overwrite refuses it (it deleted both)."""
    out = tmp_path / "research"
    out.mkdir()
    _copy(models / "base.safetensors", out / "checkpoint-old.safetensors")
    (out / "thesis.txt").write_text("years of work")
    (out / "results.json").write_text("{}")
    held = _digest(out)
    r = run(CLI + ["apply", models / "base", models / "d.dpk", "-o", out, "--overwrite", "-q"])
    assert_clean_error(r, "which deltapack apply does not write")
    assert "thesis.txt" in r.err or "results.json" in r.err, r
    assert _digest(out) == held


def test_info_prints_names_without_terminal_control_characters(models, tmp_path):
    path = craft(tmp_path / "esc.dpk", models / "d.dpk",
                 record=lambda rec: rec.update(removed=["\x1b[2J\x1b]0;pwned\x07"]))
    r = run(CLI + ["info", path])
    assert r.rc == 0 and "\x1b" not in r.out and "\\x1b[2J" in r.out, r


@pytest.mark.parametrize("args,word", [
    (["info", "{noft}"], None),  # a record without its optional ft_bytes
    (["verify", "{base}", "{ft}", "{d}", "--max-rel-error", "nan"], "finite"),
    (["apply", "{base}", "{d}", "-o", "{tmp}/o", "--threads", "-5"], "negative")])
def test_optional_fields_and_numbers(models, tmp_path, args, word):
    noft = craft(tmp_path / "noft.dpk", models / "d.dpk", record=lambda rec: rec.pop("ft_bytes"))
    argv = [a.format(noft=noft, base=models / "base", ft=models / "ft", d=models / "d.dpk", tmp=tmp_path) for a in args]
    r = run(CLI + argv)
    if word is None:
        assert r.rc == 0 and "Traceback" not in r.err, r
    else:
        assert_clean_error(r, word, rc=(2,))


@needs_apply_bin
def test_deltapack_apply_rejects_an_unknown_dtype(models, tmp_path):
    r = run([APPLY_BIN, models / "base.safetensors", models / "plain.dpk", tmp_path / "o.safetensors", "--dtype", "f8"])
    assert_clean_error(r, "--dtype f8", rc=(2,))
    assert not (tmp_path / "o.safetensors").exists()


# ============================================================================= docs

def test_security_doc_names_what_exists_and_states_the_policies():
    """docs/SECURITY.md states the bounds, the link policy and the overwrite policy, and every
    `checkpoint.NAME` it mentions exists (it named checkpoint.read_safetensors_header)."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "SECURITY.md")).read()
    for name in re.findall(r"`checkpoint\.(\w+)", text):
        assert hasattr(ck, name), f"docs/SECURITY.md names checkpoint.{name}, which does not exist"
    for word in ("--follow-links", "--overwrite", "SIGBUS"):
        assert word in text, word
