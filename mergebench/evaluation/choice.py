"""Multiple-choice accuracy by log-likelihood, scored the way lm-evaluation-harness scores it.

A JSONL file of ``{"question": ..., "choices": [...], "answer": INDEX}``. Each choice is the continuation
``" " + choice`` of the question; its score is Σ log p(continuation tokens | question), the tokens being
those of the whole text after the question's own (lm-eval's ``_encode_pair``, trailing spaces of the
question moved to the continuation). ``mc_acc``: the highest score is the answer; ``mc_acc_norm``: the
highest score per character of the choice (lm-eval's ``acc_norm``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergebench.errors import MergebenchError
from mergebench.evaluation.progress import tracked
from mergebench.io.examples import read_examples


class MultipleChoice:
    kind = "causal_lm"

    def __init__(self, path: Path, delimiter: str = " "):
        self.path, self.delimiter = path, delimiter

    def __call__(self, model: torch.nn.Module, tokenizer: object) -> dict[str, float]:
        device = next(model.parameters()).device
        examples = read_examples(self.path, ("question", "choices", "answer"))
        right = right_norm = 0
        for number, example in tracked(list(enumerate(examples, 1)), "multiple choice"):
            choices, answer = example["choices"], example["answer"]
            if not (isinstance(choices, list) and choices and isinstance(answer, int) and 0 <= answer < len(choices)):
                raise MergebenchError(f"{self.path}: example {number}: 'choices' must be a list and 'answer' an index "
                                      f"into it")
            scores = [continuation_loglikelihood(model, tokenizer, example["question"], self.delimiter + str(choice),
                                                 device) for choice in choices]
            right += int(max(range(len(choices)), key=lambda i: scores[i]) == answer)
            right_norm += int(max(range(len(choices)), key=lambda i: scores[i] / len(str(choices[i]))) == answer)
        return {"mc_acc": right / len(examples), "mc_acc_norm": right_norm / len(examples)}


def continuation_loglikelihood(model: torch.nn.Module, tokenizer: object, context: str, continuation: str,
                               device: torch.device) -> float:
    """Σ log p(continuation | context) with lm-eval's split of the tokens between the two."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
    continuation_ids = whole[len(context_ids):]
    if not continuation_ids or not context_ids:
        raise MergebenchError(f"the continuation {continuation!r} of {context[:40]!r} has no tokens of its own")
    inputs = torch.tensor((context_ids + continuation_ids)[:-1], device=device).unsqueeze(0)
    logits = model(input_ids=inputs).logits[0, -len(continuation_ids):].float().log_softmax(-1)
    targets = torch.tensor(continuation_ids, device=device)
    return float(logits.gather(-1, targets.unsqueeze(-1)).double().sum())
