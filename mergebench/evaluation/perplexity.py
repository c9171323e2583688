"""Causal-LM perplexity on a local text file, token-weighted, with a sliding window.

A ``.jsonl`` file is documents (``text``), each scored on its own; any other file is one document (its
lines joined by newlines). Each token after a document's first is scored once, with up to ``window − 1``
tokens of context: windows advance by ``stride`` and score only the tokens the previous window did not
(the Hugging Face recipe). Perplexity = exp(Σ NLL / tokens scored).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mergebench.evaluation.progress import tracked
from mergebench.io.examples import read_examples
from mergebench.io.reading import read_text


class Perplexity:
    kind = "causal_lm"

    def __init__(self, path: Path, window: int | None = None, stride: int | None = None,
                 max_tokens: int | None = None, batch_size: int = 8):
        self.path, self.window, self.stride, self.max_tokens, self.batch_size = path, window, stride, max_tokens, \
            batch_size

    def documents(self) -> list[str]:
        if self.path.suffix == ".jsonl":
            return [example["text"] for example in read_examples(self.path)]
        return [read_text(self.path, "data file")]

    def __call__(self, model: torch.nn.Module, tokenizer: object) -> dict[str, float]:
        window = self.window or min(int(getattr(model.config, "max_position_embeddings", 1024) or 1024), 1024)
        stride = self.stride or max(1, window // 2)
        device = next(model.parameters()).device
        spans, scored = [], 0  # (document's tokens, begin, end, new), in order, up to max_tokens
        for text in self.documents():
            ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
            for begin, end, new in _windows(len(ids), window, stride):
                if self.max_tokens is not None and scored + new > self.max_tokens:
                    break
                spans.append((ids, begin, end, new))
                scored += new
        total = sum(_window_nll(model, spans, self.batch_size, device))
        return {"ppl": math.exp(total / scored) if scored else float("nan"), "ppl_tokens": float(scored)}


def _windows(length: int, window: int, stride: int):
    """(begin, end, tokens newly scored) per window; the first token of a document is never scored."""
    previous_end = 1
    for begin in range(0, max(length - 1, 1), stride):
        end = min(begin + window, length)
        if end > previous_end:
            yield begin, end, end - previous_end
            previous_end = end
        if end == length:
            break


def _window_nll(model: torch.nn.Module, spans: list[tuple[torch.Tensor, int, int, int]], batch_size: int,
                device: torch.device) -> list[float]:
    """Σ NLL of the last ``new`` tokens of each window; windows of one length (of any document) run in batches
    of ``batch_size``, without padding."""
    results = [0.0] * len(spans)
    by_length: dict[int, list[int]] = {}
    for i, (_, begin, end, _) in enumerate(spans):
        by_length.setdefault(end - begin, []).append(i)
    batches = [same[start:start + batch_size] for same in by_length.values()
               for start in range(0, len(same), batch_size)]
    for indices in tracked(batches, "perplexity"):
        inputs = torch.stack([spans[i][0][spans[i][1]:spans[i][2]] for i in indices]).to(device)
        logits = model(input_ids=inputs).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs[:, 1:].reshape(-1),
                                                reduction="none").reshape(len(indices), -1)
        for row, i in enumerate(indices):
            results[i] = float(nll[row, -spans[i][3]:].double().sum())
    return results
