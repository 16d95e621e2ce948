"""Evaluation data and metrics for causal LMs: JSONL examples (a prompt and its answer as token ids),
batches whose labels cover the answer, loss and exact-match accuracy, greedy generation. Used by the
analysis, calibration and the benchmarks on deltapack's own model pairs (deltapack.pairs) or any data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .pairs import EOS, Pair, decode_ids, encode_text, load_model, pad_batch


def read_data(path) -> list[dict]:
    """Examples from a JSONL file of {"input_ids": [...], optional "prompt_len"}; clear errors on bad lines."""
    path = Path(path)
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            ids = ex.get("input_ids") if isinstance(ex, dict) else None
            if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"{path}:{n}: expected {{\"input_ids\": [at least 2 non-negative ints]}}")
            plen = ex.get("prompt_len", 0)
            if not isinstance(plen, int) or not 0 <= plen < len(ids):
                raise ValueError(f"{path}:{n}: prompt_len must be an int in [0, {len(ids)})")
            out.append({"input_ids": ids, "prompt_len": plen})
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def examples_of(data) -> list[dict]:
    """Normalise data: a Pair, a JSONL path, or a list of examples/id lists -> list of example dicts."""
    if isinstance(data, Pair):
        return read_data(data.data)
    if isinstance(data, (str, os.PathLike)):
        return read_data(data)
    out = []
    for ex in data:
        if isinstance(ex, dict):
            out.append({"input_ids": list(ex["input_ids"]), "prompt_len": int(ex.get("prompt_len", 0))})
        else:
            out.append({"input_ids": list(ex), "prompt_len": 0})
    if not out:
        raise ValueError("no examples in data")
    return out


def batches(examples, batch_size: int = 64):
    """(input_ids, attention_mask, labels) batches; labels cover tokens after each example's prompt."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        ids, mask = pad_batch([e["input_ids"] for e in chunk])
        labels = ids.clone()
        labels[mask == 0] = -100
        for j, e in enumerate(chunk):
            labels[j, :e["prompt_len"]] = -100
        yield ids, mask, labels


def answer_logits(model, ids, mask, labels):
    """Next-token logits (f32) at the labelled positions only, their targets and the row of each: [N, V], [N],
    [N]. The output head runs on those positions alone, not on every token of the batch: for a 262k-token
    vocabulary (Gemma 3) that is most of a forward pass and gigabytes of logits saved."""
    import torch

    tgt = labels[:, 1:]
    keep = tgt != -100
    rows = keep.nonzero()[:, 0]
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if isinstance(body, torch.nn.Module) and isinstance(head, torch.nn.Module):
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        logits = head(hidden[keep]).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2's output soft cap, as its forward applies it
            logits = torch.tanh(logits / cap) * cap
    else:  # any other causal LM: the whole head, then the labelled positions
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()
    return logits, tgt[keep], rows


def answer_loss(model, ids, mask, labels):
    """Mean cross-entropy over the labelled positions (a training loss that runs the head on those only)."""
    import torch.nn.functional as F

    logits, tgt, _ = answer_logits(model, ids, mask, labels)
    return F.cross_entropy(logits, tgt)


def evaluate(model_or_dir, data, batch_size: int = 64) -> dict:
    """Held-out loss (mean cross-entropy over answer tokens) and exact-match accuracy by greedy decoding.

    Exact match under greedy decoding equals "the argmax at every answer position, teacher-forced, is the
    answer token" (greedy reproduces the answer iff each step's argmax is right given a right prefix), so
    one batched forward pass gives it. The answer includes its terminator ("\\n", or the model's end of turn),
    so a model that keeps writing digits is wrong. Examples without a prompt_len count only toward the loss.
    """
    import torch
    import torch.nn.functional as F

    model = load_model(model_or_dir) if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
    examples = examples_of(data)
    was_training = model.training
    model.eval()
    total, count, correct, scored = 0.0, 0, 0, 0
    with torch.no_grad():
        for (ids, mask, labels), start in zip(batches(examples, batch_size), range(0, len(examples), batch_size)):
            logits, tgt, rows = answer_logits(model, ids, mask, labels)
            total += float(F.cross_entropy(logits, tgt, reduction="sum"))
            count += len(tgt)
            wrong = torch.zeros(len(ids), dtype=torch.bool)
            wrong.index_fill_(0, rows[logits.argmax(-1) != tgt], True)
            for j, e in enumerate(examples[start:start + len(ids)]):
                if e["prompt_len"] > 0:
                    scored += 1
                    correct += int(not wrong[j])
    model.train(was_training)
    return {"loss": total / max(count, 1), "accuracy": correct / scored if scored else float("nan"),
            "n": len(examples), "tokens": count}


def generate(model_or_dir, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of a text prompt (for looking at what a model does)."""
    import torch

    model = load_model(model_or_dir) if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
    ids = torch.tensor([encode_text(prompt)])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) in (EOS, ord("\n")):
                break
    return decode_ids(ids[0, 1:].tolist())[len(prompt):]
