import numpy as np
import pytest

import deltapack as dp

torch = pytest.importorskip("torch")


@pytest.fixture(params=dp.simd_available())
def simd_path(request):
    """Run the test once per SIMD path this machine has (forced, then restored)."""
    dp.set_simd(request.param)
    yield request.param
    dp.set_simd("auto")


def make_delta(shape, dtype="f32", seed=0, scale=1e-3):
    """A delta with the heavy-ish tails of real fine-tune deltas, as numpy f32/f16 or torch bf16."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(df=4, size=shape) * scale).astype(np.float32)
    if dtype == "f32":
        return x
    if dtype == "f16":
        return x.astype(np.float16)
    return torch.from_numpy(x).to(torch.bfloat16)


def exact_f32(x) -> np.ndarray:
    """The exact float32 values of a numpy/torch f32/f16/bf16 array."""
    if isinstance(x, torch.Tensor):
        return x.float().numpy()
    return np.asarray(x, dtype=np.float32)


def bits(x) -> np.ndarray:
    """Raw bit patterns of a float array (numpy or torch), for bit-exact comparison."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16)
        x = x.numpy()
    x = np.asarray(x)
    return x.view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize])


def tiny_llama_config(vocab=96, tie=False):
    """A Llama config small enough to build, save and run in milliseconds (checkpoint and bank tests)."""
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=tie)


def perturbed(model, seed, scale=2e-3, only=None):
    """`model` with N(0, scale) noise added in place to its parameters (those whose name holds `only`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return model


# A child's own peak RSS: Linux counts the RSS of the process that forks into the child's ru_maxrss when the
# child execs (and pytest is large), so commands run from this small launcher, which reports "maxrss status".
_LAUNCHER = ("import os, sys\n"
             "pid = os.fork()\n"
             "if pid == 0:\n"
             "    os.execvp(sys.argv[2], sys.argv[2:])\n"
             "_, status, ru = os.wait4(pid, 0)\n"
             "open(sys.argv[1], 'w').write(f'{ru.ru_maxrss} {status}')\n"
             "os._exit(0)\n")


def run_child(cmd, *, timeout, env=None, cwd=None, limits=None):
    """Runs `cmd` with stdin closed: (exit code, -N for death by signal N, None after `timeout` seconds; stdout;
    stderr; the command's own peak RSS in MiB; seconds). limits(): called in the child before anything runs
    (resource limits; they apply to the command too)."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    def pre():
        os.setsid()  # a process group of its own: a timeout kills the command with its launcher
        if limits is not None:
            limits()

    t0 = time.monotonic()
    with tempfile.TemporaryFile() as o, tempfile.TemporaryFile() as e, tempfile.NamedTemporaryFile("r") as report:
        p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, report.name, *map(str, cmd)], stdout=o, stderr=e,
                             stdin=subprocess.DEVNULL, env=env, cwd=cwd, preexec_fn=pre)
        try:
            p.wait(timeout)
            maxrss, status = map(int, report.read().split())
            rc = os.waitstatus_to_exitcode(status)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc, maxrss = None, 0
        o.seek(0)
        e.seek(0)
        return (rc, o.read().decode("utf-8", "replace"), e.read().decode("utf-8", "replace"), maxrss / 1024,
                time.monotonic() - t0)


def write_model_dir(path, tensors, config, shards=2):
    """A Hugging Face directory as transformers writes it: `shards` safetensors files (+ index when more than one),
    config.json and a tokenizer_config.json (a kept, non-weight file). tensors: name -> torch tensor."""
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(path)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        fname = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[k * per:(k + 1) * per]}
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"model_max_length": 64}, fh)
