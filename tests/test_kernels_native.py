"""C++-level checks built straight from the sources: every kernel of every SIMD path against the
scalar path (natively, and the NEON path cross-compiled for AArch64 and run under qemu-user, skipped
where that toolchain is missing), and the C API used from a plain C program."""
import os
import shutil
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(ROOT, "cpp", "src", f) for f in ("core.cpp", "json.cpp", "engine.cpp", "registry.cpp",
                                                        "container.cpp", "kernels_scalar.cpp", "c_api.cpp")]
SOURCES += [os.path.join(ROOT, "cpp", "src", "codecs", f) for f in os.listdir(os.path.join(ROOT, "cpp", "src", "codecs"))
            if f.endswith(".cpp")]
CHECK = os.path.join(ROOT, "tests", "cpp", "kernel_check.cpp")
FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-I" + os.path.join(ROOT, "cpp", "include"),
         "-I" + os.path.join(ROOT, "cpp", "src"), '-DDELTAPACK_VERSION="test"', "-pthread"]


def build(compiler, extra_sources, defines, out, link=(), c_main=None):
    objs = []
    if c_main:  # a C program: compiled as C, linked with the C++ library objects
        obj = os.path.join(os.path.dirname(out), "main.o")
        subprocess.run([compiler.replace("g++", "gcc"), "-std=c99", "-O2", "-I" + os.path.join(ROOT, "cpp", "include"),
                        "-c", c_main, "-o", obj], check=True)
        objs.append(obj)
    for src in SOURCES + extra_sources:
        obj = os.path.join(os.path.dirname(out), os.path.basename(src) + ".o")
        flags = list(FLAGS)
        if src.endswith("kernels_avx2.cpp"):
            flags += ["-mavx2", "-mf16c", "-mpopcnt"]
        if src.endswith("kernels_avx512.cpp"):
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx2", "-mf16c", "-mpopcnt"]
        subprocess.run([compiler, *flags, *defines, "-c", src, "-o", obj], check=True)
        objs.append(obj)
    subprocess.run([compiler, *objs, "-o", out, "-pthread", *link], check=True)


@pytest.mark.skipif(os.uname().machine != "x86_64" or not shutil.which("g++"), reason="x86-64 g++ needed")
def test_x86_kernels_match_scalar(tmp_path):
    src = os.path.join(ROOT, "cpp", "src")
    build("g++", [os.path.join(src, "kernels_avx2.cpp"), os.path.join(src, "kernels_avx512.cpp"), CHECK],
          ["-DDELTAPACK_X86"], str(tmp_path / "check"))
    r = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all kernels identical" in r.stdout


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
                    reason="needs g++-aarch64-linux-gnu and qemu-user (Debian packages)")
def test_neon_kernels_match_scalar_under_qemu(tmp_path):
    build("aarch64-linux-gnu-g++", [os.path.join(ROOT, "cpp", "src", "kernels_neon.cpp"), CHECK], ["-DDELTAPACK_ARM"],
          str(tmp_path / "check"), link=["-static"])
    r = subprocess.run(["qemu-aarch64", str(tmp_path / "check")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checked neon against scalar" in r.stdout and "all kernels identical" in r.stdout


@pytest.mark.skipif(not shutil.which("gcc") or not shutil.which("g++"), reason="gcc/g++ needed")
def test_c_api_from_plain_c(tmp_path):
    import torch
    from conftest import bits, make_delta

    import deltapack as dp
    build("g++", [], [], str(tmp_path / "capi"), c_main=os.path.join(ROOT, "tests", "cpp", "c_api_check.c"))
    enc = dp.encode(make_delta((37, 70), seed=1), "quant", bits=4)
    dp.save(tmp_path / "d.dpk", {"w": enc})
    base = make_delta((37, 70), "bf16", seed=2, scale=0.05)
    base.view(torch.int16).numpy().tofile(tmp_path / "base.raw")
    r = subprocess.run([str(tmp_path / "capi"), str(tmp_path / "d.dpk"), "w", str(tmp_path / "base.raw"), "2",
                        str(tmp_path / "out.raw"), "0.5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = np.fromfile(tmp_path / "out.raw", dtype=np.uint16).reshape(37, 70)
    np.testing.assert_array_equal(got, bits(dp.apply(base, enc, alpha=0.5)))
    r = subprocess.run([str(tmp_path / "capi"), str(tmp_path / "d.dpk"), "nope", str(tmp_path / "base.raw"), "2",
                        str(tmp_path / "out.raw"), "1"], capture_output=True, text=True)
    assert r.returncode == 1 and "no tensor 'nope'" in r.stderr
