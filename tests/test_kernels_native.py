"""The C and C++ checks, built by CMake and run by CTest (DELTAPACK_TESTS=ON): every kernel of every
SIMD path against the scalar path (natively, and for AArch64 cross-compiled and run under qemu-user,
skipped where that toolchain is missing), the C API from plain C99 against a static and a shared
library, several threads rebuilding from one delta file, and the CUDA path's launch arithmetic and host
emulation (cuda_check; with CUDA when CMake finds a toolkit).

native_build() is the one CMake build of a session; test_c_api_ctypes.py and test_install.py use it too."""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TOOLS = bool(shutil.which("cmake") and shutil.which("ctest") and shutil.which("gcc") and shutil.which("g++"))
NEEDS_TOOLS = pytest.mark.skipif(not HAVE_TOOLS, reason="cmake, ctest, gcc and g++ needed")
_BUILD = {}


def cmake_generator():
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def write_c_api_fixture(d):
    """The files tests/cpp/c_api_check.c reads (its names, shapes and metadata are fixed there), written
    with the Python API, and reference outputs computed by dp.apply / dp.decode or plain numpy."""
    import torch
    from conftest import bits, exact_f32, make_delta
    from safetensors.torch import save_file

    import deltapack as dp
    d.mkdir(parents=True, exist_ok=True)
    b_delta = make_delta((70,), "f16", seed=3)
    enc = {"w": dp.encode(make_delta((37, 70), seed=1), "sign", scope="row"),
           "b": dp.encode(b_delta, "dense", dtype="f32"),
           "q": dp.encode(make_delta((3, 4, 50), "bf16", seed=4), "quant", bits=4),
           "s": dp.encode(make_delta((4, 5), seed=5), "dense"),
           "i": dp.encode(make_delta((6,), seed=6), "dense"),
           "missing": dp.encode(make_delta((2,), seed=7), "dense")}
    dp.save(d / "delta.dpk", enc, metadata={"task": "gsm8k", "steps": 3, "nested": {"a": [1, 2.5]}})
    base_w = make_delta((37, 70), "bf16", seed=2, scale=0.05)
    base_b = make_delta((70,), seed=8, scale=0.05)
    base_q = make_delta((3, 4, 50), "f16", seed=9, scale=0.05)
    save_file({"w": base_w, "b": torch.from_numpy(base_b), "q": torch.from_numpy(base_q), "s": torch.zeros(5, 4),
               "i": torch.arange(6, dtype=torch.int32), "extra": torch.zeros(10, dtype=torch.uint8)},
              str(d / "base.safetensors"))
    bits(base_w).tofile(d / "base_w.raw")
    bits(dp.apply(base_w, enc["w"], alpha=0.5)).tofile(d / "ref_w_bf16.raw")
    decoded = dp.decode(enc["w"])
    decoded.tofile(d / "decode_w.raw")
    (exact_f32(base_w) + np.float32(0.5) * decoded).astype(np.float32).tofile(d / "ref_w_f32.raw")
    bits(dp.apply(base_q, enc["q"])).tofile(d / "ref_q_f16.raw")
    (base_b + b_delta.astype(np.float32)).tofile(d / "ref_b_f32.raw")  # dense f32 keeps the f16 delta exactly
    write_checkpoint_fixture(d)
    write_bank_fixture(d)
    return enc


def write_checkpoint_fixture(d):
    """A sharded base directory and a fine-tune of it with every kind of tensor (changed, unchanged, a
    resized embedding, an added and a removed tensor, an integer one), compressed by deltapack compress;
    the references are what deltapack.load rebuilds (ck_<name>.raw) and one tensor in f32."""
    import json

    import torch
    from conftest import bits
    from safetensors.torch import save_file

    from deltapack import checkpoint as ck
    g = torch.Generator().manual_seed(11)
    base = {"emb": torch.randn(20, 8, generator=g).to(torch.bfloat16), "w": torch.randn(16, 12, generator=g),
            "n": torch.randn(12, generator=g).to(torch.bfloat16), "pos": torch.arange(5),
            "old": torch.randn(4, 4, generator=g).to(torch.float16)}
    ft = {"emb": torch.cat([base["emb"] + 0.01, torch.randn(4, 8, generator=g).to(torch.bfloat16)]),
          "w": base["w"] + 0.01 * torch.randn(16, 12, generator=g), "n": base["n"], "pos": base["pos"],
          "added": torch.randn(3, 5, generator=g)}
    for name, sd, shards in (("ckpt_base", base, (["emb", "w"], ["n", "pos", "old"])),
                             ("ckpt_ft", ft, (["emb", "w"], ["n", "pos", "added"]))):
        (d / name).mkdir()
        files = {f"model-0000{i + 1}-of-00002.safetensors": keys for i, keys in enumerate(shards)}
        for fname, keys in files.items():
            save_file({k: sd[k] for k in keys}, str(d / name / fname), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, keys in files.items() for k in keys}}
        (d / name / "model.safetensors.index.json").write_text(json.dumps(index))
        (d / name / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    ck.compress(d / "ckpt_base", d / "ckpt_ft", d / "ckpt.dpk", "*emb*=quant:bits=4;*=sign", min_size=0, force=True)
    for name, t in ck.load(d / "ckpt_base", d / "ckpt.dpk").items():
        (bits(t) if t.is_floating_point() else t.numpy()).tofile(d / f"ck_{name}.raw")
    bits(ck.load(d / "ckpt_base", d / "ckpt.dpk", dtype="f32")["emb"]).tofile(d / "ck_emb_f32.raw")


BANK_TENSORS = ("emb", "w1", "w2", "b", "norm", "pos")
BANK_PRODUCTS = (("a", "w1"), ("b", "w1"), ("b", "w2"))  # (fine-tune, tensor) pairs with product references
BANK_ROWS = (3, 0, 23)  # rows of "emb" for delta_rows


def write_bank_fixture(d):
    """A base directory (bank_base: emb bf16 [24, 16], w1 bf16 [32, 16], w2 f32 [16, 32], b f16 [32], norm bf16
    [16], pos i64 [5]) and two fine-tunes with its tensors only, compressed by deltapack compress: bank_a.dpk
    (emb, w1, w2, norm; sign) and bank_b.dpk (w1 quant:bits=4, w2 lowrank:rank=4, b dense), plus bank_other.dpk
    (the same names and shapes, made against another base). References: bank_<state>_<tensor>.raw for the
    states base (as stored), a and b (deltapack.checkpoint.load) and mix (a at 1.0 then b at 0.5, dp.Bank);
    products y0 + 0.75 * x times the decoded delta, transposed, in float64 (bank_prod_<ft>_<tensor>.raw, f64)
    with a bound on the f32 error (bank_tol_..., f64) from bank_x_<tensor>.raw and bank_y0_<tensor>.raw (f32);
    0.75 * rows BANK_ROWS of a's decoded emb delta (bank_rows_a_emb.raw, f32)."""
    import json

    import torch
    from conftest import bits
    from safetensors.torch import save_file

    import deltapack as dp
    from deltapack import checkpoint as ck
    g = torch.Generator().manual_seed(21)

    def noise(t, scale):
        return (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype)

    base = {"emb": torch.randn(24, 16, generator=g).to(torch.bfloat16),
            "w1": torch.randn(32, 16, generator=g).to(torch.bfloat16), "w2": torch.randn(16, 32, generator=g),
            "b": torch.randn(32, generator=g).to(torch.float16), "norm": torch.randn(16, generator=g).to(torch.bfloat16),
            "pos": torch.arange(5)}
    ft_a = dict(base, emb=noise(base["emb"], 0.02), w1=noise(base["w1"], 0.02), w2=noise(base["w2"], 0.02),
                norm=noise(base["norm"], 0.05))
    ft_b = dict(base, w1=noise(base["w1"], 0.03), w2=noise(base["w2"], 0.03), b=noise(base["b"], 0.05))
    other = {k: noise(v, 0.01) if v.is_floating_point() else v for k, v in base.items()}
    for name, sd in (("bank_base", base), ("bank_ft_a", ft_a), ("bank_ft_b", ft_b), ("bank_other", other)):
        (d / name).mkdir()
        save_file(sd, str(d / name / "model.safetensors"), metadata={"format": "pt"})
        (d / name / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    ck.compress(d / "bank_base", d / "bank_ft_a", d / "bank_a.dpk", "sign", min_size=0, force=True)
    ck.compress(d / "bank_base", d / "bank_ft_b", d / "bank_b.dpk", "w1=quant:bits=4;w2=lowrank:rank=4;*=sign",
                min_size=0, force=True)
    ck.compress(d / "bank_other", d / "bank_ft_b", d / "bank_other.dpk", "sign", min_size=0, force=True)

    def raw(t):
        return bits(t) if t.is_floating_point() else t.numpy()

    bank = dp.Bank(d / "bank_base")
    bank.add("a", d / "bank_a.dpk")
    bank.add("b", d / "bank_b.dpk")
    states = {"base": base, "a": ck.load(d / "bank_base", d / "bank_a.dpk"), "b": ck.load(d / "bank_base", d / "bank_b.dpk"),
              "mix": {n: bank.rebuild({"a": 1.0, "b": 0.5}, n) for n in BANK_TENSORS}}
    for state, sd in states.items():
        for n in BANK_TENSORS:
            raw(sd[n]).tofile(d / f"bank_{state}_{n}.raw")
    rng = np.random.default_rng(5)
    for n in ("w1", "w2"):
        rows, cols = base[n].shape
        rng.standard_normal((3, cols)).astype(np.float32).tofile(d / f"bank_x_{n}.raw")
        rng.standard_normal((3, rows)).astype(np.float32).tofile(d / f"bank_y0_{n}.raw")
    for ft, n in BANK_PRODUCTS:
        x = np.fromfile(d / f"bank_x_{n}.raw", np.float32).reshape(3, -1).astype(np.float64)
        y0 = np.fromfile(d / f"bank_y0_{n}.raw", np.float32).reshape(3, -1).astype(np.float64)
        delta = dp.decode(dp.open(d / f"bank_{ft}.dpk")[n]).astype(np.float64)
        (y0 + 0.75 * (x @ delta.T)).tofile(d / f"bank_prod_{ft}_{n}.raw")
        # f32 sums of cols products: within a few ulps of the magnitudes summed (as tests/test_mixed_batches.py)
        (4 * x.shape[1] * 2.0**-24 * (np.abs(y0) + 0.75 * (np.abs(x) @ np.abs(delta).T)) + 1e-30).tofile(
            d / f"bank_tol_{ft}_{n}.raw")
    emb = dp.decode(dp.open(d / "bank_a.dpk")["emb"])
    (np.float32(0.75) * emb[list(BANK_ROWS)]).tofile(d / "bank_rows_a_emb.raw")


def native_build(tmp_path_factory):
    """One CMake build per session (static + shared library, examples, checks), with the C API fixture."""
    if "dir" not in _BUILD:
        if not HAVE_TOOLS:
            pytest.skip("cmake, ctest, gcc and g++ needed")
        top = tmp_path_factory.mktemp("native")
        write_c_api_fixture(top / "fixture")
        build = top / "build"
        subprocess.run(["cmake", "-S", ROOT, "-B", str(build), *cmake_generator(), "-DCMAKE_BUILD_TYPE=Release",
                        "-DDELTAPACK_SHARED=ON", "-DDELTAPACK_TESTS=ON", f"-DDELTAPACK_TEST_DATA={top / 'fixture'}"],
                       check=True, capture_output=True)
        r = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        _BUILD["dir"] = build
    return _BUILD["dir"]


def run_ctest(build, name, timeout=600):
    """Runs one CTest test (verbose: its output comes back); it must exist, run and pass."""
    r = subprocess.run(["ctest", "-R", f"^{name}$", "-V"], cwd=str(build), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert re.search(rf"Test +#\d+: {name} \.* *Passed", r.stdout), r.stdout[-3000:]  # not skipped, not absent
    return r.stdout


@NEEDS_TOOLS
@pytest.mark.parametrize("name", ["kernel_check", "c_api_check", "c_api_check_shared", "thread_check", "cuda_check"])
def test_ctest(tmp_path_factory, name):
    out = run_ctest(native_build(tmp_path_factory), name)
    expected = {"kernel_check": "all kernels identical", "c_api_check": "C API: all checks passed",
                "c_api_check_shared": "C API: all checks passed", "thread_check": "threaded rebuilds identical",
                "cuda_check": "cuda checks passed"}[name]
    assert expected in out


@NEEDS_TOOLS
def test_c_api_check_without_fixture_is_skipped(tmp_path_factory):
    exe = native_build(tmp_path_factory) / "c_api_check"
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 77 and "skipped" in r.stdout


@NEEDS_TOOLS
def test_c_api_check_detects_a_wrong_reference(tmp_path_factory, tmp_path):
    """The C check compares real outputs: one flipped reference bit fails it."""
    build = native_build(tmp_path_factory)
    fixture = build.parent / "fixture"
    shutil.copytree(fixture, tmp_path / "fx")
    ref = np.fromfile(tmp_path / "fx" / "ref_q_f16.raw", dtype=np.uint16)
    ref[17] ^= 1
    ref.tofile(tmp_path / "fx" / "ref_q_f16.raw")
    r = subprocess.run([str(build / "c_api_check"), str(tmp_path / "fx")], capture_output=True, text=True)
    assert r.returncode == 1 and "FAILED" in r.stdout and "1 C API checks failed" in r.stdout


@pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
                    reason="needs cmake, g++-aarch64-linux-gnu and qemu-user (Debian packages)")
def test_neon_kernels_match_scalar_under_qemu(tmp_path):
    """The same CMake project cross-compiled for AArch64; CTest runs kernel_check through qemu-aarch64."""
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), *cmake_generator(), "-DCMAKE_BUILD_TYPE=Release",
                    "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                    "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
                    "-DCMAKE_EXE_LINKER_FLAGS=-static", "-DCMAKE_CROSSCOMPILING_EMULATOR=qemu-aarch64",
                    "-DDELTAPACK_TESTS=ON", "-DDELTAPACK_EXAMPLES=OFF"], check=True, capture_output=True)
    r = subprocess.run(["cmake", "--build", str(build), "--target", "kernel_check", "-j", str(os.cpu_count() or 2)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = run_ctest(build, "kernel_check")
    assert "checked neon against scalar" in out and "all kernels identical" in out
