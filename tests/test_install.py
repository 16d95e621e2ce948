"""The installed library, used the way another project would: tests/consumer/ built against (a) a
`cmake --install` tree, with find_package (CMake) and with pkg-config (a plain Makefile), and (b) an
installed wheel, through `python -m deltapack --cmake-dir` / `--pkgconfig-dir`. Each consumer rebuilds
tensors from a delta file and base written here with the Python API; the outputs must equal dp.apply's."""
import os
import shutil
import site
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import bits, make_delta
from test_kernels_native import NEEDS_TOOLS, ROOT, cmake_generator, native_build

import deltapack as dp

pytestmark = NEEDS_TOOLS
CONSUMER = os.path.join(ROOT, "tests", "consumer")
HAVE_PKG_CONFIG = bool(shutil.which("pkg-config") and shutil.which("make"))
_WHEEL = {}


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A base safetensors file and a delta (sign for a bf16 matrix, quant for an f16 one, dense for an f32 vector)."""
    import torch
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("consumer-inputs")
    base = {"w": make_delta((33, 90), "bf16", seed=21, scale=0.05),
            "h": torch.from_numpy(make_delta((16, 40), "f16", seed=22, scale=0.05)),
            "n": torch.from_numpy(make_delta((90,), seed=23, scale=0.05))}
    enc = {"w": dp.encode(make_delta((33, 90), seed=24), "sign", scope="row"),
           "h": dp.encode(make_delta((16, 40), seed=25), "quant", bits=4),
           "n": dp.encode(make_delta((90,), seed=26), "dense")}
    save_file(base, str(d / "base.safetensors"))
    dp.save(d / "delta.dpk", enc)
    want = {name: bits(dp.apply(base[name], enc[name], alpha=0.5)) for name in enc}
    return d, want


def check_consumer(exe, inputs, env=None):
    d, want = inputs
    for name, expected in want.items():
        out = d.parent / f"{os.path.basename(str(exe))}-{name}.raw"
        run([str(exe), str(d / "base.safetensors"), str(d / "delta.dpk"), name, str(out), "0.5"], env=env)
        np.testing.assert_array_equal(np.fromfile(out, dtype=expected.dtype), expected.ravel())
        out.unlink()
    r = subprocess.run([str(exe), str(d / "base.safetensors"), str(d / "delta.dpk"), "nope", str(d / "x.raw"), "1"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "no tensor 'nope'" in r.stderr


def build_cmake_consumer(build, *defines):
    run(["cmake", "-S", os.path.join(CONSUMER, "cmake"), "-B", str(build), *cmake_generator(), *defines])
    run(["cmake", "--build", str(build)])
    return build


def build_make_consumer(build, pkgconfig_dir):
    build.mkdir()
    env = dict(os.environ, PKG_CONFIG_PATH=str(pkgconfig_dir))
    run(["make", "-f", os.path.join(CONSUMER, "make", "Makefile")], cwd=build, env=env)
    return build / "apply_c"


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    """`cmake --install` of the session's build, then moved: every path in it must be relative."""
    top = tmp_path_factory.mktemp("install")
    run(["cmake", "--install", str(native_build(tmp_path_factory)), "--prefix", str(top / "first")])
    shutil.move(str(top / "first"), str(top / "moved"))
    return top / "moved"


def test_install_tree(prefix):
    lib = prefix / "lib"
    for path in ["include/deltapack/deltapack.h", "include/deltapack/deltapack_c.h", "lib/libdeltapack.a",
                 "lib/libdeltapack.so", "lib/cmake/deltapack/deltapackConfig.cmake",
                 "lib/cmake/deltapack/deltapackConfigVersion.cmake", "lib/pkgconfig/deltapack.pc", "bin/deltapack-apply"]:
        assert (prefix / path).exists(), path
    targets = (lib / "cmake" / "deltapack" / "deltapackTargets.cmake").read_text()
    assert "deltapack::deltapack" in targets and "deltapack::deltapack_shared" in targets
    assert "DELTAPACK_X86" not in targets and "DELTAPACK_ARM" not in targets  # ISA defines stay private
    assert str(prefix.parent / "first") not in targets + (lib / "pkgconfig" / "deltapack.pc").read_text()


def test_cmake_consumer_against_install(prefix, inputs, tmp_path):
    build = build_cmake_consumer(tmp_path / "b", f"-DCMAKE_PREFIX_PATH={prefix}")
    check_consumer(build / "apply_cpp", inputs)
    check_consumer(build / "apply_c", inputs)
    check_consumer(build / "apply_c_shared", inputs)
    ldd = run(["ldd", str(build / "apply_c_shared")])
    assert str(prefix / "lib" / "libdeltapack.so") in ldd  # really the shared library (an rpath CMake set)


@pytest.mark.skipif(not HAVE_PKG_CONFIG, reason="pkg-config and make needed (Debian: apt-get install pkg-config make)")
def test_make_consumer_with_pkg_config(prefix, inputs, tmp_path):
    exe = build_make_consumer(tmp_path / "b", prefix / "lib" / "pkgconfig")
    check_consumer(exe, inputs, env=dict(os.environ, LD_LIBRARY_PATH=str(prefix / "lib")))  # -ldeltapack: the .so


def wheel_site(tmp_path_factory):
    """The project's wheel (built once per session from a copy of the tree), installed into a directory.
    It is run with `python -S` and that directory first on PYTHONPATH: a development machine's editable
    install adds an import hook (a .pth file) that would shadow the wheel in a venv."""
    if "site" not in _WHEEL:
        try:  # the build requirements here: no download; else pip fetches them into an isolated build
            import nanobind  # noqa: F401
            import scikit_build_core  # noqa: F401
            isolation = ["--no-build-isolation"]
        except ImportError:
            isolation = []
        top = tmp_path_factory.mktemp("wheel")
        src = top / "src"
        shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n == ".git" or n.startswith("build")
                                                            or n in (".pytest_cache", "__pycache__")])
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(top / "dist"), "--no-deps",
                            *isolation, "-q"], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"the wheel does not build here: {r.stderr[-2000:]}")
        wheel = next((top / "dist").glob("deltapack-*.whl"))
        run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(top / "site"),
             str(wheel)])
        _WHEEL.update(site=top / "site", wheel=wheel)
    return _WHEEL


def wheel_python(site_dir, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site_dir), *site.getsitepackages()]))
    return run([sys.executable, "-S", "-m", "deltapack", *args], env=env, cwd=str(site_dir)).strip()


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    return wheel_site(tmp_path_factory)


def test_wheel_content_and_dirs(installed_wheel):
    names = set(zipfile.ZipFile(installed_wheel["wheel"]).namelist())
    for path in ["deltapack/include/deltapack/deltapack.h", "deltapack/include/deltapack/deltapack_c.h",
                 "deltapack/lib/libdeltapack.a", "deltapack/lib/cmake/deltapack/deltapackConfig.cmake",
                 "deltapack/lib/cmake/deltapack/deltapackConfigVersion.cmake",
                 "deltapack/lib/pkgconfig/deltapack.pc", "deltapack/bin/deltapack-apply"]:
        assert path in names, path
    package = installed_wheel["site"] / "deltapack"
    assert wheel_python(installed_wheel["site"], "--cmake-dir") == str(package / "lib" / "cmake" / "deltapack")
    assert wheel_python(installed_wheel["site"], "--include-dir") == str(package / "include")
    assert wheel_python(installed_wheel["site"], "--pkgconfig-dir") == str(package / "lib" / "pkgconfig")


def test_cmake_consumer_against_wheel(installed_wheel, inputs, tmp_path):
    cmake_dir = wheel_python(installed_wheel["site"], "--cmake-dir")
    build = build_cmake_consumer(tmp_path / "b", f"-Ddeltapack_DIR={cmake_dir}")
    assert not (build / "apply_c_shared").exists()  # the wheel ships the static library only
    check_consumer(build / "apply_cpp", inputs)
    check_consumer(build / "apply_c", inputs)


@pytest.mark.skipif(not HAVE_PKG_CONFIG, reason="pkg-config and make needed (Debian: apt-get install pkg-config make)")
def test_make_consumer_against_wheel(installed_wheel, inputs, tmp_path):
    exe = build_make_consumer(tmp_path / "b", wheel_python(installed_wheel["site"], "--pkgconfig-dir"))
    check_consumer(exe, inputs)


def test_python_m_deltapack_without_a_flag_is_the_cli():
    r = subprocess.run([sys.executable, "-m", "deltapack", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "compress" in r.stdout and "demo" in r.stdout
