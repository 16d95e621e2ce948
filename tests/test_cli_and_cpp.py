"""The command line, and the C++ example application (no Python in the rebuild path)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import bits, make_delta
from safetensors import safe_open
from safetensors.torch import save_file

import deltapack as dp

APPLY_BIN = os.path.join(os.path.dirname(dp._core.__file__), "bin", "deltapack-apply")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "deltapack.cli", *args], capture_output=True, text=True)


def test_demo_runs_and_reports_every_codec():
    r = run_cli("demo", "--size", "256", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    codecs = {row["recipe"].split(":")[0] for row in out["results"]}
    assert codecs == set(dp.codec_names())
    for row in out["results"]:
        assert 0 < row["bits_per_param"] <= 16 and row["apply_gbps"] > 0
    dense = next(r for r in out["results"] if r["recipe"].startswith("dense"))
    assert dense["rel_error"] < 0.01 and dense["cosine"] > 0.9999


def test_info_and_errors(tmp_path):
    path = tmp_path / "d.dpk"
    dp.save(path, {"w": dp.encode(make_delta((16, 64)), "sign")}, metadata={"task": "x"})
    r = run_cli("info", str(path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["tensors"] == 1 and info["tensor_list"][0]["codec"] == "sign" and info["metadata"] == {"task": "x"}
    assert abs(info["bits_per_param"] - (16 * 8 + 4) * 8 / (16 * 64)) < 1e-9
    r = run_cli("info", str(tmp_path / "missing.dpk"))
    assert r.returncode == 1 and "missing.dpk" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "info" in r.stdout


@pytest.mark.skipif(not os.path.exists(APPLY_BIN), reason="C++ example not built")
def test_cpp_application_rebuilds_like_python(tmp_path):
    base = {"a.weight": make_delta((64, 96), "bf16", seed=1, scale=0.05),
            "b.weight": torch.from_numpy(make_delta((40, 33), "f32", seed=2, scale=0.05)),
            "c.bias": torch.from_numpy(make_delta((33,), "f16", seed=3, scale=0.05)),
            "untouched": torch.arange(10, dtype=torch.int64)}
    save_file(base, str(tmp_path / "base.safetensors"), metadata={"format": "pt"})
    deltas = {"a.weight": dp.encode(make_delta((64, 96), seed=4), "quant", bits=4),
              "b.weight": dp.encode(make_delta((40, 33), seed=5), "sparse", p=0.7),
              "c.bias": dp.encode(make_delta((33,), seed=6), "dense")}
    dp.save(tmp_path / "d.dpk", deltas)
    r = subprocess.run([APPLY_BIN, str(tmp_path / "base.safetensors"), str(tmp_path / "d.dpk"),
                        str(tmp_path / "out.safetensors"), "--alpha", "0.5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:  # an independent reader
        assert set(f.keys()) == set(base) and f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("untouched"), base["untouched"])
        for name, enc in deltas.items():
            want = dp.apply(base[name], enc, alpha=0.5)
            got = f.get_tensor(name)
            assert got.dtype == base[name].dtype
            np.testing.assert_array_equal(bits(got), bits(want))
    # Bad input: a delta naming a tensor the base lacks.
    dp.save(tmp_path / "e.dpk", {"zzz": deltas["c.bias"]})
    r = subprocess.run([APPLY_BIN, str(tmp_path / "base.safetensors"), str(tmp_path / "e.dpk"),
                        str(tmp_path / "o2.safetensors")], capture_output=True, text=True)
    assert r.returncode == 1 and "'zzz' is not in the base" in r.stderr
    assert not (tmp_path / "o2.safetensors").exists()
