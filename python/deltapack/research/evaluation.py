"""Metrics of a causal LM on examples (deltapack.lm): the loss and the exact-match accuracy of greedy decoding
over each example's answer. Used by the analysis, the pair builders and the benchmarks."""
from __future__ import annotations

import os

from ..lm import answer_logits, batches, examples_of, load_model


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
