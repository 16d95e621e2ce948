"""The CUDA sources build without a GPU (issue 22): the CUDA toolkit from PyPI (pinned below: nvcc 13.0) compiles
every .cu file for sm_80 and sm_90 with warnings as errors, and CMake builds and links the library with
DELTAPACK_CUDA=ON (static CUDA runtime) and runs cuda_check, which on a machine without a GPU checks the launch
arithmetic and the host emulation and reports that the kernels were built. The toolkit is installed once into
~/.cache/deltapack/cuda-toolkit; where PyPI cannot be reached the tests skip and say so."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The toolkit's pieces on PyPI, one CUDA release (nvidia-nvvm too: left free, pip takes the newest cicc, whose PTX
# the older ptxas rejects).
TOOLKIT = {"nvidia-cuda-nvcc": "13.0.88", "nvidia-nvvm": "13.0.88", "nvidia-cuda-runtime": "13.0.88",
           "nvidia-cuda-cccl": "13.0.85", "nvidia-cuda-crt": "13.0.88"}
CACHE = Path.home() / ".cache" / "deltapack" / "cuda-toolkit" / TOOLKIT["nvidia-cuda-nvcc"]
NVCC_FLAGS = ["-std=c++17", "--fmad=false", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
              "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]
NEEDS_TOOLS = pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("g++")), reason="cmake and g++ needed")


def pypi_toolkit() -> Path:
    """The toolkit's root (bin/nvcc, include, lib), installed from PyPI on first use."""
    root = CACHE / "nvidia" / "cu13"
    if not (root / "bin" / "nvcc").exists():
        staging = CACHE.with_name(CACHE.name + f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "--target", str(staging), *(f"{k}=={v}" for k, v in TOOLKIT.items())],
                           capture_output=True, text=True, timeout=900)
        if r.returncode:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.skip("the CUDA toolkit could not be installed from PyPI: " + (r.stderr or r.stdout)[-500:])
        shutil.rmtree(CACHE, ignore_errors=True)
        os.replace(staging, CACHE)
    return root


def toolkit_env(root: Path) -> dict:
    # nvcc appends its own directory to PATH: put the toolkit first, so another CUDA's ptxas is not taken.
    return {**os.environ, "PATH": f"{root / 'bin'}:{root / 'nvvm' / 'bin'}:{os.environ.get('PATH', '')}"}


@NEEDS_TOOLS
def test_every_cu_file_compiles_for_sm80_and_sm90_without_warnings(tmp_path):
    root = pypi_toolkit()
    sources = sorted((ROOT / "cpp" / "src").rglob("*.cu"))
    assert sources, "no CUDA sources"
    for src in sources:
        r = subprocess.run([str(root / "bin" / "nvcc"), *NVCC_FLAGS, "-I", str(ROOT / "cpp" / "include"),
                            "-I", str(ROOT / "cpp" / "src"), "-c", str(src), "-o", str(tmp_path / (src.stem + ".o"))],
                           capture_output=True, text=True, env=toolkit_env(root), timeout=900)
        assert r.returncode == 0, f"{src.name}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    # The flags do turn a warning into an error (a check that the check can fail).
    bad = tmp_path / "unused.cu"
    bad.write_text("__global__ void k(float* p) { int unused = 1; p[threadIdx.x] = 0.0f; }\n")
    r = subprocess.run([str(root / "bin" / "nvcc"), *NVCC_FLAGS, "-c", str(bad), "-o", str(tmp_path / "unused.o")],
                       capture_output=True, text=True, env=toolkit_env(root), timeout=900)
    assert r.returncode != 0 and "unused" in r.stdout + r.stderr


@NEEDS_TOOLS
def test_cmake_builds_links_and_checks_the_library_with_cuda(tmp_path):
    root = pypi_toolkit()
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    # The PyPI layout keeps the libraries in lib/ (CMake's FindCUDAToolkit looks in lib64/): named here.
    r = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                        "-DDELTAPACK_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}",
                        f"-DCUDAToolkit_ROOT={root}", f"-DCMAKE_CUDA_FLAGS=-L{root / 'lib'}",
                        f"-DCUDA_CUDART={root / 'lib' / 'libcudart.so.13'}",
                        f"-DCUDA_cudart_static_LIBRARY={root / 'lib' / 'libcudart_static.a'}",
                        "-DDELTAPACK_TESTS=ON", "-DDELTAPACK_EXAMPLES=ON"],
                       capture_output=True, text=True, env=toolkit_env(root), timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    r = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "cuda_check",
                        "deltapack-apply"], capture_output=True, text=True, env=toolkit_env(root), timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    r = subprocess.run([str(build / "cuda_check")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "cuda built: yes" in r.stdout and "cuda checks passed" in r.stdout, r.stdout
    # The static CUDA runtime: the programs run where no libcudart is installed.
    ldd = subprocess.run(["ldd", str(build / "deltapack-apply")], capture_output=True, text=True).stdout
    assert "cudart" not in ldd, ldd
