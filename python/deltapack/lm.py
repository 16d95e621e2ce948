"""A causal language model and the examples it is run on, as compress's data-aware steps (Fisher and
activation statistics, the refit of scales) and the research tools need them: a model directory loaded through
deltapack's own reader, JSONL examples (a prompt and its answer as token ids) and their batches."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .modeldir import Checkpoint
from .threads import bound_torch


def load_model(model_dir, dtype=None):
    """A transformers causal LM from a directory (f32 by default, for training and gradients; dtype="stored":
    bf16 when every floating weight is stored in bf16, else f32). The weights are read by deltapack's reader
    (pread, links only inside the directory; never a memory mapping, which a file truncated meanwhile would turn
    into SIGBUS) and handed to transformers as a state dict."""
    import torch
    import transformers

    bound_torch(torch)
    ck = Checkpoint(model_dir)
    if dtype == "stored":
        floats = {i.dtype for i in ck.tensors.values() if i.dtype in ("F64", "F32", "F16", "BF16")}
        dtype = torch.bfloat16 if floats == {"BF16"} else torch.float32
    state = {}
    for name, info in ck.tensors.items():
        t = torch.from_numpy(ck.read_tensor(name))
        state[name] = t.view(torch.bfloat16) if info.float_name == "bf16" else t
    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(os.fspath(model_dir))
        model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype or torch.float32,
                                           attn_implementation="eager")


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars while loading/saving these small models."""
    from transformers.utils import logging as tlog

    enabled = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            tlog.enable_progress_bar()


def pad_batch(seqs, pad: int = 0):
    """Right-padded input_ids (`pad` where a sequence has ended) and the attention mask."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


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
    """Normalise data: a pair (its `data` file), a JSONL path, or a list of examples or id lists -> a list of
    example dicts."""
    if isinstance(getattr(data, "data", None), (str, os.PathLike)):  # a model pair: its held-out data
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


def body_and_head(model):
    """(the transformer body, the output head) of a transformers causal LM that has them as `model` and
    `lm_head`, else (None, None): running the body alone skips the head's vocabulary-wide logits."""
    import torch

    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if isinstance(body, torch.nn.Module) and isinstance(head, torch.nn.Module):
        return body, head
    return None, None


def answer_logits(model, ids, mask, labels):
    """Next-token logits (f32) at the labelled positions only, their targets and the row of each: [N, V], [N],
    [N]. The output head runs on those positions alone, not on every token of the batch: for a 262k-token
    vocabulary (Gemma 3) that is most of a forward pass and gigabytes of logits saved."""
    import torch

    tgt = labels[:, 1:]
    keep = tgt != -100
    rows = keep.nonzero()[:, 0]
    body, head = body_and_head(model)
    if body is not None:
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        logits = head(hidden[keep]).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2's output soft cap, as its forward applies it
            logits = torch.tanh(logits / cap) * cap
    else:  # any other causal LM: the whole head, then the labelled positions
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()
    return logits, tgt[keep], rows
