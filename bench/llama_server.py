"""llama.cpp's `llama-server`, built from the llama.cpp sources that the installed (pinned) llama-cpp-python ships,
and run on 127.0.0.1 for the server test (tests/test_llama_server.py) and bench_llamacpp.py.

    python bench/llama_server.py build          # once (about 10 minutes on 2 cores); prints the binary's path
    with Server(build(), "base.gguf", ["a.gguf", "b.gguf"]) as s:
        s.post("/completion", {"prompt": [1, 2, 3], "n_predict": 8, "lora": [{"id": 0, "scale": 1.0}]})

The sources come from PyPI as llama-cpp-python's source distribution (`pip download`), so the server and the
Python bindings run the same llama.cpp. The binary is cached under $DELTAPACK_CACHE/llama-server/VERSION (default
~/.cache/deltapack); nothing is downloaded at run time (the web UI is not built).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PACKAGE = "llama_cpp_python"
PINNED = "0.3.36"   # pyproject's test extra pins the same version
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_HTML=OFF", "-DGGML_NATIVE=ON"]


class Unavailable(RuntimeError):
    """The server cannot be built here (no build tools, or no source distribution to build from)."""


def version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return PINNED


def cache_dir() -> Path:
    return Path(os.environ.get("DELTAPACK_CACHE") or Path.home() / ".cache" / "deltapack") / "llama-server"


def missing_tools() -> str | None:
    """Why the server cannot be built here, or None."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (building llama-server needs cmake and a C++ compiler)"
    return None


def _run(cmd, log, cwd=None):
    with open(log, "ab") as fh:
        fh.write(f"$ {' '.join(map(str, cmd))}\n".encode())
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
    if rc:
        tail = Path(log).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed (exit {rc}); the end of {log}:\n{tail}")


def build(quiet: bool = True) -> Path:
    """The llama-server binary for the installed llama-cpp-python's version: from the cache, or built now."""
    ver = version()
    binary = cache_dir() / ver / "llama-server"
    if binary.exists():
        return binary
    why = missing_tools()
    if why:
        raise Unavailable(why)
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=binary.parent) as tmp:
        tmp = Path(tmp)
        log = tmp / "build.log"
        if not quiet:
            print(f"building llama-server {ver} (log: {log})", file=sys.stderr)
        try:
            _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", PACKAGE,
                  "--no-build-isolation", "-d", tmp, f"{PACKAGE}=={ver}"], log)
        except RuntimeError as ex:
            raise Unavailable(f"no source distribution of {PACKAGE}=={ver} ({ex})") from None
        sdist = next(tmp.glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp / "src", filter="data")
        src = next((tmp / "src").glob("*/vendor/llama.cpp"))
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", src, "-B", tmp / "build", *gen, *CMAKE_OPTIONS], log)
        _run(["cmake", "--build", tmp / "build", "--target", "llama-server", "-j", str(os.cpu_count() or 2)], log)
        staged = binary.with_suffix(".new")
        shutil.copy2(tmp / "build" / "bin" / "llama-server", staged)
        os.replace(staged, binary)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on the port: a new server could bind it (connections closed by the stopped server may
    linger in TIME_WAIT, which SO_REUSEADDR lets a listener ignore, as llama-server's own socket does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


class Server:
    """llama-server on 127.0.0.1 with a base model and LoRA adapters loaded at scale 0
    (--lora-init-without-apply: each request chooses its adapters). Stopped, and its port freed, however the
    `with` block ends."""

    def __init__(self, binary, model, loras=(), *, threads: int = 1, parallel: int = 2, ctx: int = 1024,
                 f32_cache: bool = True, extra=(), start_timeout: float = 120.0):
        self.cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "-t", str(threads), "-tb", str(threads),
                    "-np", str(parallel), "-c", str(ctx), "--no-webui", *map(str, extra)]
        for lora in loras:
            self.cmd += ["--lora", str(lora)]
        if loras:
            # The host-memory prompt cache (--cache-ram, 8 GiB by default) hands a slot the keys and values saved for
            # the same tokens under another adapter: with adapters chosen per request, answers came back computed
            # with the wrong one (3 runs in 4 of the server test). Off, each slot's own cache is cleared on a switch.
            self.cmd += ["--lora-init-without-apply", "--cache-ram", "0"]
        if f32_cache:   # as the tests' llama-cpp-python models: an f16 cache rounds attention inputs
            self.cmd += ["--cache-type-k", "f32", "--cache-type-v", "f32"]
        self.start_timeout, self.proc, self.port, self.log = start_timeout, None, None, None

    def __enter__(self):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd + ["--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if self.get("/health", timeout=2).get("status") == "ok":
                    return
            time.sleep(0.2)
        raise RuntimeError(f"llama-server not ready after {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log is not None and not self.log.closed:
            self.log.close()

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 300):
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as ex:
            raise RuntimeError(f"POST {path}: HTTP {ex.code}: {ex.read()[:2000]!r}") from None


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python bench/llama_server.py build")
    try:
        print(build(quiet=False))
    except Unavailable as ex:
        sys.exit(f"llama-server: {ex}")
