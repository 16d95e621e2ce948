"""Corruption matrix for delta files (issue 8, "Corruption matrix (tests)").

For a small valid file of every codec layout (f32, f16 and bf16 deltas), each case damages one part of
the file or makes it lie, then reads the whole file as a user does: open it, read every tensor (checksums
on) and decode every tensor. Each case must end in a clean dp.FormatError whose message names the file
and, where the damage is inside one tensor, that tensor (and the problem where the case knows it).
Success is accepted only where a comment says why the change is provably harmless, and then the file must
read back as that comment says (the same data as before, or, with a recomputed checksum, exactly what
reference.py decodes). Nothing may crash, hang, raise another exception type, or allocate much memory
(the subprocess tests at the end measure peak RSS).

Cases marked xfail(strict=True, reason="BUG: ...") are defects this matrix found (reported on issue 8);
drop the mark when the bug is fixed.
"""
import faulthandler
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import make_delta
from test_files import _entry_text as checked_entry_text, read_raw, write_raw

import deltapack as dp
from deltapack import reference

TARGET = "model.layers.0.w.weight"  # the tensor of the codec under test
OTHER = "model.norm.weight"  # a small dense neighbour, so that offsets, overlaps and gaps have something beside them
MAX_DECODE = 64 << 20  # no tensor of these small files decodes to more; a larger one is a lie that got through

# name -> (codec, shape, delta dtype, params)
VARIANTS = {
    "sign-tensor": ("sign", (16, 40), "f32", {"scope": "tensor"}),
    "sign-row": ("sign", (24, 33), "bf16", {"scope": "row"}),
    "sign-group": ("sign", (2, 6, 40), "f16", {"scope": "group", "group": 16}),
    "levels": ("levels", (16, 33), "f16", {"bits": 3}),
    "levels-1bit": ("levels", (8, 20), "f32", {"bits": 1}),
    "quant": ("quant", (12, 70), "f32", {"bits": 3, "group": 32}),
    "quant-8bit": ("quant", (8, 64), "bf16", {"bits": 8, "group": 16}),
    "sparse-bitmap": ("sparse", (32, 40), "f32", {"p": 0.8, "index": "bitmap"}),
    "sparse-gaps": ("sparse", (6, 300), "f16", {"p": 0.95, "index": "gaps"}),
    "sparse-int8": ("sparse", (16, 48), "bf16", {"p": 0.7, "values": "int8", "index": "gaps"}),
    "lowrank": ("lowrank", (20, 24), "f32", {"rank": 4}),
    "lowrank-q4": ("lowrank", (20, 40), "bf16", {"rank": 4, "bits": 4}),
    "lowrank-q84": ("lowrank", (24, 70), "f16", {"bits": "8/4", "bands": "2/2"}),
    "dense": ("dense", (4, 24), "f32", {}),
    "dense-bf16": ("dense", (30,), "bf16", {"dtype": "bf16"}),
}
# Canonical parameter keys as stored (encoder-chosen ones included).
STORED_KEYS = {
    "sign-tensor": ["scope", "group"], "sign-row": ["scope", "group"], "sign-group": ["scope", "group"],
    "levels": ["bits"], "levels-1bit": ["bits"], "quant": ["bits", "group", "scale_exp"],
    "quant-8bit": ["bits", "group", "scale_exp"], "sparse-bitmap": ["p", "mode", "seed", "values", "index"],
    "sparse-gaps": ["p", "mode", "seed", "values", "index"], "sparse-int8": ["p", "mode", "seed", "values", "index"],
    "lowrank": ["rank", "dtype"], "lowrank-q4": ["rank", "bits", "bands", "group"],
    "lowrank-q84": ["rank", "bits", "bands", "group"], "dense": ["dtype"], "dense-bf16": ["dtype"],
}
# Cases that do not depend on the codec run on two variants only.
GENERIC = ["sign-row", "lowrank-q84"]
# Components the codec checks completely: any change to them must be caught even with a matching checksum.
MUST_DETECT = {"sparse-bitmap": {"mask", "rowptr"}}



def bug(reason):
    """The mark of a case that fails because of a reported bug (its assertion, not an error in the test)."""
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


class Bomb(Exception):
    """A tensor that passed every check would decode to far more than any of these files holds."""


@pytest.fixture(autouse=True)
def _no_hang():
    # A hang in C++ (GIL released) cannot be interrupted by a signal handler: dump the stacks and exit instead.
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------------------------------- helpers


@dataclass
class Valid:
    path: object
    raw: bytes
    snap: dict
    hlen: int  # header length N (the 8-byte prefix)
    header: dict
    spans: list  # (begin, end, key) of every component, by begin

    @property
    def data_size(self):
        return len(self.raw) - 8 - self.hlen

    def comps(self, tensor=TARGET):
        return [k.split(":", 1)[1] for _, _, k in self.spans if k.split(":", 1)[0] == tensor]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    cache = {}

    def get(variant) -> Valid:
        if variant not in cache:
            codec, shape, dtype, params = VARIANTS[variant]
            seed = list(VARIANTS).index(variant) + 1
            tensors = {TARGET: dp.encode(make_delta(shape, dtype, seed=seed), codec, **params),
                       OTHER: dp.encode(make_delta((24,), "f32", seed=99), "dense")}
            path = root / f"{variant}.dpk"
            dp.save(path, tensors, metadata={"task": "arith", "n": 3}, base={"fingerprint": "abc"})
            raw = path.read_bytes()
            hlen = struct.unpack("<Q", raw[:8])[0]
            header = json.loads(raw[8:8 + hlen])
            spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items()
                           if k != "__metadata__")
            cache[variant] = Valid(path, raw, snapshot(path), hlen, header, spans)
        return cache[variant]

    return get


def snapshot(path):
    """Everything a user gets from the file: tensor order, and per tensor codec, params, shape, dtype, decoded bits."""
    f = dp.open(path)
    out = {"": f.keys()}
    for k in f.keys():
        e = f[k]
        if 4 * math.prod(e.shape) > MAX_DECODE:
            raise Bomb(f"tensor '{k}' passed every check with shape {list(e.shape)}: decoding it would allocate "
                       f"{4 * math.prod(e.shape)} bytes for a {os.path.getsize(path)}-byte file")
        out[k] = (e.codec, e.params, tuple(e.shape), e.dtype, dp.decode(e).tobytes())
    return out


def verdict(path, *, tensor=None, match=None, avoid=None, harmless=None):
    """None if reading the whole file ends as required, else what went wrong.

    Required: a dp.FormatError whose message names the file, contains `tensor`, matches `match` and not
    `avoid` when given; or, only when `harmless` is given (the original snapshot, or a predicate on the new
    one), a read that gives back exactly that.
    """
    try:
        got = snapshot(path)
    except dp.FormatError as ex:
        msg = str(ex)
        if os.path.basename(path) not in msg:
            return f"the error does not name the file: {msg!r}"
        if tensor is not None and tensor not in msg:
            return f"the error does not name tensor {tensor!r}: {msg!r}"
        if match is not None and not re.search(match, msg):
            return f"the error does not say {match!r}: {msg!r}"
        if avoid is not None and re.search(avoid, msg):
            return f"the error should not say {avoid!r}: {msg!r}"
        return None
    except Bomb as ex:
        return str(ex)
    except Exception as ex:  # noqa: BLE001 - any other type is the failure being looked for
        return f"{type(ex).__name__} instead of FormatError: {ex}"
    if harmless is not None and (harmless(got) if callable(harmless) else got == harmless):
        return None
    return "the damaged file was accepted silently" + (" and reads differently" if harmless is not None else "")


def same_data(snap):
    """A predicate: every tensor has the same codec, shape, dtype and decoded bits as in `snap` (its params
    may differ where the decoder does not use them, e.g. sparse p and seed)."""
    def ok(got):
        return got[""] == snap[""] and all(
            (got[k][0], got[k][2], got[k][3], got[k][4]) == (snap[k][0], snap[k][2], snap[k][3], snap[k][4])
            for k in snap[""])
    return ok


def check(path, **kw):
    why = verdict(path, **kw)
    assert why is None, f"{os.path.basename(path)}: {why}"


def put(path, raw):
    path.write_bytes(bytes(raw))
    return path


def rewrite(dst, v: Valid, header_fn=None, manifest_fn=None, crc=None, data_fn=None):
    """A copy of v's file with its header, manifest and/or data edited (header re-serialised, re-padded).

    crc: a tensor whose crc32c is then recomputed over its components as stored (manifest order)."""
    header, data = read_raw(v.path)
    man = json.loads(header["__metadata__"]["deltapack"])
    if data_fn is not None:
        data = data_fn(header, data)
    if manifest_fn is not None:
        manifest_fn(man)
    if header_fn is not None:
        header_fn(header)
    if crc is not None:
        c = 0
        entry = man["tensors"][crc]
        for comp in entry["components"]:
            b, e = header[f"{crc}:{comp}"]["data_offsets"]
            c = dp._core.crc32c(bytes(data[b:e]), c)
        if isinstance(entry, dict) and all(k in entry for k in ("codec", "params", "shape", "dtype")):
            c = dp._core.crc32c(checked_entry_text(entry), c)  # version 2: the entry text after the components
        entry["crc32c"] = f"{c:08x}"
    header["__metadata__"]["deltapack"] = json.dumps(man)
    write_raw(dst, header, bytes(data))
    return dst


def matrix(shape):
    return (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)


def same_floats(a, b):
    a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
    if a.shape != b.shape:
        return False
    return bool(np.all((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))))


def variants(bugs=None, only=None):
    """pytest params over the variants; bugs: variant -> xfail reason."""
    bugs = bugs or {}
    return [pytest.param(v, marks=bug(bugs[v])) if v in bugs else v
            for v in (only or VARIANTS)]


# ------------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("variant", variants())
def test_truncated_at_every_section_boundary(files, variant, tmp_path):
    v = files(variant)
    text_end = 8 + len(v.raw[8:8 + v.hlen].rstrip(b" "))  # the JSON text, before its padding
    cuts = {0, 1, 4, 7, 8, 9, text_end, 8 + v.hlen - 1, 8 + v.hlen, len(v.raw) - 1}
    for b, e, _ in v.spans:
        cuts |= {8 + v.hlen + b, 8 + v.hlen + (b + e) // 2, 8 + v.hlen + e, 8 + v.hlen + e - 1}
    assert_truncations_refused(v, cuts, tmp_path)


@pytest.mark.parametrize("variant", variants())
def test_truncated_at_random_points(files, variant, tmp_path):
    v = files(variant)
    rng = random.Random(f"{variant}:cut")
    assert_truncations_refused(v, {rng.randrange(len(v.raw)) for _ in range(20)}, tmp_path)


def assert_truncations_refused(v, cuts, tmp_path):
    problems = []
    for cut in sorted(c for c in cuts if 0 <= c < len(v.raw)):
        why = verdict(put(tmp_path / f"cut{cut}.dpk", v.raw[:cut]), match="truncated")
        if why:
            problems.append(f"cut at byte {cut}: {why}")
    assert not problems, "\n".join(problems)


# -------------------------------------------------------------------------------------------- bit flips


def entry_regions(v: Valid):
    """Byte ranges (in the file) of each tensor's params and shape text inside the escaped manifest."""
    text = v.raw[:8 + v.hlen]
    out = []
    for name in (TARGET, OTHER):
        at = text.index(b'\\"' + name.encode() + b'\\":{')
        start = text.index(b'\\"params\\":', at)
        end = text.index(b"]", text.index(b'\\"shape\\":', start)) + 1
        out.append((start, end))
    return out


@pytest.mark.parametrize("variant", variants())
def test_header_bit_flips(files, variant, tmp_path):
    # Bits 0-6 only: a flipped bit 7 makes a byte that is not ASCII (test_header_bytes_that_are_not_utf8).
    v = files(variant)
    rng = random.Random(f"{variant}:header")
    problems = []
    for i in range(48):
        at, bit = rng.randrange(8, 8 + v.hlen), rng.randrange(7)
        raw = bytearray(v.raw)
        raw[at] ^= 1 << bit
        path = put(tmp_path / f"flip{i}.dpk", raw)
        # Harmless: a flip in free-form text (tool, metadata, base): same data as before. A flip in a tensor's
        # entry (params, shape, dtype) fails its checksum (format version 2).
        why = verdict(path, harmless=same_data(v.snap))
        if why:
            problems.append(f"byte {at} bit {bit} ({bytes(v.raw[at:at + 1])!r} -> {bytes(raw[at:at + 1])!r}): {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("variant", variants())
def test_manifest_entry_bit_flips(files, variant, tmp_path):
    # Every bit 0-6 of every letter and digit of the target's params and shape text (a flipped quote, brace
    # or comma only breaks the JSON): each flip must be refused, or change no data.
    v = files(variant)
    start, end = entry_regions(v)[0]
    silent = []
    for at in (i for i in range(start, end) if chr(v.raw[i]).isalnum()):
        for bit in range(7):
            raw = bytearray(v.raw)
            raw[at] ^= 1 << bit
            path = put(tmp_path / "flip.dpk", raw)
            why = verdict(path, harmless=same_data(v.snap))
            if why:
                silent.append(f"{bytes(v.raw[start:end]).decode()!r} byte {at - start} -> "
                              f"{bytes(raw[at:at + 1])!r}: {why}")
    assert not silent, f"{len(silent)} flips:\n" + "\n".join(silent[:20])


@pytest.mark.parametrize("where", ["metadata value", "tool", "tensor name in the manifest",
                                   "key of a bad header entry"])
def test_header_bytes_that_are_not_utf8(files, where, tmp_path):
    v = files("quant")
    raw = bytearray(v.raw)
    if where == "key of a bad header entry":
        header, data = read_raw(v.path)
        header[f"{TARGET}:codes"]["dtype"] = "X9"  # the error message quotes the key
        write_raw(tmp_path / "x.dpk", header, data)
        raw = bytearray((tmp_path / "x.dpk").read_bytes())
        at = raw.index(f'"{TARGET}:codes"'.encode()) + 3
    else:
        needle = {"metadata value": b"arith", "tool": b'tool\\":\\"deltapa',
                  "tensor name in the manifest": b'\\"' + TARGET.encode()}[where]
        at = raw.index(needle) + len(needle) - 2  # a letter inside the string
    raw[at] ^= 0x80
    check(put(tmp_path / "utf8.dpk", raw))


@pytest.mark.parametrize("variant", variants())
def test_length_prefix_bit_flips(files, variant, tmp_path):
    v = files(variant)
    problems = []
    for bit in range(64):
        raw = bytearray(v.raw)
        raw[bit // 8] ^= 1 << (bit % 8)
        why = verdict(put(tmp_path / f"len{bit}.dpk", raw))
        if why:
            problems.append(f"length bit {bit}: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("variant", variants())
def test_component_bit_flips_fail_the_checksum(files, variant, tmp_path):
    v = files(variant)
    rng = random.Random(f"{variant}:crc")
    problems = []
    for b, e, key in v.spans:
        owner = key.split(":", 1)[0]
        for i in range(4 if e > b else 0):
            at, bit = 8 + v.hlen + rng.randrange(b, e), rng.randrange(8)
            raw = bytearray(v.raw)
            raw[at] ^= 1 << bit
            why = verdict(put(tmp_path / f"c{i}.dpk", raw), tensor=f"tensor '{owner}'", match="checksum mismatch")
            if why:
                problems.append(f"{key} byte {at} bit {bit}: {why}")
    assert not problems, "\n".join(problems)


def decodes_as_specified(v: Valid, path):
    """A predicate on a snapshot of `path`: the other tensor is unchanged and the target decodes exactly as
    reference.py (the executable spec) decodes the components now stored."""
    def ok(got):
        if got[""] != v.snap[""] or got[OTHER] != v.snap[OTHER]:
            return False
        e = dp.open(path)[TARGET]
        with np.errstate(all="ignore"):
            want = reference.DECODERS[e.codec](e.components, e.shape, **e.params)
        return same_floats(np.frombuffer(got[TARGET][4], np.float32), want)
    return ok


@pytest.mark.parametrize("variant", variants())
def test_component_corruption_with_a_matching_checksum(files, variant, tmp_path):
    # The checksum is recomputed, so only the codec's own checks stand between the data and the user. A change
    # the codec cannot tell from valid data (a value, a scale, a code, a sign) makes another valid file: it
    # is accepted only if it decodes exactly as the spec decodes it. Components the codec checks completely
    # (MUST_DETECT) must be refused.
    v = files(variant)
    rng = random.Random(f"{variant}:recrc")
    problems = []
    for b, e, key in v.spans:
        owner, comp = key.split(":", 1)
        if owner != TARGET or e == b:
            continue
        # (what, the component's new bytes): 8 single-bit flips, then all zeros, all ones, random bytes.
        edits = []
        for _ in range(8):
            at, bit = rng.randrange(b, e), rng.randrange(8)
            new = bytearray(v.raw[8 + v.hlen + b:8 + v.hlen + e])
            new[at - b] ^= 1 << bit
            edits.append((f"byte {at} bit {bit}", bytes(new)))
        edits += [("zeros", b"\0" * (e - b)), ("ones", b"\xff" * (e - b)),
                  ("random bytes", bytes(rng.randrange(256) for _ in range(e - b)))]
        for i, (what, new) in enumerate(edits):
            path = rewrite(tmp_path / f"r{i}.dpk", v, data_fn=lambda h, d, b=b, e=e, new=new: d[:b] + new + d[e:],
                           crc=TARGET)
            harmless = None if comp in MUST_DETECT.get(variant, ()) else decodes_as_specified(v, path)
            why = verdict(path, tensor=f"tensor '{TARGET}'", avoid="checksum", harmless=harmless)
            if why:
                problems.append(f"{comp} {what}: {why}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------- lying shapes


def _shape_lies():
    def keep_rank_last(shape, n):
        return list(shape[:-1]) + [n]

    return {
        "huge": lambda s: [1 << 40, 1 << 20],
        "huge rows": lambda s: [1 << 30] + list(s[1:]) if len(s) > 1 else [1 << 30, s[0]],
        "huge row width": lambda s: keep_rank_last(s, 1 << 30),
        "2^48 elements": lambda s: [1 << 24, 1 << 24],
        "int64 overflow": lambda s: [1 << 32, 1 << 32, 1 << 32],
        "zero hiding a huge one": lambda s: [0, (1 << 63) - 1],
        "zero rows": lambda s: [0] + list(s[1:]) if len(s) > 1 else [0, s[0]],
        "zero row width": lambda s: keep_rank_last(s, 0),
        "negative": lambda s: [-s[0]] + list(s[1:]),
        "past int64": lambda s: [1 << 64] + list(s[1:]),
        "float": lambda s: [float(s[0])] + list(s[1:]),
        "string": lambda s: [str(s[0])] + list(s[1:]),
        "not an array": lambda s: s[0],
        "flattened": lambda s: [math.prod(s)] if len(s) > 1 else [s[0], 1],
        "extra dimension": lambda s: list(s) + [1],
        "scalar": lambda s: [],
    }


SHAPE_LIES = _shape_lies()
SHAPE_MATCH = {"huge": "implausibly large", "int64 overflow": "implausibly large",
               "zero hiding a huge one": "implausibly large", "negative": "shape", "past int64": "shape",
               "float": "shape", "string": "shape", "not an array": "shape"}


def _shape_params():
    out = []
    for variant in VARIANTS:
        for case in SHAPE_LIES:
            out.append(pytest.param(variant, case, id=f"{variant}-{case}"))
    return out


@pytest.mark.parametrize("variant,case", _shape_params())
def test_lying_manifest_shape(files, variant, case, tmp_path):
    v = files(variant)
    shape = list(VARIANTS[variant][1])
    # The checksum recomputed (an attacker writes a valid one): the shape checks behind it must catch the lie.
    path = rewrite(tmp_path / "shape.dpk", v, manifest_fn=lambda m: m["tensors"][TARGET].update(
        shape=SHAPE_LIES[case](shape)), crc=TARGET)
    check(path, tensor=TARGET, match=SHAPE_MATCH.get(case))


@pytest.mark.parametrize("variant", variants())
def test_shape_with_a_leading_one(files, variant, tmp_path):
    # Harmless by construction (FORMAT.md §3: the matrix view of [1, *s] is that of s): the same values
    # come back, only the shape has the extra 1; dense (whose component has the tensor's own shape) refuses.
    v = files(variant)
    shape = list(VARIANTS[variant][1])
    path = rewrite(tmp_path / "one.dpk", v, manifest_fn=lambda m: m["tensors"][TARGET].update(shape=[1] + shape))

    def same_but_shape(got):
        a, b = got[TARGET], v.snap[TARGET]
        return (a[0], a[1], a[3], a[4]) == (b[0], b[1], b[3], b[4]) and a[2] == (1, *b[2])

    check(path, tensor=TARGET, harmless=same_but_shape)


HEADER_SHAPE_LIES = {
    "huge": lambda s: [1 << 40, 1 << 40],
    "overflowing": lambda s: [1 << 32, 1 << 32, 1 << 32],
    "zero": lambda s: [0] + list(s[1:]),
    "negative": lambda s: [-s[0]] + list(s[1:]),
    "past int64": lambda s: [1 << 64] + list(s[1:]),
    "not an array": lambda s: s[0],
    "float": lambda s: [float(s[0])] + list(s[1:]),
    "same bytes, other rank": lambda s: [math.prod(s)] if len(s) > 1 else [s[0], 1],
    "same bytes, transposed": lambda s: list(reversed(s)) if len(s) == 2 and s[0] != s[1] else None,
}


@pytest.mark.parametrize("case", HEADER_SHAPE_LIES)
@pytest.mark.parametrize("variant", variants())
def test_lying_header_shape(files, variant, case, tmp_path):
    v = files(variant)
    problems = []
    for comp in v.comps():
        key = f"{TARGET}:{comp}"
        new = HEADER_SHAPE_LIES[case](v.header[key]["shape"])
        if new is None or new == v.header[key]["shape"]:
            continue
        path = rewrite(tmp_path / "hshape.dpk", v, header_fn=lambda h: h[key].update(shape=new))
        why = verdict(path, tensor=TARGET)
        if why:
            problems.append(f"{comp} shape {new}: {why}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- offsets


def _offset_case(v: Valid, case):
    """(header_fn, data_fn, tensor named in the error, match); None where a case does not apply."""
    target = [(b, e, k) for b, e, k in v.spans if k.startswith(TARGET + ":")]
    b, e, key = target[0]
    n = e - b
    size = v.data_size

    def at(k, off):
        return lambda h: h[k].update(data_offsets=off)

    if case == "end past the data":
        return at(key, [size - n + 8, size + 8]), None, TARGET, "truncated"
    if case == "begin past the data":
        return at(key, [size + 8, size + 8 + n]), None, TARGET, "truncated"
    if case == "near 2^63":
        return at(key, [(1 << 62), (1 << 62) + n]), None, TARGET, "truncated"
    if case == "past int64":
        return at(key, [1 << 64, (1 << 64) + n]), None, TARGET, "data_offsets"
    if case == "begin after end":
        return (at(key, [e, b]) if n else None), None, TARGET, "data_offsets"
    if case == "negative":
        return at(key, [-n - 8, -8]), None, TARGET, "data_offsets"
    if case == "one number":
        return at(key, [b]), None, TARGET, "data_offsets"
    if case == "three numbers":
        return at(key, [b, e, e]), None, TARGET, "data_offsets"
    if case == "strings":
        return at(key, [str(b), str(e)]), None, TARGET, "data_offsets"
    if case == "missing":
        return (lambda h: h[key].pop("data_offsets")), None, TARGET, "data_offsets"
    if case == "overlapping":
        # A target component moved by 8 bytes (a multiple of every element size: alignment kept) into the
        # component before it, or, for the first one, into the one after it.
        step = -min(8, b) if b > 0 else 8
        return at(key, [b + step, e + step]), None, TARGET, "overlap"
    if case == "gap, data not moved":
        # Room at the end, the last component moved into it: its bytes are now the wrong ones (and 8 bytes
        # before it belong to no array, which safetensors' layout forbids).
        lb, le, lk = v.spans[-1]
        return at(lk, [lb + 8, le + 8]), (lambda h, d: d + b"\0" * 8), lk.split(":")[0], "belong to no tensor"
    if case == "misaligned":
        # One byte inserted before a target component of 2+ byte elements, which moves with its data.
        for b2, e2, k2 in v.spans:
            if k2.startswith(TARGET + ":") and v.header[k2]["dtype"] not in ("U8", "I8") and e2 > b2:
                def shift(h, b2=b2):
                    for k3, t in h.items():
                        if k3 != "__metadata__" and t["data_offsets"][0] >= b2:
                            t["data_offsets"] = [t["data_offsets"][0] + 1, t["data_offsets"][1] + 1]
                return shift, (lambda h, d, b2=b2: d[:b2] + b"\0" + d[b2:]), TARGET, "aligned"
    return None


OFFSET_CASES = ["end past the data", "begin past the data", "near 2^63", "past int64", "begin after end", "negative",
                "one number", "three numbers", "strings", "missing", "overlapping", "gap, data not moved",
                "misaligned"]


@pytest.mark.parametrize("case", OFFSET_CASES)
@pytest.mark.parametrize("variant", variants())
def test_lying_offsets(files, variant, case, tmp_path):
    v = files(variant)
    spec = _offset_case(v, case)
    assert spec is not None and spec[0] is not None, "every variant has a component this case applies to"
    header_fn, data_fn, tensor, match = spec
    path = rewrite(tmp_path / "off.dpk", v, header_fn=header_fn, data_fn=data_fn)
    check(path, tensor=tensor, match=match)


@pytest.mark.parametrize("case", ["gap between components", "bytes after the data"])
@pytest.mark.parametrize("variant", variants())
def test_unreferenced_bytes_are_refused(files, variant, case, tmp_path):
    # As in safetensors (FORMAT.md §5.6), the arrays tile the data section: bytes no component claims (a gap,
    # with the later components moved along with their data; or a tail) are refused.
    v = files(variant)
    if case == "gap between components":
        b0 = v.spans[1][0]

        def header_fn(h):
            for k, t in h.items():
                if k != "__metadata__" and t["data_offsets"][0] >= b0:
                    t["data_offsets"] = [t["data_offsets"][0] + 8, t["data_offsets"][1] + 8]
        path = rewrite(tmp_path / "gap.dpk", v, header_fn=header_fn, data_fn=lambda h, d: d[:b0] + b"\xa5" * 8 + d[b0:])
    else:
        path = rewrite(tmp_path / "tail.dpk", v, data_fn=lambda h, d: d + b"\xa5" * 24)
    check(path, match="belong to no tensor" if case.startswith("gap") else "data section")


# ----------------------------------------------------------------------------------------------- dtypes

SAME_SIZE_OTHER_TYPE = {"U8": "I8", "I8": "U8", "F32": "I32", "F16": "BF16", "BF16": "F16", "I64": "F64"}
OTHER_SIZE = {"U8": "F16", "I8": "F16", "F32": "F16", "F16": "F32", "BF16": "F32", "I64": "F32"}
LENIENT = {"U8": "uint8", "I8": "i8", "F32": "float32", "F16": "f16", "BF16": "bfloat16", "I64": "int64"}


@pytest.mark.parametrize("case", ["unknown", "not a string", "same size, other type", "other size",
                                  "lenient spelling"])
@pytest.mark.parametrize("variant", variants())
def test_lying_header_dtype(files, variant, case, tmp_path):
    v = files(variant)
    problems = []
    for comp in v.comps():
        key = f"{TARGET}:{comp}"
        dt = v.header[key]["dtype"]
        new = {"unknown": "X9", "not a string": 4, "same size, other type": SAME_SIZE_OTHER_TYPE[dt],
               "other size": OTHER_SIZE[dt], "lenient spelling": LENIENT[dt]}[case]
        path = rewrite(tmp_path / "dt.dpk", v, header_fn=lambda h: h[key].update(dtype=new))
        why = verdict(path, tensor=TARGET, match={"unknown": "unsupported dtype", "not a string": "dtype",
                                                  "same size, other type": "dtype",
                                                  "lenient spelling": "not a safetensors dtype"}.get(case))
        if why:
            problems.append(f"{comp} dtype {dt} -> {new!r}: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case,new,match", [
    ("unknown", "x9", "unsupported dtype"),
    ("not a string", 32, "dtype"),
    ("not a float dtype", "i64", "is not f32, f16 or bf16"),
])
@pytest.mark.parametrize("variant", variants(only=GENERIC))
def test_lying_manifest_dtype(files, variant, case, new, match, tmp_path):
    v = files(variant)
    path = rewrite(tmp_path / "mdt.dpk", v, manifest_fn=lambda m: m["tensors"][TARGET].update(dtype=new))
    check(path, tensor=TARGET, match=match)


# ------------------------------------------------------------------------------------- codec parameters


def _param_edit(variant, case):
    shape = VARIANTS[variant][1]
    rows, cols = matrix(shape)
    quantized = variant.startswith("lowrank-q")

    def edit(fn):
        return lambda m: fn(m["tensors"][TARGET]["params"])

    if case == "bits 0":
        return edit(lambda p: p.update(bits="0" if quantized else 0))
    if case == "bits 99":
        return edit(lambda p: p.update(bits="99" if quantized else 99))
    if case == "group 0":
        return edit(lambda p: p.update(group=0))
    if case == "rank larger than the shape":
        k = min(rows, cols) + 1
        return edit(lambda p: p.update(rank=k, **({"bits": "4", "bands": str(k)} if quantized else {})))
    if case == "rank past the limit":
        return edit(lambda p: p.update(rank=1 << 21))
    if case == "unknown key":
        return edit(lambda p: p.update(zzz=1))
    if case == "params not an object":
        return lambda m: m["tensors"][TARGET].update(params=[])
    if case == "params null":
        return lambda m: m["tensors"][TARGET].update(params=None)
    if case == "index auto":
        return edit(lambda p: p.update(index="auto"))
    if case == "values of another dtype":
        return edit(lambda p: p.update(values={"f16": "bf16", "int8": "f16"}.get(p.get("values"), "int8")))
    if case == "factors of another dtype":
        return edit(lambda p: p.update(dtype={"f16": "bf16", "f32": "f16", "bf16": "f32"}.get(p.get("dtype"), "f16")))
    if case == "another scope":
        return edit(lambda p: p.update(scope={"tensor": "row", "row": "group", "group": "tensor"}.get(
            p.get("scope"), "row")))
    if case == "bands that do not sum to rank":
        return edit(lambda p: p.update(bands="1/1", bits="4/4", rank=4))
    if case == "integer past int64":
        return edit(lambda p: p.update(group=1 << 64, bits=1 << 64))
    raise AssertionError(case)


PARAM_CASES = ["bits 0", "bits 99", "group 0", "rank larger than the shape", "rank past the limit", "unknown key",
               "params not an object", "params null", "index auto", "values of another dtype",
               "factors of another dtype", "another scope", "bands that do not sum to rank", "integer past int64"]


@pytest.mark.parametrize("case", PARAM_CASES)
@pytest.mark.parametrize("variant", variants())
def test_lying_codec_parameters(files, variant, case, tmp_path):
    # Each edit is refused whatever the codec: a parameter the codec does not have is an unknown one.
    v = files(variant)
    path = rewrite(tmp_path / "p.dpk", v, manifest_fn=_param_edit(variant, case))
    check(path, tensor=TARGET)


def _wrong_type(value):
    """A number for a string and a string for a number; a list for a lowrank bits/bands string (which also
    takes a bare integer)."""
    return str(value) if isinstance(value, (int, float)) else [value]


def _stored_key_params(bugs):
    return [pytest.param(v, k, id=f"{v}-{k}", marks=[bug(bugs[(v, k)])]
                         if (v, k) in bugs else []) for v in VARIANTS for k in STORED_KEYS[v]]


@pytest.mark.parametrize("variant,key", _stored_key_params({}))
def test_parameter_of_the_wrong_type(files, variant, key, tmp_path):
    v = files(variant)
    path = rewrite(tmp_path / "t.dpk", v, manifest_fn=lambda m: m["tensors"][TARGET]["params"].update(
        {key: _wrong_type(m["tensors"][TARGET]["params"][key])}))
    check(path, tensor=TARGET)


@pytest.mark.parametrize("variant,key", _stored_key_params({}))
def test_parameter_missing(files, variant, key, tmp_path):
    # Refused, or harmless where the default equals the stored value or the parameter does not reach the
    # decoder (sparse p, mode and seed only shaped the encoder's choice): the file reads back exactly.
    v = files(variant)
    path = rewrite(tmp_path / "t.dpk", v, manifest_fn=lambda m: m["tensors"][TARGET]["params"].pop(key))
    check(path, tensor=TARGET, harmless=same_data(v.snap))


# ------------------------------------------------------------------------- names, manifest versus header


def _raw_with_manifest_text(v: Valid, dst, text_fn):
    header, data = read_raw(v.path)
    header["__metadata__"]["deltapack"] = text_fn(header["__metadata__"]["deltapack"])
    write_raw(dst, header, data)
    return dst


def _raw_with_header_text(v: Valid, dst, text_fn):
    header, data = read_raw(v.path)
    text = text_fn(json.dumps(header)).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return dst


def _entry_text(man_text, name):
    man = json.loads(man_text)
    return json.dumps(name) + ": " + json.dumps(man["tensors"][name])


@pytest.mark.parametrize("variant", variants())
def test_duplicate_names(files, variant, tmp_path):
    v = files(variant)
    comp = v.comps()[0]
    key = f"{TARGET}:{comp}"
    problems = []
    cases = {
        # The same component key twice in the safetensors header.
        "header key": (_raw_with_header_text(v, tmp_path / "a.dpk", lambda t: t[:-1] + ", " + json.dumps(key) + ": "
                                             + json.dumps(v.header[key]) + "}"), key, "duplicate key"),
        # The same tensor twice in the manifest.
        "tensor": (_raw_with_manifest_text(v, tmp_path / "b.dpk", lambda t: json.dumps(json.loads(t))[:-2] + ", "
                                           + _entry_text(t, TARGET) + "}}"), TARGET, "duplicate key"),
        # The same component listed twice by its tensor.
        "component": (rewrite(tmp_path / "c.dpk", v, manifest_fn=lambda m: m["tensors"][TARGET]["components"].append(
            comp)), TARGET, "listed twice"),
        # A parameter twice in one tensor's params.
        "parameter": (_raw_with_manifest_text(v, tmp_path / "d.dpk", lambda t: json.dumps(json.loads(t)).replace(
            '"params": {', '"params": {"zz": 1, "zz": 1, ', 1)), None, "duplicate key"),
    }
    for name, (path, tensor, match) in cases.items():
        why = verdict(path, tensor=tensor, match=match)
        if why:
            problems.append(f"{name}: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("variant", variants())
def test_manifest_disagrees_with_header(files, variant, tmp_path):
    v = files(variant)
    problems = []
    for comp in v.comps():
        key = f"{TARGET}:{comp}"
        # Listed but not stored: the header entry is gone (its bytes stay, unreferenced).
        path = rewrite(tmp_path / "a.dpk", v, header_fn=lambda h: h.pop(key))
        why = verdict(path, tensor=TARGET, match=f"'{comp}' is listed but not stored")
        if why:
            problems.append(f"{comp} not stored: {why}")
        # Stored but not listed (checksum recomputed over the rest): an array no tensor claims.
        path = rewrite(tmp_path / "b.dpk", v, manifest_fn=lambda m: m["tensors"][TARGET]["components"].remove(comp),
                       crc=TARGET)
        why = verdict(path, tensor=TARGET, match=f"'{TARGET}:{comp}' belongs to no tensor of the manifest")
        if why:
            problems.append(f"{comp} not listed: {why}")
    path = rewrite(tmp_path / "c.dpk", v, manifest_fn=lambda m: m["tensors"][TARGET]["components"].append("bogus"))
    why = verdict(path, tensor=TARGET, match="'bogus' is listed but not stored")
    if why:
        problems.append(f"bogus listed: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", ["extra component stored and listed", "unreferenced header entry"])
@pytest.mark.parametrize("variant", variants(only=GENERIC))
def test_extra_entries(files, variant, case, tmp_path):
    # FORMAT.md §5: a component the codec does not need is ignored (harmless: every tensor decodes exactly as
    # before); a stored array that no manifest tensor lists is refused (a tensor dropped from the manifest
    # would otherwise vanish silently).
    v = files(variant)
    name = f"{TARGET}:extra" if case.startswith("extra") else "junk"
    size = v.data_size

    def header_fn(h):
        h[name] = {"dtype": "U8", "shape": [8], "data_offsets": [size, size + 8]}

    def manifest_fn(m):
        if case.startswith("extra"):
            m["tensors"][TARGET]["components"].append("extra")

    path = rewrite(tmp_path / "x.dpk", v, header_fn=header_fn, manifest_fn=manifest_fn, crc=TARGET,
                   data_fn=lambda h, d: d + bytes(range(8)))
    if case.startswith("extra"):
        check(path, harmless=v.snap)
    else:
        check(path, match="stored array 'junk' belongs to no tensor of the manifest")


@pytest.mark.parametrize("variant", variants(only=GENERIC))
def test_tensor_missing_from_the_manifest(files, variant, tmp_path):
    v = files(variant)
    path = rewrite(tmp_path / "drop.dpk", v, manifest_fn=lambda m: m["tensors"].pop(OTHER))
    check(path, match="belongs to no tensor of the manifest")


MANIFEST_CASES = {
    "crc uppercase": (lambda m: m["tensors"][TARGET].update(crc32c="ABCDEF01"), "crc32c"),
    "crc short": (lambda m: m["tensors"][TARGET].update(crc32c="1234567"), "crc32c"),
    "crc not hex": (lambda m: m["tensors"][TARGET].update(crc32c="1234567g"), "crc32c"),
    "crc a number": (lambda m: m["tensors"][TARGET].update(crc32c=12345678), "crc32c"),
    "crc missing": (lambda m: m["tensors"][TARGET].pop("crc32c"), "crc32c"),
    "codec unknown": (lambda m: m["tensors"][TARGET].update(codec="zip"), "unknown codec"),
    "codec missing": (lambda m: m["tensors"][TARGET].pop("codec"), "codec"),
    "components not an array": (lambda m: m["tensors"][TARGET].update(components="codes"), "components"),
    "component name a number": (lambda m: m["tensors"][TARGET].update(components=[1]), "component"),
    "components missing": (lambda m: m["tensors"][TARGET].pop("components"), "components"),
    "entry not an object": (lambda m: m["tensors"].update({TARGET: [1, 2]}), "not an object"),
    "shape missing": (lambda m: m["tensors"][TARGET].pop("shape"), "shape"),
    "dtype missing": (lambda m: m["tensors"][TARGET].pop("dtype"), "dtype"),
    "params missing": (lambda m: m["tensors"][TARGET].pop("params"), "params"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
@pytest.mark.parametrize("variant", variants(only=GENERIC))
def test_broken_manifest_entry(files, variant, case, tmp_path):
    fn, match = MANIFEST_CASES[case]
    path = rewrite(tmp_path / "m.dpk", files(variant), manifest_fn=fn)
    check(path, tensor=TARGET, match=match)


WHOLE_MANIFEST_CASES = {
    "tensors not an object": (lambda h, t: h["__metadata__"].update(deltapack=json.dumps(
        {**json.loads(t), "tensors": []})), "'tensors' must be an object"),
    "version 3": (lambda h, t: h["__metadata__"].update(deltapack=json.dumps({**json.loads(t), "version": 3})),
                  "version 3"),
    "version a string": (lambda h, t: h["__metadata__"].update(deltapack=json.dumps({**json.loads(t), "version": "1"})),
                         "version"),
    "format other": (lambda h, t: h["__metadata__"].update(deltapack=json.dumps({**json.loads(t), "format": "x"})),
                     "format"),
    "manifest not JSON": (lambda h, t: h["__metadata__"].update(deltapack=t[:-1]), "corrupt manifest"),
    "manifest not a string": (lambda h, t: h["__metadata__"].update(deltapack=json.loads(t)), "must be strings"),
    "manifest missing": (lambda h, t: h["__metadata__"].pop("deltapack"), "not a deltapack file"),
    "metadata not an object": (lambda h, t: h.update(__metadata__=[t]), "not an object"),
    "header entry not an object": (lambda h, t: h.update({f"{TARGET}:x": 5}), "not an object"),
    "manifest nested too deep": (lambda h, t: h["__metadata__"].update(deltapack=json.dumps(
        {**json.loads(t), "metadata": json.loads("[" * 100 + "]" * 100)})), "corrupt manifest.*nesting too deep"),
    "header nested too deep": (lambda h, t: h.update(deep=json.loads("[" * 100 + "]" * 100)),
                               "corrupt header.*nesting too deep"),
    "header not an object": (None, "not a JSON object"),
}


@pytest.mark.parametrize("case", WHOLE_MANIFEST_CASES)
@pytest.mark.parametrize("variant", variants(only=GENERIC))
def test_broken_header_or_manifest(files, variant, case, tmp_path):
    v = files(variant)
    fn, match = WHOLE_MANIFEST_CASES[case]
    header, data = read_raw(v.path)
    if fn is None:
        text = b"[1, 2, 3]"
        text += b" " * ((8 - len(text) % 8) % 8)
        (tmp_path / "w.dpk").write_bytes(struct.pack("<Q", len(text)) + text + data)
    else:
        fn(header, header["__metadata__"]["deltapack"])
        write_raw(tmp_path / "w.dpk", header, data)
    check(tmp_path / "w.dpk", match=match)


# --------------------------------------------------------------------------------- header length prefix

LENGTH_CASES = {
    "one past the file": (lambda v: len(v.raw) - 8 + 1, "runs past the end"),
    "the file size": (lambda v: len(v.raw), "runs past the end"),
    "10^8": (lambda v: 100_000_000, "runs past the end"),
    "10^8 + 1": (lambda v: 100_000_001, "limit of 100000000"),
    "2^32": (lambda v: 1 << 32, "limit of 100000000"),
    "2^63": (lambda v: 1 << 63, "limit of 100000000"),
    "2^64 - 1": (lambda v: (1 << 64) - 1, "limit of 100000000"),
    "zero": (lambda v: 0, "corrupt header"),
    "8 short": (lambda v: v.hlen - 8, "corrupt header"),
    "8 long": (lambda v: v.hlen + 8, "corrupt header"),
    "1 short": (lambda v: v.hlen - 1, None),  # may still end the JSON: then the data is shifted (misaligned)
    "1 long": (lambda v: v.hlen + 1, None),  # a data byte that is JSON whitespace would end it too
}


@pytest.mark.parametrize("case", LENGTH_CASES)
@pytest.mark.parametrize("variant", variants(only=GENERIC + ["sparse-gaps", "dense-bf16"]))
def test_lying_header_length(files, variant, case, tmp_path):
    v = files(variant)
    n, match = LENGTH_CASES[case]
    path = put(tmp_path / "len.dpk", struct.pack("<Q", n(v)) + v.raw[8:])
    check(path, match=match)


# ------------------------------------------------------------------------------------------ peak memory

CHILD = textwrap.dedent("""
    import json, resource, sys
    import deltapack as dp

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    def vmsize():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    before = hwm()
    if sys.argv[1] == "limit":  # the address space allowed: what is mapped now + 512 MiB (no big allocation fits)
        lim = vmsize() + (512 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    out = {}
    for path in sys.argv[2:]:
        try:
            f = dp.open(path)
            for k in f.keys():
                dp.decode(f[k])
            out[path] = "ok"
        except Exception as ex:
            out[path] = type(ex).__name__ + ": " + str(ex)[:300]
    print(json.dumps({"before": before, "peak": hwm(), "out": out}))
""")


def run_child(paths, limit=False):
    proc = subprocess.run([sys.executable, "-c", CHILD, "limit" if limit else "free", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the child died ({proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


PEAK_LIMIT = 400 << 20


def test_lying_sizes_do_not_allocate(files, tmp_path):
    sign, lowrank, quant = files("sign-row"), files("lowrank-q4"), files("quant")
    paths = {
        "length 2^63": put(tmp_path / "len63.dpk", struct.pack("<Q", 1 << 63) + sign.raw[8:]),
        "length 100 MiB": put(tmp_path / "len100.dpk", struct.pack("<Q", 100 << 20) + sign.raw[8:]),
        "manifest shape [2^40, 2^20]": rewrite(tmp_path / "s1.dpk", sign, manifest_fn=lambda m: m["tensors"][
            TARGET].update(shape=[1 << 40, 1 << 20])),
        "manifest shape [2^24, 2^24]": rewrite(tmp_path / "s2.dpk", lowrank, manifest_fn=lambda m: m["tensors"][
            TARGET].update(shape=[1 << 24, 1 << 24])),
        "lowrank bands 2^20": rewrite(tmp_path / "s3.dpk", lowrank, manifest_fn=lambda m: m["tensors"][
            TARGET]["params"].update(rank=1 << 20, bits="8", bands=str(1 << 20), group=8)),
        "quant group 1, shape [2^24, 2^24]": rewrite(tmp_path / "s4.dpk", quant, manifest_fn=lambda m: (
            m["tensors"][TARGET].update(shape=[1 << 24, 1 << 24]), m["tensors"][TARGET]["params"].update(group=1))),
        "header shape [2^40, 2^40]": rewrite(tmp_path / "h1.dpk", quant, header_fn=lambda h: h[
            f"{TARGET}:codes"].update(shape=[1 << 40, 1 << 40])),
        "offsets [0, 2^62]": rewrite(tmp_path / "h2.dpk", quant, header_fn=lambda h: h[f"{TARGET}:codes"].update(
            data_offsets=[0, 1 << 62])),
    }
    got = run_child(paths.values())
    print(f"\nchild peak RSS {got['peak'] >> 20} MiB (after imports {got['before'] >> 20} MiB)")
    bad = {case: got["out"][str(p)] for case, p in paths.items() if not got["out"][str(p)].startswith("FormatError")}
    assert not bad, bad
    assert got["peak"] < PEAK_LIMIT, f"peak RSS {got['peak'] >> 20} MiB"


def test_sparse_row_width_lie_does_not_allocate(files, tmp_path):
    # The child may map at most 512 MiB more than it has after its imports, so the bomb cannot hurt the machine.
    v = files("sparse-gaps")
    path = rewrite(tmp_path / "bomb.dpk", v, manifest_fn=lambda m: m["tensors"][TARGET].update(shape=[6, 1 << 28]),
                   crc=TARGET)
    got = run_child([path], limit=True)
    print(f"\nchild peak RSS {got['peak'] >> 20} MiB (after imports {got['before'] >> 20} MiB): {got['out']}")
    assert got["out"][str(path)].startswith("FormatError"), got["out"]
    assert got["peak"] < PEAK_LIMIT


# ------------------------------------------------------------------------------ the record and the metadata
#
# What deltapack reads from a manifest beyond its tensors (docs/FORMAT.md §7): the checkpoint record, the base
# fingerprint, the budget, PEFT and calibration records. Every field of a valid checkpoint delta that uses every op
# is given a value of each wrong type (and, for required fields, removed): opening the file must give a FormatError
# naming the file and the field, and `deltapack info` must print that error (exit 1), not a traceback. The
# checksums stay valid: the metadata is not covered by the tensors' CRCs, as an attacker would use it.

def _record_file(tmp_path):
    """A checkpoint delta (made by hand, no base needed): a delta, a resized tensor with new rows, an added tensor,
    an unchanged one, lm_head from the embedding, a removed tensor, kept files, and budget, PEFT and calibration
    records; all valid."""
    emb = "model.embed_tokens.weight"
    tensors = {"w": dp.encode(make_delta((8, 8), "f32", seed=1), "sign"),
               emb: dp.encode(make_delta((16, 8), "f32", seed=2), "sign"),
               emb + "#new_rows": dp.encode(make_delta((4, 8), "f32", seed=3), "dense", dtype="bf16"),
               "added": dp.encode(make_delta((2, 8), "f32", seed=4), "dense"),
               "lm_head.weight": dp.encode(make_delta((16, 8), "f32", seed=5), "sign")}
    record = {"version": 1, "removed": ["old"], "ft_bytes": 1234,
              "tensors": {"w": {"op": "delta", "dtype": "F32", "shape": [8, 8]},
                          emb: {"op": "resized", "dtype": "BF16", "shape": [20, 8], "base_shape": [16, 8],
                                "new_rows": emb + "#new_rows"},
                          "added": {"op": "new", "dtype": "F32", "shape": [2, 8]},
                          "norm": {"op": "same", "dtype": "F32", "shape": [8]},
                          "lm_head.weight": {"op": "delta", "dtype": "BF16", "shape": [16, 8], "source": emb}},
              "files": {"config.json": {"text": "{}"}, "tokenizer.model": {"base64": "AAEC"}}}
    fingerprint = {"fingerprint": "crc32c", "config": {"model_type": "llama"},
                   "tensors": {"w": {"dtype": "F32", "shape": [8, 8], "crc32c": "0a1b2c3d"},
                               emb: {"dtype": "BF16", "shape": [16, 8]}, "norm": {"dtype": "F32", "shape": [8]},
                               "old": {"dtype": "F32", "shape": [3]}}}
    metadata = {"checkpoint": record,
                "budget": {"bits_per_param": 1.0, "proxy": "data-free", "predicted_error": 0.1, "tensors": {"w": 0.2},
                           "data": {"examples": 3, "refit": "least-squares",
                                    "scores": {"data-free": {"agreement": 0.9, "kl": 0.01}}}},
                "peft": {"r": 2, "lora_alpha": 4, "use_rslora": False,
                         "modules": {"w": {"scaling": 1.0, "alpha": 2, "rank": 2}}},
                "calibration": {"method": "least-squares", "examples": 3, "tensors": 1}}
    path = tmp_path / "record.dpk"
    dp.save(path, tensors, metadata=metadata, base=fingerprint)
    return path


_EMB = '"model.embed_tokens.weight"'
# (case, where in the manifest, what to put there (_DROP: remove it), the field the message must name)
_DROP = object()
RECORD_CASES = [
    ("record not an object", ("metadata", "checkpoint"), [1], "metadata.checkpoint"),
    ("version a string", ("metadata", "checkpoint", "version"), "1", "metadata.checkpoint.version"),
    ("version missing", ("metadata", "checkpoint", "version"), _DROP, "metadata.checkpoint.version"),
    ("tensors a list", ("metadata", "checkpoint", "tensors"), [], "metadata.checkpoint.tensors"),
    ("tensors missing", ("metadata", "checkpoint", "tensors"), _DROP, "metadata.checkpoint.tensors"),
    ("tensor entry a string", ("metadata", "checkpoint", "tensors", "w"), "delta", 'tensors["w"]'),
    ("op a number", ("metadata", "checkpoint", "tensors", "w", "op"), 1, 'tensors["w"].op'),
    ("op unknown", ("metadata", "checkpoint", "tensors", "w", "op"), "copy", 'tensors["w"].op'),
    ("op missing", ("metadata", "checkpoint", "tensors", "w", "op"), _DROP, 'tensors["w"].op'),
    ("dtype unknown", ("metadata", "checkpoint", "tensors", "w", "dtype"), "Q4_K", 'tensors["w"].dtype'),
    ("dtype lowercase", ("metadata", "checkpoint", "tensors", "w", "dtype"), "f32", 'tensors["w"].dtype'),
    ("dtype missing", ("metadata", "checkpoint", "tensors", "w", "dtype"), _DROP, 'tensors["w"].dtype'),
    ("shape a string", ("metadata", "checkpoint", "tensors", "w", "shape"), "64", 'tensors["w"].shape'),
    ("shape negative", ("metadata", "checkpoint", "tensors", "w", "shape"), [-1, 8], 'tensors["w"].shape'),
    ("shape fractional", ("metadata", "checkpoint", "tensors", "w", "shape"), [8.5, 8], 'tensors["w"].shape'),
    ("shape huge", ("metadata", "checkpoint", "tensors", "w", "shape"), [1 << 40, 1 << 40], 'tensors["w"].shape'),
    ("shape missing", ("metadata", "checkpoint", "tensors", "w", "shape"), _DROP, 'tensors["w"].shape'),
    ("source a list", ("metadata", "checkpoint", "tensors", "lm_head.weight", "source"), ["x"],
     'tensors["lm_head.weight"].source'),
    ("base_shape a string", ("metadata", "checkpoint", "tensors", "model.embed_tokens.weight", "base_shape"), "16",
     f"tensors[{_EMB}].base_shape"),
    ("base_shape missing", ("metadata", "checkpoint", "tensors", "model.embed_tokens.weight", "base_shape"), _DROP,
     f"tensors[{_EMB}].base_shape"),
    ("new_rows a number", ("metadata", "checkpoint", "tensors", "model.embed_tokens.weight", "new_rows"), 3,
     f"tensors[{_EMB}].new_rows"),
    ("removed a string", ("metadata", "checkpoint", "removed"), "old", "metadata.checkpoint.removed"),
    ("removed holds a number", ("metadata", "checkpoint", "removed"), [5], "metadata.checkpoint.removed[0]"),
    ("ft_bytes a string", ("metadata", "checkpoint", "ft_bytes"), "1234", "metadata.checkpoint.ft_bytes"),
    ("ft_bytes negative", ("metadata", "checkpoint", "ft_bytes"), -1, "metadata.checkpoint.ft_bytes"),
    ("files a number", ("metadata", "checkpoint", "files"), 5, "metadata.checkpoint.files"),
    ("kept file a string", ("metadata", "checkpoint", "files", "config.json"), "{}", 'files["config.json"]'),
    ("kept text a number", ("metadata", "checkpoint", "files", "config.json"), {"text": 5}, 'files["config.json"].text'),
    ("kept file both forms", ("metadata", "checkpoint", "files", "config.json"), {"text": "", "base64": ""},
     'files["config.json"]'),
    ("kept file bad base64", ("metadata", "checkpoint", "files", "tokenizer.model"), {"base64": "A!=="},
     'files["tokenizer.model"].base64'),
    ("kept file sha256 upper case", ("metadata", "checkpoint", "files", "config.json"), {"sha256": "AB" * 32},
     'files["config.json"].sha256'),
    ("kept file sha256 short", ("metadata", "checkpoint", "files", "config.json"), {"sha256": "ab" * 31},
     'files["config.json"].sha256'),
    ("kept file sha256 and text", ("metadata", "checkpoint", "files", "config.json"), {"sha256": "ab" * 32, "text": ""},
     'files["config.json"]'),
    ("kept bytes without sha256", ("metadata", "checkpoint", "files", "config.json"), {"bytes": [0, 0]},
     'files["config.json"].sha256'),
    ("kept bytes not a pair", ("metadata", "checkpoint", "files", "config.json"), {"bytes": [0], "sha256": "ab" * 32},
     'files["config.json"].bytes'),
    ("kept bytes reversed", ("metadata", "checkpoint", "files", "config.json"), {"bytes": [2, 1], "sha256": "ab" * 32},
     'files["config.json"].bytes'),
    ("kept bytes past the stored ones", ("metadata", "checkpoint", "files", "config.json"),
     {"bytes": [0, 5], "sha256": "ab" * 32}, 'files["config.json"].bytes'),
    ("kept bytes and text", ("metadata", "checkpoint", "files", "config.json"),
     {"bytes": [0, 0], "sha256": "ab" * 32, "text": ""}, 'files["config.json"]'),
    ("base a string", ("base",), "abc", "base"),
    ("hub id a path", ("base", "hub"), {"id": "../../etc", "revision": "a" * 40}, "base.hub.id"),
    ("hub id a number", ("base", "hub"), {"id": 5, "revision": "a" * 40}, "base.hub.id"),
    ("hub revision a branch", ("base", "hub"), {"id": "org/m", "revision": "main"}, "base.hub.revision"),
    ("hub without id", ("base", "hub"), {"revision": "a" * 40}, "base.hub.id"),
    ("fingerprint tensors a list", ("base", "tensors"), [], "base.tensors"),
    ("fingerprint entry a string", ("base", "tensors", "w"), "F32", 'base.tensors["w"]'),
    ("fingerprint dtype a number", ("base", "tensors", "w", "dtype"), 4, 'base.tensors["w"].dtype'),
    ("fingerprint shape a string", ("base", "tensors", "w", "shape"), "[8, 8]", 'base.tensors["w"].shape'),
    ("fingerprint crc not hex", ("base", "tensors", "w", "crc32c"), "xyzxyzxy", 'base.tensors["w"].crc32c'),
    ("fingerprint config a list", ("base", "config"), [], "base.config"),
    ("tool a number", ("tool",), 5, "tool"),
    ("budget a string", ("metadata", "budget"), "1.0", "metadata.budget"),
    ("budget bits a string", ("metadata", "budget", "bits_per_param"), "1.0", "metadata.budget.bits_per_param"),
    ("budget per tensor a string", ("metadata", "budget", "tensors", "w"), "x", 'metadata.budget.tensors["w"]'),
    ("budget examples a string", ("metadata", "budget", "data", "examples"), "3", "metadata.budget.data.examples"),
    ("budget score a string", ("metadata", "budget", "data", "scores", "data-free", "kl"), "0",
     'scores["data-free"]["kl"]'),
    ("peft modules a list", ("metadata", "peft", "modules"), [], "metadata.peft.modules"),
    ("peft scaling a string", ("metadata", "peft", "modules", "w", "scaling"), "1", 'modules["w"].scaling'),
    ("peft rank zero", ("metadata", "peft", "modules", "w", "rank"), 0, 'modules["w"].rank'),
    ("peft rslora a string", ("metadata", "peft", "use_rslora"), "no", "metadata.peft.use_rslora"),
    ("calibration examples a string", ("metadata", "calibration", "examples"), "3", "metadata.calibration.examples"),
]


def _edit_at(man, where, value):
    node = man
    for key in where[:-1]:
        node = node[key]
    if value is _DROP:
        del node[where[-1]]
    else:
        node[where[-1]] = value


@pytest.mark.parametrize("case,where,value,field", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_record_field_of_wrong_type(tmp_path, case, where, value, field):
    import contextlib
    import io

    from deltapack import cli
    valid = _record_file(tmp_path)
    dp.open(valid)  # the untouched file opens
    bad = tmp_path / "bad.dpk"
    header, data = read_raw(valid)
    man = json.loads(header["__metadata__"]["deltapack"])
    _edit_at(man, where, value)
    header["__metadata__"]["deltapack"] = json.dumps(man)
    write_raw(bad, header, data)
    with pytest.raises(dp.FormatError) as ex:
        dp.open(bad)
    assert "bad.dpk" in str(ex.value) and field in str(ex.value), str(ex.value)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["info", str(bad)]) == 1
    assert "bad.dpk" in err.getvalue() and field in err.getvalue(), err.getvalue()
    if where != ("tool",):  # the writer will not write it either (`tool` it always writes itself)
        with pytest.raises(ValueError, match="refused before writing"):
            dp.save(tmp_path / "again.dpk", {"w": dp.encode(make_delta((8, 8), "f32"), "sign")},
                    metadata=man.get("metadata"), base=man.get("base"))
        assert not (tmp_path / "again.dpk").exists()


def test_record_of_every_op_is_accepted_without_a_base(tmp_path):
    """The valid file of the matrix above: the record's semantics hold without a base (CheckpointDelta over none)."""
    path = _record_file(tmp_path)
    c = dp._core.CheckpointDelta(None, str(path))
    ops = {name: op for name, op, *_ in c.tensors()}
    assert ops == {"w": "delta", "model.embed_tokens.weight": "resized", "added": "new", "norm": "same",
                   "lm_head.weight": "delta"}


def _lowrank_1bit(rows, cols):
    """A rank-1 lowrank tensor of 1-bit factors: a bit per row and column (FORMAT.md §4.4), rows x cols decoded."""
    return dp.Encoded("lowrank", {"rank": 1, "bits": "1", "bands": "1", "group": 64}, (rows, cols), "f32",
                      {"codes": np.zeros(-(-rows // 8) - (-cols // 8), np.uint8), "s": np.ones(1, np.float32),
                       "scales": np.ones((1, -(-rows // 64) - (-cols // 64)), np.float16)})


# (case, how the valid record is changed, what the message must say)
BOUND_CASES = [
    ("a tensor without a base stored other than dense",
     lambda t, r: (t.update(added=_lowrank_1bit(1 << 14, 1 << 14)),
                   r["tensors"]["added"].update(shape=[1 << 14, 1 << 14])), "must be stored dense"),
    ("new rows stored other than dense",
     lambda t, r: (t.update({"model.embed_tokens.weight#new_rows": _lowrank_1bit(1 << 12, 8)}),
                   r["tensors"]["model.embed_tokens.weight"].update(shape=[16 + (1 << 12), 8])),
     "must be stored dense"),
    ("a tensor without a base stored sign (one bit per element)",
     lambda t, r: t.update(added=dp.encode(make_delta((2, 8), "f32"), "sign")), "must be stored dense"),
    ("a third tensor from one base tensor",
     lambda t, r: r["tensors"].update({f"copy{i}": {"op": "same", "dtype": "F32", "shape": [8, 8], "source": "w"}
                                       for i in range(2)}), "at most two share one"),
    ("a stored tensor serving two tensors",
     lambda t, r: r["tensors"]["model.embed_tokens.weight"].update(new_rows="added", shape=[18, 8]),
     "already used by"),
    ("base_shape that is not the fingerprint's",
     lambda t, r: r["tensors"]["model.embed_tokens.weight"].update(base_shape=[12, 8]), "base_shape"),
]


@pytest.mark.parametrize("case,change,says", BOUND_CASES, ids=[c[0] for c in BOUND_CASES])
def test_record_bounds(tmp_path, case, change, says):
    """docs/FORMAT.md §7: what a record may make apply write is bounded by the base and the file's own bytes;
    a record past the bound is refused when it is opened, before anything is decoded or allocated."""
    valid = dp.open(_record_file(tmp_path))
    tensors = {k: valid[k] for k in valid.keys()}
    meta = json.loads(json.dumps(valid.metadata))
    change(tensors, meta["checkpoint"])
    path = tmp_path / "bound.dpk"
    dp.save(path, tensors, metadata=meta, base=valid.base)
    with pytest.raises(dp.FormatError, match=re.escape(says)) as ex:
        dp._core.CheckpointDelta(None, str(path))
    assert "bound.dpk" in str(ex.value)


def test_lowrank_rank_above_min_rows_cols_is_refused():
    """FORMAT.md §5 check 15: a rank above min(rows, cols) describes nothing more and costs rank x rows x cols to
    decode; refused with the components, before anything is decoded (and the writer will not write it)."""
    rng = np.random.default_rng(0)
    enc = dp.Encoded("lowrank", {"rank": 30, "dtype": "f32"}, (20, 24), "f32",
                     {"u": rng.standard_normal((20, 30)).astype(np.float32),
                      "v": rng.standard_normal((30, 24)).astype(np.float32)})
    with pytest.raises(dp.FormatError, match="rank 30 exceeds min"):
        dp.decode(enc)
