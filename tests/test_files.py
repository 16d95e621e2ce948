"""Delta files: round trip, safetensors compatibility, and every kind of bad input."""
import gc
import json
import os
import struct

import numpy as np
import pytest
import torch
from conftest import make_delta
from safetensors import safe_open

import deltapack as dp


@pytest.fixture
def delta_file(tmp_path):
    tensors = {
        "model.layers.0.mlp.weight": dp.encode(make_delta((64, 96), "bf16", seed=1), "sign", scope="row"),
        "model.layers.0.attn.weight": dp.encode(make_delta((32, 40), seed=2), "sparse", p=0.8),
        "model.norm.weight": dp.encode(make_delta((96,), seed=3), "dense"),
        "lm_head.weight": dp.encode(make_delta((50, 64), seed=4), "lowrank", rank=4),
        "q.weight": dp.encode(make_delta((16, 256), seed=5), "quant", bits=3),
        "l.weight": dp.encode(make_delta((16, 33), seed=6), "levels", bits=3),
    }
    path = tmp_path / "ft.dpk"
    dp.save(path, tensors, metadata={"task": "arith", "n": 3}, base={"fingerprint": "abc"})
    return path, tensors


def read_raw(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def edit_manifest(path, fn):
    header, data = read_raw(path)
    man = json.loads(header["__metadata__"]["deltapack"])
    fn(man)
    header["__metadata__"]["deltapack"] = json.dumps(man)
    write_raw(path, header, data)


def test_round_trip(delta_file):
    path, tensors = delta_file
    f = dp.open(path)
    assert sorted(f.keys()) == sorted(tensors)
    assert f.metadata == {"task": "arith", "n": 3} and f.base == {"fingerprint": "abc"}
    for name, enc in tensors.items():
        got = f[name]
        assert (got.codec, got.params, got.shape, got.dtype) == (enc.codec, enc.params, enc.shape, enc.dtype)
        for c, arr in enc.components.items():
            np.testing.assert_array_equal(got.components[c], arr)
        np.testing.assert_array_equal(dp.decode(got), dp.decode(enc))
    assert f["model.layers.0.mlp.weight"].dtype == "bf16"
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        f["nope"]


def test_components_are_readonly_zero_copy_views(delta_file):
    f = dp.open(delta_file[0])
    comp = f["q.weight"].components["codes"]
    assert not comp.flags.writeable
    with pytest.raises(ValueError):
        comp[0, 0] = 1


def test_safetensors_reader_lists_components(delta_file):
    path, tensors = delta_file
    with safe_open(str(path), framework="np") as st:
        keys = set(st.keys())
        assert keys == {f"{n}:{c}" for n, e in tensors.items() for c in e.components}
        meta = json.loads(st.metadata()["deltapack"])
        assert meta["format"] == "deltapack" and meta["version"] == 2
        for n, e in tensors.items():
            for c, arr in e.components.items():
                got = st.get_tensor(f"{n}:{c}")
                np.testing.assert_array_equal(got.view(np.uint8).reshape(-1), arr.view(np.uint8).reshape(-1))


def _entry_text(entry) -> bytes:
    """FORMAT.md §2, version 2: the entry text the CRC covers after the components (compact JSON)."""
    return json.dumps({k: entry[k] for k in ("codec", "params", "shape", "dtype")}, separators=(",", ":")).encode()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 3 * 32768 - 1, 3 * 32768, 3 * 32768 + 5, 7 * 32768 + 3, 1 << 20])
def test_crc32c_of_any_length_and_alignment(n):
    """The core's CRC-32C (three interleaved streams over 32 KiB stripes, joined by the polynomial
    arithmetic that crc32c_combine exposes) against the crc32c package, at stripe edges and odd addresses."""
    crc32c = pytest.importorskip("crc32c")
    data = np.random.default_rng(n).integers(0, 256, n + 3, dtype=np.uint8)
    for off in (0, 3):
        piece = data[off:off + n]
        want = crc32c.crc32c(piece.tobytes())
        assert dp._core.crc32c(piece) == want, (n, off)
        cut = n // 3
        head, tail = piece[:cut], piece[cut:]
        assert dp._core.crc32c(tail, dp._core.crc32c(head)) == want  # chained: crc argument continues
        assert dp._core.crc32c_combine(dp._core.crc32c(head), dp._core.crc32c(tail), tail.size) == want


def test_crc_matches_independent_crc32c(delta_file):
    crc32c = pytest.importorskip("crc32c")
    path, tensors = delta_file
    man = json.loads(read_raw(path)[0]["__metadata__"]["deltapack"])
    for name, entry in man["tensors"].items():
        data = b"".join(tensors[name].components[c].tobytes() for c in entry["components"])
        assert entry["crc32c"] == f"{crc32c.crc32c(data + _entry_text(entry)):08x}"


def test_version_1_files_are_read_and_version_2_checks_the_entry(delta_file, tmp_path):
    # Version 1's CRC covers the components only: such files still read. Version 2 also covers the entry,
    # so a shape or parameter changed within what the components allow is caught.
    path, tensors = delta_file
    header, data = read_raw(path)
    man = json.loads(header["__metadata__"]["deltapack"])
    for name, entry in man["tensors"].items():
        crc = 0
        for c in entry["components"]:
            b, e = header[f"{name}:{c}"]["data_offsets"]
            crc = dp._core.crc32c(data[b:e], crc)
        entry["crc32c"] = f"{crc:08x}"
    header["__metadata__"]["deltapack"] = json.dumps({**man, "version": 1})
    write_raw(tmp_path / "v1.dpk", header, data)
    f = dp.open(tmp_path / "v1.dpk")
    for name in tensors:
        np.testing.assert_array_equal(dp.decode(f[name]), dp.decode(tensors[name]))
    bad = tmp_path / "scale.dpk"
    bad.write_bytes(open(path, "rb").read())
    edit_manifest(bad, lambda m: m["tensors"]["q.weight"]["params"].update(scale_exp=m["tensors"]["q.weight"]
                                                                             ["params"]["scale_exp"] - 1))
    with pytest.raises(dp.FormatError, match=r"scale\.dpk: tensor 'q.weight': checksum mismatch"):
        dp.open(bad)["q.weight"]


def test_truncated_files(delta_file, tmp_path):
    path = delta_file[0]
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    for cut, msg in [(5, "truncated"), (8 + n // 2, "truncated"), (len(raw) - 3, "truncated")]:
        bad = tmp_path / f"cut{cut}.dpk"
        bad.write_bytes(raw[:cut])
        with pytest.raises(dp.FormatError, match=msg) as ei:
            dp.open(bad)
        assert str(bad) in str(ei.value)


def test_corrupt_header_and_lying_sizes(delta_file, tmp_path):
    path = delta_file[0]
    header, data = read_raw(path)
    bad = tmp_path / "bad.dpk"
    # Garbage JSON.
    raw = open(path, "rb").read()
    bad.write_bytes(raw[:8] + b"[" + raw[9:])
    with pytest.raises(dp.FormatError, match="corrupt header"):
        dp.open(bad)
    # A header length far beyond the file (no allocation of that size is attempted).
    bad.write_bytes(struct.pack("<Q", 1 << 60) + raw[8:])
    with pytest.raises(dp.FormatError, match="header length"):
        dp.open(bad)
    key = next(k for k in header if k != "__metadata__")
    cases = {
        "out of bounds": lambda h: h[key].update(data_offsets=[0, len(data) + 100]),
        "data_offsets span": lambda h: h[key].update(shape=[1 << 40, 1 << 40]),
        "overlap": lambda h: h.update(dup=dict(h[key])),
        "unsupported dtype": lambda h: h[key].update(dtype="X9"),
    }
    for msg, fn in cases.items():
        h = json.loads(json.dumps(header))
        fn(h)
        write_raw(bad, h, data)
        expect = {"out of bounds": "truncated", "data_offsets span": "data_offsets span", "overlap": "overlap",
                  "unsupported dtype": "unsupported dtype"}[msg]
        with pytest.raises(dp.FormatError, match=expect):
            dp.open(bad)


def test_checksum_mismatch_names_file_and_tensor(delta_file, tmp_path):
    path = delta_file[0]
    header, data = read_raw(path)
    key = "q.weight:codes"
    b, e = header[key]["data_offsets"]
    data = bytearray(data)
    data[b] ^= 0x10
    bad = tmp_path / "flip.dpk"
    write_raw(bad, header, bytes(data))
    f = dp.open(bad)
    with pytest.raises(dp.FormatError, match=r"flip\.dpk.*tensor 'q.weight'.*checksum mismatch"):
        f["q.weight"]
    f["lm_head.weight"]  # other tensors still read
    assert f.get("q.weight", verify=False).codec == "quant"  # the switch turns the check off


def test_manifest_errors(delta_file, tmp_path):
    path = delta_file[0]
    edits = {
        "unknown codec 'zip'": lambda m: m["tensors"]["q.weight"].update(codec="zip"),
        "format version 3 is not supported": lambda m: m.update(version=3),
        "component 'bogus' is listed but not stored": lambda m: m["tensors"]["q.weight"]["components"].append("bogus"),
        "not 'deltapack'": lambda m: m.update(format="other"),
    }
    for msg, fn in edits.items():
        bad = tmp_path / "m.dpk"
        bad.write_bytes(open(path, "rb").read())
        edit_manifest(bad, fn)
        with pytest.raises(dp.FormatError, match=msg):
            dp.open(bad)


def test_lying_manifest_shape_fails_before_allocation(delta_file, tmp_path):
    # Checksums off (an attacker writes valid ones): the shape checks behind them catch the lies.
    bad = tmp_path / "shape.dpk"
    bad.write_bytes(open(delta_file[0], "rb").read())
    edit_manifest(bad, lambda m: m["tensors"]["model.layers.0.mlp.weight"].update(shape=[1 << 40, 1 << 20]))
    with pytest.raises(dp.FormatError, match="model.layers.0.mlp.weight.*implausibly large"):
        dp.open(bad).get("model.layers.0.mlp.weight", verify=False)
    edit_manifest(bad, lambda m: m["tensors"]["model.layers.0.mlp.weight"].update(shape=[1 << 20, 1 << 20]))
    with pytest.raises(dp.FormatError, match="model.layers.0.mlp.weight.*component 'signs' has shape"):
        dp.open(bad).get("model.layers.0.mlp.weight", verify=False)
    edit_manifest(bad, lambda m: m["tensors"]["model.layers.0.mlp.weight"].update(params={"scope": "cube"}))
    with pytest.raises(dp.FormatError, match="scope='cube' is not one of"):
        dp.open(bad).get("model.layers.0.mlp.weight", verify=False)


def test_sparse_index_out_of_range_is_rejected():
    enc = dp.encode(make_delta((4, 300), seed=8), "sparse", p=0.95, index="gaps")
    gaps = enc.components["gaps"].copy()
    gaps[-1] = 255
    gaps[:] = 255
    bad = dp.Encoded(enc.codec, enc.params, enc.shape, enc.dtype, {**enc.components, "gaps": gaps})
    with pytest.raises(dp.FormatError, match="gaps run past the last column"):
        dp.decode(bad)
    rowptr = enc.components["rowptr"].copy()
    rowptr[2] = rowptr[1] - 1
    bad = dp.Encoded(enc.codec, enc.params, enc.shape, enc.dtype, {**enc.components, "rowptr": rowptr})
    with pytest.raises(dp.FormatError, match="rowptr"):
        dp.decode(bad)


def test_sparse_gap_rows_reach_their_width():
    # Rows that end early (here: every column past 40 is zero, and row 2 is empty) get end fillers, so each
    # row's entries reach its last 256 columns; the same components under a wider shape are refused.
    x = make_delta((4, 1000), seed=9)
    x[:, 40:] = 0
    x[2] = 0
    enc = dp.encode(x, "sparse", p=0.5, mode="magnitude", index="gaps", values="f32")
    comps = enc.components
    rowptr, gaps = comps["rowptr"], comps["gaps"].astype(np.int64)
    for r in range(4):
        span = int((gaps[rowptr[r]:rowptr[r + 1]] + 1).sum())
        assert 1000 - 256 < span <= 1000, (r, span)
    assert np.array_equal(dp.decode(enc), x)  # every nonzero is among the 2000 largest magnitudes
    wide = dp.Encoded(enc.codec, enc.params, (4, 1000 + 300), enc.dtype, comps)
    with pytest.raises(dp.FormatError, match=r"row 0 ends 3\d\d columns before the width"):
        dp.decode(wide)


def test_not_a_delta_file(tmp_path):
    from safetensors.numpy import save_file
    p = tmp_path / "plain.safetensors"
    save_file({"w": np.zeros((2, 2), np.float32)}, str(p))
    with pytest.raises(dp.FormatError, match="not a deltapack file"):
        dp.open(p)
    with pytest.raises(dp.FormatError, match="cannot open"):
        dp.open(tmp_path / "missing.dpk")


@pytest.mark.parametrize("codec,params,msg", [
    ("sparse", {"p": 1.0}, r"p=1.0* is out of range"),
    ("sparse", {"p": -0.1}, "out of range"),
    ("sparse", {"mode": "best"}, "mode='best' is not one of"),
    ("lowrank", {"rank": 0}, "rank=0 is out of range"),
    ("levels", {"bits": 0}, "bits=0 is out of range"),
    ("levels", {"bits": 9}, "bits=9 is out of range"),
    ("quant", {"bits": 5}, "bits=5 is not one of 2, 3, 4, 8"),
    ("quant", {"group": 0}, "group=0 is out of range"),
    ("sign", {"group": 12, "scope": "group"}, "multiple of 8"),
    ("sign", {"scale": 2}, "unknown parameter 'scale'"),
    ("dense", {"dtype": "f8"}, "dtype='f8' is not one of"),
    ("zip", {}, "unknown codec 'zip'"),
])
def test_invalid_parameters(codec, params, msg):
    with pytest.raises(ValueError, match=msg):
        dp.encode(make_delta((8, 16)), codec, **params)


def test_recipe_strings():
    x = make_delta((8, 64))
    assert dp.encode(x, "sparse:p=0.5,mode=magnitude").params["mode"] == "magnitude"
    p = dp.encode(x, "quant:bits=8", group=32).params
    assert (p["bits"], p["group"]) == (8, 32) and isinstance(p["scale_exp"], int)
    with pytest.raises(ValueError, match="expected key=value"):
        dp.encode(x, "sparse:p")


def test_lowrank_rank_too_large():
    with pytest.raises(ValueError, match="exceeds min"):
        dp.encode(make_delta((4, 16)), "lowrank", rank=5)


def test_non_finite_delta_is_rejected():
    x = make_delta((4, 16))
    x[2, 3] = np.nan
    for codec in dp.codec_names():
        with pytest.raises(ValueError, match="NaN or infinity"):
            dp.encode(x, codec, **({"rank": 2} if codec == "lowrank" else {}))


def test_apply_shape_and_dtype_mismatch():
    enc = dp.encode(make_delta((8, 16)), "sign")
    enc.name = "layer.w"
    with pytest.raises(ValueError, match=r"tensor 'layer.w': base shape \[8, 15\] does not match"):
        dp.apply(np.zeros((8, 15), np.float32), enc)
    with pytest.raises(ValueError, match="unsupported dtype"):
        dp.apply(np.zeros((8, 16), np.int32), enc)
    buf = np.zeros(8 * 16 + 1, np.float32)
    with pytest.raises(ValueError, match="partially overlaps"):
        dp.apply(buf[:-1].reshape(8, 16), enc, out=buf[1:].reshape(8, 16))


def test_save_is_atomic_and_leaves_nothing_on_failure(tmp_path):
    good = dp.encode(make_delta((8, 16)), "sign")
    bad = dp.Encoded("sign", good.params, (8, 17), "f32", good.components)  # components do not fit the shape
    target = tmp_path / "out.dpk"
    with pytest.raises(dp.FormatError):
        dp.save(target, {"a": good, "b": bad})
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="cannot create"):
        dp.save(tmp_path / "no" / "dir.dpk", {"a": good})
    dp.save(target, {"a": good})
    assert os.listdir(tmp_path) == ["out.dpk"]


def _with_padding_entries(src, dst, n, repeat=None):
    """Copies a delta file with n extra __metadata__ keys in its header (and one key twice)."""
    header, data = read_raw(src)
    meta = header.pop("__metadata__")
    extra = "".join(f',"pad.{i}":"x"' for i in range(n)) + (f',"pad.{repeat}":"y"' if repeat is not None else "")
    text = ('{"__metadata__":' + json.dumps(meta)[:-1] + extra + "}," + json.dumps(header)[1:]).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def test_header_with_many_keys_opens_quickly_and_rejects_a_repeated_one(delta_file, tmp_path):
    # A scan per key made duplicate detection quadratic: 80,000 keys took ~20 s. 200,000 would take minutes.
    import time
    path, expected = delta_file
    many = tmp_path / "many.dpk"
    _with_padding_entries(path, many, 200_000)
    t = time.perf_counter()
    f = dp.open(many)
    assert time.perf_counter() - t < 10
    assert f.keys() == dp.open(path).keys()
    name = "model.layers.0.mlp.weight"
    np.testing.assert_array_equal(dp.decode(f[name]), dp.decode(dp.open(path)[name]))
    repeated = tmp_path / "repeated.dpk"
    _with_padding_entries(path, repeated, 200_000, repeat=123_456)
    with pytest.raises(dp.FormatError, match=r'repeated\.dpk.*duplicate key "pad\.123456"'):
        dp.open(repeated)
    _with_padding_entries(path, repeated, 5, repeat=3)  # small objects: found where it repeats
    with pytest.raises(dp.FormatError, match=r'repeated\.dpk.*duplicate key "pad\.3" at byte'):
        dp.open(repeated)


@pytest.mark.parametrize("shape", [(0, 2**63 - 1), (2**62, 0), (0, 2**40, 2**40), (2**40, 2**40, 0)])
@pytest.mark.parametrize("codec,params", [("sign", {}), ("sign", {"scope": "row"}), ("levels", {"bits": 2}),
                                          ("quant", {"bits": 4}), ("sparse", {"index": "gaps"}),
                                          ("sparse", {"index": "bitmap"}), ("lowrank", {"rank": 1}),
                                          ("lowrank", {"rank": 2, "bits": 4}), ("dense", {})])
def test_zero_dimension_does_not_hide_a_huge_one(codec, params, shape):
    # No elements, but a row width or row count near 2^63: per-row sizes used to overflow (undefined behaviour).
    enc = dp.encode(make_delta((4, 8), seed=3), codec, **params)
    comps = {k: np.zeros((0,) + v.shape[1:], v.dtype) for k, v in enc.components.items()}
    bad = dp.Encoded(enc.codec, enc.params, shape, enc.dtype, comps)
    with pytest.raises(dp.FormatError, match=r"shape \[.*\] is implausibly large"):
        dp._core.validate(bad._core())


def test_rebuild_that_overflows_is_an_error_naming_the_tensor(tmp_path):
    # A delta whose rebuild leaves the output dtype's range, or holds inf/NaN, is refused, not silently inf.
    base16 = torch.full((4, 8), 60000.0, dtype=torch.float16)
    enc = dp.encode(np.full((4, 8), 10000.0, np.float32), "dense")
    enc = dp.Encoded(enc.codec, enc.params, enc.shape, enc.dtype, enc.components, "layers.0.w")
    with pytest.raises(dp.FormatError, match="'layers.0.w': base \\+ alpha x delta overflows float16 at row 0"):
        dp.apply(base16, enc)
    assert torch.isfinite(dp.apply(base16.float(), enc)).all()  # the same rebuild in f32 is fine
    assert torch.equal(dp.apply(base16, enc, alpha=0.0), base16)
    inf_base = base16.clone()
    inf_base[1, 2] = float("inf")
    small = dp.encode(np.full((4, 8), 1.0, np.float32), "dense")
    assert torch.isinf(dp.apply(inf_base, small)[1, 2])  # the base's own infinity is the user's
    sign = dp.encode(make_delta((4, 8), seed=1), "sign")
    for bad in (np.float32("inf"), np.float32("nan"), np.float32(3e38)):
        hostile = dp.Encoded(sign.codec, sign.params, sign.shape, sign.dtype,
                             {**sign.components, "scales": np.array([bad], np.float32)}, "layers.1.w")
        with pytest.raises(dp.FormatError, match="'layers.1.w': alpha x delta is .* at row 0: not a finite value"):
            dp.apply(base16.float(), hostile)


@pytest.mark.parametrize("in_memory", [0, 3000, 1 << 20])
def test_writer_spills_to_scratch_files_beyond_its_memory_and_writes_the_same_bytes(tmp_path, in_memory):
    """Components are held in memory up to `in_memory` bytes in all, then each element size goes on in a
    scratch file after its pieces in memory: every split gives the file `save` writes, which safetensors reads
    back."""
    tensors = {f"t{i}": dp.encode(make_delta((20 + i, 40), seed=i), recipe)
               for i, recipe in enumerate(["sign:scope=row", "quant:bits=4,group=16", "dense", "sign", "levels:bits=3",
                                           "lowrank:rank=3", "sparse:p=0.3"] * 3)}
    dp.save(tmp_path / "ref.dpk", tensors, metadata={"k": 1})
    w = dp.DeltaWriter(tmp_path / "w.dpk", in_memory=in_memory)
    for name, enc in tensors.items():
        w.add(name, enc)
    w.close(metadata={"k": 1})
    assert (tmp_path / "w.dpk").read_bytes() == (tmp_path / "ref.dpk").read_bytes()
    # Handed over: what the writer holds in memory is the caller's arrays, not copies; the caller's own
    # references (here copies, some not contiguous) are gone and the memory reused before close.
    w = dp.DeltaWriter(tmp_path / "h.dpk", in_memory=in_memory, handed_over=True)
    for name, enc in tensors.items():
        comps = {k: np.asfortranarray(v) if v.ndim == 2 else v.copy() for k, v in enc.components.items()}
        w.add(name, dp.Encoded(enc.codec, enc.params, enc.shape, enc.dtype, comps))
        del comps
    gc.collect()
    junk = [np.full(1 << 16, 0xAB, np.uint8) for _ in range(64)]
    w.close(metadata={"k": 1})
    del junk
    assert (tmp_path / "h.dpk").read_bytes() == (tmp_path / "ref.dpk").read_bytes()
    os.unlink(tmp_path / "h.dpk")
    f = dp.open(tmp_path / "w.dpk")
    with safe_open(str(tmp_path / "w.dpk"), framework="np") as st:
        for name, enc in tensors.items():
            for key, value in enc.components.items():
                np.testing.assert_array_equal(st.get_tensor(f"{name}:{key}"), value)
            np.testing.assert_array_equal(dp.decode(f[name]), dp.decode(enc))
    assert sorted(os.listdir(tmp_path)) == ["ref.dpk", "w.dpk"]
