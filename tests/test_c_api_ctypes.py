"""The C API through libdeltapack.so loaded with ctypes (as an FFI user would), on delta files written
with the Python API, against dp.decode / dp.apply and plain numpy recomputations; the bank (dp_bank_*) and the
example deltapack-bank against dp.Bank, on the fixture write_bank_fixture writes."""
import ctypes
import json
import re
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import bits, exact_f32, make_delta
from test_kernels_native import BANK_TENSORS, NEEDS_TOOLS, native_build

import deltapack as dp
from deltapack import reference

pytestmark = NEEDS_TOOLS
F32, F16, BF16, I32 = 0, 1, 2, 5
c_size = ctypes.c_size_t


class ApplyParams(ctypes.Structure):
    _fields_ = [("alpha", ctypes.c_float), ("threads", ctypes.c_int), ("verify", ctypes.c_int),
                ("rounding", ctypes.c_int)]


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
        ("dp_apply_from_base", ctypes.c_int, [p, p, cp, p, c_size, ctypes.c_int, ApplyParams]),
        ("dp_bank_open", p, [cp]), ("dp_bank_close", None, [p]), ("dp_bank_add", ctypes.c_int, [p, cp, cp, ctypes.c_int]),
        ("dp_bank_remove", ctypes.c_int, [p, cp]), ("dp_bank_fine_tune_count", c_size, [p]),
        ("dp_bank_fine_tune_name", i64, [p, c_size, cp, c_size]),
        ("dp_bank_activate", ctypes.c_int, [p, c_size, p, p, ctypes.c_int]),
        ("dp_bank_last_rewritten", i64, [p, p, c_size]), ("dp_bank_count", c_size, [p]),
        ("dp_bank_tensor_name", i64, [p, c_size, cp, c_size]), ("dp_bank_shape", ctypes.c_int, [p, cp, p, c_size]),
        ("dp_bank_dtype", ctypes.c_int, [p, cp]), ("dp_bank_numel", i64, [p, cp]),
        ("dp_bank_tensor", ctypes.c_int, [p, cp, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(c_size)]),
        ("dp_bank_rebuild", ctypes.c_int, [p, c_size, p, p, cp, p, c_size, ctypes.c_int]),
        ("dp_bank_touches", ctypes.c_int, [p, cp, cp]),
        ("dp_bank_product", ctypes.c_int, [p, cp, cp, p, c_size, i64, ctypes.c_float, p, c_size, ctypes.c_int]),
        ("dp_bank_mixed_product", ctypes.c_int, [p, cp, c_size, p, p, c_size, p, c_size, i64, ctypes.c_float, p, c_size,
                                                 ctypes.c_int]),
        ("dp_bank_delta_rows", ctypes.c_int, [p, cp, cp, p, c_size, ctypes.c_float, p, c_size]),
        ("dp_bank_set_cache_budget", ctypes.c_int, [p, ctypes.c_uint64]), ("dp_bank_cache_bytes", i64, [p]),
        ("dp_bank_lock_shared", ctypes.c_int, [p]), ("dp_bank_unlock_shared", ctypes.c_int, [p])]:
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
    p = params(lib, 0.75)
    p.rounding = 1  # DP_ROUNDING_NEAREST
    rc = lib.dp_apply(f, b"sign", base.ctypes.data, base.nbytes, base_dtype, out.ctypes.data, out.nbytes, out_dtype, p)
    assert rc == 0, error(lib)
    # numpy: f32(base) + f32(alpha) * decode, one rounding to the output dtype
    want = exact_f32(base) + np.float32(0.75) * dp.decode(enc["sign"])
    if out_dtype == F32:
        np.testing.assert_array_equal(out, want)
    else:
        import torch
        np.testing.assert_array_equal(out, bits(torch.from_numpy(want).to(torch.bfloat16)))
        # the default (auto) dithers a lossy codec: the executable spec's rule
        rc = lib.dp_apply(f, b"sign", base.ctypes.data, base.nbytes, base_dtype, out.ctypes.data, out.nbytes,
                          out_dtype, params(lib, 0.75))
        assert rc == 0, error(lib)
        np.testing.assert_array_equal(out, reference.apply(exact_f32(base), dp.decode(enc["sign"]), 0.75, "bf16",
                                                           "dithered"))
        p.rounding = 3
        assert lib.dp_apply(f, b"sign", base.ctypes.data, base.nbytes, base_dtype, out.ctypes.data, out.nbytes,
                            out_dtype, p) == -1
        assert "dp_apply_params.rounding 3 is not a dp_rounding" in error(lib)


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


# ------------------------------------------------------------------------------------------ the bank

NP_OF = {F32: np.float32, F16: np.uint16, BF16: np.uint16, 4: np.int64}  # bank fixture dtypes (bf16/f16 as bits)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return native_build(tmp_path_factory).parent / "fixture"


@pytest.fixture(scope="module")
def py_bank(fixture):
    """dp.Bank over the same base and fine-tunes: what every C call is compared with."""
    bank = dp.Bank(fixture / "bank_base")
    bank.add("a", fixture / "bank_a.dpk")
    bank.add("b", fixture / "bank_b.dpk")
    return bank


@pytest.fixture()
def bank(lib, fixture):
    b = lib.dp_bank_open(str(fixture / "bank_base").encode())
    assert b, error(lib)
    assert lib.dp_bank_add(b, b"a", str(fixture / "bank_a.dpk").encode(), 0) == 0, error(lib)
    assert lib.dp_bank_add(b, b"b", str(fixture / "bank_b.dpk").encode(), 0) == 0, error(lib)
    yield b
    lib.dp_bank_close(b)


def mix_args(mix):
    """dp_bank_activate / dp_bank_rebuild's (n, names, alphas) for a {name: alpha} dict."""
    names = (ctypes.c_char_p * max(len(mix), 1))(*(k.encode() for k in mix))
    alphas = (ctypes.c_float * max(len(mix), 1))(*mix.values())
    return len(mix), names, alphas


def live(lib, b, name):
    """The live buffer of tensor `name` as a numpy view (no copy), with its dtype and shape."""
    data, nbytes = ctypes.c_void_p(), c_size()
    assert lib.dp_bank_tensor(b, name.encode(), ctypes.byref(data), ctypes.byref(nbytes)) == 0, error(lib)
    dims = (ctypes.c_int64 * 4)()
    rank = lib.dp_bank_shape(b, name.encode(), dims, 4)
    buf = (ctypes.c_uint8 * nbytes.value).from_address(data.value)
    return np.frombuffer(buf, NP_OF[lib.dp_bank_dtype(b, name.encode())]).reshape(dims[:rank])


def test_bank_switches_match_python_bank(lib, bank, py_bank):
    names = [text(lib.dp_bank_tensor_name, bank, i) for i in range(lib.dp_bank_count(bank))]
    assert names == py_bank._b.tensor_names() and sorted(names) == sorted(BANK_TENSORS)
    for mix in ({"a": 1.0}, {"b": 1.0}, {}, {"a": 1.0, "b": 0.5}, {"b": -0.75}, {"a": 1.0}):
        assert lib.dp_bank_activate(bank, *mix_args(mix), 0) == 0, error(lib)
        sd = py_bank.activate(mix)
        flags = np.zeros(len(names), np.uint8)
        n = lib.dp_bank_last_rewritten(bank, flags.ctypes.data, flags.size)
        assert n == flags.sum() and sorted(np.array(names)[flags == 1]) == sorted(py_bank.last_rewritten), mix
        for name in names:
            assert live(lib, bank, name).tobytes() == py_bank.numpy(name).tobytes(), (mix, name)
            assert lib.dp_bank_numel(bank, name.encode()) == sd[name].numel()


def test_bank_rebuild_product_and_rows_match_python_bank(lib, bank, py_bank):
    assert lib.dp_bank_activate(bank, 0, None, None, 0) == 0
    for mix in ({}, {"a": 1.0}, {"a": 0.5, "b": 1.25}):
        for name in BANK_TENSORS:
            want = py_bank.rebuild(mix, name)
            out = np.zeros(want.shape, NP_OF[lib.dp_bank_dtype(bank, name.encode())])
            assert lib.dp_bank_rebuild(bank, *mix_args(mix), name.encode(), out.ctypes.data, out.nbytes, 0) == 0, error(lib)
            assert out.tobytes() == (bits(want) if want.is_floating_point() else want.numpy()).tobytes(), (mix, name)
    rng = np.random.default_rng(3)
    for ft in ("a", "b"):
        for name in ("w1", "w2", "emb", "b"):
            rows, cols = (1, 32) if name == "b" else live(lib, bank, name).shape
            x = rng.standard_normal((5, cols)).astype(np.float32)
            y = rng.standard_normal((5, rows)).astype(np.float32)
            want = y.copy()
            py_bank._b.product(ft, name, x, want, 0.5)
            assert lib.dp_bank_product(bank, ft.encode(), name.encode(), x.ctypes.data, x.size, 5, 0.5, y.ctypes.data,
                                       y.size, 0) == 0, error(lib)
            assert np.array_equal(y, want), (ft, name)  # the same kernels: the same bits
            assert lib.dp_bank_touches(bank, ft.encode(), name.encode()) == int(py_bank._b.touches(ft, name))
    which = np.array([1, -1, 0, 0, 1, -1], np.int32)  # rows for b, the base, a, a, b, the base
    x = rng.standard_normal((6, 16)).astype(np.float32)
    y = rng.standard_normal((6, 32)).astype(np.float32)
    want = y.copy()
    py_bank._b.mixed_product("w1", ["a", "b"], which, x, want, 0.75)
    n, names, _ = mix_args({"a": 1.0, "b": 1.0})
    assert lib.dp_bank_mixed_product(bank, b"w1", n, names, which.ctypes.data, which.size, x.ctypes.data, x.size, 6, 0.75,
                                     y.ctypes.data, y.size, 0) == 0, error(lib)
    assert np.array_equal(y, want) and not np.array_equal(y[0], want[0] * 0)
    idx = np.array([5, 0, 23, 5], np.int64)
    out, want = np.full((4, 16), 9.0, np.float32), np.empty((4, 16), np.float32)
    py_bank._b.delta_rows("a", "emb", idx, want, -1.5)
    assert lib.dp_bank_delta_rows(bank, b"a", b"emb", idx.ctypes.data, 4, -1.5, out.ctypes.data, out.size) == 0
    assert np.array_equal(out, want) and np.abs(out).max() > 0


def test_bank_errors(lib, bank, fixture):
    out = np.zeros((32, 16), np.uint16)
    assert lib.dp_bank_activate(bank, *mix_args({"nope": 1.0}), 0) == -1
    assert "no fine-tune named 'nope' (add it first)" in error(lib)
    assert lib.dp_bank_rebuild(bank, *mix_args({"a": 1.0}), b"w1", out.ctypes.data, out.nbytes + 2, 0) == -1
    assert f"bank_base: tensor 'w1': out holds {out.nbytes + 2} bytes, expected {out.nbytes} ([32, 16] bf16)" in error(lib)
    x, y = np.zeros((2, 16), np.float32), np.zeros((2, 31), np.float32)
    assert lib.dp_bank_product(bank, b"a", b"w1", x.ctypes.data, x.size, 2, 1.0, y.ctypes.data, y.size, 0) == -1
    assert "tensor 'w1': y holds 62 values, expected 64 (batch 2 x 32 f32)" in error(lib)
    assert lib.dp_bank_add(bank, b"o", str(fixture / "bank_other.dpk").encode(), 0) == -1
    assert "this is not the delta's base: tensor 'w2' has different contents" in error(lib)
    assert lib.dp_bank_fine_tune_count(bank) == 2
    assert [text(lib.dp_bank_fine_tune_name, bank, i) for i in range(2)] == ["a", "b"]
    assert lib.dp_bank_tensor(None, b"w1", ctypes.byref(ctypes.c_void_p()), None) == -1 and "bank is NULL" in error(lib)
    assert lib.dp_bank_open(str(fixture / "nope").encode()) is None and "nope" in error(lib)
    assert lib.dp_bank_unlock_shared(bank) == -1 and "holds no shared lock" in error(lib)
    assert lib.dp_bank_set_cache_budget(bank, 1 << 20) == 0 and lib.dp_bank_cache_bytes(bank) == 0
    assert lib.dp_bank_activate(bank, *mix_args({"a": 1.0}), 0) == 0 and lib.dp_bank_cache_bytes(bank) > 0


def test_bank_threads_readers_hold_the_lock_while_another_switches(lib, bank, fixture):
    """ctypes releases the GIL in C calls: a switching thread and reading threads really run at once. Readers
    under dp_bank_lock_shared always see one whole state; a switch waits for a reader on another thread and is
    refused (not deadlocked) on the reader's own."""
    states = {s: {n: (fixture / f"bank_{s}_{n}.raw").read_bytes() for n in BANK_TENSORS} for s in ("base", "a", "b")}
    views = {n: live(lib, bank, n) for n in BANK_TENSORS}
    stop, problems, seen = threading.Event(), [], set()

    def switcher():
        for i in range(600):
            if lib.dp_bank_activate(bank, *mix_args([{"a": 1.0}, {"b": 1.0}, {}][i % 3]), 1) != 0:
                problems.append(error(lib))
        stop.set()

    def reader():
        while not stop.is_set():
            assert lib.dp_bank_lock_shared(bank) == 0
            try:
                snapshot = {n: v.tobytes() for n, v in views.items()}
            finally:
                assert lib.dp_bank_unlock_shared(bank) == 0
            whole = [s for s, ref in states.items() if ref == snapshot]
            if len(whole) != 1:
                problems.append("a reader saw a mix of states")
            seen.update(whole)

    threads = [threading.Thread(target=switcher)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not problems, problems[:3]
    assert len(seen) >= 2

    assert lib.dp_bank_lock_shared(bank) == 0  # this thread reads: another's switch waits, its own is refused
    rc = []
    waiting = threading.Thread(target=lambda: rc.append(lib.dp_bank_activate(bank, *mix_args({"b": 1.0}), 0)))
    waiting.start()
    time.sleep(0.3)
    assert waiting.is_alive() and not rc
    assert lib.dp_bank_activate(bank, 0, None, None, 0) == -1 and "would wait for itself" in error(lib)
    assert lib.dp_bank_unlock_shared(bank) == 0
    waiting.join(timeout=30)
    assert rc == [0] and states["b"]["w1"] == views["w1"].tobytes()


LINE = re.compile(r"^(A|B|base) +switch +[\d.]+ ms, (\d+) tensors rewritten; (\w+): crc32c ([0-9a-f]{8}), first values (.*)$")


@pytest.mark.parametrize("tensor", [None, "w1"])
def test_bank_example_program(tmp_path_factory, fixture, py_bank, tensor):
    """deltapack-bank BASE A B: every state's CRC-32C and first values are dp.Bank's; the mixed batch's product
    agrees with the rebuilt matrices within their rounding."""
    exe = native_build(tmp_path_factory) / "deltapack-bank"
    args = [str(exe), str(fixture / "bank_base"), str(fixture / "bank_a.dpk"), str(fixture / "bank_b.dpk")]
    r = subprocess.run(args + (["--tensor", tensor] if tensor else []), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [m.groups() for m in map(LINE.match, r.stdout.splitlines()) if m]
    assert [g[0] for g in lines] == ["A", "B", "base", "A"], r.stdout
    watched = lines[0][2]
    assert watched == (tensor or "w2")  # the largest matrix both change (w1 and w2 tie; w2 comes first)
    for state, rewritten, name, crc, values in lines:
        py_bank.activate(None if state == "base" else {state.lower(): 1.0})
        arr = py_bank.numpy(name)
        assert crc == f"{dp._core.crc32c(arr.tobytes()):08x}", (state, name)
        want = py_bank.state_dict()[name].flatten()[:4].float().numpy()
        assert np.array_equal(np.array(values.split(), np.float32), want), (state, values)
    assert [int(g[1]) for g in lines] == [4, 5, 3, 4]  # a: emb w1 w2 norm; then b's w1 w2 b too; ...
    py_bank.activate(None)
    m = re.search(r"mixed batch through (\w+) .*max \|delta part\| (\S+), max \|product - rebuild\| (\S+) \(relative (\S+)\)",
                  r.stdout)
    assert m and m.group(1) == watched, r.stdout
    delta_part, diff, relative = map(float, m.groups()[1:])
    # the rebuilt matrix is rounded to the tensor's dtype (bf16 w1: 2^-9 relative per weight; f32 w2: 2^-24)
    # (dithered, as a lossy delta is by default: up to a whole ulp per weight, not half)
    assert relative < (4e-3 if watched == "w1" else 1e-6) and delta_part > 4 * diff, r.stdout
