"""A model card (README.md) for publishing a checkpoint delta: what it is a delta of, how to rebuild the
fine-tune, what is stored at what size, and the quality the publisher measured. Hugging Face reads the YAML
front matter (`base_model`, `library_name`, `tags`)."""
from __future__ import annotations

import json
import math
import os
from collections import Counter

from . import files
from .checkpoint import describe


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def model_card(path, quality: dict | None = None, title: str | None = None) -> str:
    """The card's Markdown for delta file `path`. quality: metric name -> value as measured by the publisher
    (e.g. {"gsm8k exact match": "0.52 (fine-tune 0.54, base 0.31)"}); nothing is measured here."""
    f = files.open(path)
    meta = f.metadata if isinstance(f.metadata, dict) else {}
    rec = meta.get("checkpoint")
    if not isinstance(rec, dict):
        raise ValueError(f"{path}: not a checkpoint delta (made by `deltapack compress`): a card describes one")
    name = title or os.path.splitext(os.path.basename(os.fspath(path)))[0]
    snap = (f.base or {}).get("hub")
    params = sum(math.prod(t["shape"]) for t in rec["tensors"].values())
    size = f.nbytes
    by_codec, stored = Counter(), Counter()
    for t in f.keys():
        codec, cparams, shape, _ = f.entry(t)
        label = codec + ("" if not cparams else ":" + ",".join(f"{k}={v}" for k, v in cparams.items()))
        by_codec[label] += 1
        stored[label] += math.prod(shape)
    ops = Counter(t["op"] for t in rec["tensors"].values())
    base_text = f"[{snap['id']}](https://huggingface.co/{snap['id']}) (revision `{snap['revision'][:12]}`)" if snap \
        else "its base model"
    base_arg = snap["id"] if snap else "BASE"
    lines = ["---"]
    if snap:
        lines.append(f"base_model: {snap['id']}")
    lines += ["library_name: deltapack", "tags:", "- deltapack", "- fine-tune-delta", "---", "", f"# {name}", "",
              f"A fine-tune of {base_text}, stored as a [deltapack](https://pypi.org/project/deltapack/) delta "
              f"(W_ft - W_base, compressed): {_mb(size)} for {params:,} parameters, "
              f"{8 * size / max(params, 1):.3f} bits per parameter"
              + (f", {rec['ft_bytes'] / size:.1f}x smaller than the fine-tune's {_mb(rec['ft_bytes'])}."
                 if rec.get("ft_bytes") else "."), "",
              "## Rebuild the fine-tune", "", "```sh", "pip install deltapack",
              f"deltapack apply {base_arg} {os.path.basename(os.fspath(path))} -o model   # a Hugging Face model "
              "directory", "```", ""]
    if snap:
        lines += ["With the base in the local Hugging Face cache, `deltapack apply "
                  f"{os.path.basename(os.fspath(path))} -o model` finds it by itself. ", ""]
    lines += ["## What is stored", "",
              f"{len(rec['tensors'])} tensors: {ops.get('delta', 0)} as deltas, {ops.get('same', 0)} unchanged "
              f"(not stored), {ops.get('new', 0) + ops.get('resized', 0)} new or resized.", "",
              "| codec | tensors | elements |", "|---|---|---|"]
    lines += [f"| `{label}` | {n} | {stored[label]:,} |" for label, n in by_codec.most_common()]
    budget = meta.get("budget")
    if isinstance(budget, dict) and "bits_per_param" in budget:
        lines += ["", f"Chosen per matrix by `deltapack compress --budget {budget['bits_per_param']}` (proxy "
                      f"{budget.get('proxy', '?')}" + (f", calibrated on {budget['data']['examples']} examples"
                                                        if isinstance(budget.get("data"), dict) else "") + ")."]
    kept = describe(f)
    if kept["files"]:
        shared = kept["files_from_base"]
        own = [n for n in kept["files"] if n not in shared]
        lines += ["", "Files: " + ", ".join(f"`{n}`" for n in own) + (" stored; " if own else "")
                  + ", ".join(f"`{n}`" for n in shared) + (" taken from the base (SHA-256 checked)." if shared else "")]
    if quality:
        lines += ["", "## Quality (as measured by the publisher)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in quality.items()]
    user = {k: v for k, v in meta.items() if k not in ("checkpoint", "budget", "peft", "calibration")}
    if user:
        lines += ["", "## Metadata", "", "```json", json.dumps(user, indent=1), "```"]
    return "\n".join(lines) + "\n"


def is_card(path) -> bool:
    """Whether `path` is a regular file (not a link) whose front matter says deltapack wrote it."""
    import stat

    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            return False
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    front = head.split("\n---\n", 1)[0] if head.startswith("---\n") else ""
    return "\nlibrary_name: deltapack\n" in front + "\n"
