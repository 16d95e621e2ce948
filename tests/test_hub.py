"""Hugging Face Hub ids on the command line, resolved in a local Hub cache made here (HF_HUB_OFFLINE=1: nothing is
downloaded), and the base a delta records so that `deltapack apply FILE -o OUT` finds it."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")
from conftest import perturbed, tiny_llama_config  # noqa: E402

import deltapack as dp  # noqa: E402
from deltapack import hub  # noqa: E402


def _cache_model(cache, repo, src, commit):
    """Put model directory `src` into a Hub cache as huggingface_hub lays it out: blobs named by hash, a snapshot
    of links to them, refs/main naming the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(os.listdir(src)):
        data = (src / f).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snap / f)
    return snap


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    base.save_pretrained(root / "src-base")
    perturbed(base, 1).save_pretrained(root / "src-ft")
    _cache_model(root / "cache", "org/base", root / "src-base", "a" * 40)
    _cache_model(root / "cache", "org/ft", root / "src-ft", "b" * 40)
    return root


def _cli(cache, *args, cwd):
    env = dict(os.environ, HF_HUB_CACHE=str(cache / "cache"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "deltapack", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_hub_ids_resolve_in_the_cache_and_apply_finds_the_recorded_base(cache, tmp_path):
    r = _cli(cache, "compress", "org/base", "org/ft@main", "-o", "d.dpk", "-q", "--recipe", "dense:dtype=f32",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert dp.open(tmp_path / "d.dpk").base["hub"] == {"id": "org/base", "revision": "a" * 40}
    r = _cli(cache, "apply", "d.dpk", "-o", "out", "-q", cwd=tmp_path)  # no BASE: the recorded one, from the cache
    assert r.returncode == 0, r.stderr
    r = _cli(cache, "apply", "org/base", "d.dpk", "-o", "out2", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in os.listdir(tmp_path / "out"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name
    want = transformers.AutoModelForCausalLM.from_pretrained(cache / "src-ft").state_dict()
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # exact delta: the ft
    r = _cli(cache, "verify", "org/base", "org/ft", "d.dpk", "-q", "--max-rel-error", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_missing_ids_and_unrecorded_bases_are_clear_errors(cache, tmp_path):
    r = _cli(cache, "compress", "org/nothere", "org/ft", "-o", "d.dpk", cwd=tmp_path)
    assert r.returncode == 2 and "no model org/nothere in the Hugging Face cache" in r.stderr
    assert "hf download org/nothere" in r.stderr and "Traceback" not in r.stderr
    r = _cli(cache, "compress", "org/base@" + "c" * 40, "org/ft", "-o", "d.dpk", cwd=tmp_path)
    assert r.returncode == 2 and "no model org/base@" + "c" * 40 in r.stderr
    # A delta made from plain directories names no base: apply without BASE says to give one.
    r = _cli(cache, "compress", cache / "src-base", cache / "src-ft", "-o", "plain.dpk", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "hub" not in dp.open(tmp_path / "plain.dpk").base
    r = _cli(cache, "apply", "plain.dpk", "-o", "out", cwd=tmp_path)
    assert r.returncode == 1 and "does not name its base" in r.stderr and "give BASE" in r.stderr
    # The recorded base gone from the cache.
    shutil.copy(cache / "cache" / "models--org--base" / "refs" / "main", tmp_path / "keep")
    r = _cli(cache, "compress", "org/base", "org/ft", "-o", "d.dpk", "-q", cwd=tmp_path)
    assert r.returncode == 0
    env_cache = tmp_path / "empty-cache"
    env_cache.mkdir()
    r = subprocess.run([sys.executable, "-m", "deltapack", "apply", "d.dpk", "-o", "out"], capture_output=True,
                       text=True, cwd=tmp_path, env=dict(os.environ, HF_HUB_CACHE=str(env_cache), HF_HUB_OFFLINE="1"))
    assert r.returncode == 1 and "was made from org/base@" + "a" * 40 in r.stderr and "give BASE" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["../../etc", "org/../x", "/abs", "a/b/c", "-x", ""])
def test_a_recorded_hub_id_is_checked_before_writing(cache, tmp_path, bad):
    """The writer refuses an id that is not one (the reader's check of the same schema: test_corruption)."""
    r = _cli(cache, "compress", "org/base", "org/ft", "-o", "d.dpk", "-q", cwd=tmp_path)
    assert r.returncode == 0
    f = dp.open(tmp_path / "d.dpk")
    tensors = {k: f[k] for k in f.keys()}
    base = dict(f.base, hub={"id": bad, "revision": "a" * 40})
    with pytest.raises(ValueError, match=r"base\.hub\.id .* is not a Hugging Face model id .*refused before writing"):
        dp.save(tmp_path / "bad.dpk", tensors, metadata=f.metadata, base=base)


def test_snapshot_of_names_cache_directories_only(tmp_path):
    assert hub.snapshot_of(f"/c/models--org--m-1/snapshots/{'0' * 40}") == {"id": "org/m-1", "revision": "0" * 40}
    assert hub.snapshot_of(f"/c/models--m/snapshots/{'0' * 40}/") == {"id": "m", "revision": "0" * 40}
    assert hub.snapshot_of("/c/models--org--m/snapshots/main") is None
    assert hub.snapshot_of(tmp_path) is None


def test_card_names_the_base_and_its_command_rebuilds_the_fine_tune(cache, tmp_path):
    """`deltapack card`: Hugging Face front matter with the base's id, the apply command (run here as written),
    the codecs as `info` lists them, the publisher's figures; -o never replaces another file."""
    import re

    r = _cli(cache, "compress", "org/base", "org/ft", "-o", "ft.dpk", "-q", "--recipe",
             "*.mlp.*=dense:dtype=f32;*=sign", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli(cache, "card", "ft.dpk", "-o", "README.md", "--quality", "task accuracy=0.61 (ft 0.63)", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "README.md").read_text()
    front = text.split("\n---\n")[0]
    assert "\nbase_model: org/base\n" in front and "\nlibrary_name: deltapack\n" in front
    assert "| task accuracy | 0.61 (ft 0.63) |" in text
    f = dp.open(tmp_path / "ft.dpk")
    codecs = {f.entry(k)[0] for k in f.keys()}
    rows = dict(re.findall(r"^\| `(\w+)[^`]*` \| (\d+) \|", text, re.M))
    assert set(rows) == codecs and sum(map(int, rows.values())) == len(f.keys())
    command = re.search(r"^deltapack apply (.*?) -o model", text, re.M).group(1).split()
    assert command == ["org/base", "ft.dpk"]
    r = _cli(cache, "apply", *command, "-o", "model", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model" / "model.safetensors").exists()

    r = _cli(cache, "card", "ft.dpk", "-o", "README.md", cwd=tmp_path)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = _cli(cache, "card", "ft.dpk", "-o", "README.md", "--overwrite", "--title", "Mine", cwd=tmp_path)
    assert r.returncode == 0 and "\n# Mine\n" in (tmp_path / "README.md").read_text()
    (tmp_path / "notes.md").write_text("my notes\n")
    r = _cli(cache, "card", "ft.dpk", "-o", "notes.md", "--overwrite", cwd=tmp_path)
    assert r.returncode == 1 and "not a card deltapack wrote" in r.stderr
    assert (tmp_path / "notes.md").read_text() == "my notes\n"
    r = _cli(cache, "card", "ft.dpk", "--quality", "oops", cwd=tmp_path)
    assert r.returncode == 1 and "expected METRIC=VALUE" in r.stderr
