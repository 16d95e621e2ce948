"""Real base / fine-tune model pairs, built offline, deterministic and cached.

    pair = build_pair("llama", "tiny")          # or "qwen2", "mistral"; "tiny" (seconds) or "small" (minutes)
    pair.base, pair.ft                          # Hugging Face model directories (bf16 safetensors)
    pair.data                                   # held-out task examples, JSONL {"input_ids", "prompt_len", "text"}
    evaluate(pair.ft, pair)                     # {"loss": ..., "accuracy": ..., "n": ...}

A base model is a transformers config with random init, pretrained on text read from the local Python
installation (stdlib sources) and then on a skill in one format ("reverse abcde: edcba"); the fine-tune
learns the task in another format with an exact metric. Tasks (`build_pair(..., task=...)`):

- "reverse" (default): string reversal "abcde>edcba\\n", five letters, a few hundred steps; the base scores
  ~0 and the fine-tune ~1 (saturated: loss ~0.001, so it hides what an edit costs).
- "add": addition "347+89=436\\n" (a < 1000, b < 100); the base saw "347 plus 89 is 436" in pretraining.
  Fine-tuning stops once validation exact match reaches 0.75, so the fine-tune is not saturated and an
  edit's cost shows in accuracy.
- "reverse-light": reversal with a 6x smaller learning rate, stopped at 0.85: a small delta
  (‖ΔW‖/‖W‖ ≈ 0.03-0.05, like instruction tuning of 7B models) that is not saturated either.

Tokens are bytes: ids 0..255 are bytes, then BOS, EOS, PAD, so no tokenizer download is needed (a
byte-level tokenizer.json is written too when the `tokenizers` package exists).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..lm import pad_batch, quiet_transformers, read_data
from .evaluation import evaluate

BOS, EOS, PAD = 256, 257, 258
VOCAB = 260  # 256 bytes + BOS, EOS, PAD + one spare
BUILDER_VERSION = 5  # bump to invalidate cached pairs when the recipe below changes

ARCHS = ("llama", "qwen2", "mistral")
# Model shape, pretraining and fine-tuning schedule per size.
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=176, ctx=64,
                 text_steps=150, pre_steps=650, pre_lr=3e-3, pre_batch=32, ft_steps=300, ft_lr=1e-3, ft_batch=32,
                 n_eval=200),
    "small": dict(hidden=192, layers=4, heads=6, kv_heads=2, inter=512, ctx=64,
                  text_steps=200, pre_steps=700, pre_lr=1e-3, pre_batch=32, ft_steps=300, ft_lr=3e-4, ft_batch=32,
                  n_eval=400),
}


@dataclass(frozen=True)
class Pair:
    """A built pair: model directories, held-out data, task name and the metrics measured at build time."""

    base: Path
    ft: Path
    data: Path
    task: str
    arch: str
    size: str
    seed: int
    info: dict

    @property
    def root(self) -> Path:
        return self.ft.parent


# ---------------------------------------------------------------- tokenization (bytes)
def encode_text(text: str, bos: bool = True) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [BOS] + ids if bos else ids


def decode_ids(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- the tasks
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASK = "reverse"  # the default task


def _reverse_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(5))


def _addends(rng: random.Random) -> tuple[int, int]:
    return rng.randrange(1000), rng.randrange(100)


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: its exact-match format, the base's pretraining format of the same skill, and how
    the fine-tune is trained (learning rate x the size's, optional early stop at a validation accuracy)."""

    example: Callable[[random.Random], tuple[str, str]]  # (prompt, answer) in the fine-tune's format
    skill: Callable[[random.Random], tuple[str, str]]    # the same skill in the base's pretraining format
    lr_scale: float = 1.0
    stop_at: float | None = None   # stop once validation exact match reaches this (checked every 25 steps)
    max_steps_scale: float = 1.0   # x the size's ft_steps
    n_eval: int | None = None      # held-out examples (default: the size's)


def _rev_example(rng):
    w = _reverse_word(rng)
    return f"{w}>", f"{w[::-1]}\n"


def _rev_skill(rng):
    w = _reverse_word(rng)
    return f"reverse {w}: ", f"{w[::-1]}\n"


def _add_example(rng):
    a, b = _addends(rng)
    return f"{a}+{b}=", f"{a + b}\n"


def _add_skill(rng):
    a, b = _addends(rng)
    return f"{a} plus {b} is ", f"{a + b}\n"


TASKS = {
    "reverse": Task(_rev_example, _rev_skill),
    "add": Task(_add_example, _add_skill, lr_scale=10 / 3, stop_at=0.75, max_steps_scale=5, n_eval=1000),
    "reverse-light": Task(_rev_example, _rev_skill, lr_scale=1 / 6, stop_at=0.85, max_steps_scale=2, n_eval=1000),
}
STOP_EVERY = 25
N_VALIDATION = 200


def _task_examples(rng: random.Random, n: int, exclude: set | None = None, task: str = TASK):
    """n distinct (prompt, answer) pairs of `task`, none of them in `exclude`."""
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        p, a = TASKS[task].example(rng)
        if p in seen:
            continue
        seen.add(p)
        out.append((p, a))
    return out


def task_examples(pair: "Pair", n: int, seed: int = 12345) -> list[dict]:
    """n fresh task examples (not in the pair's held-out set), e.g. for calibration data."""

    held = {decode_ids(e["input_ids"][1:e["prompt_len"]]) for e in read_data(pair.data)}
    out = []
    for p, a in _task_examples(random.Random(seed), n, exclude=held, task=pair.task):
        ids, plen = _example_ids(p, a)
        out.append({"input_ids": ids, "prompt_len": plen})
    return out


def _example_ids(prompt: str, answer: str) -> tuple[list[int], int]:
    ids = encode_text(prompt)
    return ids + encode_text(answer, bos=False), len(ids)


# ---------------------------------------------------------------- pretraining text
def _stdlib_text(limit: int = 1 << 21) -> bytes:
    """Up to `limit` bytes of Python stdlib source (sorted file order, so deterministic per installation)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    text = b"".join(chunks)[:limit]
    if len(text) < 10_000:  # a stripped installation: fall back to a generated corpus
        rng = random.Random(0)
        words = ["def", "return", "self", "value", "list", "print", "import", "class", "for", "in", "if"]
        text = " ".join(rng.choice(words) for _ in range(200_000)).encode()
    return text


# ---------------------------------------------------------------- model
def make_config(arch: str, size: str = "tiny"):
    """A transformers config of the given architecture family and size (byte vocabulary)."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (known: {', '.join(SIZES)})")
    s = SIZES[size]
    common = dict(vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["inter"],
                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  num_key_value_heads=s["kv_heads"], max_position_embeddings=s["ctx"] * 2,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.02)
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":  # Qwen2 has q/k/v biases built in
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    return transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=s["ctx"] // 2)


def train_adamw(model, batches, steps: int, lr: float, seed: int, stop=None, loss_fn=None, stop_every=None):
    """AdamW with linear warmup/decay over `steps`; `batches(step)` gives (ids, mask, labels).
    loss_fn(model, ids, mask, labels): the loss (default: the model's own, over every position).
    stop(): checked every `stop_every` (STOP_EVERY) steps; True ends training early. Returns (last loss, steps
    run)."""
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warm, max(0.05, (steps - i) / max(1, steps - warm))))
    model.train()
    done = 0
    for step in range(steps):
        ids, mask, labels = batches(step)
        if loss_fn is None:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:
            loss = loss_fn(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if stop is not None and done % (stop_every or STOP_EVERY) == 0 and stop():
            break
    model.eval()
    return loss.item(), done


def round_to_bf16_(model):
    """Round the weights to bf16 in place (kept in f32), so what we train on equals what is saved."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def _save(model, path: Path):
    import torch

    with quiet_transformers():
        model.to(torch.bfloat16).save_pretrained(os.fspath(path))
    model.float()
    _write_tokenizer(path)


def _write_tokenizer(path: Path):
    """Byte-level tokenizer files (ids 0..255 = bytes, then <s>, </s>, <pad>), when `tokenizers` exists."""
    try:
        from tokenizers import Tokenizer, models, decoders, pre_tokenizers  # noqa: F401
    except ImportError:
        return
    # Plain WordLevel over single bytes via a byte-level split: every byte maps to its own id.
    vocab = {}
    # ByteLevel pre-tokenizer maps bytes to printable unicode chars; reuse its alphabet as the vocab.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    for b in range(256):
        vocab[byte_to_char[b]] = b
    assert set(vocab) == set(alphabet)
    vocab.update({"<s>": BOS, "</s>": EOS, "<pad>": PAD, "<unused>": VOCAB - 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    from tokenizers import processors
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    tok.save(os.fspath(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unused>", "add_bos_token": True, "model_max_length": 4096}, indent=1))


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# ---------------------------------------------------------------- build
def cache_root() -> Path:
    """Where built pairs are cached: $DELTAPACK_CACHE, else ~/.cache/deltapack."""
    return Path(os.environ.get("DELTAPACK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "deltapack"))


def default_cache_dir(arch: str, size: str, seed: int, task: str = TASK) -> Path:
    name = f"{arch}-{size}-{seed}" if task == TASK else f"{arch}-{size}-{task}-{seed}"
    return cache_root() / "pairs" / name


def _load_pair(root: Path) -> Pair | None:
    try:
        info = json.loads((root / "pair.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("builder_version") != BUILDER_VERSION:
        return None
    if not all((root / d / "model.safetensors").exists() for d in ("base", "ft")):
        return None
    return Pair(root / "base", root / "ft", root / "data.jsonl", info["task"], info["arch"], info["size"],
                info["seed"], info)


def build_pair(arch: str = "llama", size: str = "tiny", cache_dir=None, seed: int = 0,
               rebuild: bool = False, task: str = TASK) -> Pair:
    """Build (or load from cache) a base / fine-tune pair. Deterministic for (arch, size, seed, task).

    task: "reverse" (saturated), "add" or "reverse-light" (not saturated; see the module docs).
    cache_dir: the pair's own directory (default ~/.cache/deltapack/pairs/<arch>-<size>[-<task>]-<seed>, or
    under $DELTAPACK_CACHE). Built in a temporary sibling directory and renamed into place.
    """
    make_config(arch, size)  # validates arch and size before any work
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir(arch, size, seed, task)
    if not rebuild:
        pair = _load_pair(root)
        if pair is not None:
            return pair
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp", dir=root.parent))
    try:
        _build_into(tmp, arch, size, seed, task)
        if root.exists():
            old = root.with_name(root.name + f".old{os.getpid()}")
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished the same pair first: use theirs
            pair = _load_pair(root)
            if pair is None:
                raise
            return pair
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    pair = _load_pair(root)
    assert pair is not None
    return pair


def answer_batch(rows, pad=PAD):
    """(ids, mask, labels) for (ids, prompt_len) rows; loss on the tokens after each prompt."""
    ids, mask = pad_batch([r for r, _ in rows], pad)
    labels = ids.clone()
    labels[mask == 0] = -100
    for j, (_, plen) in enumerate(rows):
        labels[j, :plen] = -100
    return ids, mask, labels


def _build_into(out: Path, arch: str, size: str, seed: int, task: str = TASK):
    import torch
    import transformers

    s, t = SIZES[size], TASKS[task]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and polite on a shared machine
    try:
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(make_config(arch, size), dtype=torch.float32,
                                                              attn_implementation="eager")
        # Pretraining, like a real base model: first language modelling on stdlib source, then the task's skill
        # in another format ("reverse abcde: edcba", answer-only loss) mixed with more source text. The
        # fine-tune then mostly teaches the task's own format, which keeps the delta small next to the weights.
        text = _stdlib_text()
        rng = random.Random(seed * 1000 + 1)
        ctx = s["ctx"]

        def text_row():
            i = rng.randrange(len(text) - ctx)
            return [BOS] + list(text[i:i + ctx - 1]), 0

        def skill_row():
            p, a = t.skill(rng)
            prompt = encode_text(p)
            return prompt + encode_text(a, bos=False), len(prompt)

        def pre_batches(step):
            skill = step >= s["text_steps"]
            return answer_batch([skill_row() if skill and j % 8 else text_row() for j in range(s["pre_batch"])])

        pre_loss, _ = train_adamw(model, pre_batches, s["pre_steps"], s["pre_lr"], seed)
        round_to_bf16_(model)
        _save(model, out / "base")
        base_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

        # Held-out evaluation set and (for early stopping) a validation set, disjoint from each other and from
        # the training prompts by construction.
        drng = random.Random(seed * 1000 + 2)
        held = _task_examples(drng, t.n_eval or s["n_eval"], task=task)
        excluded = {p for p, _ in held}
        validation = []
        if t.stop_at is not None:
            for p, a in _task_examples(random.Random(seed * 1000 + 4), N_VALIDATION, exclude=excluded, task=task):
                ids, plen = _example_ids(p, a)
                validation.append({"input_ids": ids, "prompt_len": plen})
                excluded.add(p)
        with open(out / "data.jsonl", "w") as f:
            for p, a in held:
                ids, plen = _example_ids(p, a)
                f.write(json.dumps({"input_ids": ids, "prompt_len": plen, "text": p + a}) + "\n")

        # Fine-tuning: loss on the answer tokens only.
        frng = random.Random(seed * 1000 + 3)

        def ft_batches(step):
            rows = []
            for _ in range(s["ft_batch"]):
                while True:
                    p, a = t.example(frng)
                    if p not in excluded:
                        break
                rows.append(_example_ids(p, a))
            return answer_batch(rows)

        def reached_target():
            return evaluate(model, validation)["accuracy"] >= t.stop_at

        ft_loss, ft_steps = train_adamw(model, ft_batches, round(s["ft_steps"] * t.max_steps_scale),
                                        s["ft_lr"] * t.lr_scale, seed + 1, stop=reached_target if validation else None)
        round_to_bf16_(model)
        _save(model, out / "ft")

        examples = read_data(out / "data.jsonl")
        m_base = evaluate(out / "base", examples)
        m_ft = evaluate(out / "ft", examples)
        sq_delta = sum(float((v - base_weights[k]).double().pow(2).sum()) for k, v in model.state_dict().items())
        sq_base = sum(float(v.double().pow(2).sum()) for v in base_weights.values())
        info = {"builder_version": BUILDER_VERSION, "arch": arch, "size": size, "seed": seed, "task": task,
                "params": sum(p.numel() for p in model.parameters()), "pretrain_loss": pre_loss,
                "finetune_loss": ft_loss, "finetune_steps": ft_steps, "base_metrics": m_base, "ft_metrics": m_ft,
                "delta_rel_norm": math.sqrt(sq_delta / sq_base),
                "transformers": transformers.__version__, "torch": torch.__version__}
        (out / "pair.json").write_text(json.dumps(info, indent=1))
    finally:
        torch.set_num_threads(threads)
