"""`deltapack compress | apply | verify | info` as a user runs them: exit codes, atomic writes, kills."""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import deltapack as dp

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "deltapack.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


def _write_model(path, tensors, shards=2):
    """A HF-style directory: tensors split over `shards` files + index.json + a config."""
    path.mkdir()
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        safetensors_torch.save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "bfloat16"}))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Synthetic bf16 base / fine-tune, big enough (2 x 256 MiB) that a run can be killed mid-way (compress
    reads at about 1 GB/s here; its progress bar must show a step between 0 and 100 %)."""
    root = tmp_path_factory.mktemp("cli")
    g = torch.Generator().manual_seed(0)
    base, ft = {}, {}
    for i in range(32):
        w = torch.randn(2048, 2048, generator=g) * 0.02
        base[f"model.layers.{i}.mlp.up_proj.weight"] = w.bfloat16()
        ft[f"model.layers.{i}.mlp.up_proj.weight"] = (w + torch.randn(2048, 2048, generator=g) * 1e-3).bfloat16()
        base[f"model.layers.{i}.norm.weight"] = torch.ones(2048).bfloat16()
        ft[f"model.layers.{i}.norm.weight"] = torch.ones(2048).bfloat16() + (1 if i == 3 else 0) / 64
    _write_model(root / "base", base)
    _write_model(root / "ft", ft)
    (root / "ft" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return root


def test_help_for_every_command():
    r = cli("--help")
    assert r.returncode == 0
    for cmd in ("demo", "info", "compress", "apply", "verify"):
        assert cmd in r.stdout
        h = cli(cmd, "--help")
        assert h.returncode == 0 and "usage: deltapack " + cmd in h.stdout
    assert cli("compress").returncode == 2  # usage error
    assert cli("apply", "a", "b").returncode == 2


def test_compress_info_apply_verify(pair, tmp_path):
    d = tmp_path / "d.dpk"
    r = cli("compress", pair / "base", pair / "ft", "-o", d, "--recipe", "*.mlp.*=sign:scope=row;*=sign",
            "--metadata", "task=toy", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["delta"], s["same"], s["new"]) == (33, 31, 0) and s["ratio"] > 10
    with safe_open(str(d), framework="pt") as f:  # a valid safetensors file
        assert "model.layers.0.mlp.up_proj.weight:signs" in f.keys()
    r = cli("info", d, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["metadata"] == {"task": "toy"} and info["tensors"] == 33
    assert info["checkpoint"]["unchanged"] == 31 and info["compression_ratio"] == pytest.approx(s["ratio"])
    assert info["base"]["tensors"] == 64
    row = next(t for t in info["tensor_list"] if t["name"] == "model.layers.3.norm.weight")
    assert row["codec"] == "dense" and row["op"] == "delta"
    r = cli("info", d)
    assert r.returncode == 0 and "compression ratio" in r.stdout and "kept files: config.json" in r.stdout
    r = cli("apply", pair / "base", d, "-o", tmp_path / "out", "--alpha", "0.5", "--dtype", "f32", "-q")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    with safe_open(str(tmp_path / "out" / "model-00001-of-00002.safetensors"), framework="pt") as f, \
            safe_open(str(pair / "base" / "model-00001-of-00002.safetensors"), framework="pt") as b:
        name = "model.layers.0.mlp.up_proj.weight"
        enc = dp.open(d)[name]
        want = dp.apply(b.get_tensor(name), enc, alpha=0.5, out=torch.empty(2048, 2048))
        assert f.get_tensor(name).dtype == torch.float32 and torch.equal(f.get_tensor(name), want)
    r = cli("apply", pair / "base", d, "-o", tmp_path / "out")
    assert r.returncode == 1 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = cli("verify", pair / "base", pair / "ft", d, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["tensors"]
    assert len(rows) == 64 and all(x["rel_error"] < 0.05 and x["delta_cosine"] > 0.7 for x in rows)
    r = cli("verify", pair / "base", pair / "ft", d, "--max-rel-error", "1e-4", "-q")
    assert r.returncode == 3 and "over threshold" in r.stdout
    r = cli("apply", pair / "ft", d, "-o", tmp_path / "out2")  # the wrong base
    assert r.returncode == 1 and "not the delta's base" in r.stderr and "model.layers.0.mlp.up_proj.weight" in r.stderr
    assert not (tmp_path / "out2").exists()
    assert cli("apply", pair / "ft", d, "-o", tmp_path / "out2", "--force", "-q", "--no-fsync").returncode == 0
    assert sorted(os.listdir(tmp_path / "out2")) == sorted(os.listdir(tmp_path / "out"))
    r = cli("compress", pair / "base", tmp_path / "nope", "-o", tmp_path / "e.dpk")
    assert r.returncode == 1 and "nope" in r.stderr and not (tmp_path / "e.dpk").exists()


def _start(args, cwd):
    # Every progress update printed (tqdm >= 4.66 reads TQDM_* defaults from the environment): by default tqdm
    # prints at most every 0.1 s, and a compress of the pair that took about that long showed only 0 and 100 %.
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="0")
    # A runner started in the background may have SIGINT ignored, and that is inherited: give the child
    # the default disposition, as an interactive user's process has, so Ctrl-C handling is what is tested.
    return subprocess.Popen([sys.executable, "-m", "deltapack.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_progress(proc, label):
    """Read the progress bar until it shows some work done (tqdm writes '\\r'-separated updates)."""
    buf = ""
    deadline = time.time() + 60
    while time.time() < deadline:
        ch = proc.stderr.read(1)
        if not ch:
            return False
        buf += ch
        if re.search(label + r":\s+([1-9]\d?)%", buf):
            return True
    return False


def _wait_for_partial_shard(proc, where):
    """Poll until the temporary output directory holds a partly written shard."""
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        for d in os.listdir(where):
            if d.startswith(".model.deltapack-tmp-"):
                try:
                    if any(os.path.getsize(os.path.join(where, d, f)) > 0 for f in os.listdir(os.path.join(where, d))):
                        return True
                except OSError:
                    pass
        time.sleep(0.002)
    return False


def _interrupt(proc, sig):
    """Freeze the process first (SIGSTOP), so it cannot finish between our check and the signal on a
    loaded machine; the signal is then delivered as it resumes."""
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_compress_and_apply_leave_nothing(pair, tmp_path, sig):
    out = tmp_path / "d.dpk"
    p = _start(["compress", pair / "base", pair / "ft", "-o", out, "--recipe", "sign"], tmp_path)
    started = _wait_for_progress(p, "compress")
    _interrupt(p, sig)
    rc = p.wait(30)
    assert started, "compress finished before it could be interrupted"
    assert rc == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    assert os.listdir(tmp_path) == []  # no final file, no temporary (unnamed O_TMPFILE) left
    assert cli("compress", pair / "base", pair / "ft", "-o", out, "-q").returncode == 0

    p = _start(["apply", pair / "base", out, "-o", tmp_path / "model", "--dtype", "f32"], tmp_path)
    started = _wait_for_partial_shard(p, tmp_path)
    _interrupt(p, sig)
    rc = p.wait(30)
    assert started and rc == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    assert not (tmp_path / "model").exists()
    left = sorted(os.listdir(tmp_path))
    assert "d.dpk" in left and all(x.startswith(".model.deltapack-tmp-") for x in left if x != "d.dpk")
    if sig == signal.SIGINT:
        assert left == ["d.dpk"]  # cleaned up on Ctrl-C
    r = cli("apply", pair / "base", out, "-o", tmp_path / "model", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["d.dpk", "model"]  # the killed run's leftovers removed
    assert cli("verify", pair / "base", pair / "ft", out, "-q").returncode == 0


def _limit_file_size(nbytes):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG, like a full disk
    return pre


def test_full_disk_is_a_clear_error(pair, tmp_path):
    out = tmp_path / "d.dpk"
    r = cli("compress", pair / "base", pair / "ft", "-o", out, "--recipe", "dense", "-q",
            preexec_fn=_limit_file_size(8 << 20))
    assert r.returncode == 1 and "disk full" in r.stderr and str(out) in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []
    assert cli("compress", pair / "base", pair / "ft", "-o", out, "-q").returncode == 0
    r = cli("apply", pair / "base", out, "-o", tmp_path / "model", "-q", preexec_fn=_limit_file_size(8 << 20))
    assert r.returncode == 1 and "disk full" in r.stderr
    assert os.listdir(tmp_path) == ["d.dpk"]


def test_bad_delta_file(tmp_path, pair):
    (tmp_path / "junk.dpk").write_bytes(b"\x10" + b"\x00" * 7 + b"{}" + b" " * 14)
    r = cli("apply", pair / "base", tmp_path / "junk.dpk", "-o", tmp_path / "m")
    assert r.returncode == 1 and "junk.dpk" in r.stderr and "Traceback" not in r.stderr
    x = np.ones((4, 8), np.float32)
    dp.save(tmp_path / "plain.dpk", {"w": dp.encode(x, "sign")})
    r = cli("apply", pair / "base", tmp_path / "plain.dpk", "-o", tmp_path / "m")
    assert r.returncode == 1 and "not a checkpoint delta" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["junk.dpk", "plain.dpk"]
