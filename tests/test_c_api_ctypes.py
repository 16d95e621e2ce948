"""The C API through libdeltapack.so loaded with ctypes (as an FFI user would), on delta files written
with the Python API, against dp.decode / dp.apply and plain numpy recomputations."""
import ctypes
import json

import numpy as np
import pytest
from conftest import bits, exact_f32, make_delta
from test_kernels_native import NEEDS_TOOLS, native_build

import deltapack as dp

pytestmark = NEEDS_TOOLS
F32, F16, BF16, I32 = 0, 1, 2, 5
c_size = ctypes.c_size_t


class ApplyParams(ctypes.Structure):
    _fields_ = [("alpha", ctypes.c_float), ("threads", ctypes.c_int), ("verify", ctypes.c_int)]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    lib = ctypes.CDLL(str(native_build(tmp_path_factory) / "libdeltapack.so"))
    p, i64, cp = ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p
    for name, res, args in [
        ("dp_version", cp, []), ("dp_last_error", cp, []), ("dp_apply_default_params", ApplyParams, []),
        ("dp_file_open", p, [cp]), ("dp_file_close", None, [p]), ("dp_file_count", c_size, [p]),
        ("dp_file_name", i64, [p, c_size, cp, c_size]), ("dp_file_shape", ctypes.c_int, [p, cp, p, c_size]),
        ("dp_file_numel", i64, [p, cp]), ("dp_file_dtype", ctypes.c_int, [p, cp]),
        ("dp_file_codec", i64, [p, cp, cp, c_size]), ("dp_file_metadata", i64, [p, cp, cp, c_size]),
        ("dp_file_manifest", i64, [p, cp, c_size]),
        ("dp_apply", ctypes.c_int, [p, cp, p, c_size, ctypes.c_int, p, c_size, ctypes.c_int, ApplyParams]),
        ("dp_decode", ctypes.c_int, [p, cp, p, c_size, ctypes.c_int]),
        ("dp_base_open", p, [cp]), ("dp_base_close", None, [p]), ("dp_base_count", c_size, [p]),
        ("dp_base_dtype", ctypes.c_int, [p, cp]),
        ("dp_apply_from_base", ctypes.c_int, [p, p, cp, p, c_size, ctypes.c_int, ApplyParams])]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def text(fn, *args):
    """A string out of an snprintf-style call: ask the length, then read it whole."""
    n = fn(*args, None, 0)
    assert n >= 0
    buf = ctypes.create_string_buffer(n + 1)
    assert fn(*args, buf, n + 1) == n
    return buf.value.decode()


def error(lib):
    return lib.dp_last_error().decode()


def params(lib, alpha=1.0):
    p = lib.dp_apply_default_params()
    p.alpha = alpha
    return p


def test_version_and_defaults(lib):
    assert lib.dp_version().decode() == dp.__version__
    p = lib.dp_apply_default_params()
    assert (p.alpha, p.threads, p.verify) == (1.0, 0, 1)


@pytest.fixture()
def delta_file(lib, tmp_path):
    delta = make_delta((48, 130), seed=11)
    enc = {"sign": dp.encode(delta, "sign", scope="row"), "dense": dp.encode(delta.astype(np.float16), "dense", dtype="f32")}
    dp.save(tmp_path / "d.dpk", enc, metadata={"task": "gsm8k", "lr": 0.5, "tags": ["a", "b"]})
    f = lib.dp_file_open(str(tmp_path / "d.dpk").encode())
    assert f, error(lib)
    yield f, enc, delta
    lib.dp_file_close(f)


def test_accessors_and_metadata(lib, delta_file, tmp_path):
    f, enc, delta = delta_file
    assert lib.dp_file_count(f) == 2
    assert [text(lib.dp_file_name, f, i) for i in range(2)] == ["sign", "dense"]
    dims = (ctypes.c_int64 * 4)()
    assert lib.dp_file_shape(f, b"sign", dims, 4) == 2 and list(dims[:2]) == [48, 130]
    assert lib.dp_file_numel(f, b"sign") == delta.size
    assert lib.dp_file_dtype(f, b"sign") == F32 and lib.dp_file_dtype(f, b"dense") == F16
    assert text(lib.dp_file_codec, f, b"dense") == "dense"
    for key, value in {"task": "gsm8k", "lr": 0.5, "tags": ["a", "b"]}.items():
        assert json.loads(text(lib.dp_file_metadata, f, key.encode())) == value
    manifest = json.loads(text(lib.dp_file_manifest, f))
    assert manifest == dp.open(tmp_path / "d.dpk").manifest
    assert lib.dp_file_metadata(f, b"nope", None, 0) == -1 and "no metadata key 'nope'" in error(lib)
    assert lib.dp_file_shape(f, b"sign", dims, 1) == -1 and "rank 2 does not fit in dims of 1" in error(lib)


@pytest.mark.parametrize("base_dtype,out_dtype", [(F32, F32), (F32, BF16), (F16, F32)])
def test_apply_matches_numpy(lib, delta_file, base_dtype, out_dtype):
    f, enc, delta = delta_file
    base = make_delta(delta.shape, seed=12, scale=0.05)
    base = base.astype(np.float16) if base_dtype == F16 else base
    np_out = {F32: np.float32, BF16: np.uint16}[out_dtype]
    out = np.zeros(delta.shape, dtype=np_out)
    rc = lib.dp_apply(f, b"sign", base.ctypes.data, base.nbytes, base_dtype, out.ctypes.data, out.nbytes, out_dtype,
                      params(lib, 0.75))
    assert rc == 0, error(lib)
    # numpy: f32(base) + f32(alpha) * decode, one rounding to the output dtype
    want = exact_f32(base) + np.float32(0.75) * dp.decode(enc["sign"])
    if out_dtype == F32:
        np.testing.assert_array_equal(out, want)
    else:
        import torch
        np.testing.assert_array_equal(out, bits(torch.from_numpy(want).to(torch.bfloat16)))


def test_dense_apply_is_plain_addition(lib, delta_file):
    f, enc, delta = delta_file
    base = make_delta(delta.shape, seed=13, scale=0.05)
    out = np.empty_like(base)
    assert lib.dp_apply(f, b"dense", base.ctypes.data, base.nbytes, F32, out.ctypes.data, out.nbytes, F32, params(lib)) == 0
    np.testing.assert_array_equal(out, base + delta.astype(np.float16).astype(np.float32))
    dec = np.empty_like(base)
    assert lib.dp_decode(f, b"sign", dec.ctypes.data, dec.nbytes, 0) == 0
    np.testing.assert_array_equal(dec, dp.decode(enc["sign"]))


def test_wrong_sizes_and_names_are_errors(lib, delta_file):
    f, enc, delta = delta_file
    base = np.zeros(delta.shape, np.float32)
    out = np.full(delta.shape, 7.0, np.float32)
    assert lib.dp_apply(f, b"sign", base.ctypes.data, base.nbytes - 4, F32, out.ctypes.data, out.nbytes, F32, params(lib)) == -1
    assert f"d.dpk: tensor 'sign': base holds {base.nbytes - 4} bytes, expected {base.nbytes} ([48, 130] f32)" in error(lib)
    assert lib.dp_apply(f, b"sign", base.ctypes.data, base.nbytes, F32, out.ctypes.data, out.nbytes, BF16, params(lib)) == -1
    assert f"out holds {out.nbytes} bytes, expected {out.nbytes // 2} ([48, 130] bf16)" in error(lib)
    assert lib.dp_apply(f, b"sign", base.ctypes.data, base.nbytes, I32, out.ctypes.data, out.nbytes, F32, params(lib)) == -1
    assert "base dtype i32 is not f32, f16 or bf16" in error(lib)
    assert lib.dp_apply(f, b"nope", base.ctypes.data, base.nbytes, F32, out.ctypes.data, out.nbytes, F32, params(lib)) == -1
    assert "no tensor 'nope'" in error(lib)
    assert lib.dp_apply(None, b"sign", base.ctypes.data, base.nbytes, F32, out.ctypes.data, out.nbytes, F32, params(lib)) == -1
    assert "f is NULL" in error(lib)
    assert (out == 7.0).all()  # nothing written by any failed call
    assert lib.dp_file_open(b"/nonexistent/x.dpk") is None and "/nonexistent/x.dpk" in error(lib)


def test_apply_from_base_file(lib, tmp_path, delta_file):
    import torch
    from safetensors.torch import save_file
    f, enc, delta = delta_file
    base = make_delta(delta.shape, "bf16", seed=14, scale=0.05)
    save_file({"sign": base, "dense": torch.zeros(3), "ids": torch.arange(4, dtype=torch.int32)}, str(tmp_path / "base.safetensors"))
    b = lib.dp_base_open(str(tmp_path / "base.safetensors").encode())
    assert b, error(lib)
    try:
        assert lib.dp_base_count(b) == 3 and lib.dp_base_dtype(b, b"ids") == I32 and lib.dp_base_dtype(b, b"sign") == BF16
        out = np.zeros(delta.shape, np.uint16)
        assert lib.dp_apply_from_base(f, b, b"sign", out.ctypes.data, out.nbytes, BF16, params(lib, 0.5)) == 0, error(lib)
        np.testing.assert_array_equal(out, bits(dp.apply(base, enc["sign"], alpha=0.5)))
        assert lib.dp_apply_from_base(f, b, b"dense", out.ctypes.data, out.nbytes, BF16, params(lib)) == -1
        assert "the delta's shape [48, 130] differs from the base's [3]" in error(lib)
        assert lib.dp_base_open(str(tmp_path).encode()) is None and "no model.safetensors" in error(lib)
    finally:
        lib.dp_base_close(b)
