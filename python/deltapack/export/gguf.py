"""Fine-tunes to llama.cpp: a GGUF LoRA adapter, or a complete GGUF model rebuilt from base + delta.

    export_gguf_lora("base_dir", "ft.dpk", "adapter.gguf", rank=16, outtype="f32")
    export_gguf_model("base_dir", "ft.dpk", "model.gguf", outtype="q8_0")   # delta=None: the base itself

Conventions (those of llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py):
- tensor names come from gguf-py's Hugging Face name map (`blk.N.attn_q.weight`, ...);
- numpy shapes are ggml's dimensions reversed, so a Hugging Face (out, in) weight is written as is;
- llama (and Mistral, which llama.cpp runs as llama) stores q/k rows permuted from Hugging Face's
  rotate-half layout to interleaved pairs, per head; the same row permutation applies to a LoRA's B;
- an adapter holds `<name>.lora_a` (r x in) and `<name>.lora_b` (out x r); llama.cpp adds
  (alpha / r) * B @ A. For the token embedding it looks rows up in A, so there A is (vocab x r) and
  B is (dim x r);
- 1-d tensors and norms stay f32; q8_0 needs rows of a multiple of 32 values.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass

import numpy as np

import gguf

from .. import _core, modeldir
from .finetune import FineTune, is_input_embedding, lowrank_factors

OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
# An adapter's factors may also take the 32-value block types that gguf-py quantizes and llama.cpp's CPU backend
# multiplies (tests/test_lora_only.py loads each); the k-quants' 256-value blocks would pad every rank to 256.
LORA_OUTTYPES = {**OUTTYPES, "q5_1": gguf.GGMLQuantizationType.Q5_1, "q5_0": gguf.GGMLQuantizationType.Q5_0,
                 "q4_1": gguf.GGMLQuantizationType.Q4_1, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


@dataclass(frozen=True)
class Arch:
    hf: str            # Hugging Face architecture class
    gguf: gguf.MODEL_ARCH
    permute_qk: bool   # llama.cpp's llama graph wants q/k rows in interleaved-pair RoPE order

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf]


ARCHS = {
    "LlamaForCausalLM": Arch("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": Arch("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": Arch("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, False),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_IGNORED = (".rotary_emb.inv_freq",)


def _say(msg, quiet=False):
    if not quiet:
        print(f"deltapack: {msg}", file=sys.stderr)


def arch_of(config: dict | None, where: str) -> Arch:
    """The supported architecture named by a config.json, or a ValueError listing the supported ones."""
    supported = ", ".join(ARCHS)
    if not config:
        raise ValueError(f"{where}: no config.json; GGUF export needs the base's Hugging Face config "
                         f"(supported architectures: {supported})")
    archs, model_type = config.get("architectures"), config.get("model_type")
    if not (archs is None or isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ValueError(f"{where}/config.json: field 'architectures' must be a list of strings, not {archs!r}")
    if not (model_type is None or isinstance(model_type, str)):
        raise ValueError(f"{where}/config.json: field 'model_type' must be a string, not {model_type!r}")
    names = list(archs or [])
    if model_type in _MODEL_TYPES:
        names.append(_MODEL_TYPES[model_type])
    for n in names:
        if n in ARCHS:
            return ARCHS[n]
    got = ", ".join(names) or config.get("model_type") or "unknown"
    raise ValueError(f"{where}: architecture {got} is not supported for GGUF export (supported: {supported})")


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def checked_config(config: dict, where: str, shapes: dict) -> dict:
    """config.json (of the model directory `where`) with every field a GGUF export reads checked against its type
    and the tensors' shapes (`shapes`: name -> shape, what the export writes; the file's numbers size the name
    map and the vocabulary): a ValueError naming the file and the field when one is missing or wrong."""
    path = f"{where}/config.json"

    def fail(key, what):
        raise ValueError(f"{path}: field '{key}' {what}")

    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size"):
        if key not in config:
            fail(key, "is missing (GGUF export needs it)")
        if not _is_int(config[key]) or config[key] <= 0:
            fail(key, f"must be a positive integer, not {config[key]!r}")
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        v = config.get(key)
        if v is not None and (not _is_int(v) or v < 0):
            fail(key, f"must be an integer >= 0 or null, not {v!r}")

    def f32(v):  # GGUF stores these as float32
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 3.4e38

    for key in ("rms_norm_eps", "rope_theta"):
        v = config.get(key)
        if v is not None and not f32(v):
            fail(key, f"must be a finite float32 number, not {v!r}")
    for key in ("rope_parameters", "rope_scaling"):
        rp = config.get(key)
        if rp is None:
            continue
        if not isinstance(rp, dict):
            fail(key, f"must be an object or null, not {rp!r}")
        for sub in ("rope_theta", "factor"):
            v = rp.get(sub)
            if v is not None and (not f32(v) or v <= 0):
                fail(f"{key}.{sub}", f"must be a positive float32 number, not {v!r}")
        for sub in ("rope_type", "type"):
            if rp.get(sub) is not None and not isinstance(rp[sub], str):
                fail(f"{key}.{sub}", f"must be a string, not {rp[sub]!r}")
        if (rp.get("rope_type") or rp.get("type")) == "linear" and rp.get("factor") is None:
            fail(f"{key}.factor", "is missing (linear RoPE scaling needs it)")
    if not isinstance(config.get("use_sliding_window", True), bool):
        fail("use_sliding_window", f"must be true or false, not {config['use_sliding_window']!r}")
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    if n_head % n_kv:
        fail("num_key_value_heads", f"{n_kv} does not divide num_attention_heads {n_head}")
    if not config.get("head_dim") and config["hidden_size"] % n_head:
        fail("hidden_size", f"{config['hidden_size']} is not a multiple of num_attention_heads {n_head}")
    layers = {int(m.group(1)) for m in map(_LAYER.match, shapes) if m}
    if config["num_hidden_layers"] != (max(layers) + 1 if layers else 0):
        fail("num_hidden_layers", f"is {config['num_hidden_layers']}, the tensors have {len(layers)} layers")
    emb = shapes.get("model.embed_tokens.weight")
    if emb is not None and config["vocab_size"] > emb[0]:
        fail("vocab_size", f"{config['vocab_size']} is more than the embedding's {emb[0]} rows")
    for name, shape in shapes.items():  # q/k rows are permuted in rotary pairs per head
        heads = n_head if name.endswith("q_proj.weight") else n_kv if name.endswith("k_proj.weight") else None
        if heads and shape[0] % (2 * heads):
            fail("num_attention_heads" if heads == n_head else "num_key_value_heads",
                 f"{heads} does not split tensor '{name}' ({shape[0]} rows) into pairs per head")
    return config


def _heads(config):
    n_head = config["num_attention_heads"]
    return n_head, config.get("num_key_value_heads") or n_head


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotate-half q/k rows -> llama.cpp's interleaved pairs, head by head."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


class _Names:
    """Hugging Face tensor names -> GGUF names, and the q/k row permutation of the architecture."""

    def __init__(self, arch: Arch, config: dict):
        self.arch, self.config = arch, config
        self.map = gguf.get_tensor_name_map(arch.gguf, config["num_hidden_layers"])
        self.n_head, self.n_kv = _heads(config)

    def gguf_name(self, hf_name: str) -> str | None:
        return self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def permute(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        if not self.arch.permute_qk:
            return rows
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return _permute_rows(rows, self.n_head)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return _permute_rows(rows, self.n_kv)
        return rows


def _qtype_for(name: str, shape, outtype: str, notes: list | None) -> gguf.GGMLQuantizationType:
    """Output type of one tensor: vectors and norms f32; a block type only for rows of whole blocks (else f16,
    with a note when `notes` is a list)."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    q = LORA_OUTTYPES[outtype]
    block = gguf.GGML_QUANT_SIZES[q][0]
    if shape[-1] % block != 0:
        if notes is not None:
            notes.append(f"{name}: rows of {shape[-1]} values are not whole {outtype} blocks of {block}; "
                         "written as f16")
        return gguf.GGMLQuantizationType.F16
    return q


def _nbytes(shape, qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * size


class _StreamWriter:
    """A GGUF file written tensor by tensor: declare every tensor, then write their data in order.

    gguf-py writes into the C++ core's AtomicFile: an unnamed file (or one created with O_EXCL under a random
    name) in the target directory, linked into place when complete; never a fixed name or through a link. An
    existing file is replaced only with overwrite (export checks that it is a GGUF file first)."""

    def __init__(self, path, arch_name: str, overwrite: bool = False):
        self.path = os.fspath(path)
        self.file = _core.AtomicFile(self.path, overwrite)
        self.tmp = self.file.reopen_path
        self.w = gguf.GGUFWriter(self.tmp, arch_name)
        self.order = []

    def declare(self, name, shape, qtype):
        self.w.add_tensor_info(name, tuple(int(s) for s in shape), np.dtype(np.float32), _nbytes(shape, qtype),
                               raw_dtype=qtype)
        self.order.append((name, tuple(shape), qtype))

    def write(self, produce):
        """produce(name) -> float32 array of the declared shape, called once per tensor in order."""
        try:
            self.w.write_header_to_file()
            self.w.write_kv_data_to_file()
            self.w.write_ti_data_to_file()
            for name, shape, qtype in self.order:
                data = np.ascontiguousarray(produce(name), dtype=np.float32)
                if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                 gguf.GGMLQuantizationType.BF16):
                    # gguf-py computes 1/scale in f32, which overflows for blocks of values below ~1e-37;
                    # such values round to 0 in a block type anyway (its scale is f16).
                    data = np.where(np.abs(data) < 1e-30, np.float32(0), data)
                if tuple(data.shape) != shape:
                    raise ValueError(f"tensor '{name}': produced shape {list(data.shape)}, declared {list(shape)}")
                self.w.write_tensor_data(gguf.quants.quantize(data, qtype))
            self.w.close()
            self.file.commit()
        except OSError as ex:  # numpy's short-write message names neither the file nor the cause
            self._discard()
            try:
                full = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free < (1 << 20)
            except OSError:
                full = False
            reason = str(ex.strerror or ex).replace(self.tmp, self.path)
            raise OSError(ex.errno, f"writing {self.path}: {reason}" + (" (disk full)" if full else "")) from None
        except BaseException:
            self._discard()
            raise

    def _discard(self):
        try:
            self.w.close()
        except OSError:  # flushing onto a full disk fails again: the file goes anyway
            pass
        self.file.abort()


# ----------------------------------------------------------------------------- LoRA adapter

def _opened(base, delta, alpha, force, follow_links):
    """The fine-tune to export, its llama.cpp architecture and checked config: every check before any work."""
    ft = FineTune(base, delta, alpha, force=force, follow_links=follow_links)
    arch = arch_of(ft.config, ft.base.path)
    return ft, arch, checked_config(ft.config, ft.base.path, {n: ft.shape(n) for n in ft.names()})


def adapter_types(outtype: str) -> tuple[str, str]:
    """(type of A, type of B) from an adapter's --outtype: one type for both, or 'A_TYPE/B_TYPE'."""
    types = tuple(outtype.split("/")) if isinstance(outtype, str) else ()
    types = types * 2 if len(types) == 1 else types
    if len(types) != 2 or not all(t in LORA_OUTTYPES for t in types):
        raise ValueError(f"outtype must be one of {', '.join(LORA_OUTTYPES)}, or two of them as A_TYPE/B_TYPE "
                         f"(got {outtype!r})")
    return types


def _lora_pair(f, gname: str, names: _Names, types: tuple[str, str]):
    """(A, B) of one factor as llama.cpp takes them (the token embedding transposed), at the rank written: with a
    block type on a tensor whose rows run along the rank, the rank is padded with zero directions to whole blocks
    when that is smaller than writing that tensor in f16."""
    u, v = f.u, f.v
    embd = gname == "token_embd.weight"
    block = max(gguf.GGML_QUANT_SIZES[LORA_OUTTYPES[t]][0] for t in types)

    def pair(rank):
        uu = np.zeros((u.shape[0], rank), np.float32)
        vv = np.zeros((rank, v.shape[1]), np.float32)
        uu[:, :f.rank], vv[:f.rank] = u, v
        if embd:   # rows looked up in A: A = u (vocab x r), B = v.T (dim x r)
            return np.ascontiguousarray(uu), np.ascontiguousarray(vv.T)
        return vv, np.ascontiguousarray(names.permute(f.name, uu))

    def size(rank):
        a_shape, b_shape = ((u.shape[0], rank), (v.shape[1], rank)) if embd else \
            ((rank, v.shape[1]), (u.shape[0], rank))
        return sum(_nbytes(sh, _qtype_for(gname, sh, t, None)) for sh, t in zip((a_shape, b_shape), types))

    padded = -(-f.rank // block) * block
    return pair(padded if size(padded) < size(f.rank) else f.rank)


def export_gguf_lora(base, delta, out, rank: int = 16, outtype: str = "f32", alpha: float = 1.0,
                     quiet: bool = False, force: bool = False, overwrite: bool = False,
                     follow_links: bool = False, untied_output: bool = False) -> dict:
    """Write `delta` (against `base`) as a llama.cpp LoRA adapter. Returns a report with, per tensor,
    its rank, whether it was stored low-rank or approximated by SVD, and the approximation's error, and the
    share of the delta's energy the adapter does not carry (vectors, skipped tensors, SVD error).
    outtype: f32 (exact), f16, bf16 or a block type of LORA_OUTTYPES (the rank padded to whole blocks where that
    is smaller), or 'A_TYPE/B_TYPE' (e.g. 'q5_0/q4_0': A, the input side, is the more sensitive).
    overwrite: replace an existing GGUF file at `out`; follow_links: read BASE through links wherever they point.
    untied_output: for a model with tied embeddings, carry the embedding's delta on both of its uses, the token
    embedding and the output projection; the adapter then needs a base exported with untied_output=True."""
    types = adapter_types(outtype)
    ft, arch, config = _opened(base, delta, alpha, force, follow_links)
    _core.check_output(os.fspath(out), _core.OutputKind.GGUF_FILE, [ft.base.path, ft.delta.path], overwrite)
    names = _Names(arch, config)

    def show(f):
        if f.source == "svd":
            _say(f"{f.name}: rank {f.rank} SVD, relative error {f.rel_error:.4f}", quiet)

    view = lowrank_factors(ft, rank, show, tied_embedding=untied_output)
    if not view.factors:
        raise ValueError(f"{ft.delta.path}: no matrix delta to write as a LoRA adapter "
                         f"({len(view.skipped)} not representable, {len(view.vectors)} vectors)")
    notes, pairs, kept = [], {}, []
    for f in view.factors:
        gname = names.gguf_name(f.name)
        if gname is None:
            view.skipped.append((f.name, f"no GGUF name for this tensor in {arch.name}"))
            continue
        kept.append(f)
        pairs[gname] = _lora_pair(f, gname, names, types)
        if gname == "token_embd.weight" and ft.tied_embeddings:   # untied_output: its output use too
            pairs["output.weight"] = _lora_pair(f, "output.weight", names, types)
    view.factors = kept
    if not kept:
        raise ValueError(f"{ft.delta.path}: none of its matrix deltas has a tensor name in llama.cpp's {arch.name}")
    # llama.cpp scales every pair by alpha / r, r its rank in the file: fold r / alpha into B so each pair keeps
    # its own rank.
    written = {g: b.shape[1] for g, (a, b) in pairs.items()}
    common = Counter(written.values()).most_common(1)[0][0]
    entries = {}
    for gname, (a, b) in pairs.items():
        entries[gname + ".lora_a"] = a
        entries[gname + ".lora_b"] = b if written[gname] == common else b * np.float32(written[gname] / common)
    sw = _StreamWriter(out, arch.name, overwrite)
    sw.w.add_type(gguf.GGUFType.ADAPTER)
    sw.w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    sw.w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(common))
    sw.w.add_name(f"deltapack LoRA of {os.path.basename(os.fspath(delta))}")
    for name, arr in entries.items():
        sw.declare(name, arr.shape, _qtype_for(name, arr.shape, types[name.endswith(".lora_b")], notes))
    sw.write(lambda name: entries[name])
    for n in notes:
        _say(n, quiet)
    for n, why in view.skipped:
        _say(f"not in the adapter: {n} ({why})", quiet)
    for n in view.vectors:
        _say(f"not in the adapter: {n} (vector; LoRA covers matrices)", quiet)
    rep = view.report()
    e = rep["energy"]
    _say(f"the adapter carries {100 * (1 - e['vectors'] - e['skipped'] - e['svd_error']):.2f} % of the delta's energy "
         f"(sum of squares); not carried: vectors {100 * e['vectors']:.2f} %, other tensors {100 * e['skipped']:.2f} %"
         + (f", SVD to rank {rank} {100 * e['svd_error']:.2f} %" if any(f.source == "svd" for f in kept) else "")
         + ("" if outtype == "f32" else f"; the factors then rounded to {outtype}"), quiet)
    for t in rep["tensors"]:
        t["rank_in_file"] = written[names.gguf_name(t["name"])]
    rep.update(out=os.fspath(out), arch=arch.name, alpha=float(common), outtype=outtype, notes=notes,
               bytes=os.path.getsize(out))
    return rep


# ----------------------------------------------------------------------------- full model

def _rope_theta(config):
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rp.get("rope_theta") or config.get("rope_theta") or 10000.0, rp


def _hyperparameters(w: gguf.GGUFWriter, arch: Arch, config: dict, outtype: str):
    n_head, n_kv = _heads(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config.get("max_position_embeddings") or 2048)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps") or 1e-6)
    theta, rp = _rope_theta(config)
    w.add_rope_freq_base(float(theta))
    rope_type = (rp.get("rope_type") or rp.get("type") or "default")
    if rope_type == "linear" and rp.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif rope_type != "default":
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported by this export (default and linear are)")
    if "head_dim" in config and config["head_dim"]:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch.gguf == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(head_dim)
    w.add_file_type(FILE_TYPES[outtype])
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# The files of a model directory the vocabulary is read from, here and by gguf-py's SpecialVocab (which opens them
# by name, following links): they are copied, checked, into a private directory, and only that is read.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "config.json", "generation_config.json", "tokenizer.model", "chat_template.jinja",
                    "chat_template.json", "merges.txt", "vocab.json")
_TEMPLATES = "additional_chat_templates"


@contextlib.contextmanager
def _vocab_dir(model_dir, follow_links: bool):
    """A private directory holding checked copies of `model_dir`'s tokenizer files (links only inside it unless
    follow_links, regular files of at most 64 MiB); None without a model directory."""
    if not model_dir:
        yield None
        return
    names = list(_TOKENIZER_FILES)
    templates = _core.resolve_in_model_dir(model_dir, _TEMPLATES, follow_links)
    if os.path.isdir(templates):
        names += [f"{_TEMPLATES}/{n}" for n in sorted(os.listdir(templates)) if n.endswith(".jinja")][:64]
    total = 0
    with tempfile.TemporaryDirectory(prefix="deltapack-vocab-") as tmp:
        os.mkdir(os.path.join(tmp, _TEMPLATES))
        for name in names:
            src = _core.resolve_in_model_dir(model_dir, name, follow_links)
            if not os.path.lexists(src):
                continue
            st = os.stat(src)  # before opening: a FIFO would block open()
            total += st.st_size
            limit = modeldir.MAX_JSON_FILE
            if not stat.S_ISREG(st.st_mode) or st.st_size > limit or total > 2 * limit:
                raise ValueError(f"{model_dir}/{name}: not a regular file of at most {limit >> 20} MiB "
                                 f"(the tokenizer files at most {2 * limit >> 20} MiB together)")
            with open(src, "rb") as fh, open(os.path.join(tmp, name), "wb") as out:
                out.write(fh.read(limit + 1))
        yield tmp


def _tokenizer_json(vocab_dir, model_dir):
    """tokenizer.json from the checked copies (None without one), named as `model_dir`'s in messages."""
    path = os.path.join(vocab_dir, "tokenizer.json") if vocab_dir else None
    if not path or not os.path.exists(path):
        return None
    return modeldir.read_json_object(path, os.path.join(model_dir, "tokenizer.json"))


def _split_patterns(pre) -> list[str]:
    """Regex patterns of a tokenizer.json pre-tokenizer (Split steps; ByteLevel's own GPT-2 regex as 'gpt2')."""
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [p for step in pre.get("pretokenizers") or [] for p in _split_patterns(step)]
    if pre.get("type") == "Split":
        pat = pre.get("pattern") or {}
        return [pat.get("Regex") or pat.get("String") or ""]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return ["gpt2"]
    return []


def _bpe_pre(tok: dict, arch: Arch, has_merges: bool, model_dir, quiet: bool) -> str:
    """llama.cpp's name for the pre-tokenizer (the regex that splits text before BPE merges)."""
    pats = _split_patterns(tok.get("pre_tokenizer"))
    if pats == ["gpt2"]:
        return "gpt-2"
    if len(pats) == 1 and "\\p{L}+|\\p{N}{1,3}|" in pats[0]:
        return "llama-bpe"
    if len(pats) == 1 and "\\p{L}+|\\p{N}|" in pats[0]:
        return "qwen2"
    guess = "qwen2" if arch.gguf == gguf.MODEL_ARCH.QWEN2 else "default"
    if has_merges:  # without merges every character is its own token, however the text is split
        _say(f"{model_dir}/tokenizer.json: pre-tokenizer not recognised; using llama.cpp's '{guess}', "
             "tokenization may differ from Hugging Face's", quiet)
    return guess


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """tokenizer.json merges, in rank order (stored as "a b" strings or as [a, b] pairs)."""
    out = []
    for m in model.get("merges") or []:
        pair = m.split(" ", 1) if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TypeError(f"merge {m!r} is not two tokens")
        out.append(tuple(pair))
    return out


def _prepends_space(tok: dict) -> bool:
    """Whether the tokenizer puts '▁' before the text (Llama-2 / Mistral style sentencepiece BPE)."""
    def walk(node):
        if not isinstance(node, dict):
            return False
        kind = node.get("type")
        if kind == "Sequence":
            return any(walk(n) for n in node.get("normalizers") or node.get("pretokenizers") or [])
        if kind == "Prepend":
            return node.get("prepend") == "\u2581"
        if kind == "Metaspace":
            return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
        return False
    return walk(tok.get("normalizer")) or walk(tok.get("pre_tokenizer"))


def _write_spm_vocab(w: gguf.GGUFWriter, tok: dict, config: dict, model_dir, vocab_dir):
    """A sentencepiece-style BPE (byte_fallback, '▁' for spaces) as llama.cpp's 'llama' tokenizer.

    llama.cpp merges the adjacent pair whose joined token scores highest; scoring each token by minus
    the rank of the merge that makes it reproduces the BPE's merge order."""
    model = tok["model"]
    n_vocab = config["vocab_size"]
    vocab = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in tok.get("added_tokens") or []}
    rank = {}
    for i, (a, b) in enumerate(_merge_pairs(model)):
        rank.setdefault(a + b, i)
    by_id = {i: s for s, i in vocab.items()}
    for i, t in added.items():
        by_id[i] = t["content"]
    if by_id and max(by_id) >= n_vocab:
        raise ValueError(f"{model_dir}/tokenizer.json: token id {max(by_id)} is beyond vocab_size {n_vocab}")
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i, f"[PAD{i}]")
        tokens.append(text)
        scores.append(-float(rank[text]) if text in rank else 0.0)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif text == model.get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        elif i in by_id:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(_prepends_space(tok))
    special = gguf.SpecialVocab(vocab_dir, load_merges=False, n_vocab=n_vocab)
    if "unk" not in special.special_token_ids and model.get("unk_token") in vocab:
        special.special_token_ids["unk"] = vocab[model["unk_token"]]
    special.add_to_gguf(w, quiet=True)


def _write_vocab(w: gguf.GGUFWriter, arch: Arch, config: dict, model_dir, quiet: bool, follow_links: bool) -> str:
    """The tokenizer from tokenizer.json (byte-level BPE), else a placeholder of vocab_size tokens."""
    with _vocab_dir(model_dir, follow_links) as vocab_dir:
        tok = _tokenizer_json(vocab_dir, model_dir)
        try:
            return _write_vocab_of(w, arch, config, model_dir, quiet, tok, vocab_dir)
        except (TypeError, AttributeError, KeyError, IndexError, RecursionError) as ex:  # another structure
            raise ValueError(f"{model_dir}/tokenizer.json: not a tokenizer this export reads "
                             f"({type(ex).__name__}: {ex})") from None


def _write_vocab_of(w: gguf.GGUFWriter, arch: Arch, config: dict, model_dir, quiet: bool, tok, vocab_dir) -> str:
    n_vocab = config["vocab_size"]
    model = (tok or {}).get("model") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        vocab = dict(model.get("vocab") or {})
        added = {t["id"]: t for t in tok.get("added_tokens") or []}
        for t in added.values():
            vocab[t["content"]] = t["id"]
        by_id = {i: s for s, i in vocab.items()}
        if by_id and max(by_id) >= n_vocab:
            raise ValueError(f"{model_dir}/tokenizer.json: token id {max(by_id)} is beyond vocab_size {n_vocab}")
        tokens, types = [], []
        for i in range(n_vocab):
            if i in added:
                tokens.append(added[i]["content"])
                types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            elif i in by_id:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model("gpt2")
        special = gguf.SpecialVocab(vocab_dir, load_merges=True, n_vocab=n_vocab)
        w.add_tokenizer_pre(_bpe_pre(tok, arch, bool(special.merges), model_dir, quiet))
        w.add_token_list(tokens)
        w.add_token_types(types)
        if not special.merges:
            # llama.cpp requires the merges key; a merge of two control tokens never applies (they are
            # matched before BPE runs), so a merge-free byte-level tokenizer keeps its behaviour.
            ctl = next((t for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL), tokens[0])
            special.merges = [f"{ctl} {ctl}"]
        special.add_to_gguf(w, quiet=True)
        return "tokenizer.json"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        _write_spm_vocab(w, tok, config, model_dir, vocab_dir)
        return "tokenizer.json"
    why = "no tokenizer.json" if tok is None else f"tokenizer.json model {model.get('type')!r} is not supported"
    _say(f"{model_dir}: {why}; writing a placeholder vocabulary of {n_vocab} tokens (feed token ids directly)",
         quiet)
    # A sentencepiece-type vocabulary of opaque tokens: llama.cpp loads it, and token ids mean what they
    # meant to the Hugging Face model.
    special_ids = {config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<id_{i}>" for i in range(n_vocab)])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL
                       for i in range(n_vocab)])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        if isinstance(config.get(key), int):
            add(config[key])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    return "placeholder"


def export_gguf_model(base, delta, out, outtype: str = "f32", alpha: float = 1.0, quiet: bool = False,
                      force: bool = False, overwrite: bool = False, follow_links: bool = False,
                      untied_output: bool = False) -> dict:
    """Write the fine-tune (base + alpha * delta, any codec; delta=None: the base) as a complete GGUF model.
    overwrite: replace an existing GGUF file at `out`; follow_links: read BASE through links wherever they point.
    untied_output: a model with tied embeddings gets its output projection as a tensor of its own (output.weight,
    a copy of the embedding), so that adapters written with export_gguf_lora(untied_output=True) can change it."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)} (got {outtype!r})")
    ft, arch, config = _opened(base, delta, alpha, force, follow_links)
    inputs = [ft.base.path] + ([ft.delta.path] if ft.delta is not None else [])
    _core.check_output(os.fspath(out), _core.OutputKind.GGUF_FILE, inputs, overwrite)
    names = _Names(arch, config)
    plan, notes = [], []
    window = config.get("sliding_window")
    if config.get("use_sliding_window", True) and window and window < (config.get("max_position_embeddings") or 0):
        notes.append(f"sliding window of {window} tokens not kept: llama.cpp's {arch.name} graph attends over the "
                     f"whole context, so outputs differ from transformers' beyond {window} tokens")
    for name in ft.names():
        if name.endswith(_IGNORED):
            continue
        gname = names.gguf_name(name)
        if gname is None:
            raise ValueError(f"{ft.base.path}: tensor '{name}' has no GGUF name in llama.cpp's {arch.name} "
                             "architecture")
        if ft.float_name(name) is None:
            raise ValueError(f"{ft.base.path}: tensor '{name}' is not a float tensor")
        shape = ft.shape(name)
        plan.append((name, gname, shape, _qtype_for(gname, shape, outtype, notes)))
        if untied_output and ft.tied_embeddings and is_input_embedding(name):
            plan.append((name, "output.weight", shape, _qtype_for("output.weight", shape, outtype, notes)))
    sw = _StreamWriter(out, arch.name, overwrite)
    sw.w.add_type(gguf.GGUFType.MODEL)
    label = os.path.basename(os.path.normpath(os.fspath(base)))
    sw.w.add_name(label + (f" + {os.path.basename(os.fspath(delta))}" if delta is not None else ""))
    _hyperparameters(sw.w, arch, config, outtype)
    vocab = _write_vocab(sw.w, arch, config, ft.base.dir, quiet, follow_links)
    hf_of = {}
    for name, gname, shape, qtype in plan:
        sw.declare(gname, shape, qtype)
        hf_of[gname] = name
    sw.write(lambda gname: names.permute(hf_of[gname], ft.tensor(hf_of[gname], "f32")))
    for n in notes:
        _say(n, quiet)
    return {"out": os.fspath(out), "arch": arch.name, "tensors": len(plan), "outtype": outtype, "vocab": vocab,
            "notes": notes}
